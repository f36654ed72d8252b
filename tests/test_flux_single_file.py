"""FLUX.1 single files in Black Forest Labs' layout (``export/flux_single_file.py``).

The files are written here from the tiny presets' seeded modules by ``tests/helpers/flux_layout.py``, a
hand-written inverse of diffusers' converters; the first tests prove that inverse right (diffusers' own
converter gives every tensor back, bit for bit; the full-size layouts on meta tensors, names and shapes only).
Then: BFL's transformer file with ae.safetensors and the separate text encoders, and ComfyUI's all-in-one file,
load tensor for tensor and export to the images of the same weights' preset export (itself checked against
diffusers' FluxPipeline in tests/test_flux.py). Nothing is fetched and nothing is unpickled.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.export.flux_loading import is_flux_source, load_flux
from sdrt.export.flux_presets import FluxModules, build_modules, get_flux_preset
from sdrt.export.flux_single_file import detect_flux_preset, is_flux_file, load_flux_single_file, to_diffusers
from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .helpers.flux_layout import ae_file, bfl_file, comfy_file, transformer_to_bfl
from .helpers.pipelines import shared_pipeline
from .helpers.sd3_layout import encoder_file, write

TINY = ["flux-schnell-tiny", "flux-dev-tiny"]
PARTS = ("transformer", "clip", "t5", "vae")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load here must work with networking unavailable."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def seeded() -> dict[str, FluxModules]:
    """Seed 0: the weights of the ``flux_export`` fixture's preset exports."""
    return {name: build_modules(get_flux_preset(name), seed=0) for name in TINY}


@pytest.fixture(scope="module")
def files(seeded: dict[str, FluxModules], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per preset: BFL's transformer file, ae.safetensors, clip_l and t5xxl files, ComfyUI's all-in-one file
    (with and without T5)."""
    out = {}
    for name, mods in seeded.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = {
            "bfl": write(bfl_file(mods), folder / f"{name}.safetensors"),
            "ae": write(ae_file(mods.vae), folder / "ae.safetensors"),
            "clip_l": write(encoder_file(mods.clip), folder / "clip_l.safetensors"),
            "t5": write(encoder_file(mods.t5), folder / "t5xxl_fp16.safetensors"),
            "aio": write(comfy_file(mods), folder / f"{name}-aio.safetensors"),
            "aio_no_t5": write(comfy_file(mods, t5=False), folder / f"{name}-aio-no-t5.safetensors"),
        }
    return out


def separate(f: dict[str, Path]) -> dict[str, Path]:
    return {"clip_l": f["clip_l"], "t5": f["t5"], "vae": f["ae"]}


def assert_same_modules(want: FluxModules, got: FluxModules, cast: torch.dtype | None = None) -> None:
    """Every tensor equal, bit for bit (``cast``: the file held them rounded to that dtype), float32, eval."""
    for part in PARTS:
        w, g = getattr(want, part), getattr(got, part)
        sw, sg = w.state_dict(), g.state_dict()
        assert sw.keys() == sg.keys(), part
        for k, t in sw.items():
            assert sg[k].dtype == torch.float32, (part, k)
            expected = t.to(cast).float() if cast is not None else t
            assert torch.equal(sg[k], expected), f"{part}: {k} differs"
        assert not g.training, part


# --- the inverse layout, proved against diffusers' converters ------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_inverse_layout_round_trips_through_diffusers(seeded: dict[str, FluxModules], name: str) -> None:
    """BFL's names back to diffusers' through diffusers' converter (``to_diffusers`` lays the tiny width's fused
    linear1 out at the 3072-wide offsets that converter splits at); the VAE through its LDM converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    mods = seeded[name]
    sd = mods.transformer.state_dict()
    bfl = transformer_to_bfl(sd)
    assert ("guidance_in.in_layer.weight" in bfl) == (name == "flux-dev-tiny")
    back = to_diffusers(dict(bfl))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    vae = mods.vae.state_dict()
    vae_back = convert_ldm_vae_checkpoint(ae_file(mods.vae), dict(mods.vae.config))
    assert vae_back.keys() == vae.keys()
    assert all(torch.equal(vae_back[k], vae[k]) for k in vae)


