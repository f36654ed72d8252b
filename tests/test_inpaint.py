"""Inpainting pieces: the step graph variants against numpy, model detection, build shapes, paste-back
against diffusers' apply_overlay, and every bad input refused before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from sdrt.runtime import inpaint
from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.samplers import COLUMNS
from sdrt.runtime.step_graph import BLEND_COLUMNS, extra_graph_bytes, step_engine_name, step_graph_bytes

from .helpers.inputs import image_and_mask
from .helpers.pipelines import shared_pipeline


def _run(graph: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _base(rng: np.random.Generator, b: int, rows: int) -> dict[str, np.ndarray]:
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"latents": f(b, 4, 3, 5), "unet_out": f(rows, 4, 3, 5), "x0_prev": f(b, 4, 3, 5), "noise": f(b, 4, 3, 5)}


def test_blend_graph_against_numpy() -> None:
    rng = np.random.default_rng(0)
    feeds = _base(rng, 2, 4)
    coeffs = rng.uniform(-1, 1, len(COLUMNS) + len(BLEND_COLUMNS)).astype(np.float32)
    mask = (rng.uniform(size=(2, 1, 3, 5)) < 0.5).astype(np.float32)
    img, init_noise = (rng.standard_normal((2, 4, 3, 5)).astype(np.float32) for _ in range(2))
    out = _run(step_graph_bytes(True, np.float32, "blend"),
               {**feeds, "guidance": np.array(3.0, np.float32), "coeffs": coeffs, "mask": mask,
                "image_latents": img, "init_noise": init_noise})
    _, p, q, a, b, c, d, s_next, ka, kn = coeffs.astype(np.float64)
    u, cond = feeds["unet_out"][:2], feeds["unet_out"][2:]
    m = u + 3.0 * (cond - u)
    x0 = p * feeds["latents"] + q * m
    x_next = a * feeds["latents"] + b * x0 + c * feeds["x0_prev"] + d * feeds["noise"]
    x_next = (1 - mask) * (ka * img + kn * init_noise) + mask * x_next
    np.testing.assert_allclose(out["latents_next"], x_next, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["x0"], x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["unet_in_next"], np.concatenate([s_next * x_next] * 2), rtol=1e-5, atol=1e-5)


def test_concat_graph_appends_the_mask_block() -> None:
    rng = np.random.default_rng(1)
    feeds = _base(rng, 1, 1)
    coeffs = rng.uniform(-1, 1, len(COLUMNS)).astype(np.float32)
    extra = rng.standard_normal((1, 5, 3, 5)).astype(np.float32)
    out = _run(step_graph_bytes(False, np.float32, "concat"), {**feeds, "coeffs": coeffs, "unet_extra": extra})
    assert out["unet_in_next"].shape == (1, 9, 3, 5)
    np.testing.assert_allclose(out["unet_in_next"][:, :4], coeffs[-1] * out["latents_next"], rtol=1e-6)
    np.testing.assert_array_equal(out["unet_in_next"][:, 4:], extra)
    assert step_engine_name(True, "concat") == "sampler_step_cfg_concat"


def test_mask_binarized_and_downsampled_as_diffusers() -> None:
    import torch
    from diffusers.image_processor import VaeImageProcessor

    _, mask = image_and_mask()
    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    ref = proc.preprocess(mask, height=64, width=96)
    got = inpaint.binarize(inpaint.resize_mask(inpaint.check_mask(mask, mask), 64, 96))
    np.testing.assert_array_equal(got, ref[0, 0].numpy())
    assert 0 < got.mean() < 1
    lat = torch.nn.functional.interpolate(ref, size=(8, 12))
    np.testing.assert_array_equal(inpaint.latent_mask(got, 8, 2), lat.repeat(2, 1, 1, 1).numpy())


@pytest.mark.parametrize("blur", [0, 4])
def test_paste_back_is_apply_overlay(blur: int) -> None:
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    init, mask = image_and_mask(96, 64)
    generated = Image.fromarray(np.full((64, 96, 3), 30, np.uint8))
    proc = VaeImageProcessor()
    ref = proc.apply_overlay(proc.blur(mask, blur) if blur else mask, init, generated)
    got = inpaint.paste_back(generated, init, mask, blur)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    px = np.asarray(got)
    assert (px[32, 56] == 30).all()  # deep inside the repainted box: the generated pixels
    np.testing.assert_array_equal(px[60, 40], np.asarray(init)[60, 40])  # far outside: the original


@pytest.mark.parametrize("case", range(40))
def test_mask_crop_pieces_are_diffusers(case: int) -> None:
    """``padding_mask_crop``'s host pieces against diffusers' ``VaeImageProcessor`` on random boxes, sizes and
    paddings: ``get_crop_region``, ``preprocess(crops_coords=..., resize_mode="fill")``'s pixels (image and mask)
    and ``apply_overlay`` with ``crop_coords``."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    rng = np.random.default_rng(case)
    w, h = (int(v) for v in rng.integers(24, 160, 2))
    m = np.zeros((h, w), np.uint8)
    x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
    m[y:y + int(rng.integers(1, 40)), x:x + int(rng.integers(1, 40))] = int(rng.integers(1, 256))
    mask = Image.fromarray(m)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out_w, out_h = (8 * int(v) for v in rng.integers(4, 16, 2))
    pad = int(rng.integers(0, 40))
    proc = VaeImageProcessor(vae_scale_factor=8)
    masks = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    box = VaeImageProcessor.get_crop_region(mask, out_w, out_h, pad=pad)
    assert inpaint.crop_region(mask, out_w, out_h, pad) == box
    crop = inpaint.mask_crop(np.asarray(image), mask, out_h, out_w, pad)
    want = proc.preprocess(image, height=out_h, width=out_w, crops_coords=box, resize_mode="fill")
    np.testing.assert_array_equal(crop.init[0], ((want[0].permute(1, 2, 0).numpy() + 1) * 127.5).round())
    want_mask = masks.preprocess(mask, height=out_h, width=out_w, crops_coords=box, resize_mode="fill")[0, 0]
    np.testing.assert_array_equal(inpaint.binarize(crop.crop_mask), want_mask.numpy())
    generated = Image.fromarray(rng.integers(0, 256, (out_h, out_w, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(inpaint.overlay(generated, crop, None)),
                                  np.asarray(proc.apply_overlay(mask, image, generated, box)))
    # with paste_back's blur: apply_overlay through diffusers' blurred mask
    np.testing.assert_array_equal(np.asarray(inpaint.overlay(generated, crop, 3)),
                                  np.asarray(proc.apply_overlay(proc.blur(mask, 3), image, generated, box)))


def test_presets_and_detection() -> None:
    from sdrt.export.presets import PRESETS
    from sdrt.export.single_file import detect_preset

    from .helpers.ldm_layout import ldm_state_dict, meta_model

    for name in ("sd15-inpaint", "sd2-inpaint", "sdxl-inpaint", "sd15-inpaint-tiny", "sd2-inpaint-tiny",
                 "sdxl-inpaint-tiny"):
        assert PRESETS[name].unet["in_channels"] == 9
    for name in ("sd15-inpaint", "sd2-inpaint", "sdxl-inpaint", "sd15"):
        shapes = {k: tuple(v.shape) for k, v in ldm_state_dict(meta_model(name)).items()}
        assert shapes["model.diffusion_model.input_blocks.0.0.weight"][1] == PRESETS[name].unet["in_channels"]
        assert detect_preset(shapes).name == name


def test_diffusers_folder_with_nine_channels(tmp_path: Path) -> None:
    from sdrt.export.loading import load_model, random_model

    m = random_model("sd15-inpaint-tiny")
    for sub, mod in (("unet", m.unet), ("vae", m.vae), ("text_encoder", m.text_encoders[0])):
        mod.save_pretrained(tmp_path / sub)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(m.scheduler_config))
    (tmp_path / "model_index.json").write_text("{}")
    loaded = load_model(tmp_path)
    assert loaded.preset.name == "sd15-inpaint-custom"  # the inpainting base, not sd15
    assert loaded.preset.unet["in_channels"] == 9


def test_build_shapes_cover_a_nine_channel_unet() -> None:
    from dataclasses import replace

    from sdrt.export.profiles import load_profile, step_graph_modes, step_graph_shapes
    from sdrt.runtime.manifest import TensorSpec

    from .helpers.models import export_manifest

    plain = export_manifest()
    unet = plain.components["unet"]
    nine = replace(plain, components={**plain.components, "unet": replace(
        unet, inputs=(TensorSpec("sample", "float16", ("batch", 9, "height", "width")), *unet.inputs[1:]))})
    assert step_graph_modes(plain) == (None, "blend")
    assert step_graph_modes(nine) == ("concat",)
    prof = load_profile("sd15-dynamic")
    shapes = {s.name: s for s in step_graph_shapes(prof, nine, True, "concat")}
    assert shapes["unet_extra"].max == (8, 5, 128, 128) and shapes["unet_extra"].min == (2, 5, 32, 32)
    blend = {s.name: s for s in step_graph_shapes(prof, plain, False, "blend")}
    assert blend["mask"].opt == (1, 1, 64, 64) and blend["init_noise"].max == (4, 4, 128, 128)


# -- bad input, refused before any engine runs ---------------------------------------------------------------

@pytest.fixture
def no_engines(monkeypatch: pytest.MonkeyPatch):
    """Pipelines whose engines fail if run: every refusal below must come first."""
    def get(pipe: Pipeline) -> Pipeline:
        for name in list(pipe.engines):
            monkeypatch.setitem(pipe.engines, name, _Boom())
        return pipe
    return get


class _Boom:
    inputs: ClassVar[dict[str, object]] = {"sample": type("S", (), {"shape": (None, 4, None, None), "dtype": np.dtype(np.float32)})()}

    def __call__(self, *a: object, **k: object) -> None:
        raise AssertionError("an engine ran before the input was refused")


@pytest.fixture
def sd15(tiny_export) -> Pipeline:
    return shared_pipeline(tiny_export("sd15-tiny", "fp32"))


@pytest.fixture
def sd15_inpaint(tiny_export) -> Pipeline:
    return shared_pipeline(tiny_export("sd15-inpaint-tiny", "fp32"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask_image": "M"}, "mask_image needs the image to inpaint"),
    ({"image": "I", "mask_image": "small"}, r"mask_image is 60x40 but the image is 120x80"),
    ({"image": "I", "mask_image": "rgba"}, "mode RGBA"),
    ({"image": "I", "mask_image": np.zeros((80, 120), np.float32)}, "must be uint8"),
    ({"image": "I", "mask_image": [[0, 1]]}, "PIL image or a uint8 array"),
    ({"image": "I", "mask_image": "M", "paste_back": -1}, "blur radius from 0 to 256"),
    ({"image": "I", "paste_back": 4}, "paste_back applies to inpainting"),
    ({"image": "I", "mask_image": "M", "paste_back": 4, "output": "latents"}, "paste_back applies to inpainting"),
    ({"image": "I", "mask_image": "M", "guidance_rescale": 0.7}, "guidance_rescale with inpainting"),
    ({"image": "I", "mask_image": "M", "padding_mask_crop": -1}, "padding_mask_crop must be .* from 0 to 4096"),
    ({"image": "I", "mask_image": "M", "padding_mask_crop": 2.5}, "padding_mask_crop must be .* whole number"),
    ({"image": "I", "mask_image": "M", "padding_mask_crop": True}, "padding_mask_crop must be .* whole number"),
    ({"image": "I", "padding_mask_crop": 8}, "padding_mask_crop inpaints .* pass image= and mask_image="),
    ({"image": "I", "mask_image": "M", "padding_mask_crop": 8, "output": "latents"}, "with output='images'"),
    ({"image": "I", "mask_image": "black", "padding_mask_crop": 8}, "mask_image is all black"),
])
def test_bad_inputs(sd15: Pipeline, no_engines, kwargs: dict, message: str) -> None:
    img, mask = image_and_mask()
    subst = {"I": img, "M": mask, "small": mask.resize((60, 40)), "rgba": mask.convert("RGBA"),
             "black": mask.point(lambda v: 0)}
    kw = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    pipe = no_engines(sd15)
    with pytest.raises(InputError, match=message):
        pipe("a cat", steps=2, **kw)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image": "I", "padding_mask_crop": 8}, "padding_mask_crop inpaints .* pass image= and mask_image="),
    ({"image": "I", "mask_image": "M", "padding_mask_crop": -1}, "padding_mask_crop must be .* from 0 to 4096"),
    ({"image": "I", "mask_image": "black", "padding_mask_crop": 8}, "mask_image is all black"),
])
def test_staged_padding_mask_crop_bad_inputs(sd15: Pipeline, no_engines, kwargs: dict, message: str) -> None:
    """``prepare_latents(padding_mask_crop=)`` refuses what the call refuses, before any engine runs."""
    img, mask = image_and_mask()
    subst = {"I": img, "M": mask, "black": mask.point(lambda v: 0)}
    kw = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    pipe = no_engines(sd15)
    with pytest.raises(InputError, match=message):
        pipe.prepare_latents(pipe.plan("ddim", 2), 64, 96, seed=1, **kw)


