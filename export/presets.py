"""Architecture presets: the real configurations of each family, shipped so nothing is ever fetched.

Full-size presets mirror the public diffusers configurations of SD 1.5, SD 2.1 (base 512 epsilon and
768 v-prediction), SDXL base 1.0, and the few-step distillations SD-Turbo (SD 2.1's architecture) and
SDXL-Turbo (SDXL's), both served at 512 with Euler ancestral over trailing timesteps, and the SDXL refiner 1.0
(an SDXL-family expert for the last part of the schedule: only the OpenCLIP bigG encoder, aesthetic-score
time ids). Each ``-tiny`` preset keeps its family's structure (the same block types, levels, encoders and
conditioning inputs) with small widths, for tests and the demo; ``sdxl-refiner-tiny`` pairs with ``sdxl-tiny``
(its encoder is as wide as sdxl-tiny's second one).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

from sdrt.runtime.errors import InputError
from sdrt.runtime.families import Family, family_of
from sdrt.runtime.manifest import encoder_names, pooled_encoder

__all__ = ["PRESETS", "Preset", "encoder_names", "get_preset", "pooled_encoder"]


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    default_size: int  # pixels
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # CLIPTextConfig kwargs; the second one (SDXL) has a projection
    scheduler: dict[str, Any]  # diffusers scheduler config, "_class_name" included
    pad_tokens: tuple[str, ...]  # the pad token of each tokenizer
    vae_fp32: bool = False  # the VAE overflows in fp16 (SDXL): keep it fp32
    # False: the weights have another preset's shapes (a distillation), so only its name selects it
    by_shape: bool = True
    # an SDXL refiner: one text encoder (the second, with projection) and time ids
    # [h, w, crop_top, crop_left, aesthetic_score]
    refiner: bool = False

    def config(self, part: str) -> dict[str, Any]:
        return copy.deepcopy(getattr(self, part))

    @property
    def encoder_names(self) -> tuple[str, ...]:
        """The export's text encoder components, in the order of ``text_encoders``."""
        return self.model_family.encoders

    @property
    def model_family(self) -> Family:
        """The family module's description of this model (runtime/families)."""
        return family_of(self)



_SCHED_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def clip_config(hidden: int, inter: int, heads: int, layers: int, act: str, proj: int) -> dict[str, Any]:
    """A CLIP text encoder config (transformers CLIPTextConfig keys): the vocabulary, 77 positions and ids of
    openai's ViT-L; eos id 2 makes transformers pool at the argmax of the ids (the real end-of-text token)."""
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": proj,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def vae_config(channels: list[int], sample_size: int, scaling: float, groups: int = 32, layers: int = 2,
               latent_channels: int = 4) -> dict[str, Any]:
    """An AutoencoderKL config (diffusers' keys) with SD's encoder/decoder blocks."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": layers,
        "act_fn": "silu",
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": scaling,
    }


_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_XL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_XL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
_REFINER_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_REFINER_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]


def _sd_unet(channels: list[int], head_dim: int | list[int], cross: int, sample: int, groups: int = 32,
             linear_proj: bool = False, upcast: bool = False) -> dict[str, Any]:
    return {
        "sample_size": sample,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": _SD_DOWN,
        "up_block_types": _SD_UP,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "attention_head_dim": head_dim,
        "cross_attention_dim": cross,
        "norm_num_groups": groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
        "use_linear_projection": linear_proj,
        "upcast_attention": upcast,
    }


def _xl_unet(channels: list[int], heads: list[int], tlayers: list[int], cross: int, time_dim: int,
             text_embed_dim: int, sample: int, groups: int = 32) -> dict[str, Any]:
    return {
        "sample_size": sample,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": _XL_DOWN,
        "up_block_types": _XL_UP,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": 2,
        "attention_head_dim": heads,
        "transformer_layers_per_block": tlayers,
        "cross_attention_dim": cross,
        "norm_num_groups": groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": time_dim,
        # six time ids (original size, crop, target size) embedded, plus the pooled text embedding
        "projection_class_embeddings_input_dim": 6 * time_dim + text_embed_dim,
    }


def _refiner_unet(channels: list[int], heads: list[int], tlayers: int, cross: int, time_dim: int,
                  text_embed_dim: int, sample: int, groups: int = 32) -> dict[str, Any]:
    """stabilityai/stable-diffusion-xl-refiner-1.0's UNet layout: four levels, attention in the middle two."""
    cfg = _xl_unet(channels, heads, [tlayers] * len(channels), cross, time_dim, text_embed_dim, sample, groups)
    # five time ids (original size, crop, aesthetic score) embedded, plus the pooled text embedding
    return {**cfg, "down_block_types": _REFINER_DOWN, "up_block_types": _REFINER_UP,
            "transformer_layers_per_block": tlayers, "projection_class_embeddings_input_dim": 5 * time_dim + text_embed_dim}


