"""FLUX.1 architecture presets ([schnell] and [dev] at full size, and tiny ones for the tests) and the seeded
construction of their torch modules.

The full-size values are black-forest-labs' diffusers folders' (transformer/config.json, text_encoder*/,
vae/config.json, scheduler/scheduler_config.json; nothing is fetched): a 12B ``FluxTransformer2DModel`` (19
double-stream and 38 single-stream blocks of width 3072, rotary axes 16 + 56 + 56), CLIP ViT-L/14 (its pooled
output only), T5-XXL v1.1's encoder, and a 16-channel VAE with scaling 0.3611 and shift 0.1159. [dev] embeds
the guidance scale (``guidance_embeds``) and shifts its schedule by the image's token count
(``use_dynamic_shifting``); [schnell] does neither. FLUX.1 Fill [dev] (black-forest-labs/FLUX.1-Fill-dev, run by
diffusers' ``FluxFillPipeline``) is [dev] with 384 packed input channels: the latents', the masked image's
latents' and the mask's (each latent pixel's 8 x 8 pixels), 64 + 64 + 256. FLUX.1 Kontext [dev]
(black-forest-labs/FLUX.1-Kontext-dev, diffusers' ``FluxKontextPipeline``) has [dev]'s structure and schedule: only
the pipeline class tells it apart (its transformer also reads a reference image's tokens). FLUX.1 Depth [dev] and
Canny [dev] (black-forest-labs/FLUX.1-Depth-dev, FLUX.1-Canny-dev, diffusers' ``FluxControlPipeline``) are [dev] with
128 packed input channels: the latents' and a control image's latents (a depth map or canny edges, VAE-encoded),
64 + 64; the two share every shape (only their weights tell them apart).

The tiny presets keep that structure at small widths: one double and two single blocks, rotary axes summing to
the head width, a T5 as wide as the transformer's ``joint_attention_dim`` and a CLIP as wide as its
``pooled_projection_dim``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from sdrt.runtime.errors import InputError

from .presets import clip_config, vae_config
from .sd3_presets import t5_config


@dataclass(frozen=True)
class FluxPreset:
    name: str
    family: str  # "flux" (runtime/families/flux.py)
    default_size: int  # pixels
    transformer: dict[str, Any]  # FluxTransformer2DModel kwargs
    vae: dict[str, Any]  # AutoencoderKL kwargs (16 latent channels, shift_factor)
    clip: dict[str, Any]  # CLIPTextConfig kwargs (CLIPTextModel: its pooled output is used)
    t5: dict[str, Any]  # T5Config kwargs (an encoder only)
    scheduler: dict[str, Any]  # FlowMatchEulerDiscreteScheduler config, "_class_name" included
    prediction_type: str = "flow_prediction"
    t5_tokens: int = 512  # diffusers' max_sequence_length default for both variants
    pad_token: str = "<|endoftext|>"  # black-forest-labs' CLIP tokenizer pads with the end token
    test_scale: bool = False  # a tiny structure for tests: the shipped tiny T5 tokenizer serves its files
    # diffusers' pipeline that runs it (FluxFillPipeline, FluxKontextPipeline, FluxControlPipeline)
    pipeline_class: str = "FluxPipeline"

    def config(self, part: str) -> Any:
        return copy.deepcopy(getattr(self, part))

    @property
    def guided(self) -> bool:
        """The transformer embeds a guidance scale ([dev])."""
        return bool(self.transformer.get("guidance_embeds"))

    @property
    def kontext(self) -> bool:
        """FLUX.1 Kontext: [dev]'s transformer, run by FluxKontextPipeline with a reference image's tokens beside
        the image's (its structure is [dev]'s: only the pipeline class tells them apart)."""
        return self.pipeline_class == KONTEXT_PIPELINE


def variant(transformer: dict[str, Any]) -> str:
    """Which FLUX.1 transformer a config is, from its packed channels: ``fill`` (FLUX.1 Fill: the masked image's
    latents and the mask beside the latents, more than twice the output's), ``control`` (FLUX.1 Depth / Canny: a
    control image's latents beside the latents, twice the output's), else ``base`` ([schnell], [dev], Kontext)."""
    inner = int(transformer["in_channels"])
    out = int(transformer.get("out_channels") or inner)
    return "fill" if inner > 2 * out else "control" if inner == 2 * out else "base"


def fills(transformer: dict[str, Any]) -> bool:
    """A transformer config of FLUX.1 Fill (diffusers' FluxFillPipeline concatenates the masked image's latents
    and the mask to the latents' tokens)."""
    return variant(transformer) == "fill"


def controls(transformer: dict[str, Any]) -> bool:
    """A transformer config of FLUX.1 Depth or Canny (diffusers' FluxControlPipeline concatenates a control
    image's packed latents to the latents' tokens)."""
    return variant(transformer) == "control"


@dataclass
class FluxModules:
    """A preset's torch modules, float32, in eval mode (``transformer`` or ``t5`` None: streamed, not held)."""

    transformer: torch.nn.Module | None
    clip: torch.nn.Module
    t5: torch.nn.Module | None
    vae: torch.nn.Module


def _transformer(double: int, single: int, head_dim: int, heads: int, joint: int, pooled: int,
                 guidance: bool, axes: tuple[int, int, int], fill: bool = False,
                 control: bool = False) -> dict[str, Any]:
    return {
        "patch_size": 1,
        # 16 latent channels x a 2x2 patch, packed by the pipeline (here: by the graph); FLUX.1 Fill also takes the
        # masked image's 16 latent channels and the mask's 8 x 8 pixels per latent pixel, each x a 2x2 patch;
        # FLUX.1 Depth / Canny the control image's 16 latent channels x a 2x2 patch
        "in_channels": 4 * (16 + 16 + 64) if fill else 4 * (16 + 16) if control else 64,
        "out_channels": 64 if fill or control else None,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "guidance_embeds": guidance,
        "axes_dims_rope": list(axes),
    }


def _vae(channels: list[int], sample_size: int, groups: int, layers: int) -> dict[str, Any]:
    """FLUX.1's VAE: 16 latent channels, no quant convs, its own scaling and shift."""
    return {**vae_config(channels, sample_size, 0.3611, groups, layers, latent_channels=16),
            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def _scheduler(dynamic: bool) -> dict[str, Any]:
    """black-forest-labs' scheduler configs: [dev] shifts by the token count (shift 3.0 unused), [schnell] not."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0 if dynamic else 1.0, "use_dynamic_shifting": dynamic, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


FLUX_PRESETS: dict[str, FluxPreset] = {}
KONTEXT_PIPELINE = "FluxKontextPipeline"
CONTROL_PIPELINE = "FluxControlPipeline"


def _add(p: FluxPreset) -> None:
    FLUX_PRESETS[p.name] = p


_TINY_CLIP = clip_config(16, 32, 2, 2, "quick_gelu", 16)
_TINY_VAE = _vae([16, 16, 32, 32], 64, groups=8, layers=1)
for _name, _guided in (("flux-schnell-tiny", False), ("flux-dev-tiny", True)):
    _add(FluxPreset(
        _name, "flux", 64,
        transformer=_transformer(1, 2, 8, 2, joint=48, pooled=16, guidance=_guided, axes=(2, 2, 4)),
        vae=_TINY_VAE, clip=_TINY_CLIP, t5=t5_config(48, 8, 64, 2, 2), scheduler=_scheduler(_guided),
        test_scale=True,
    ))
_add(FluxPreset(
    "flux-fill-dev-tiny", "flux", 64,
    transformer=_transformer(1, 2, 8, 2, joint=48, pooled=16, guidance=True, axes=(2, 2, 4), fill=True),
    vae=_TINY_VAE, clip=_TINY_CLIP, t5=t5_config(48, 8, 64, 2, 2), scheduler=_scheduler(True), test_scale=True,
    pipeline_class="FluxFillPipeline",
))
_add(FluxPreset(
    "flux-kontext-dev-tiny", "flux", 64,
    transformer=_transformer(1, 2, 8, 2, joint=48, pooled=16, guidance=True, axes=(2, 2, 4)),
    vae=_TINY_VAE, clip=_TINY_CLIP, t5=t5_config(48, 8, 64, 2, 2), scheduler=_scheduler(True), test_scale=True,
    pipeline_class=KONTEXT_PIPELINE,
))
for _name in ("flux-depth-dev-tiny", "flux-canny-dev-tiny"):  # one structure: Depth's and Canny's weights differ
    _add(FluxPreset(
        _name, "flux", 64,
        transformer=_transformer(1, 2, 8, 2, joint=48, pooled=16, guidance=True, axes=(2, 2, 4), control=True),
        vae=_TINY_VAE, clip=_TINY_CLIP, t5=t5_config(48, 8, 64, 2, 2), scheduler=_scheduler(True), test_scale=True,
        pipeline_class=CONTROL_PIPELINE,
    ))

_CLIP_L = clip_config(768, 3072, 12, 12, "quick_gelu", 768)
_T5_XXL = t5_config(4096, 64, 10240, 64, 24)
_FLUX_VAE = _vae([128, 256, 512, 512], 1024, groups=32, layers=2)
for _name, _guided in (("flux-schnell", False), ("flux-dev", True)):
    _add(FluxPreset(
        _name, "flux", 1024,
        transformer=_transformer(19, 38, 128, 24, joint=4096, pooled=768, guidance=_guided, axes=(16, 56, 56)),
        vae=_FLUX_VAE, clip=_CLIP_L, t5=_T5_XXL, scheduler=_scheduler(_guided),
    ))
_add(FluxPreset(  # black-forest-labs/FLUX.1-Fill-dev: [dev]'s structure and schedule, 384 input channels
    "flux-fill-dev", "flux", 1024,
    transformer=_transformer(19, 38, 128, 24, joint=4096, pooled=768, guidance=True, axes=(16, 56, 56), fill=True),
    vae=_FLUX_VAE, clip=_CLIP_L, t5=_T5_XXL, scheduler=_scheduler(True), pipeline_class="FluxFillPipeline",
))
_add(FluxPreset(  # black-forest-labs/FLUX.1-Kontext-dev: [dev]'s structure and schedule, FluxKontextPipeline
    "flux-kontext-dev", "flux", 1024,
    transformer=_transformer(19, 38, 128, 24, joint=4096, pooled=768, guidance=True, axes=(16, 56, 56)),
    vae=_FLUX_VAE, clip=_CLIP_L, t5=_T5_XXL, scheduler=_scheduler(True), pipeline_class=KONTEXT_PIPELINE,
))

for _name in ("flux-depth-dev", "flux-canny-dev"):  # black-forest-labs/FLUX.1-Depth-dev, FLUX.1-Canny-dev
    _add(FluxPreset(  # [dev]'s structure and schedule, 128 input channels, FluxControlPipeline
        _name, "flux", 1024,
        transformer=_transformer(19, 38, 128, 24, joint=4096, pooled=768, guidance=True, axes=(16, 56, 56),
                                 control=True),
        vae=_FLUX_VAE, clip=_CLIP_L, t5=_T5_XXL, scheduler=_scheduler(True), pipeline_class=CONTROL_PIPELINE,
    ))


def get_flux_preset(name: str) -> FluxPreset:
    try:
        return FLUX_PRESETS[name]
    except KeyError:
        raise InputError(f"unknown FLUX.1 preset {name!r}; choose one of: {', '.join(FLUX_PRESETS)}") from None


def build_modules(preset: FluxPreset, seed: int = 0, skip: tuple[str, ...] = ()) -> FluxModules:
    """The preset's modules with seeded random weights (float32, eval mode); those named in ``skip``
    (``transformer``, ``text_encoder_2``: too large to build, streamed instead) are None."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = None if "transformer" in skip else FluxTransformer2DModel(**preset.config("transformer"))
    clip = CLIPTextModel(CLIPTextConfig(**preset.config("clip")))
    t5 = None if "text_encoder_2" in skip else T5EncoderModel(T5Config(**preset.config("t5")))
    vae = AutoencoderKL(**preset.config("vae"))
    for m in (transformer, clip, t5, vae):
        if m is not None:
            m.float().eval()
    return FluxModules(transformer=transformer, clip=clip, t5=t5, vae=vae)
