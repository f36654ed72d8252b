"""LoRA for the transformer families (SD 3 / 3.5, FLUX.1): which of the denoiser's layers get a slot, and the
helpers their key maps share (runtime/families/sd3_lora.py, flux_lora.py).

The layers are diffusers' (``SD3Transformer2DModel``, ``FluxTransformer2DModel``), which the exports hold under
the same names. ``attn``: every attention projection of the blocks, the image stream's (``to_q``, ``to_k``,
``to_v``, ``to_out.0``; SD 3.5's second attention ``attn2``) and the context stream's (``add_q_proj``,
``add_k_proj``, ``add_v_proj``, ``to_add_out``), diffusers' LoRA training scripts' targets; ``attn-ff``: every
linear layer of the blocks, as kohya's scripts train them: also the feed-forward layers (``ff``, ``ff_context``;
FLUX.1's single blocks' ``proj_mlp`` and ``proj_out``) and the modulation (``norm1.linear``,
``norm1_context.linear``, the single blocks' ``norm.linear``). Nothing outside the blocks (the embedders, the final
layer) has a slot; their blocks hold no convolution.

Files in the original layouts (Stability's MMDiT, Black Forest Labs' FLUX.1: kohya's ``lora_unet_...`` and
ComfyUI's ``diffusion_model.`` keys) fuse what diffusers splits: q, k and v in one ``qkv`` layer (FLUX.1's single
blocks: q, k, v and the MLP's input in ``linear1``). A fused layer's LoRA is ``up (down x)`` with ``up``'s rows the
parts' outputs in order, so each part takes the same ``down`` and its rows of ``up``, at the same rank and alpha:
exactly the fused product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..errors import InputError
from ..lora_files import LoraFile, LoraModule
from .base import Family

_BLOCKS = r"(?:transformer_blocks|single_transformer_blocks)\.\d+\."
ATTN = _BLOCKS + r"attn2?\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
BLOCK_LINEARS = (
    r"transformer_blocks\.\d+\.(?:ff|ff_context)\.net\.(?:0\.proj|2)",
    r"single_transformer_blocks\.\d+\.(?:proj_mlp|proj_out)",
    _BLOCKS + r"(?:norm1|norm1_context|norm)\.linear",
)
TARGETS: dict[str, tuple[str, ...]] = {"attn": (ATTN,), "attn-ff": (ATTN, *BLOCK_LINEARS)}


def slot_targets(label: str, targets: str) -> tuple[str, ...]:
    """The denoiser's slotted layers for ``targets`` (full-match patterns over module names); InputError for a
    target set these families do not have (``attn-ff-conv``: their blocks hold no convolution)."""
    if targets not in TARGETS:
        raise InputError(f"--lora-slots targets {targets!r}: {label} transformer blocks hold no convolutions; use "
                         f"{' or '.join(TARGETS)} (attn-ff: every linear layer of the blocks, as kohya trains them)")
    return TARGETS[targets]


def renamed(m: LoraModule, module: str) -> LoraModule:
    """``m`` under diffusers' (dotted) module name."""
    return replace(m, module=module, flat=False)


def split(m: LoraModule, parts: Sequence[str], sizes: Sequence[int] | None = None) -> list[LoraModule]:
    """A fused layer's LoRA as its parts' (diffusers' separate layers): each the same ``down`` and its rows of
    ``up`` (``sizes``: the parts' output widths, in order; None: equal)."""
    rows = int(m.up.shape[0])
    widths = list(sizes) if sizes is not None else [rows // len(parts)] * len(parts)
    if sum(widths) != rows or min(widths) <= 0:
        raise InputError(f"LoRA module {m.module} adapts a fused layer of {rows} outputs, which does not split into "
                         f"{', '.join(parts)} of this model ({widths}): the LoRA was trained for another architecture")
    bounds = np.cumsum([0, *widths])
    return [replace(m, module=name, flat=False, up=m.up[a:b]) for name, a, b in zip(parts, bounds[:-1], bounds[1:],
                                                                                   strict=True)]


def swap_halves(m: LoraModule) -> LoraModule:
    """The original layouts' final-layer modulation gives (shift, scale), diffusers' ``AdaLayerNormContinuous``
    (scale, shift): the rows of ``up`` swapped in halves."""
    a, b = np.split(np.asarray(m.up), 2, axis=0)
    return replace(m, up=np.concatenate([b, a], axis=0))


def original_name(m: LoraModule) -> str:
    """A denoiser module's name in the original layout with underscores for dots (kohya's spelling already;
    ComfyUI's dotted ``double_blocks.0.img_attn.qkv`` becomes ``double_blocks_0_img_attn_qkv``)."""
    return m.module.replace(".", "_")


class TransformerLoraFamily(Family):
    """What the transformer families (SD 3 / 3.5, FLUX.1) share of the family interface for LoRA: the denoiser is
    "the transformer", its slots are the blocks' layers (``slot_targets``), and a file's modules are mapped to
    diffusers' names by ``lora_modules`` (each family's own key map)."""

    @property
    def denoiser_label(self) -> str:
        return "transformer"

    def lora_targets(self, targets: str) -> tuple[str, ...] | None:
        return slot_targets(self.label, targets)

    def lora_file(self, lora: LoraFile) -> LoraFile:
        return replace(lora, modules=tuple(self.lora_modules(lora.modules)))

    def lora_modules(self, modules: Sequence[LoraModule]) -> list[LoraModule]:
        """``modules`` with the transformer's under diffusers' names (the family's key map)."""
        raise NotImplementedError