def _sched(cls: str, prediction: str, **extra: Any) -> dict[str, Any]:
    return {"_class_name": cls, **_SCHED_COMMON, "prediction_type": prediction, **extra}


_PNDM = {"skip_prk_steps": True}
# SD-Turbo / SDXL-Turbo: adversarial diffusion distillation serves 1-4 steps from the top of the schedule
_TURBO = {"timestep_spacing": "trailing", "skip_prk_steps": True}
_EULER = {"interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0,
          "skip_prk_steps": True}

PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


# --- full size -----------------------------------------------------------------------------------
_add(Preset(
    "sd15", "sd1", "epsilon", 512,
    unet=_sd_unet([320, 640, 1280, 1280], 8, 768, 64),
    vae=vae_config([128, 256, 512, 512], 512, 0.18215),
    text_encoders=(clip_config(768, 3072, 12, 12, "quick_gelu", 768),),
    scheduler=_sched("PNDMScheduler", "epsilon", **_PNDM),
    pad_tokens=("<|endoftext|>",),
))
_add(Preset(
    "sd21", "sd2", "epsilon", 512,
    unet=_sd_unet([320, 640, 1280, 1280], [5, 10, 20, 20], 1024, 64, linear_proj=True),
    vae=vae_config([128, 256, 512, 512], 512, 0.18215),
    text_encoders=(clip_config(1024, 4096, 16, 23, "gelu", 512),),
    scheduler=_sched("PNDMScheduler", "epsilon", **_PNDM),
    pad_tokens=("!",),
))
_add(Preset(
    "sd21-768", "sd2", "v_prediction", 768,
    unet=_sd_unet([320, 640, 1280, 1280], [5, 10, 20, 20], 1024, 96, linear_proj=True, upcast=True),
    vae=vae_config([128, 256, 512, 512], 768, 0.18215),
    text_encoders=(clip_config(1024, 4096, 16, 23, "gelu", 512),),
    scheduler=_sched("DDIMScheduler", "v_prediction"),
    pad_tokens=("!",),
))
_add(Preset(
    "sdxl", "sdxl", "epsilon", 1024,
    unet=_xl_unet([320, 640, 1280], [5, 10, 20], [1, 2, 10], 2048, 256, 1280, 128),
    vae=vae_config([128, 256, 512, 512], 1024, 0.13025),
    text_encoders=(clip_config(768, 3072, 12, 12, "quick_gelu", 768), clip_config(1280, 5120, 20, 32, "gelu", 1280)),
    scheduler=_sched("EulerDiscreteScheduler", "epsilon", **_EULER),
    pad_tokens=("<|endoftext|>", "!"),
    vae_fp32=True,
))
_add(Preset(
    "sdxl-refiner", "sdxl", "epsilon", 1024,
    unet=_refiner_unet([384, 768, 1536, 1536], [6, 12, 12, 24], 4, 1280, 256, 1280, 128),
    vae=vae_config([128, 256, 512, 512], 1024, 0.13025),
    text_encoders=(clip_config(1280, 5120, 20, 32, "gelu", 1280),),
    scheduler=_sched("EulerDiscreteScheduler", "epsilon", **_EULER),
    pad_tokens=("!",),
    vae_fp32=True,
    refiner=True,
))
_add(Preset(
    "sd-turbo", "sd2", "epsilon", 512,
    unet=_sd_unet([320, 640, 1280, 1280], [5, 10, 20, 20], 1024, 64, linear_proj=True),
    vae=vae_config([128, 256, 512, 512], 512, 0.18215),
    text_encoders=(clip_config(1024, 4096, 16, 23, "gelu", 512),),
    scheduler=_sched("EulerAncestralDiscreteScheduler", "epsilon", **_TURBO),
    pad_tokens=("!",),
    by_shape=False,
))
_add(Preset(
    "sdxl-turbo", "sdxl", "epsilon", 512,
    unet=_xl_unet([320, 640, 1280], [5, 10, 20], [1, 2, 10], 2048, 256, 1280, 64),
    vae=vae_config([128, 256, 512, 512], 512, 0.13025),
    text_encoders=(clip_config(768, 3072, 12, 12, "quick_gelu", 768), clip_config(1280, 5120, 20, 32, "gelu", 1280)),
    scheduler=_sched("EulerAncestralDiscreteScheduler", "epsilon", **_TURBO),
    pad_tokens=("<|endoftext|>", "!"),
    vae_fp32=True,
    by_shape=False,
))

