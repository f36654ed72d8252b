"""ControlNet for a call: the control keywords checked against the export, and the loop's control feeds (the
images at the latents' size, the per-step scale table). The host math lives in runtime/controlnet.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import controlnet, samplers
from .engine import Backend, Engine
from .errors import ArtifactError, InputError
from .step_loop import ControlFeeds

CONTROL_UNET = "unet_control"  # the UNet taking ControlNet residuals (an export made with ControlNets)


def check(folder: Path, engines: dict[str, Engine], nets: tuple[str, ...], inpainting: bool, control_images: Any,
          control_scales: Any, control_start: Any, control_end: Any, guess_mode: Any,
          control_preprocess: Any) -> controlnet.ControlRequest | None:
    """The control keywords checked against the export, before any engine runs. ``inpainting``: the call has
    a mask or the UNet is an inpainting one."""
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise InputError(f"guess_mode must be True or False, got {guess_mode!r}")
    req = controlnet.check_request(nets, folder, control_images, control_scales, control_start, control_end,
                                   bool(guess_mode), control_preprocess)
    if req is None:
        return None
    missing = [n for n in (*nets, CONTROL_UNET) if n not in engines]
    if missing:
        raise ArtifactError(f"{folder} lists ControlNets but lacks {', '.join(missing)}; re-export the model "
                            "with `sdrt export ... --controlnet CONTROLNET` (and rebuild its engines)")
    if inpainting:
        raise InputError("ControlNet with inpainting is not supported yet: generate with control_images and no "
                         "mask_image, on a model with an ordinary (4-channel) UNet",
                         cli="ControlNet with inpainting is not supported yet: use --control-image without --mask, "
                             "on a model with an ordinary (4-channel) UNet")
    return req


def feeds(backend: Backend, engines: dict[str, Engine], nets: tuple[str, ...], req: controlnet.ControlRequest,
          plan: samplers.SamplerPlan, lo: int, hi: int, height: int, width: int, rows: int,
          guided: bool) -> ControlFeeds:
    """The images at the latents' size (uint8, one per UNet row) and the scale table of rows [lo, hi)."""
    residuals = len(engines[nets[req.active[0]]].outputs)
    table = controlnet.scale_table(req, plan.steps, rows, residuals, guided)[lo:hi]
    images: list[Any] = []
    for im in req.images:
        if im is None:
            images.append(None)
            continue
        px = controlnet.pixels(im, height, width)
        images.append(backend.to_device(np.ascontiguousarray(np.broadcast_to(px, (rows, *px.shape)))))
    return ControlFeeds(images, table)
