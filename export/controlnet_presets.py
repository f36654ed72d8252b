"""ControlNet architecture presets, shipped so a ControlNet single file converts without a download.

A ControlNet is a copy of its UNet's encoder (the same block types, widths, attention and conditioning
inputs) plus a small conditioning-image embedding and one zero-initialized 1x1 convolution per residual.
Each preset is therefore derived from the UNet preset it pairs with:

- ``sd15-controlnet``: lllyasviel's SD 1.5 ControlNets (sd-controlnet-*, control_v11*), conditioning
  embedding widths (16, 32, 96, 256);
- ``sdxl-controlnet``: diffusers' SDXL ControlNets (controlnet-canny-sdxl-1.0 and the like);
- ``sd15-controlnet-tiny`` / ``sdxl-controlnet-tiny``: the structure of ``sd15-tiny`` / ``sdxl-tiny`` with
  small widths, for tests and the demo.

SD 3 / 3.5's ControlNets (``SD3ControlNetModel``) are a few MMDiT blocks of their transformer's width instead,
in two layouts, each with a tiny preset for the tests: InstantX's SD3 nets (``sd3-controlnet-tiny`` on
``sd3-tiny``: joint blocks with a context stream, zeros for the pooled projections, the control latents without
the VAE's shift) and Stability's SD 3.5 nets (``sd35-controlnet-tiny`` on ``sd35-medium-tiny``: single-stream
blocks, no text states, the transformer's position embedding, the pooled projections and the shift).

FLUX.1's (``FluxControlNetModel``) are double- and single-stream blocks of their transformer's width reading the
control image's packed latents: ``flux-controlnet-tiny`` (InstantX's layout) and ``flux-controlnet-union-tiny``
(a Union net: a control mode's embedding joins the text tokens), both on ``flux-dev-tiny``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from sdrt.runtime.errors import InputError

from .flux_presets import FLUX_PRESETS
from .presets import PRESETS
from .sd3_presets import SD3_PRESETS


@dataclass(frozen=True)
class ControlNetPreset:
    name: str
    family: str  # the family it pairs with: "sd1" | "sd2" | "sdxl" | "sd3" | "flux"
    unet_preset: str  # the UNet preset whose encoder it copies
    controlnet: dict[str, Any]  # the diffusers class's config kwargs
    model_class: str = "ControlNetModel"  # diffusers' class: ControlNetModel (UNet families), SD3ControlNetModel,
    # FluxControlNetModel

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self.controlnet)


# UNet2DConditionModel config keys that a ControlNetModel shares (the encoder half), as from_unet copies them
_SHARED = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads", "encoder_hid_dim",
    "encoder_hid_dim_type",
)


def controlnet_config_from_unet(unet: dict[str, Any], cond_channels: tuple[int, ...] = (16, 32, 96, 256)
                                ) -> dict[str, Any]:
    """A ControlNetModel config copying a UNet config's encoder, as diffusers' ``ControlNetModel.from_unet``."""
    cfg = {k: copy.deepcopy(unet[k]) for k in _SHARED if k in unet}
    cfg.update(conditioning_channels=3, controlnet_conditioning_channel_order="rgb",
               conditioning_embedding_out_channels=list(cond_channels), global_pool_conditions=False)
    return cfg


CONTROLNET_PRESETS: dict[str, ControlNetPreset] = {}


def _add(name: str, unet_preset: str, cond_channels: tuple[int, ...]) -> None:
    base = PRESETS[unet_preset]
    CONTROLNET_PRESETS[name] = ControlNetPreset(
        name, base.family, unet_preset, controlnet_config_from_unet(base.config("unet"), cond_channels))


_add("sd15-controlnet", "sd15", (16, 32, 96, 256))
_add("sdxl-controlnet", "sdxl", (16, 32, 96, 256))
# tiny: four conditioning widths (three stride-2 stages: pixels -> latent size), small
_add("sd15-controlnet-tiny", "sd15-tiny", (4, 8, 8, 16))
_add("sdxl-controlnet-tiny", "sdxl-tiny", (4, 8, 8, 16))


# SD3ControlNetModel keys that copy the transformer's (diffusers' from_transformer copies its whole config)
_SD3_SHARED = ("sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
               "pos_embed_max_size", "qk_norm")


def sd3_controlnet_config(transformer: dict[str, Any], layers: int, *, stability: bool = False) -> dict[str, Any]:
    """An SD3ControlNetModel config of ``layers`` blocks for an SD3 transformer config: InstantX's layout (joint
    blocks, ``force_zeros_for_pooled_projection``), or with ``stability`` Stability's SD 3.5 layout (single-stream
    blocks without text states, the transformer's position embedding, the pooled projections kept)."""
    cfg = {k: copy.deepcopy(transformer[k]) for k in _SD3_SHARED}
    cfg.update(num_layers=layers, extra_conditioning_channels=0)
    if stability:
        cfg.update(joint_attention_dim=None, use_pos_embed=False, pos_embed_type=None,
                   force_zeros_for_pooled_projection=False, qk_norm=None)
    return cfg


def _add_sd3(name: str, transformer_preset: str, layers: int, stability: bool) -> None:
    base = SD3_PRESETS[transformer_preset]
    CONTROLNET_PRESETS[name] = ControlNetPreset(
        name, base.family, transformer_preset,
        sd3_controlnet_config(base.config("transformer"), layers, stability=stability), "SD3ControlNetModel")


_add_sd3("sd3-controlnet-tiny", "sd3-tiny", 2, stability=False)
_add_sd3("sd35-controlnet-tiny", "sd35-medium-tiny", 2, stability=True)


# FluxControlNetModel keys that copy the transformer's (diffusers' from_transformer copies its whole config)
_FLUX_SHARED = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")


def flux_controlnet_config(transformer: dict[str, Any], double: int, single: int,
                           modes: int | None = None) -> dict[str, Any]:
    """A FluxControlNetModel config of ``double`` double-stream and ``single`` single-stream blocks for a FLUX
    transformer config, reading the control image's latents (InstantX's layout); ``modes``: a Union net's mode
    count (``num_mode``, InstantX's and Shakker-Labs' Union nets)."""
    cfg = {k: copy.deepcopy(transformer[k]) for k in _FLUX_SHARED}
    cfg.update(num_layers=double, num_single_layers=single, num_mode=modes, conditioning_embedding_channels=None)
    return cfg


def _add_flux(name: str, transformer_preset: str, double: int, single: int, modes: int | None = None) -> None:
    base = FLUX_PRESETS[transformer_preset]
    CONTROLNET_PRESETS[name] = ControlNetPreset(
        name, base.family, transformer_preset,
        flux_controlnet_config(base.config("transformer"), double, single, modes), "FluxControlNetModel")


_add_flux("flux-controlnet-tiny", "flux-dev-tiny", 1, 1)
_add_flux("flux-controlnet-union-tiny", "flux-dev-tiny", 1, 1, modes=3)


def get_controlnet_preset(name: str) -> ControlNetPreset:
    try:
        return CONTROLNET_PRESETS[name]
    except KeyError:
        raise InputError(f"unknown ControlNet preset {name!r}; choose one of: {', '.join(CONTROLNET_PRESETS)}"
                         ) from None
