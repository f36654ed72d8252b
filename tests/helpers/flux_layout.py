"""Test helper: a FLUX.1 model's weights in Black Forest Labs' layout (flux1-dev.safetensors,
flux1-schnell.safetensors: the transformer as BFL's ``flux`` package names it; ae.safetensors: the VAE as LDM's
autoencoder without quant convs) and as ComfyUI's all-in-one checkpoints bundle them (``model.diffusion_model.``,
``vae.``, ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``).

A hand-written inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, from the layout of
BFL's modules (``double_blocks`` with fused qkv per stream, ``single_blocks`` with q, k, v and the MLP's input
fused in ``linear1``, RMS norms' ``scale``, the final layer's (shift, scale) modulation), and of the VAE
converter (``tests/helpers/ldm_layout.vae_to_ldm``). The text encoders are stored as transformers holds them
(``sd3_layout.encoder_file``). Works on meta tensors too.
"""

from __future__ import annotations

import torch

from sdrt.export.flux_presets import FluxModules

from .ldm_layout import vae_to_ldm
from .sd3_layout import encoder_file

MODEL = "model.diffusion_model."
CLIP_L, T5XXL = "text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer."

_TOP = {  # diffusers -> BFL, outside the blocks
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_DOUBLE = {  # transformer_blocks.i.* -> double_blocks.i.*, renamed (not fused)
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {  # RMS norms: diffusers' weight is BFL's scale
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # fused on the output axis, in this order


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final AdaLayerNorm gives (shift, scale), diffusers' (scale, shift): the swap is its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _blocks(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in sd if k.startswith(prefix)})


def transformer_to_bfl(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel's state dict -> BFL's names (``prefix``: ComfyUI's ``model.diffusion_model.``).
    Every diffusers key is used once (a KeyError names one that is not)."""
    left = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for old, new in _TOP.items():
        for suffix in (".weight", ".bias"):
            if old + suffix in left:
                t = left.pop(old + suffix)
                out[new + suffix] = _swap_halves(t) if old == "norm_out.linear" else t
    for i in _blocks(sd, "transformer_blocks."):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for fused, parts in _DOUBLE_QKV.items():
            for suffix in (".weight", ".bias"):
                out[b + fused + suffix] = torch.cat([left.pop(d + p + suffix) for p in parts], dim=0)
        for old, new in _DOUBLE.items():
            for suffix in (".weight", ".bias"):
                out[b + new + suffix] = left.pop(d + old + suffix)
        for old, new in _DOUBLE_NORMS.items():
            out[b + new] = left.pop(d + old)
    for i in _blocks(sd, "single_transformer_blocks."):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for suffix in (".weight", ".bias"):
            out[b + "linear1" + suffix] = torch.cat([left.pop(d + p + suffix) for p in _LINEAR1], dim=0)
            for old, new in _SINGLE.items():
                out[b + new + suffix] = left.pop(d + old + suffix)
        for old, new in _SINGLE_NORMS.items():
            out[b + new] = left.pop(d + old)
    if left:
        raise KeyError(f"no BFL name for transformer keys {sorted(left)[:5]}")
    return {prefix + k: v for k, v in out.items()}


def ae_file(vae: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The VAE as BFL's ae.safetensors holds it (LDM's encoder / decoder names, no prefix; ``prefix``:
    ComfyUI's ``vae.``)."""
    ldm = vae_to_ldm(vae.state_dict(), dict(vae.config))
    return {prefix + k.removeprefix("first_stage_model."): v for k, v in ldm.items()}


def bfl_file(mods: FluxModules) -> dict[str, torch.Tensor]:
    """flux1-dev.safetensors / flux1-schnell.safetensors: the transformer alone, as BFL publishes it."""
    assert mods.transformer is not None
    return transformer_to_bfl(mods.transformer.state_dict())


def comfy_file(mods: FluxModules, *, t5: bool = True) -> dict[str, torch.Tensor]:
    """A ComfyUI all-in-one checkpoint: the transformer, the VAE, CLIP-L and (``t5``) T5-XXL."""
    assert mods.transformer is not None and mods.t5 is not None
    out = transformer_to_bfl(mods.transformer.state_dict(), MODEL)
    out.update(ae_file(mods.vae, "vae."))
    out.update(encoder_file(mods.clip, CLIP_L))
    if t5:
        out.update(encoder_file(mods.t5, T5XXL))
    return out
