"""diffusers over sdrt's synthetic weights: the independent references of the parity tests.

Pipelines are built once per process (diffusers' modules are rebuilt from the preset's seed, as sdrt's
export was) and shared by every test that compares against them; a test sets the scheduler it needs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest


def diffusers_scheduler(sampler: str, config: dict):
    """diffusers' scheduler for an sdrt sampler name (ddim, dpmpp-2m, dpmpp-2m-karras, euler)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler.startswith("dpmpp-2m"):
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", use_karras_sigmas=sampler.endswith("karras"))
    return EulerDiscreteScheduler.from_config(config)


_DIFFUSERS: dict[str, object] = {}


def diffusers_pipe(preset: str, folder: Path, img2img: bool = False):
    """A diffusers pipeline over the same synthetic weights sdrt exported (rebuilt from the seed)."""
    key = f"{preset}-{img2img}"
    if key not in _DIFFUSERS:
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionPipeline,
            StableDiffusionXLPipeline,
        )
        from transformers import CLIPTokenizer

        from sdrt.export.loading import random_model

        m = random_model(preset)
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        common = {"vae": m.vae, "unet": m.unet, "scheduler": diffusers_scheduler("ddim", m.scheduler_config)}
        if m.preset.family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=tok,
                tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), force_zeros_for_empty_prompt=True,
                **common)
        else:
            cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
            pipe = cls(text_encoder=m.text_encoders[0], tokenizer=tok, safety_checker=None, feature_extractor=None,
                       requires_safety_checker=False, **common)
        pipe.set_progress_bar_config(disable=True)
        _DIFFUSERS[key] = (pipe, m.scheduler_config)
    return _DIFFUSERS[key]


def diffusers_fused(unet, text_encoder, vae, loras: list[tuple[Path, float]]):  # type: ignore[no-untyped-def]
    """Copies of the modules with ``loras`` loaded by diffusers and fused at their strengths."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (pip install peft)")
    from diffusers import StableDiffusionPipeline

    u, te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=u, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return u, te
