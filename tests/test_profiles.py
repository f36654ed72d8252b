"""Profile arithmetic: ranges, CFG doubling, latent sizes, prompt chunks, validation messages.

Expected shapes are computed by hand from the rules (latent = pixels / 8; UNet batch = 2 x images with
CFG; text rows = 2 x images x chunks; sequence = 77 x chunks), not from the code's earlier output."""

from __future__ import annotations

import dataclasses

import pytest

from sdrt.engines import PROFILES_DIR, profile_names
from sdrt.export.profiles import (
    BuildProfile,
    Range,
    component_shapes,
    custom_profile,
    engine_shapes,
    load_profile,
    step_graph_shapes,
)
from sdrt.runtime.errors import CompatibilityError, InputError
from sdrt.runtime.manifest import ExportManifest

from .helpers.models import export_manifest


def test_range_parse_and_validation() -> None:
    assert Range.parse(512) == Range(512, 512, 512)
    assert Range.parse("256:512:1024") == Range(256, 512, 1024)
    assert Range.parse(" 7 ").is_static
    with pytest.raises(InputError, match="MIN <= OPT <= MAX"):
        Range.parse("512:256:1024", "--height")
    with pytest.raises(InputError, match="MIN <= OPT <= MAX"):
        Range.parse("256:1024:512")
    with pytest.raises(InputError, match="2 parts"):
        Range.parse("256:512")
    with pytest.raises(InputError, match="whole numbers"):
        Range.parse("a:b:c")
    with pytest.raises(InputError, match="at least 1"):
        Range.parse("0:1:2")


def test_shipped_profiles_load_and_cover_the_required_targets() -> None:
    names = profile_names()
    for required in ("sd15-512", "sd15-dynamic", "sd21-768", "sdxl-1024"):
        assert required in names
    for name in names:
        assert load_profile(name).name == name
    p = load_profile("sd15-512")
    assert p.is_static and p.cfg and p.family == "sd1" and (p.height, p.width) == (Range.static(512),) * 2
    d = load_profile("sd15-dynamic")
    assert not d.is_static and d.height == Range(256, 512, 1024) and d.width == Range(256, 512, 1024)
    assert load_profile("sd21-768").height == Range.static(768)
    assert load_profile("sdxl-1024").family == "sdxl"
    assert load_profile(PROFILES_DIR / "sd15-512.toml") == p


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(InputError, match="sd15-512"):
        load_profile("sd99")


def test_static_sd15_shapes_by_hand() -> None:
    shapes = engine_shapes(load_profile("sd15-512"), export_manifest())
    (ids,) = shapes["text_encoder"]
    assert ids.min == ids.opt == ids.max == (2, 77)  # prompt + negative prompt, one chunk
    sample, timestep, ehs = shapes["unet"]
    assert sample.min == sample.max == (2, 4, 64, 64)  # CFG doubles 1 image; 512 / 8 = 64
    assert timestep.max == (2,)
    assert ehs.max == (2, 77, 768)
    (lat,) = shapes["vae_decoder"]
    assert lat.max == (1, 4, 64, 64)  # the VAE decodes images, not CFG halves
    (img,) = shapes["vae_encoder"]
    assert img.max == (1, 512, 512, 3)


