"""Optimum's ONNX exports, read as they are: images against diffusers, the adapters against PyTorch, the CLI,
a TensorRT for RTX build, and the bad inputs (missing component, unsupported task, fp16 SDXL VAE).

The exports are made here from the tiny synthetic models with Optimum's contracts (see optimum_layout.py
for why not with Optimum's exporter itself).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.export.loading import random_model
from sdrt.runtime.errors import ArtifactError, CompatibilityError
from sdrt.runtime.pipeline import Pipeline

from .helpers.optimum_layout import _Decoder, _export, write_optimum_export
from .helpers.references import diffusers_scheduler

_CACHE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def optimum_export(tmp_path_factory: pytest.TempPathFactory):
    def get(preset: str) -> Path:
        if preset not in _CACHE:
            _CACHE[preset] = write_optimum_export(random_model(preset),
                                                  tmp_path_factory.mktemp("optimum") / preset)
        return _CACHE[preset]

    return get


def _diffusers(preset: str, folder: Path, sampler: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    m = random_model(preset)
    # transformers reads Optimum's vocab.json + merges.txt itself: an independent check of sdrt's tokenizer
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    common = {"vae": m.vae, "unet": m.unet, "scheduler": diffusers_scheduler(sampler, m.scheduler_config)}
    if m.preset.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=tok,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), force_zeros_for_empty_prompt=True,
            **common)
    else:
        pipe = StableDiffusionPipeline(text_encoder=m.text_encoders[0], tokenizer=tok, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("preset", "sampler"), [("sd15-tiny", "dpmpp-2m"), ("sdxl-tiny", "euler")])
def test_image_matches_diffusers(optimum_export, preset: str, sampler: str) -> None:
    folder = optimum_export(preset)
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    pipe = _diffusers(preset, folder, sampler)
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 12), dtype=np.float32)
    prompt, negative = "a watercolor fox in the snow, highly detailed", "blurry"
    with torch.no_grad():
        ref = pipe(prompt, negative_prompt=negative, height=64, width=96, num_inference_steps=6,
                   guidance_scale=7.5, latents=torch.from_numpy(latents), output_type="np").images
    ref_u8 = (ref * 255).round().astype(np.int32)
    with Pipeline.load(folder, backend="ort-cpu") as sd:
        assert sd.manifest.source["kind"] == "optimum"
        assert sd.engines["unet"].inputs["timestep"].shape == ()  # Optimum's scalar timestep, fed as it is
        res = sd(prompt, negative_prompt=negative, height=64, width=96, steps=6, guidance_scale=7.5,
                 sampler=sampler, latents=latents)
    got = np.asarray(res.images[0]).astype(np.int32)[None]
    assert got.shape == ref_u8.shape
    assert np.abs(got - ref_u8).max() <= 1, f"{preset}: max abs difference {np.abs(got - ref_u8).max()}/255"
    assert ref_u8.std() > 5 and res.nonfinite == [False]
    # nothing was written into the user's folder
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before


def test_vae_encoder_adapter_matches_torch(optimum_export) -> None:
    """uint8 NHWC in, the scaled latent mean out, as diffusers computes it from the same pixels."""
    folder = optimum_export("sd15-tiny")
    vae = random_model("sd15-tiny").vae
    image = np.random.default_rng(2).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    with Pipeline.load(folder, backend="ort-cpu") as sd:
        got = sd.engines["vae_encoder"]({"image": image})["latent"]
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    with torch.no_grad():
        want = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).numpy()
    assert got.shape == want.shape == (2, 4, 8, 12)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_sdxl_text_encoders_give_the_penultimate_layer(optimum_export) -> None:
    folder = optimum_export("sdxl-tiny")
    m = random_model("sdxl-tiny")
    ids = np.random.default_rng(1).integers(0, 1000, (2, 77)).astype(np.int32)
    with Pipeline.load(folder, backend="ort-cpu") as sd:
        outs = [sd.engines[n]({"input_ids": ids}) for n in ("text_encoder", "text_encoder_2")]
    with torch.no_grad():
        refs = [enc(torch.from_numpy(ids).long(), output_hidden_states=True) for enc in m.text_encoders]
    for out, ref in zip(outs, refs):
        assert np.allclose(out["hidden_states"], ref.hidden_states[-2].numpy(), atol=1e-5)
    assert set(outs[0]) == {"hidden_states"}
    assert np.allclose(outs[1]["text_embeds"], refs[1].text_embeds.numpy(), atol=1e-5)


def test_cli_generate_and_info(optimum_export, tmp_path: Path) -> None:
    folder = optimum_export("sd15-tiny")
    out = tmp_path / "fox.png"
    gen = subprocess.run([sys.executable, "-m", "sdrt", "generate", str(folder), "--prompt", "a fox", "--steps", "2",
                          "--seed", "1", "--backend", "ort-cpu", "-o", str(out)], check=False, capture_output=True,
                         text=True)
    assert gen.returncode == 0, gen.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    info = subprocess.run([sys.executable, "-m", "sdrt", "info", str(folder)], check=False,
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert f"{folder}: optimum-sd1 (sd1, epsilon)" in info.stdout
    assert "an Optimum ONNX export; runs on: ort-cpu, ort-cuda" in info.stdout and "sdrt build" in info.stdout


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_missing_component_names_the_file(optimum_export, tmp_path: Path) -> None:
    folder = _copy(optimum_export("sd15-tiny"), tmp_path / "m")
    shutil.rmtree(folder / "vae_decoder")
    with pytest.raises(ArtifactError) as e:
        Pipeline.load(folder, backend="ort-cpu")
    msg = str(e.value)
    assert str(folder) in msg and "vae_decoder/model.onnx" in msg and "optimum-cli export onnx" in msg


def test_an_unsupported_pipeline_is_refused(optimum_export, tmp_path: Path) -> None:
    folder = _copy(optimum_export("sd15-tiny"), tmp_path / "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(CompatibilityError) as e:
        Pipeline.load(folder, backend="ort-cpu")
    assert str(folder) in str(e.value) and "model_index.json" in str(e.value)
    assert "StableDiffusion3Pipeline" in str(e.value) and "ORTDiffusionPipeline" in str(e.value)


def test_an_fp16_sdxl_vae_is_refused_before_it_makes_nan_images(optimum_export, tmp_path: Path) -> None:
    folder = _copy(optimum_export("sdxl-tiny"), tmp_path / "xl16")
    vae = random_model("sdxl-tiny").vae.half()
    _export(_Decoder(vae), (torch.randn(1, 4, 8, 8).half(),), folder / "vae_decoder" / "model.onnx",
            ["latent_sample"], ["sample"], {"latent_sample": {0: "b", 2: "h", 3: "w"}, "sample": {0: "b"}})
    with pytest.raises(CompatibilityError) as e:
        Pipeline.load(folder, backend="ort-cpu")
    msg = str(e.value)
    assert str(folder) in msg and "vae_decoder/model.onnx" in msg and "fp32" in msg and "overflows" in msg


def test_tensorrt_backend_asks_for_a_build(optimum_export) -> None:
    folder = optimum_export("sd15-tiny")
    with pytest.raises(CompatibilityError, match="sdrt build"):
        Pipeline.load(folder, backend="tensorrt")


def test_build_on_tensorrt_for_rtx(optimum_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapted graphs parse and build on TensorRT for RTX's builder (no GPU needed): the text encoder
    (int32 ids cast in-graph) and the VAE decoder (scaling, uint8 NHWC, finite), weights found by path."""
    from .helpers.trt_modules import RTX

    if RTX is None:
        pytest.skip("needs TensorRT for RTX: pip install \".[trt-api]\"")
    from sdrt.export import trt_build
    from sdrt.export.profiles import custom_profile
    from sdrt.runtime.engine_manifest import EngineManifest

    folder = optimum_export("sd15-tiny")
    plan_engines = trt_build.plan_engines

    def some(*args, **kwargs):  # the UNet takes ~20 s on 2 cores; the VAE decoder and text encoder suffice
        manifest, plans = plan_engines(*args, **kwargs)
        return manifest, [p for p in plans if p.record.component in ("text_encoder", "vae_decoder")]

    monkeypatch.setattr(trt_build, "plan_engines", some)
    out = tmp_path / "engines"
    m = trt_build.build_engines(folder, out, custom_profile(batch="1:1:1", height="64:64:64", width="64:64:64"),
                                trt_build.BuildOptions(module="tensorrt_rtx", workspace_gb=1))
    assert [r.component for r in m.engines] == ["text_encoder", "vae_decoder"]
    assert all((out / r.file).stat().st_size > 0 for r in m.engines)
    assert EngineManifest.read(out).onnx_dir == str(folder.resolve())
    written = json.loads((out / "sdrt.json").read_text())  # the synthesized manifest, now the folder's own
    assert written["source"]["kind"] == "optimum" and written["kind"] == "tensorrt"
    assert (out / "tokenizer" / "vocab.json").is_file()


def test_tokenizer_from_vocab_and_merges_matches_transformers(optimum_export) -> None:
    from transformers import CLIPTokenizer

    from sdrt.export.tokenizer_assets import PROBES
    from sdrt.runtime.tokenizer import ClipTokenizer

    for sub in ("tokenizer", "tokenizer_2"):  # SDXL: pad "<|endoftext|>" then "!"
        folder = optimum_export("sdxl-tiny") / sub
        ours = ClipTokenizer.from_folder(folder, vocab_merges=True).encode(list(PROBES))
        ref = CLIPTokenizer.from_pretrained(folder)(list(PROBES), padding="max_length", max_length=77,
                                                    truncation=True).input_ids
        np.testing.assert_array_equal(ours, np.array(ref))
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):  # not read so unless asked
        ClipTokenizer.from_folder(optimum_export("sdxl-tiny") / "tokenizer")