def _meta_modules(name: str) -> FluxModules:
    """A full-size preset's modules on the meta device: names and shapes, no memory."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    p = get_flux_preset(name)
    with torch.device("meta"):
        return FluxModules(FluxTransformer2DModel(**p.config("transformer")),
                           CLIPTextModel(CLIPTextConfig(**p.config("clip"))),
                           T5EncoderModel(T5Config(**p.config("t5"))), AutoencoderKL(**p.config("vae")))


FULL = ["flux-schnell", "flux-dev", "flux-fill-dev", "flux-depth-dev"]
# diffusers' probe's name where it is not the preset's
PROBE = {"flux-fill-dev": "flux-fill", "flux-depth-dev": "flux-depth"}


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """Each full-size preset as a ComfyUI all-in-one file's names and shapes."""
    return {n: {k: tuple(v.shape) for k, v in comfy_file(_meta_modules(n)).items()} for n in FULL}


@pytest.mark.parametrize("name", FULL)
def test_full_size_layouts_detect_and_round_trip(name: str, full_shapes: dict) -> None:
    """The full-size layouts: diffusers' own probe names the variant as sdrt's detection does, and diffusers'
    converter (no width fitting at 3072) takes BFL's names back to the diffusers names and shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    shapes = full_shapes[name]
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert infer_diffusers_model_type(meta) == PROBE.get(name, name)
    view = {k.removeprefix("model.diffusion_model."): s for k, s in shapes.items()
            if k.startswith(("model.diffusion_model.", "vae."))}
    assert detect_flux_preset(view).name == name
    sd = _meta_modules(name).transformer.state_dict()
    back = convert_flux_transformer_checkpoint_to_diffusers(
        {k: v for k, v in meta.items() if k.startswith("model.diffusion_model.")})
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_separate_files_load_the_seeded_modules(seeded: dict, files: dict, name: str) -> None:
    """BFL's transformer file with ae.safetensors, clip_l and t5xxl: [schnell] or [dev] told by guidance_in,
    with its scheduler."""
    f = files[name]
    assert is_flux_file(f["bfl"]) and is_flux_source(f["bfl"], None)
    got = load_flux(f["bfl"], **separate(f))
    assert got.preset.name == name
    assert got.scheduler_config == get_flux_preset(name).scheduler
    assert got.scheduler_config["use_dynamic_shifting"] == (name == "flux-dev-tiny")
    assert got.tokenizer_dirs == (None, None)  # the tiny presets: the shipped tokenizers
    assert got.source["kind"] == "single_file" and got.source["vae"] == str(f["ae"])
    assert got.source["t5xxl"] == str(f["t5"])
    assert_same_modules(seeded[name], got.modules)


def test_all_in_one_file(seeded: dict, files: dict) -> None:
    """ComfyUI's checkpoint bundling everything; one without T5, completed by --t5."""
    f = files["flux-dev-tiny"]
    got = load_flux_single_file(f["aio"])
    assert got.preset.name == "flux-dev-tiny" and "vae" not in got.source
    assert_same_modules(seeded["flux-dev-tiny"], got.modules)
    assert_same_modules(seeded["flux-dev-tiny"], load_flux_single_file(f["aio_no_t5"], t5=f["t5"]).modules)


