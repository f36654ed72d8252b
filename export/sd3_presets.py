"""SD3 / 3.5 architecture presets (SD3 Medium, SD 3.5 Medium, Large and Large Turbo, and tiny ones) and the
seeded construction of their torch modules.

Kept apart from ``export/presets.py``: its ``Preset`` describes a UNet model with CLIP encoders, and SD3's
parts (an MMDiT transformer, two CLIP encoders with projection, a T5 encoder, a 16-channel VAE with
``shift_factor``, a flow-matching scheduler) fit none of its fields. ``export/sd3_loading.py`` loads and
``export/sd3_export.py`` exports them; ``sdrt export --list`` shows both tables. (One preset table for every
family is owed: see docs/families.md.)

The tiny presets keep SD3's structure with small widths: the CLIP encoders' hidden widths (16 + 16) are
narrower than T5's (48 = ``joint_attention_dim``), so the join's zero padding is exercised, as SD3's
768 + 1280 < 4096; the pooled width is both CLIP projections (16 + 16 = ``pooled_projection_dim``), as SD3's
768 + 1280 = 2048. ``sd35-medium-tiny`` adds SD 3.5 Medium's MMDiT-X parts: dual attention in the first
layer and RMS-normed queries and keys; ``sd3-inpaint-tiny`` is ``sd3-tiny`` with a 33-channel transformer (an
inpainting one: latents, mask and masked-image latents in).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch

from sdrt.runtime.errors import InputError

from .presets import clip_config, vae_config


@dataclass(frozen=True)
class Sd3Preset:
    name: str
    family: str  # "sd3" (runtime/families/sd3.py)
    default_size: int  # pixels
    transformer: dict[str, Any]  # SD3Transformer2DModel kwargs
    vae: dict[str, Any]  # AutoencoderKL kwargs (16 latent channels, shift_factor)
    clip: tuple[dict[str, Any], dict[str, Any]]  # CLIPTextConfig kwargs, both with a projection
    t5: dict[str, Any]  # T5Config kwargs (an encoder only)
    scheduler: dict[str, Any]  # diffusers scheduler config, "_class_name" included
    prediction_type: str = "flow_prediction"
    t5_tokens: int = 256  # diffusers' max_sequence_length default for SD3
    # the CLIP tokenizers' pad tokens: stabilityai's SD3 folders pad tokenizer with eos, tokenizer_2 with "!"
    pad_tokens: tuple[str, str] = ("<|endoftext|>", "!")
    by_shape: bool = True  # False: another preset's architecture (a distillation), selected by name only
    test_scale: bool = False  # a tiny structure for tests: the shipped tiny T5 tokenizer serves its files

    def config(self, part: str) -> Any:
        return copy.deepcopy(getattr(self, part))


@dataclass
class Sd3Modules:
    """A preset's torch modules, float32, in eval mode; ``text_encoders`` in the family's order
    (CLIP ViT-L-like, CLIP bigG-like, T5)."""

    transformer: torch.nn.Module | None  # None: streamed (export/streamed.py), not held
    text_encoders: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]  # T5 None: streamed or left out
    vae: torch.nn.Module


def t5_config(d_model: int, d_kv: int, d_ff: int, heads: int, layers: int) -> dict[str, Any]:
    """T5 v1.1's layout (google/t5-v1_1-xxl, SD3's ``text_encoder_3``): gated GELU, no tied embeddings."""
    return {
        "vocab_size": 32128,
        "d_model": d_model,
        "d_kv": d_kv,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def _vae(channels: list[int], sample_size: int, groups: int, layers: int) -> dict[str, Any]:
    """SD3's VAE: 16 latent channels, no quant convs, a scaling and a shift (stabilityai's SD3 / 3.5 values)."""
    return {**vae_config(channels, sample_size, 1.5305, groups, layers, latent_channels=16),
            "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}


def _transformer(layers: int, head_dim: int, heads: int, joint: int, pooled: int, max_pos: int, sample: int,
                 dual: tuple[int, ...] = (), qk_norm: str | None = None, in_channels: int = 16) -> dict[str, Any]:
    return {
        "sample_size": sample,
        "patch_size": 2,
        "in_channels": in_channels,
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint,
        "caption_projection_dim": heads * head_dim,  # the context stream is as wide as the image stream
        "pooled_projection_dim": pooled,
        "out_channels": 16,
        "pos_embed_max_size": max_pos,
        "dual_attention_layers": dual,
        "qk_norm": qk_norm,
    }


_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

SD3_PRESETS: dict[str, Sd3Preset] = {}


def _add(p: Sd3Preset) -> None:
    SD3_PRESETS[p.name] = p


_TINY_CLIP = (clip_config(16, 32, 2, 3, "quick_gelu", 16), clip_config(16, 32, 2, 3, "gelu", 16))
_add(Sd3Preset(
    "sd3-tiny", "sd3", 64,
    transformer=_transformer(2, 8, 2, joint=48, pooled=32, max_pos=16, sample=8),
    vae=_vae([16, 16, 32, 32], 64, groups=8, layers=1),
    clip=_TINY_CLIP,
    t5=t5_config(48, 8, 64, 2, 2),
    scheduler=_FLOW,
    test_scale=True,
))
_add(Sd3Preset(
    "sd35-medium-tiny", "sd3", 64,
    transformer=_transformer(2, 8, 2, joint=48, pooled=32, max_pos=16, sample=8, dual=(0,), qk_norm="rms_norm"),
    vae=_vae([16, 16, 32, 32], 64, groups=8, layers=1),
    clip=_TINY_CLIP,
    t5=t5_config(48, 8, 64, 2, 2),
    scheduler=_FLOW,
    test_scale=True,
))

# SD3's structure with a 33-channel transformer (latents, mask, masked-image latents), the input diffusers'
# StableDiffusion3InpaintPipeline concatenates for an inpainting transformer (none is published yet)
_add(Sd3Preset(
    "sd3-inpaint-tiny", "sd3", 64,
    transformer=_transformer(2, 8, 2, joint=48, pooled=32, max_pos=16, sample=8, in_channels=33),
    vae=_vae([16, 16, 32, 32], 64, groups=8, layers=1),
    clip=_TINY_CLIP,
    t5=t5_config(48, 8, 64, 2, 2),
    scheduler=_FLOW,
    test_scale=True,
))


# The full-size architectures, as stabilityai's diffusers folders configure them (transformer/config.json,
# text_encoder*/config.json, vae/config.json, scheduler/scheduler_config.json; nothing is fetched): the CLIP
# ViT-L/14 and OpenCLIP bigG/14 text encoders with projection, T5-XXL v1.1's encoder, SD3's 16-channel VAE.
_CLIP_L = clip_config(768, 3072, 12, 12, "quick_gelu", 768)
_CLIP_G = clip_config(1280, 5120, 20, 32, "gelu", 1280)
_T5_XXL = t5_config(4096, 64, 10240, 64, 24)
_SD3_VAE = {**_vae([128, 256, 512, 512], 1024, groups=32, layers=2)}
_add(Sd3Preset(  # SD3 Medium (2B): 24 joint blocks of width 1536
    "sd3-medium", "sd3", 1024,
    transformer=_transformer(24, 64, 24, joint=4096, pooled=2048, max_pos=192, sample=128),
    vae=_SD3_VAE, clip=(_CLIP_L, _CLIP_G), t5=_T5_XXL, scheduler=_FLOW,
))
_add(Sd3Preset(  # SD 3.5 Medium (2.5B, MMDiT-X): dual attention in blocks 0-12, RMS-normed q/k, a 384-patch grid
    "sd35-medium", "sd3", 1024,
    transformer=_transformer(24, 64, 24, joint=4096, pooled=2048, max_pos=384, sample=128, dual=tuple(range(13)),
                             qk_norm="rms_norm"),
    vae=_SD3_VAE, clip=(_CLIP_L, _CLIP_G), t5=_T5_XXL, scheduler=_FLOW,
))
_add(Sd3Preset(  # SD 3.5 Large (8.1B): 38 joint blocks of width 2432, RMS-normed q/k
    "sd35-large", "sd3", 1024,
    transformer=_transformer(38, 64, 38, joint=4096, pooled=2048, max_pos=192, sample=128, qk_norm="rms_norm"),
    vae=_SD3_VAE, clip=(_CLIP_L, _CLIP_G), t5=_T5_XXL, scheduler=_FLOW,
))
# SD 3.5 Large Turbo: Large's architecture, distilled for about 4 steps at guidance 0 (so only its name selects it)
_add(replace(SD3_PRESETS["sd35-large"], name="sd35-large-turbo", by_shape=False))


def get_sd3_preset(name: str) -> Sd3Preset:
    try:
        return SD3_PRESETS[name]
    except KeyError:
        raise InputError(f"unknown SD3 preset {name!r}; choose one of: {', '.join(SD3_PRESETS)}") from None


def build_modules(preset: Sd3Preset, seed: int = 0, skip: tuple[str, ...] = ()) -> Sd3Modules:
    """The preset's modules with seeded random weights (float32, eval mode); those named in ``skip``
    (``transformer``, ``text_encoder_3``: components too large to build, which are streamed instead) are None."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = None if "transformer" in skip else SD3Transformer2DModel(**preset.config("transformer"))
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in preset.config("clip")]
    t5 = None if "text_encoder_3" in skip else T5EncoderModel(T5Config(**preset.config("t5")))
    vae = AutoencoderKL(**preset.config("vae"))
    for m in [transformer, *clips, t5, vae]:
        if m is not None:
            m.float().eval()
    return Sd3Modules(transformer=transformer, text_encoders=(clips[0], clips[1], t5), vae=vae)
