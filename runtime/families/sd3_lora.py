"""SD 3 / 3.5 LoRA files in Stability's MMDiT layout -> diffusers' ``SD3Transformer2DModel`` modules.

kohya's sd-scripts (and the tools that save its layout) name the MMDiT's layers as Stability's code does, with
underscores: ``lora_unet_joint_blocks_0_x_block_attn_qkv`` (the image stream), ``..._context_block_...`` (the text
stream), SD 3.5's second attention ``x_block_attn2_qkv``; ComfyUI saves the same names dotted under
``diffusion_model.``. The map is diffusers' own single-file converter's (``convert_sd3_transformer_checkpoint_to_
diffusers``): q, k, v fused in ``qkv`` on the output axis, ``proj`` the attention's output, ``mlp.fc1`` / ``fc2`` the
feed-forward, ``adaLN_modulation.1`` the block's modulation; the last block's context stream is pre-only and its
modulation is (shift, scale) where diffusers' is (scale, shift), as is the final layer's. diffusers' own LoRA
loader reads only its own layout for SD 3. kohya's ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` are CLIP-L,
CLIP-G and T5 (T5 takes no LoRA in sdrt: its layers have no slot). PEFT files (``transformer.transformer_blocks.0.
attn.to_q.lora_A.weight``) are in diffusers' names already.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..lora_files import LoraModule
from .transformer_lora import original_name, renamed, split, swap_halves

_BLOCK = re.compile(r"^joint_blocks_(\d+)_(x_block|context_block)_(.+)$")
# (stream, Stability's layer) -> diffusers' layer(s) in transformer_blocks.N
_PARTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("x_block", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("x_block", "attn_proj"): ("attn.to_out.0",),
    ("x_block", "attn2_qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn2_proj"): ("attn2.to_out.0",),
    ("x_block", "mlp_fc1"): ("ff.net.0.proj",),
    ("x_block", "mlp_fc2"): ("ff.net.2",),
    ("x_block", "adaLN_modulation_1"): ("norm1.linear",),
    ("context_block", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("context_block", "attn_proj"): ("attn.to_add_out",),
    ("context_block", "mlp_fc1"): ("ff_context.net.0.proj",),
    ("context_block", "mlp_fc2"): ("ff_context.net.2",),
    ("context_block", "adaLN_modulation_1"): ("norm1_context.linear",),
}
# outside the blocks (no slot; merged at export)
_TOP = {
    "context_embedder": "context_embedder",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}


def sd3_lora_modules(modules: Sequence[LoraModule]) -> list[LoraModule]:
    """A file's modules with the transformer's in diffusers' names (fused q, k, v split); the rest as they are
    (diffusers' names already, the text encoders', or names no map knows: refused later, named as the file
    names them)."""
    out: list[LoraModule] = []
    for m in modules:
        if m.component != "unet":
            out.append(m)
            continue
        name = original_name(m)
        block = _BLOCK.match(name)
        if block is not None and (block.group(2), block.group(3)) in _PARTS:
            i, stream, layer = block.groups()
            parts = [f"transformer_blocks.{i}.{p}" for p in _PARTS[(stream, layer)]]
            if len(parts) > 1:
                out += split(m, parts)
            elif layer == "adaLN_modulation_1" and stream == "context_block" and _pre_only(m):
                out.append(swap_halves(renamed(m, parts[0])))
            else:
                out.append(renamed(m, parts[0]))
        elif name in _TOP:
            top = renamed(m, _TOP[name])
            out.append(swap_halves(top) if name == "final_layer_adaLN_modulation_1" else top)
        else:
            out.append(m)
    return out


def _pre_only(m: LoraModule) -> bool:
    """The last block's context stream modulates with (shift, scale) alone: 2 x width outputs (6 x elsewhere)."""
    return int(m.up.shape[0]) == 2 * int(m.down.shape[1])