def test_inpainting_model_needs_a_mask(sd15_inpaint: Pipeline) -> None:
    img, _ = image_and_mask()
    pipe = sd15_inpaint
    with pytest.raises(InputError, match="inpainting model"):
        pipe("a cat", steps=2)
    with pytest.raises(InputError, match="inpainting model"):
        pipe("a cat", steps=2, image=img)
    emb = pipe.encode_prompt("a cat", guided=False)
    plan = pipe.plan("ddim", 2)
    lat = pipe.prepare_latents(plan, 64, 64, seed=1)
    with pytest.raises(InputError, match="prepare the latents with image= and mask_image="):
        pipe.denoise(emb, lat, plan, guidance_scale=1.0)


def test_cli_mask_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main

    _, mask = image_and_mask()
    mask.save(tmp_path / "m.png")
    code = main(["generate", str(tmp_path), "--prompt", "x", "--mask", str(tmp_path / "m.png"),
                 "-o", str(tmp_path / "o.png")])
    assert code == 1 and "--mask needs the image to inpaint: pass --init-image" in capsys.readouterr().err
    code = main(["generate", str(tmp_path), "--prompt", "x", "--paste-back", "4", "-o", str(tmp_path / "o.png")])
    assert code == 1 and "--paste-back applies to inpainting" in capsys.readouterr().err
    code = main(["generate", str(tmp_path), "--prompt", "x", "--padding-mask-crop", "8", "-o", str(tmp_path / "o.png")])
    assert code == 1 and "--padding-mask-crop applies to inpainting" in capsys.readouterr().err
    code = main(["generate", str(tmp_path), "--prompt", "x", "--padding-mask-crop", "-3", "-o", str(tmp_path / "o.png")])
    assert code == 1 and "--padding-mask-crop must be a whole number of pixels from 0 to 4096" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_staged_inpaint_equals_the_call(sd15_inpaint: Pipeline) -> None:
    img, mask = image_and_mask()
    noise = np.random.default_rng(2).standard_normal((1, 4, 8, 12), dtype=np.float32)
    full = sd15_inpaint("a cat", image=img, mask_image=mask, height=64, width=96, steps=4, sampler="euler",
                        guidance_scale=4.0, latents=noise, output="latents").latents
    emb = sd15_inpaint.encode_prompt("a cat")
    plan = sd15_inpaint.plan("euler", 4)
    lat = sd15_inpaint.prepare_latents(plan, 64, 96, latents=noise, image=img, mask_image=mask)
    half = sd15_inpaint.denoise(emb, lat, plan, guidance_scale=4.0, end=0.5)
    done = sd15_inpaint.denoise(emb, half, plan, guidance_scale=4.0)
    np.testing.assert_allclose(sd15_inpaint.backend.to_host(done.x), full, atol=1e-5)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("src, dst", [("float32", "float16"), ("float16", "float16"), ("float32", "float32")])