def test_bf16_file_loads_as_fp32(seeded: dict, files: dict, tmp_path: Path) -> None:
    """BFL publishes bf16 files."""
    mods = seeded["flux-schnell-tiny"]
    path = write(comfy_file(mods), tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    assert_same_modules(mods, load_flux_single_file(path).modules, cast=torch.bfloat16)


def test_export_gives_the_preset_images(files: dict, tmp_path: Path, flux_export) -> None:
    """``sdrt export --model flux1-dev.safetensors --clip-l --t5 --vae`` and the export of the same (seeded)
    weights from the preset generate images within 1/255."""
    from sdrt.runtime.manifest import ExportManifest

    f = files["flux-dev-tiny"]
    out = tmp_path / "file"
    argv = ["export", "--model", str(f["bfl"]), "--out", str(out), "--clip-l", str(f["clip_l"]),
            "--t5", str(f["t5"]), "--vae", str(f["ae"])]
    assert main(argv) == 0
    manifest = ExportManifest.read(out)
    assert manifest.preset == "flux-dev-tiny" and manifest.source["kind"] == "single_file"
    assert manifest.source["guidance_embeds"] is True
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 12), dtype=np.float32)
    images = []
    for folder in (flux_export("flux-dev-tiny"), out):
        res = shared_pipeline(folder)("a red fox in the snow", height=64, width=96, steps=3, guidance_scale=3.5,
                                      latents=latents)
        images.append(np.asarray(res.images[0]).astype(np.int32))
    assert images[0].std() > 5
    assert int(np.abs(images[0] - images[1]).max()) <= 1


# --- refusals, before any work ---------------------------------------------------------------------