# --- tiny: same structure, small widths ----------------------------------------------------------
_TINY_CLIP = clip_config(32, 64, 4, 3, "quick_gelu", 32)
_add(Preset(
    "sd15-tiny", "sd1", "epsilon", 64,
    unet=_sd_unet([32, 32, 64, 64], 8, 32, 8, groups=8),
    vae=vae_config([16, 16, 32, 32], 64, 0.18215, groups=8, layers=1),
    text_encoders=(_TINY_CLIP,),
    scheduler=_sched("PNDMScheduler", "epsilon", **_PNDM),
    pad_tokens=("<|endoftext|>",),
))
_add(Preset(
    "sd21-tiny", "sd2", "v_prediction", 64,
    unet=_sd_unet([32, 32, 64, 64], [2, 2, 4, 4], 32, 8, groups=8, linear_proj=True, upcast=True),
    vae=vae_config([16, 16, 32, 32], 64, 0.18215, groups=8, layers=1),
    text_encoders=(clip_config(32, 64, 4, 3, "gelu", 32),),
    scheduler=_sched("DDIMScheduler", "v_prediction"),
    pad_tokens=("!",),
))
_add(Preset(
    "sdxl-tiny", "sdxl", "epsilon", 64,
    unet=_xl_unet([32, 64, 64], [2, 4, 4], [1, 2, 2], 64, 8, 32, 8, groups=8),
    vae=vae_config([16, 16, 32, 32], 64, 0.13025, groups=8, layers=1),
    text_encoders=(_TINY_CLIP, clip_config(32, 64, 4, 3, "gelu", 32)),
    scheduler=_sched("EulerDiscreteScheduler", "epsilon", **_EULER),
    pad_tokens=("<|endoftext|>", "!"),
    vae_fp32=True,
))
_add(Preset(
    "sdxl-refiner-tiny", "sdxl", "epsilon", 64,
    unet=_refiner_unet([32, 64, 64, 64], [2, 4, 4, 4], 2, 32, 8, 32, 8, groups=8),
    vae=vae_config([16, 16, 32, 32], 64, 0.13025, groups=8, layers=1),
    text_encoders=(clip_config(32, 64, 4, 3, "gelu", 32),),  # as wide as sdxl-tiny's second encoder: a pair
    scheduler=_sched("EulerDiscreteScheduler", "epsilon", **_EULER),
    pad_tokens=("!",),
    vae_fp32=True,
    refiner=True,
))
_add(replace(PRESETS["sd21-tiny"], name="sd-turbo-tiny", prediction_type="epsilon",
             scheduler=_sched("EulerAncestralDiscreteScheduler", "epsilon", **_TURBO), by_shape=False))
_add(replace(PRESETS["sdxl-tiny"], name="sdxl-turbo-tiny",
             scheduler=_sched("EulerAncestralDiscreteScheduler", "epsilon", **_TURBO), by_shape=False))


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


# --- inpainting: the same architectures with a 9-channel UNet input --------------------------------
# (noisy latents, the mask downsampled to latent size, the masked image's latents), as the public
# runwayml / stabilityai / diffusers inpainting checkpoints. SD 2 inpainting is the 512 px epsilon model.
def _inpaint(name: str, base: str, **changes: Any) -> None:
    b = PRESETS[base]
    latent = int(b.unet["in_channels"])
    _add(replace(b, name=name, unet={**b.config("unet"), "in_channels": 2 * latent + 1}, **changes))


_inpaint("sd15-inpaint", "sd15")
_inpaint("sd2-inpaint", "sd21")
_inpaint("sdxl-inpaint", "sdxl")
_inpaint("sd15-inpaint-tiny", "sd15-tiny")
_inpaint("sd2-inpaint-tiny", "sd21-tiny", prediction_type="epsilon",
         scheduler=_sched("PNDMScheduler", "epsilon", **_PNDM))
_inpaint("sdxl-inpaint-tiny", "sdxl-tiny")