def test_extra_channels_graph_against_numpy(guided: bool, src: str, dst: str) -> None:
    """[mask, masked latents]: the encoder's one row cast and repeated over the batch, rows doubled when guided."""
    rng = np.random.default_rng(3)
    mask = (rng.uniform(size=(3, 1, 4, 6)) < 0.5).astype(dst)
    masked = rng.standard_normal((1, 4, 4, 6)).astype(src)
    out = _run(extra_graph_bytes(guided, src, dst), {"mask": mask, "masked_latents": masked})["unet_extra"]
    want = np.concatenate([mask, np.repeat(masked.astype(dst), 3, axis=0)], axis=1)
    want = np.concatenate([want, want]) if guided else want
    assert out.dtype == np.dtype(dst) and np.array_equal(out, want)


@pytest.mark.parametrize("missing", ["image_noise", "unet_extra", "sampler_input"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_without_one_device_graph_is_an_error_naming_it(sd15_inpaint: Pipeline, missing: str,
                                                                   strength: float) -> None:
    """Each small graph a 9-channel inpainting call uses (the image's noising, the extra channels, the first
    UNet input) has no host path: a backend that cannot load it (a TensorRT folder without it) fails the call
    with an ArtifactError naming it, before the denoising loop; the image's noising is not needed at strength
    1 (the image is not encoded), so that call runs and gives the latents of a backend with every graph."""
    img, mask = image_and_mask()
    kw = {"image": img, "mask_image": mask, "height": 64, "width": 96, "steps": 3, "sampler": "dpmpp-2m",
          "guidance_scale": 4.0, "seed": 4, "batch_size": 2, "strength": strength, "output": "latents"}
    want = sd15_inpaint("a cat", **kw).latents
    pipe = sd15_inpaint
    pipe.device_graphs.clear()
    load, steps = pipe.backend.load, []

    def without(path: str | bytes, name: str, **kw: bool):
        if isinstance(path, bytes) and name.startswith(missing):
            raise ArtifactError(f"{name}: no prebuilt engine for this graph")
        return load(path, name, **kw)

    pipe.backend.load = without  # type: ignore[method-assign]
    try:
        if missing == "image_noise" and strength == 1.0:
            got = pipe("a cat", **kw).latents
            assert np.abs(want).max() > 0.1 and np.array_equal(got, want)
            return
        with pytest.raises(ArtifactError, match=f"on the device by the graph {missing}.*no prebuilt engine"):
            pipe("a cat", callback=lambda i, n: steps.append(i), **kw)
        assert steps == []  # refused before any step
    finally:
        pipe.backend.load = load  # type: ignore[method-assign]
        pipe.device_graphs.clear()


def test_cli_padding_mask_crop_is_the_call(tiny_export, tmp_path: Path) -> None:
    """``sdrt generate --init-image --mask --padding-mask-crop`` gives the Python call's image, at the image's size."""
    from PIL import Image

    from sdrt.cli import main

    from .helpers.inputs import box_mask

    folder = tiny_export("sd15-tiny", "fp32")
    image, _ = image_and_mask()
    mask = box_mask()
    image.save(tmp_path / "i.png")
    mask.save(tmp_path / "m.png")
    out = tmp_path / "o.png"
    assert main(["generate", str(folder), "--prompt", "a cat", "--steps", "3", "--seed", "2", "--backend", "ort-cpu",
                 "--init-image", str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"), "--height", "64",
                 "--width", "96", "--padding-mask-crop", "8", "-o", str(out)]) == 0
    want = shared_pipeline(folder)("a cat", steps=3, seed=2, image=image, mask_image=mask, height=64, width=96,
                                   padding_mask_crop=8).images[0]
    assert want.size == (120, 80)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
