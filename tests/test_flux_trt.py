"""FLUX.1 on the TensorRT path: build profiles (T5's 512 tokens as the transformer's whole text axis, one row per
image: no CFG), ``build_engines`` on the fakes driving the pipeline like ort-cpu, and the whole engine folder on
TensorRT for RTX's real builder (no GPU); the same for FLUX.1 Fill and Kontext.

The fakes (tests/helpers/trt_fakes.py) run the "engines" as ONNX graphs on onnxruntime: a pass says sdrt's
build, engine folder and captured loop hold together for this family, nothing about real TensorRT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sdrt.export.profiles import custom_profile, engine_shapes, load_profile, validate
from sdrt.export.trt_build import BuildOptions, build_engines
from sdrt.runtime.errors import InputError
from sdrt.runtime.manifest import ExportManifest, ShapeLimits
from sdrt.runtime.pipeline import Pipeline

from .helpers.trt_modules import RTX


def test_profile_shapes_by_hand(flux_export) -> None:
    """Each input's min/opt/max under a dynamic profile, by hand: T5 at 512 tokens, the transformer's text axis
    T5's alone, one row per image for the encoders and the transformer ([dev]'s guidance too)."""
    man = ExportManifest.read(flux_export("flux-dev-tiny"))
    shapes = engine_shapes(custom_profile(batch="1:1:2", height="64:64:128", width="64:96:256", cfg=False), man)
    by = {c: {s.name: (s.min, s.opt, s.max) for s in v} for c, v in shapes.items()}
    assert by["text_encoder_2"]["input_ids"] == ((1, 512), (1, 512), (2, 512))
    assert by["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (2, 77))
    unet = by["unet"]
    assert unet["sample"] == ((1, 16, 8, 8), (1, 16, 8, 12), (2, 16, 16, 32))
    assert unet["encoder_hidden_states"] == ((1, 512, 48), (1, 512, 48), (2, 512, 48))
    assert unet["pooled_projections"] == ((1, 16), (1, 16), (2, 16))
    assert unet["guidance"] == unet["timestep"] == ((1,), (1,), (2,))


def test_a_t5_range_by_hand(flux_export) -> None:
    """A profile's T5 range: T5's input at its min/opt/max tokens and the transformer's text axis the same (FLUX.1's
    text tokens are T5's alone); CLIP keeps its 77."""
    man = ExportManifest.read(flux_export("flux-dev-tiny"))
    prof = custom_profile(batch="1:1:2", height=64, cfg=False, t5_tokens="128:256:512")
    by = {c: {s.name: (s.min, s.opt, s.max) for s in v} for c, v in engine_shapes(prof, man).items()}
    assert by["text_encoder_2"]["input_ids"] == ((1, 128), (1, 256), (2, 512))
    assert by["unet"]["encoder_hidden_states"] == ((1, 128, 48), (1, 256, 48), (2, 512, 48))
    assert by["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (2, 77))


def test_shipped_profiles_fit_a_full_size_export(flux_export) -> None:
    """flux-1024 and flux-dynamic (1024x1024 and the common aspect ratios) against a full-size export's limits;
    a profile with CFG is refused for this family, naming the fix."""
    man = ExportManifest.read(flux_export("flux-schnell-tiny"))
    assert man.limits == ShapeLimits(min_size=64, max_size=2048, multiple_of=16)
    for name in ("flux-1024", "flux-dynamic"):
        prof = load_profile(name)
        assert prof.family == "flux" and not prof.cfg
        validate(prof, man)
    sample = {s.name: s for s in engine_shapes(load_profile("flux-dynamic"), man)["unet"]}["sample"]
    assert (sample.min, sample.opt, sample.max) == ((1, 16, 96, 96), (1, 16, 128, 128), (2, 16, 168, 168))
    with pytest.raises(InputError, match="cfg = false, or --no-cfg"):
        validate(dataclasses.replace(load_profile("flux-1024"), cfg=True), man)
    with pytest.raises(InputError, match="multiple of 16"):
        validate(custom_profile(height=72, width=64, cfg=False), man)


def test_built_engines_drive_the_pipeline_like_ort_cpu(flux_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on fakes: export -> build_engines -> Pipeline(tensorrt) gives the ort-cpu images, the loop
    captured; no text-join graph (the family joins on the host)."""
    cudart, _ = fake_gpu
    src = flux_export("flux-dev-tiny")
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96", cfg=False),
                             BuildOptions(workspace_gb=1))
    names = {r.component for r in manifest.engines}
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"} <= names
    assert not any(n.startswith("text_join") for n in names)
    kw = {"steps": 4, "seed": 5, "height": 64, "width": 96, "guidance_scale": 3.5}
    want = Pipeline.load(src, backend="ort-cpu")("a red fox", **kw)
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = pipe("a red fox", **kw)
    assert got.loop == "captured CUDA graphs" and cudart.launches == 4
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.shape == b.shape == (64, 96, 3) and a.std() > 1
    assert np.abs(a - b).max() <= 1


def test_sdrt_build_makes_a_whole_flux_engine_folder_on_rtx(flux_export, tmp_path: Path) -> None:
    """``sdrt build`` on TensorRT for RTX's real builder: every FLUX.1 component (fp32, as exported) and the
    unguided step graphs, a dynamic profile (CFG left off for this family without --no-cfg)."""
    if RTX is None:
        pytest.skip("needs the TensorRT for RTX bindings: pip install tensorrt-rtx-cu13-libs "
                    "tensorrt-rtx-cu13-bindings")
    from sdrt.cli import main
    from sdrt.runtime.engine_manifest import EngineManifest

    src, out = flux_export("flux-schnell-tiny"), tmp_path / "engines"
    assert main(["build", str(src), "--out", str(out), "--batch", "1:1:2", "--height", "64:64:128",
                 "--width", "64:96:128", "--tensorrt-module", "tensorrt_rtx"]) == 0
    m = EngineManifest.read(out)
    precision = {r.component: r.precision for r in m.engines}
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "sampler_step"} <= set(precision)
    assert "sampler_step_cfg" not in precision and precision["unet"] == "fp32"
    assert (out / "tokenizer_2" / "tokenizer.json").is_file()


@pytest.mark.parametrize(("preset", "masked"), [("flux-fill-dev-tiny", True), ("flux-kontext-dev-tiny", False),
                                              ("flux-kontext-dev-tiny", True), ("flux-depth-dev-tiny", False)])
def test_fill_and_kontext_engines_on_the_fakes(flux_export, tmp_path: Path, fake_gpu, preset: str,
                                               masked: bool) -> None:
    """Logic check on fakes: FLUX.1 Fill (the extra-channels graph built for its 64 mask channels), Kontext (the
    reference's sides from the profile's image sizes; ``masked``: inpainting, the blending step beside the reference)
    and Depth / Canny (the control latents' sides the latents') built and driven like ort-cpu, the loop captured."""
    from .helpers.inputs import image_and_mask

    cudart, _ = fake_gpu
    src = flux_export(preset)
    out = tmp_path / "engines"
    profile = custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96", cfg=False)
    man = ExportManifest.read(src)
    by = {s.name: (s.min, s.opt, s.max) for s in engine_shapes(profile, man)["unet"]}
    image, mask = image_and_mask(w=64, h=64)
    if preset == "flux-fill-dev-tiny":
        assert by["sample"] == ((1, 96, 8, 8), (1, 96, 8, 8), (2, 96, 12, 12))
        kw = {"image": image, "mask_image": mask, "guidance_scale": 30.0}
    elif preset == "flux-kontext-dev-tiny":
        assert by["reference_latents"] == ((1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 12, 12))
        kw = {"reference_image": image, "reference_resize": False, "guidance_scale": 2.5}
        if masked:  # the image is the reference
            kw = {"image": image, "mask_image": mask, "strength": 0.8, "reference_resize": False, "guidance_scale": 2.5}
    else:
        assert by["control_latents"] == ((1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 12, 12))
        kw = {"control_images": [image], "guidance_scale": 10.0}
    manifest = build_engines(src, out, profile, BuildOptions(workspace_gb=1))
    assert "unet" in {r.component for r in manifest.engines}
    want = Pipeline.load(src, backend="ort-cpu")("a red fox", steps=3, seed=5, **kw)
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = pipe("a red fox", steps=3, seed=5, **kw)
        if preset == "flux-kontext-dev-tiny" and not masked:  # a reference past the profile's sizes: refused
            with pytest.raises(InputError, match=r"the reference image is 128x128 once sized .*outside these "
                                                 r"engines' image sizes"):
                pipe("a red fox", steps=3, seed=5, height=64, width=64, reference_resize=False,
                     reference_image=np.zeros((128, 128, 3), np.uint8))
    assert got.loop == "captured CUDA graphs" and cudart.launches == 3
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.shape == b.shape == (64, 64, 3) and a.std() > 1
    assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("preset", ["flux-fill-dev-tiny", "flux-kontext-dev-tiny", "flux-depth-dev-tiny"])
def test_fill_and_kontext_build_on_rtx(flux_export, tmp_path: Path, preset: str) -> None:
    """``sdrt build`` with TensorRT for RTX's real builder (no GPU): Fill's transformer, masked-image encoder and
    64-channel extra graph; Kontext's transformer with its reference input of dynamic sides; Depth / Canny's with
    its control input."""
    if RTX is None:
        pytest.skip("needs the TensorRT for RTX bindings: pip install tensorrt-rtx-cu13-libs "
                    "tensorrt-rtx-cu13-bindings")
    from sdrt.cli import main
    from sdrt.runtime.engine_manifest import EngineManifest

    src, out = flux_export(preset), tmp_path / "engines"
    assert main(["build", str(src), "--out", str(out), "--batch", "1:1:2", "--height", "64:64:96",
                 "--width", "64:64:96", "--tensorrt-module", "tensorrt_rtx"]) == 0
    names = {r.component for r in EngineManifest.read(out).engines}
    assert {"unet", "vae_encoder"} <= names
    if preset == "flux-fill-dev-tiny":  # an inpainting model: the mask-concatenating step graph only
        assert {"vae_encoder_masked", "unet_extra_mask64_float32_to_float32", "sampler_step_concat"} <= names
        assert "sampler_step" not in names
    else:
        assert "sampler_step" in names
