"""FLUX.1 LoRA files in Black Forest Labs' layout -> diffusers' ``FluxTransformer2DModel`` modules.

kohya's sd-scripts name FLUX.1's layers as BFL's ``flux`` package does, with underscores:
``lora_unet_double_blocks_0_img_attn_qkv`` (a double-stream block's image stream; ``txt_`` its text stream),
``lora_unet_single_blocks_0_linear1``; ComfyUI saves the same names dotted under ``diffusion_model.``. The map is
diffusers' own (``_convert_kohya_flux_lora_to_diffusers``, after kohya's ``convert_flux_lora.py``): a double
block's ``img_attn.qkv`` / ``txt_attn.qkv`` are q, k, v fused on the output axis (diffusers' ``to_q``, ``to_k``,
``to_v`` / ``add_q_proj``, ``add_k_proj``, ``add_v_proj``), ``*_attn.proj`` the attention's output (``to_out.0`` /
``to_add_out``), ``*_mlp.0`` / ``.2`` the feed-forward, ``*_mod.lin`` the modulation; a single block's ``linear1``
fuses q, k, v and the MLP's input (``proj_mlp``), ``linear2`` is ``proj_out``, ``modulation.lin`` is
``norm.linear``; the final layer's modulation is (shift, scale) where diffusers' is (scale, shift). Unlike
diffusers' converter (which splits ``linear1`` at FLUX.1's 3072-wide offsets), the widths come from the file's
own factors: q, k, v as wide as the block's input, the MLP the rest.

kohya's ``lora_te1_`` is CLIP-L (sdrt's ``text_encoder``) and ``lora_te2_`` T5 (``text_encoder_2``), which takes
no LoRA in sdrt (diffusers does not load T5 layers either). diffusers / PEFT files
(``transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight``, ai-toolkit's) are in diffusers' names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..lora_files import LoraModule
from .transformer_lora import original_name, renamed, split, swap_halves

_DOUBLE = re.compile(r"^double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)$")
_SINGLE = re.compile(r"^single_blocks_(\d+)_(linear1|linear2|modulation_lin)$")
_DOUBLE_PARTS = {
    ("img", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("img", "attn_proj"): ("attn.to_out.0",),
    ("img", "mlp_0"): ("ff.net.0.proj",),
    ("img", "mlp_2"): ("ff.net.2",),
    ("img", "mod_lin"): ("norm1.linear",),
    ("txt", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("txt", "attn_proj"): ("attn.to_add_out",),
    ("txt", "mlp_0"): ("ff_context.net.0.proj",),
    ("txt", "mlp_2"): ("ff_context.net.2",),
    ("txt", "mod_lin"): ("norm1_context.linear",),
}
_SINGLE_PARTS = {"linear2": "proj_out", "modulation_lin": "norm.linear"}
LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # fused in linear1, in this order
# outside the blocks (no slot; merged at export)
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}


def flux_lora_modules(modules: Sequence[LoraModule]) -> list[LoraModule]:
    """A file's modules with the transformer's in diffusers' names (fused layers split); the rest as they are
    (diffusers' names already, the text encoders', or names no map knows: refused later, named as the file
    names them)."""
    out: list[LoraModule] = []
    for m in modules:
        if m.component != "unet":
            out.append(m)
            continue
        name = original_name(m)
        double, single = _DOUBLE.match(name), _SINGLE.match(name)
        if double is not None:
            i, stream, layer = double.groups()
            parts = [f"transformer_blocks.{i}.{p}" for p in _DOUBLE_PARTS[(stream, layer)]]
            out += split(m, parts) if len(parts) > 1 else [renamed(m, parts[0])]
        elif single is not None:
            i, layer = single.groups()
            if layer == "linear1":
                width = int(m.down.shape[1])  # q, k and v are as wide as the block's input
                out += split(m, [f"single_transformer_blocks.{i}.{p}" for p in LINEAR1],
                             [width, width, width, int(m.up.shape[0]) - 3 * width])
            else:
                out.append(renamed(m, f"single_transformer_blocks.{i}.{_SINGLE_PARTS[layer]}"))
        elif name in _TOP:
            top = renamed(m, _TOP[name])
            out.append(swap_halves(top) if name == "final_layer_adaLN_modulation_1" else top)
        else:
            out.append(m)
    return out