def test_missing_parts_name_the_flags(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = files["flux-schnell-tiny"]
    with pytest.raises(InputError, match=r"holds no VAE and no CLIP-L text encoder and no T5-XXL text encoder; "
                                         r"pass them as separate files: --vae FILE --clip-l FILE --t5 FILE "
                                         r"\(--vae: Black Forest Labs' ae.safetensors"):
        load_flux_single_file(f["bfl"])
    with pytest.raises(InputError, match=r"holds no T5-XXL text encoder; pass it as separate files: --t5 FILE"):
        load_flux_single_file(f["bfl"], clip_l=f["clip_l"], vae=f["ae"])
    assert main(["export", "--model", str(f["bfl"]), "--out", str(tmp_path / "o"), "--vae", str(f["ae"])]) == 1
    assert "--clip-l FILE --t5 FILE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_wrong_files_for_their_flags(files: dict) -> None:
    f = files["flux-schnell-tiny"]
    with pytest.raises(InputError, match=r"--clip-l .*not a CLIP-L text encoder in transformers' layout"):
        load_flux_single_file(f["bfl"], **{**separate(f), "clip_l": f["t5"]})
    with pytest.raises(InputError, match=r"--vae .*not a VAE in LDM's layout .*ae.safetensors"):
        load_flux_single_file(f["bfl"], **{**separate(f), "vae": f["clip_l"]})


def test_files_of_other_models(files: dict, seeded: dict, tmp_path: Path) -> None:
    """Another family's file, and Chroma (diffusers' probe names it) are refused from their headers."""
    sd1 = write({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                 "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "sd1.safetensors")
    assert not is_flux_file(sd1) and not is_flux_source(sd1, None)
    with pytest.raises(ArtifactError, match=r"not a FLUX.1 single file: it has no double_blocks"):
        load_flux_single_file(sd1)
    chroma = bfl_file(seeded["flux-dev-tiny"])
    chroma["distilled_guidance_layer.in_proj.bias"] = torch.zeros(16)  # Chroma's guidance approximator
    path = write(chroma, tmp_path / "chroma.safetensors")
    assert is_flux_file(path)
    with pytest.raises(InputError, match=r"is a chroma model \(as diffusers' single-file probe names it\), "
                                         r"not FLUX.1 \[schnell\], \[dev\], Fill, Depth or Canny"):
        load_flux_single_file(path, **separate(files["flux-dev-tiny"]))


def test_fill_file_exports_the_fill_preset_images(tmp_path: Path, flux_export) -> None:
    """FLUX.1 Fill's file (``img_in`` takes 384 channels: diffusers' probe names it flux-fill), here ComfyUI's
    all-in-one layout, is detected from its shapes and exports to the images of the Fill preset's export of the
    same weights (itself checked against FluxFillPipeline in tests/test_flux_fill.py), within 1/255."""
    from sdrt.runtime.manifest import ExportManifest

    from .helpers.inputs import image_and_mask

    mods = build_modules(get_flux_preset("flux-fill-dev-tiny"), seed=0)
    path = write(comfy_file(mods), tmp_path / "flux1-fill-dev.safetensors")
    assert detect_flux_preset({k.removeprefix("model.diffusion_model."): tuple(v.shape)
                               for k, v in comfy_file(mods).items()
                               if k.startswith(("model.diffusion_model.", "vae."))}).name == "flux-fill-dev-tiny"
    with pytest.raises(InputError, match=r"--arch flux-dev-tiny does not fit .*\(it fits flux-fill-dev-tiny\): "
                                         r"latent channels in 384 in the file, 64 in flux-dev-tiny"):
        load_flux_single_file(path, arch="flux-dev-tiny")
    out = tmp_path / "fill"
    assert main(["export", "--model", str(path), "--out", str(out)]) == 0
    manifest = ExportManifest.read(out)
    assert manifest.preset == "flux-fill-dev-tiny" and "vae_encoder_masked" in manifest.components
    image, mask = image_and_mask(w=64, h=64)
    latents = np.random.default_rng(2).standard_normal((1, 16, 8, 8), dtype=np.float32)
    images = [np.asarray(shared_pipeline(folder)("a red fox", image=image, mask_image=mask, steps=2,
                                                 guidance_scale=30.0, latents=latents).images[0]).astype(np.int32)
              for folder in (flux_export("flux-fill-dev-tiny"), out)]
    assert images[0].std() > 5
    assert int(np.abs(images[0] - images[1]).max()) <= 1


def test_depth_file_exports_the_depth_preset_images(tmp_path: Path, flux_export) -> None:
    """FLUX.1 Depth's file (``img_in`` takes 128 channels: diffusers' probe names it flux-depth), ComfyUI's
    all-in-one layout, is detected as Depth (Canny's file has the same shapes: ``--arch`` names it) and exports to
    the images of the Depth preset's export of the same weights (itself checked against FluxControlPipeline in
    tests/test_flux_control.py), within 1/255."""
    from sdrt.runtime.manifest import ExportManifest

    from .helpers.inputs import control_image

    mods = build_modules(get_flux_preset("flux-depth-dev-tiny"), seed=0)
    path = write(comfy_file(mods), tmp_path / "flux1-depth-dev.safetensors")
    shapes = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in comfy_file(mods).items()
              if k.startswith(("model.diffusion_model.", "vae."))}
    assert detect_flux_preset(shapes).name == "flux-depth-dev-tiny"
    assert detect_flux_preset(shapes, arch="flux-canny-dev-tiny").name == "flux-canny-dev-tiny"
    with pytest.raises(InputError, match=r"--arch flux-dev-tiny does not fit .*\(it fits flux-depth-dev-tiny, "
                                         r"flux-canny-dev-tiny\): latent channels in 128 in the file, 64 in "):
        load_flux_single_file(path, arch="flux-dev-tiny")
    out = tmp_path / "depth"
    assert main(["export", "--model", str(path), "--out", str(out)]) == 0
    manifest = ExportManifest.read(out)
    assert manifest.preset == "flux-depth-dev-tiny" and manifest.source["variant"] == "control"
    control = control_image(3, w=64, h=64)
    latents = np.random.default_rng(2).standard_normal((1, 16, 8, 8), dtype=np.float32)
    images = [np.asarray(shared_pipeline(folder)("a red fox", control_images=[control], steps=2,
                                                 guidance_scale=10.0, latents=latents).images[0]).astype(np.int32)
              for folder in (flux_export("flux-depth-dev-tiny"), out)]
    assert images[0].std() > 5
    assert int(np.abs(images[0] - images[1]).max()) <= 1


def test_shapes_no_preset_has_and_arch(files: dict, seeded: dict, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    f = files["flux-dev-tiny"]
    # Kontext has [dev]'s shapes: a file of them fits both
    with pytest.raises(InputError, match=r"--arch flux-schnell-tiny does not fit .*\(it fits flux-dev-tiny, "
                                         r"flux-kontext-dev-tiny\): guidance embedding True in the file, False in "
                                         r"flux-schnell-tiny"):
        load_flux_single_file(f["bfl"], arch="flux-schnell-tiny", **separate(f))
    deeper = FluxTransformer2DModel(**{**get_flux_preset("flux-dev-tiny").config("transformer"), "num_layers": 2})
    path = write(transformer_to_bfl(deeper.state_dict()), tmp_path / "deeper.safetensors")
    with pytest.raises(ArtifactError, match=r"a FLUX.1 file of an architecture no shipped preset has; closest is "
                                            r"flux-dev-tiny: double blocks 2 in the file, 1 in flux-dev-tiny"):
        load_flux_single_file(path, **separate(f))


def test_pickles_and_scaled_fp8_are_refused_unread(files: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def unpickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", unpickle)
    f = files["flux-schnell-tiny"]
    (tmp_path / "t5xxl.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(UnsafeCheckpointError, match=r"--t5 t5xxl.bin is a pickled file.*\.safetensors"):
        load_flux_single_file(f["bfl"], **{**separate(f), "t5": tmp_path / "t5xxl.bin"})
    scaled = write({**encoder_file(build_modules(get_flux_preset("flux-schnell-tiny")).t5),
                    "scaled_fp8": torch.zeros(0)}, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    with pytest.raises(InputError, match=r"--t5 t5xxl_fp8_e4m3fn_scaled.safetensors is a scaled fp8 file"):
        load_flux_single_file(f["bfl"], **{**separate(f), "t5": scaled})


def test_full_size_t5_needs_tokenizers(full_shapes: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the tiny presets' T5 tokenizer ships: a real file needs --tokenizers; refused from the header alone,
    before any tensor is read."""
    from sdrt.export import flux_single_file as sf

    monkeypatch.setattr(sf, "safetensors_shapes", lambda path, what, why: full_shapes["flux-dev"])
    monkeypatch.setattr(sf, "read_tensors", lambda *a: pytest.fail("read before the refusal"))
    with pytest.raises(InputError, match=r"pass --tokenizers DIR, a diffusers FLUX.1 folder .*tokenizer/ and "
                                         r"tokenizer_2/ \(e.g. black-forest-labs/FLUX.1-schnell's\)"):
        sf.load_flux_single_file(tmp_path / "flux1-dev.safetensors")
    (tmp_path / "toks" / "tokenizer").mkdir(parents=True)
    with pytest.raises(InputError, match=r"--tokenizers .* has no tokenizer_2/"):
        sf.load_flux_single_file(tmp_path / "flux1-dev.safetensors", tokenizers=tmp_path / "toks")


def test_misplaced_options(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = files["flux-dev-tiny"]
    folder = tmp_path / "flux-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    cases = [
        (["--random", "flux-dev-tiny", "--vae", str(f["ae"])], "--vae goes with a FLUX.1 single file, not --random"),
        (["--random", "sd15-tiny", "--vae", str(f["ae"])], "--vae goes with a FLUX.1 single file"),
        (["--model", str(f["bfl"]), "--clip-g", str(f["clip_l"])], "--clip-g goes with an SD 3 / 3.5 single file"),
        (["--model", str(folder), "--t5", str(f["t5"])], "--t5 goes with a FLUX.1 single .safetensors file only"),
    ]
    for argv, message in cases:
        assert main(["export", *argv, "--out", str(tmp_path / "o")]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
