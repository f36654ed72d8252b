"""LCM-LoRA merged at export (``sdrt export --lora``) and run with the ``lcm`` sampler, against diffusers'
``load_lora_weights`` + ``fuse_lora`` + ``LCMScheduler`` on the tiny SD 1.5: images within 1/255 in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.export.exporter import export_model
from sdrt.export.loading import load_model, random_model
from sdrt.export.lora_merge import merge_loras
from sdrt.runtime.errors import InputError
from sdrt.runtime.lora_files import LoraSpec
from sdrt.runtime.pipeline import Pipeline

from .helpers.models import make_lora


def _unet_only_lora(path: Path) -> Path:
    """An LCM-LoRA-like file: kohya keys with alphas, UNet modules only (as latent-consistency's files)."""
    from safetensors.numpy import load_file, save_file

    m = random_model("sd15-tiny")
    full = make_lora(path.with_suffix(".all.safetensors"), m.unet, m.text_encoders[0], "kohya", seed=9, alpha=0.5)
    save_file({k: v for k, v in load_file(str(full)).items() if k.startswith("lora_unet_")}, str(path))
    return path


@pytest.fixture(scope="module")
def lcm_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(the LCM-LoRA-like file, an export of the tiny SD 1.5 with it merged at 1.0, the merge's reports): made once
    for every step count."""
    tmp = tmp_path_factory.mktemp("lcm")
    lora = _unet_only_lora(tmp / "lcm-lora.safetensors")
    model = load_model(random_preset="sd15-tiny")
    reports = merge_loras(model, [LoraSpec(lora, 1.0)])
    export_model(model, tmp / "export", fp16=False)
    return lora, tmp / "export", reports


@pytest.mark.slow  # exports a merged model: over 1 min on 2 busy cores
@pytest.mark.parametrize("steps", [2, 4])
def test_lcm_lora_matches_diffusers(lcm_export, tiny_export, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from diffusers.schedulers import scheduling_lcm
    from transformers import CLIPTokenizer

    lora, out, reports = lcm_export
    assert reports["unet"].matched and not reports["text_encoder"].matched
    assert json.loads((out / "sdrt.json").read_text())["source"]["loras"][0]["scale"] == 1.0

    m = random_model("sd15-tiny")
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], unet=m.unet,
                                   tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
                                   scheduler=LCMScheduler.from_config(m.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="lcm")
    pipe.fuse_lora(lora_scale=1.0)
    h = w = 64
    seed = 5
    latents = np.random.default_rng(50).standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
    noise = iter(np.random.default_rng(seed).standard_normal((steps, 1, 4, h // 8, w // 8), dtype=np.float32))
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(noise)))
    prompt = "a bowl of ramen, studio light"
    with torch.no_grad():
        ref = pipe(prompt, height=h, width=w, num_inference_steps=steps, guidance_scale=1.0,
                   latents=torch.from_numpy(latents), output_type="np").images
    ref_u8 = (ref[0] * 255).round().astype(np.int32)
    with Pipeline.load(out, backend="ort-cpu") as ours:
        res = ours(prompt, height=h, width=w, steps=steps, guidance_scale=1.0, sampler="lcm", seed=seed,
                   latents=latents)
    got = np.asarray(res.images[0]).astype(np.int32)
    assert np.abs(got - ref_u8).max() <= 1, f"max abs difference {np.abs(got - ref_u8).max()}/255"
    assert 5 < ref_u8.std()
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as base:  # the LoRA changed the image
        plain = base(prompt, height=h, width=w, steps=steps, guidance_scale=1.0, sampler="lcm", seed=seed,
                     latents=latents)
    assert np.abs(np.asarray(plain.images[0]).astype(np.int32) - got).max() > 2


def test_lora_of_another_family_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    xl = random_model("sdxl-tiny")
    path = make_lora(tmp_path / "xl.safetensors", xl.unet, xl.text_encoders[0], "diffusers", seed=1)
    from safetensors.numpy import load_file, save_file

    save_file({k: v for k, v in load_file(str(path)).items() if k.startswith("unet.mid_block")}, str(path))
    with pytest.raises(InputError, match="another architecture"):  # the shapes differ
        merge_loras(load_model(random_preset="sd15-tiny"), [LoraSpec(path, 1.0)])
    sgm = tmp_path / "sgm.safetensors"  # kohya names of the original SGM UNet: no module of this model
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((2, 8), np.float32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((8, 2), np.float32)}, str(sgm))
    with pytest.raises(InputError, match="adapts no weight"):
        merge_loras(load_model(random_preset="sd15-tiny"), [LoraSpec(sgm, 1.0)])
    assert main(["export", "--random", "sd15-tiny", "--out", str(tmp_path / "o"), "--lora", str(sgm)]) == 1
    assert "--lora" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("guidance", [1.0, 8.0])
def test_lcm_model_with_time_cond_proj_dim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, guidance: float) -> None:
    """An LCM-distilled UNet (``time_cond_proj_dim``): the guidance scale enters as ``timestep_cond`` and
    the UNet runs at batch 1, as diffusers' LatentConsistencyModelPipeline."""
    from dataclasses import replace

    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from diffusers.schedulers import scheduling_lcm
    from transformers import CLIPTokenizer

    base = random_model("sd15-tiny")
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{**base.preset.config("unet"), "time_cond_proj_dim": 32}).eval()
    model = replace(base, unet=unet)
    out = tmp_path / "lcm"
    manifest = export_model(model, out, fp16=False)
    assert [i.name for i in manifest.components["unet"].inputs][-1] == "timestep_cond"

    pipe = LatentConsistencyModelPipeline(vae=base.vae, text_encoder=base.text_encoders[0], unet=unet,
                                          tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
                                          scheduler=LCMScheduler.from_config(base.scheduler_config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    steps, h, seed = 4, 64, 8
    latents = np.random.default_rng(80).standard_normal((1, 4, h // 8, h // 8), dtype=np.float32)
    noise = iter(np.random.default_rng(seed).standard_normal((steps, 1, 4, h // 8, h // 8), dtype=np.float32))
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(noise)))
    prompt = "a lighthouse in a storm"
    with torch.no_grad():
        ref = pipe(prompt, height=h, width=h, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(latents), output_type="np").images
    ref_u8 = (ref[0] * 255).round().astype(np.int32)
    with Pipeline.load(out, backend="ort-cpu") as ours:
        res = ours(prompt, height=h, width=h, steps=steps, guidance_scale=guidance, sampler="lcm", seed=seed,
                   latents=latents)
        rows = [k[0] for k in ours._loops]
    got = np.asarray(res.images[0]).astype(np.int32)
    assert np.abs(got - ref_u8).max() <= 1, f"max abs difference {np.abs(got - ref_u8).max()}/255"
    assert 5 < ref_u8.std()
    assert rows == [False]  # no classifier-free guidance: the UNet ran at batch 1
