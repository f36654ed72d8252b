"""First-block caching's pieces shared by the transformer families' exports (SD 3 / 3.5, FLUX.1).

diffusers' ``apply_first_block_cache`` (diffusers.hooks.first_block_cache) treats a transformer's blocks as one
list, every ``ModuleList`` named as a block list in the order the model holds them (SD3: ``transformer_blocks``;
FLUX.1: ``transformer_blocks`` then ``single_transformer_blocks``). Its head is the first of them, its tail the
last. A full step stores what the head added to the image tokens (``head_residual``) and what the blocks after it
added, from the head's output to the tail's (``deep_feature``); a cached step runs the head alone and adds
``deep_feature`` to its image tokens, every later block returning its input. Both families' blocks return
``(context, image tokens)``.

The residuals leave the graph on the patch grid [B, h, w, D] (h, w: the latent's sides in patches), which a
traced graph's dynamic shapes can say (a token count h*w cannot); ``runtime/feature_cache.py`` holds the names.
An editing model whose blocks see a reference image's tokens after the image's (FLUX.1 Kontext) adds the head
residual over those on the reference's own grid (``reference_residual_spec``): the rule's change is taken over the
whole sequence, as the hooks take it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sdrt.runtime.feature_cache import DEEP_FEATURE, HEAD_RESIDUAL, HEAD_RESIDUAL_REFERENCE, SHALLOW_UNET

DENOISER_FOLDER = "transformer"  # diffusers' name for a transformer denoiser; the manifest's component is "unet"
FOLDERS = {"unet": DENOISER_FOLDER, SHALLOW_UNET: f"{DENOISER_FOLDER}_shallow"}
IMAGE_TOKENS = 1  # where a block's image tokens are in what it returns: (context, image tokens)

Spec = tuple[str, str, tuple[int | str, ...]]


def residual_specs(inner: int, patch: int) -> list[Spec]:
    """The two residuals as I/O specs: [batch, latent height / patch, latent width / patch, inner width]."""
    return [(n, "float", ("batch", f"height/{patch}", f"width/{patch}", inner)) for n in (DEEP_FEATURE, HEAD_RESIDUAL)]


def reference_residual_spec(inner: int, patch: int) -> Spec:
    """An editing model's (FLUX.1 Kontext's) third residual as an I/O spec: what the first block added to the
    reference image's tokens, on the reference's patch grid [batch, reference height / patch, reference width /
    patch, inner width]."""
    return (HEAD_RESIDUAL_REFERENCE, "float", ("batch", f"reference_height/{patch}", f"reference_width/{patch}", inner))


def residual_dims(batch: Any, reference: bool = False) -> dict[str, Any]:
    """torch.export's dynamic shapes of the cached step's residual inputs (``reference``: the reference tokens' head
    residual too): the batch, and the sides left for export to infer (they equal the sample's, or the reference's,
    in patches; torch 2.13's solver fails to state that relation itself, its message builder raising on a Dim it
    derives)."""
    auto = torch.export.Dim.AUTO
    names = (DEEP_FEATURE, HEAD_RESIDUAL, *((HEAD_RESIDUAL_REFERENCE,) if reference else ()))
    return {n: {0: batch, 1: auto, 2: auto} for n in names}


def block_list(transformer: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Module]:
    """The transformer's blocks in diffusers' order: each named block list in turn."""
    return [b for n in names for b in getattr(transformer, n)]


def with_residuals(head: torch.nn.Module, tail: torch.nn.Module,
                   run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``run()``'s output, and the image-token residuals of a full step as diffusers' hooks store them: what the
    blocks after ``head`` added (``tail``'s output less ``head``'s) and what ``head`` added to its input."""
    seen: dict[str, torch.Tensor] = {}

    def on_head(_m: torch.nn.Module, _a: tuple, kw: dict, out: tuple) -> None:
        seen["in"], seen["head"] = kw["hidden_states"], out[IMAGE_TOKENS]

    def on_tail(_m: torch.nn.Module, _a: tuple, _kw: dict, out: tuple) -> None:
        seen["tail"] = out[IMAGE_TOKENS]

    hooks = [head.register_forward_hook(on_head, with_kwargs=True),
             tail.register_forward_hook(on_tail, with_kwargs=True)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return out, seen["tail"] - seen["head"], seen["head"] - seen["in"]


def on_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Image tokens [B, h*w, D] (row-major patches) as the patch grid [B, h, w, D]."""
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])


def relative_change(residual: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """diffusers' rule's number, [1] float32: the mean absolute change of the head's residual from the last full
    step's, relative to that one's mean magnitude (``FBCHeadBlockHook._should_compute_remaining_blocks``)."""
    last = last.reshape(residual.shape)
    change = (residual - last).float().abs().mean() / last.float().abs().mean()
    return change.reshape(1)


def random_residuals(inner: int, patch: int, g: torch.Generator | None, b: int, h: int,
                     w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random residuals for a cached step's example inputs at latent h x w (on the patch grid)."""
    grid = (b, h // patch, w // patch, inner)
    return torch.randn(*grid, generator=g), torch.randn(*grid, generator=g)