def test_dynamic_shapes_by_hand() -> None:
    prof = load_profile("sd15-dynamic")  # batch 1:1:4, 256:512:1024 px, chunks 1:1:3
    shapes = engine_shapes(prof, export_manifest())
    (ids,) = shapes["text_encoder"]
    assert (ids.min, ids.opt, ids.max) == ((2, 77), (2, 77), (2 * 4 * 3, 77))
    sample, _, ehs = shapes["unet"]
    assert (sample.min, sample.opt, sample.max) == ((2, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert (ehs.min, ehs.opt, ehs.max) == ((2, 77, 768), (2, 77, 768), (8, 231, 768))
    (img,) = shapes["vae_encoder"]
    assert (img.min, img.max) == ((1, 256, 256, 3), (4, 1024, 1024, 3))


def test_step_graph_shapes_by_hand() -> None:
    prof = load_profile("sd15-dynamic")  # batch 1:1:4, 256:512:1024 px
    lat, out, x0, noise = step_graph_shapes(prof, export_manifest(), guided=True)
    assert [s.name for s in (lat, out, x0, noise)] == ["latents", "unet_out", "x0_prev", "noise"]
    assert (lat.min, lat.opt, lat.max) == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
    assert (out.min, out.opt, out.max) == ((2, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert x0 == dataclasses.replace(lat, name="x0_prev") and noise == dataclasses.replace(lat, name="noise")
    # unguided, the UNet output has the images' rows; a non-square static profile
    _, out1, _, _ = step_graph_shapes(custom_profile(batch=2, height=512, width=768), export_manifest(), guided=False)
    assert out1.min == out1.max == (2, 4, 64, 96)


def test_no_cfg_keeps_the_batch() -> None:
    prof = custom_profile(batch="1:2:3", height=512, cfg=False)
    sample = component_shapes(prof, export_manifest(), "unet")[0]
    assert (sample.min[0], sample.opt[0], sample.max[0]) == (1, 2, 3)
    assert prof.cli_args()[-1] == "--no-cfg"


def test_sdxl_inputs_follow_the_unet_batch() -> None:
    shapes = engine_shapes(load_profile("sdxl-1024"), export_manifest("sdxl", 2048, sdxl=True))
    by_name = {s.name: s for s in shapes["unet"]}
    assert by_name["sample"].max == (2, 4, 128, 128)
    assert by_name["text_embeds"].max == (2, 1280)
    assert by_name["time_ids"].max == (2, 6)
    assert {s.name for s in shapes["text_encoder_2"]} == {"input_ids"}


def test_non_square_custom_profile() -> None:
    prof = custom_profile(batch=2, height=512, width=768)
    sample = component_shapes(prof, export_manifest(), "unet")[0]
    assert sample.max == (4, 4, 64, 96)
    assert prof.is_static


def test_validation_messages() -> None:
    m = export_manifest()
    with pytest.raises(InputError, match="multiple of 8"):
        engine_shapes(custom_profile(height=516), m)
    with pytest.raises(InputError, match="outside what the export supports"):
        engine_shapes(custom_profile(height="32:512:1024"), m)
    with pytest.raises(InputError, match="exceeds the export's limit"):
        engine_shapes(custom_profile(batch="1:1:64"), m)
    with pytest.raises(CompatibilityError, match="for sdxl models, but this export is sd1"):
        engine_shapes(load_profile("sdxl-1024"), m)


def test_profile_shapes_summary_checks_requests() -> None:
    s = load_profile("sd15-dynamic").shapes()
    s.check_request(batch=4, height=1024, width=256, chunks=3)
    with pytest.raises(InputError, match=r"height 1088 \(engines take 256..1024\)"):
        s.check_request(batch=1, height=1088, width=512)
    assert not s.static and "CFG" in s.describe()


def test_profile_from_toml_rejects_unknown_keys(tmp_path) -> None:
    from sdrt.runtime.errors import ArtifactError

    bad = tmp_path / "x.toml"
    bad.write_text('batch = 1\nheight = 512\nwidth = 512\nresolution = 3\n')
    with pytest.raises(ArtifactError, match="unknown keys"):
        load_profile(bad)
    assert isinstance(load_profile(PROFILES_DIR / "sd15-512.toml"), BuildProfile)


@pytest.mark.parametrize("profile", ["sd15-512", "sd15-dynamic", "sdxl-1024", "sdxl-dynamic"])
def test_controlnet_shapes_by_hand(tiny_controlnet_export, profile: str) -> None:
    """A ControlNet export's engines: the ControlNets and unet_control run on the UNet's (CFG-doubled) batch,
    the control image at pixel size, residuals at ceil(latent / 2^k)."""
    preset = "sdxl-tiny" if profile.startswith("sdxl") else "sd15-tiny"
    man = ExportManifest.read(tiny_controlnet_export(preset, "fp32", 2 if preset == "sd15-tiny" else 1))
    prof = load_profile(profile)
    shapes = engine_shapes(prof, man)
    rows = [2 * b for b in prof.batch.triple()]
    lat = [h // 8 for h in prof.height.triple()]
    cn = {s.name: s for s in shapes["controlnet_0"]}
    r = 13 if preset == "sd15-tiny" else 10
    for i, key in enumerate(("min", "opt", "max")):
        assert getattr(cn["sample"], key) == (rows[i], 4, lat[i], lat[i])
        assert getattr(cn["controlnet_cond"], key) == (rows[i], 8 * lat[i], 8 * lat[i], 3)
        assert getattr(cn["conditioning_scale"], key) == (rows[i], r)
        uc = {s.name: s for s in shapes["unet_control"]}
        deepest = 8 if preset == "sd15-tiny" else 4
        assert getattr(uc["controlnet_0_mid"], key) == (rows[i], 64, lat[i] // deepest, lat[i] // deepest)
        assert getattr(uc["controlnet_0_down_0"], key) == (rows[i], 32, lat[i], lat[i])
    # a latent size the downsampling does not divide: 520 px -> 65 -> 33 -> 17 -> 9 (ceil, as the convolutions)
    odd = {s.name: s for s in component_shapes(custom_profile(height=520, width=512), man, "unet_control")}
    names = [n for n in odd if n.startswith("controlnet_0_")]
    assert {odd[n].max[2] for n in names} == ({65, 33, 17, 9} if preset == "sd15-tiny" else {65, 33, 17})


def test_a_t5_range_from_toml_and_its_refusals(tmp_path) -> None:
    """``t5_tokens`` in a profile file: parsed as N or MIN:OPT:MAX, part of ``is_static``, recorded in the shapes
    and their summary, recreated by ``cli_args``; outside 2..512 (diffusers' max_sequence_length) refused naming
    the range, and on a family without T5 (SD 1.5) refused naming the key to drop."""
    f = tmp_path / "t5.toml"
    f.write_text('batch = 1\nheight = 512\nwidth = 512\nt5_tokens = "128:256:512"\n')
    prof = load_profile(f)
    assert prof.t5_tokens == Range(128, 256, 512) and not prof.is_static
    assert prof.shapes().t5_tokens == (128, 256, 512)
    assert "T5 tokens 128..512 (opt 256)" in prof.shapes().describe()
    assert prof.cli_args() == ["--batch", "1", "--height", "512", "--width", "512", "--chunks", "1",
                               "--t5-tokens", "128:256:512"]
    f.write_text('batch = 1\nheight = 512\nwidth = 512\nt5_tokens = 77\n')
    assert load_profile(f).t5_tokens == Range.static(77) and load_profile(f).is_static
    assert load_profile("sd3-dynamic").t5_tokens is None and load_profile("sd3-dynamic").shapes().t5_tokens is None
    for bad in ('"1:256:512"', "513", '"128:256:1024"'):
        f.write_text(f'batch = 1\nheight = 512\nwidth = 512\nt5_tokens = {bad}\n')
        with pytest.raises(InputError, match=r"t5_tokens \(--t5-tokens\) .* is outside 2\.\.512"):
            load_profile(f)
    with pytest.raises(InputError, match=r"--t5-tokens: .*MIN <= OPT <= MAX"):
        custom_profile(t5_tokens="512:256:128")
    with pytest.raises(InputError, match=r"SD 1\.x has no T5 encoder .*leave t5_tokens \(--t5-tokens\) out"):
        engine_shapes(custom_profile(t5_tokens=256), export_manifest())
