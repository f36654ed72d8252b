"""Test helper: an SD 3 / 3.5 model's weights in Stability's single-file layout (sd3_medium.safetensors,
sd3.5_medium.safetensors, sd3.5_large.safetensors) and its separate text-encoder files (clip_l.safetensors,
clip_g.safetensors, t5xxl_fp16.safetensors).

A hand-written inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (the MMDiT's
``joint_blocks`` with fused qkv, the last block's pre-only context stream, the final layer's shift/scale
order) and of its VAE converter (``tests/helpers/ldm_layout.vae_to_ldm``: SD3's VAE is LDM's, without quant
convs). The text encoders are stored as transformers holds them, under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (the separate files: the same keys without that
prefix). Works on meta tensors too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdrt.export.sd3_presets import Sd3Modules

from .ldm_layout import vae_to_ldm

MMDIT = "model.diffusion_model."
ENCODER_PREFIXES = (
    "text_encoders.clip_l.transformer.",
    "text_encoders.clip_g.transformer.",
    "text_encoders.t5xxl.transformer.",
)

_TOP = {  # diffusers -> Stability, outside the blocks
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK = {  # diffusers transformer_blocks.i.* -> joint_blocks.i.*, the renamed (not fused) parts
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_QKV = {  # fused in Stability's layout: q, k, v concatenated on the output axis
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Stability's AdaLayerNormContinuous gives (shift, scale), diffusers' (scale, shift): the swap is its own
    inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_sd3(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel's state dict -> ``model.diffusion_model.*``. Every diffusers key is used once
    (a KeyError names one that is not)."""
    left = dict(sd)
    out: dict[str, torch.Tensor] = {}
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    last = blocks[-1]
    for old, new in _TOP.items():
        for suffix in ("", ".weight", ".bias"):
            if old + suffix in left:
                t = left.pop(old + suffix)
                out[new + suffix] = _swap_halves(t) if old == "norm_out.linear" else t
    for i in blocks:
        d, s = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for fused, parts in _QKV.items():
            for suffix in (".weight", ".bias"):
                if d + parts[0] + suffix in left:
                    out[s + fused + suffix] = torch.cat([left.pop(d + p + suffix) for p in parts], dim=0)
        for old, new in _BLOCK.items():
            for suffix in (".weight", ".bias"):
                if d + old + suffix in left:
                    t = left.pop(d + old + suffix)
                    # the last block's context stream is pre-only: its modulation is (shift, scale) too
                    swap = i == last and old == "norm1_context.linear"
                    out[s + new + suffix] = _swap_halves(t) if swap else t
    if left:
        raise KeyError(f"no Stability name for transformer keys {sorted(left)[:5]}")
    return {MMDIT + k: v for k, v in out.items()}


def sd3_state_dict(mods: Sd3Modules, *, encoders: bool = True, t5: bool = True) -> dict[str, torch.Tensor]:
    """The whole single file: MMDiT and VAE, and (``encoders``) CLIP-L, CLIP-G and (``t5``) T5 bundled."""
    out = transformer_to_sd3(mods.transformer.state_dict())
    out.update(vae_to_ldm(mods.vae.state_dict(), dict(mods.vae.config)))
    if encoders:
        for prefix, enc in zip(ENCODER_PREFIXES, mods.text_encoders, strict=True):
            if enc is not None and (t5 or "t5xxl" not in prefix):
                out.update(encoder_file(enc, prefix))
    return out


def encoder_file(encoder: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A text encoder as transformers holds it: T5 with its ``shared`` embedding only (the encoder's own
    ``embed_tokens`` is the same tensor), CLIP with ``text_model.`` (and the projection)."""
    sd = encoder.state_dict()
    sd.pop("encoder.embed_tokens.weight", None)
    return {
        prefix
        + (
            k
            if k.startswith(("text_model.", "text_projection.", "shared.", "encoder."))
            else "text_model." + k
        ): v
        for k, v in sd.items()
    }


def write(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}, str(path))
    return path
