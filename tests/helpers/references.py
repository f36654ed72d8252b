"""diffusers over sdrt's synthetic weights: the independent references of the parity tests, and the comparison
of sdrt's images with theirs.

Pipelines are built once per process (diffusers' modules are rebuilt from the preset's seed, as sdrt's
export was) and shared by every test that compares against them; a test sets the scheduler it needs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .pipelines import module_cache


def diffusers_scheduler(sampler: str, config: dict):
    """diffusers' scheduler for an sdrt sampler name (ddim, dpmpp-2m, dpmpp-2m-karras, euler)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler.startswith("dpmpp-2m"):
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", use_karras_sigmas=sampler.endswith("karras"))
    return EulerDiscreteScheduler.from_config(config)


_DIFFUSERS: dict[str, object] = module_cache({})


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


def flux_pipeline(cls: Any, modules: Any, tokenizers: Path, scheduler: dict, **parts: Any) -> Any:
    """diffusers' FLUX.1 pipeline ``cls`` (``FluxControlPipeline``, ``FluxControlNetPipeline``, ...) over
    ``modules`` (``flux_presets.FluxModules``), with the tokenizer files in ``tokenizers`` (an export's folder) and
    ``FlowMatchEulerDiscreteScheduler`` of the ``scheduler`` config; ``parts``: the class's others
    (``controlnet=``)."""
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    pipe = cls(transformer=modules.transformer, vae=modules.vae,
               scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler), text_encoder=modules.clip,
               tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer"), text_encoder_2=modules.t5,
               tokenizer_2=T5TokenizerFast.from_pretrained(tokenizers / "tokenizer_2"), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_preset_pipeline(cls_name: str, preset: str, folder: Path, modules: Any = None) -> Any:
    """diffusers' pipeline ``cls_name`` (``FluxPipeline``, ``FluxKontextPipeline``, ``FluxControlPipeline``, ...)
    over the preset's modules seeded as sdrt's export seeds them (``modules``: these instead), with the tokenizers
    of the export ``folder`` (:func:`flux_pipeline`)."""
    import diffusers

    from sdrt.export.flux_presets import build_modules, get_flux_preset

    p = get_flux_preset(preset)
    return flux_pipeline(getattr(diffusers, cls_name), build_modules(p, seed=0) if modules is None else modules,
                         Path(folder), p.scheduler)


def sd3_pipeline(cls: Any, modules: Any, tokenizers: Path, scheduler: dict, *, t5: bool = False,
                 **parts: Any) -> Any:
    """diffusers' SD 3 / 3.5 pipeline ``cls`` over ``modules`` (``sd3_presets.Sd3Modules``), with the tokenizer
    files in ``tokenizers`` and ``FlowMatchEulerDiscreteScheduler`` of the ``scheduler`` config; without ``t5``,
    ``text_encoder_3=None`` (zeros in T5's place, as an export without it); ``parts``: the class's others."""
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip_l, clip_g = modules.text_encoders[:2]
    pipe = cls(transformer=modules.transformer, vae=modules.vae,
               scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
               text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer"),
               text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers / "tokenizer_2"),
               text_encoder_3=modules.text_encoders[2] if t5 else None,
               tokenizer_3=T5TokenizerFast.from_pretrained(tokenizers / "tokenizer_3") if t5 else None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_packed(latents: np.ndarray) -> Any:
    """[B, C, H, W] latents packed into FLUX.1's 2x2-patch tokens, as diffusers' pipelines take ``latents``."""
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(torch.from_numpy(latents.copy()), b, c, h, w)


def assert_diffusers_images(images: Iterable[Any], want: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """sdrt's ``images`` within 1/255 of diffusers' (``output_type="np"``: [B, H, W, 3] in 0..1), which are not
    flat (so the comparison means something). Returns both as int32 [B, H, W, 3] levels."""
    want_u8 = (want * 255).round().astype(np.int32)
    got = np.stack([np.asarray(im) for im in images]).astype(np.int32)
    assert got.shape == want_u8.shape
    diff = int(np.abs(got - want_u8).max())
    assert diff <= 1, f"{what}: max abs difference {diff}/255"
    assert want_u8.std() > 5
    return got, want_u8


def sd3_decode(pipe: Any, latents: Any) -> np.ndarray:
    """SD 3 latents decoded as ``StableDiffusion3Pipeline`` decodes them (``latents / scaling + shift``), as uint8
    levels [B, H, W, 3] (int32). diffusers 0.42's SD 3 inpainting pipeline decodes without the VAE's shift (its
    txt2img and img2img pipelines add it): its references take ``output_type="latent"`` and decode here, which is
    what sdrt's VAE decoder does."""
    import torch

    cfg = pipe.vae.config
    with torch.no_grad():
        image = pipe.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    out = pipe.image_processor.postprocess(image, output_type="np")
    return (out * 255).round().astype(np.int32)
