"""ControlNet for a call: the control keywords checked against the export, and the loop's control feeds (the
images at the latents' size, the per-step scale table). The host math lives in runtime/controlnet.py.

A net takes its control image as uint8 pixels (the UNet families' ControlNets: their conditioning embedding reads
pixels) or, where its ``controlnet_cond`` input is a float latent (SD 3 / 3.5's), as the image's VAE latents: the
export's ``vae_encoder`` encodes each control image once per call (the latent mean; diffusers' SD3 ControlNet
pipeline samples the latent distribution)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import controlnet, samplers
from .engine import Backend, Engine
from .errors import ArtifactError, InputError
from .families import Family
from .step_loop import ControlFeeds

CONTROL_UNET = "unet_control"  # the UNet taking ControlNet residuals (an export made with ControlNets)


COND = "controlnet_cond"  # a ControlNet's control-image input
MODE = "controlnet_mode"  # a Union ControlNet's control-mode input (int32, one per row)


def takes_latents(net: Engine) -> bool:
    """The net reads its control image as VAE latents (a float [B, C, h, w] input), not as uint8 pixels."""
    return net.inputs[COND].dtype != np.uint8


def check(folder: Path, engines: dict[str, Engine], nets: tuple[str, ...], inpainting: bool, control_images: Any,
          control_scales: Any, control_start: Any, control_end: Any, guess_mode: Any,
          control_preprocess: Any, family: Family | None = None, control_modes: Any = None,
          num_modes: tuple[int | None, ...] = ()) -> controlnet.ControlRequest | None:
    """The control keywords checked against the export, before any engine runs. ``inpainting``: the call has
    a mask or the UNet is an inpainting one; ``family``: the model's (its ControlNet pipeline may lack
    ``guess_mode``); ``num_modes``: each net's control modes (a Union net's; None: it takes none)."""
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise InputError(f"guess_mode must be True or False, got {guess_mode!r}")
    if guess_mode and family is not None and not family.control_guess_mode:
        raise InputError(f"guess_mode is not part of {family.label}'s ControlNet pipeline (diffusers' has none): "
                         "leave guess_mode out", cli=f"--guess-mode is not part of {family.label}'s ControlNet "
                                                     "pipeline: leave it out")
    req = controlnet.check_request(nets, folder, control_images, control_scales, control_start, control_end,
                                   bool(guess_mode), control_preprocess, control_modes=control_modes,
                                   num_modes=num_modes)
    if req is None:
        return None
    missing = [n for n in (*nets, CONTROL_UNET) if n not in engines]
    if missing:
        raise ArtifactError(f"{folder} lists ControlNets but lacks {', '.join(missing)}; re-export the model "
                            "with `sdrt export ... --controlnet CONTROLNET` (and rebuild its engines)")
    if any(takes_latents(engines[n]) for n in nets) and "vae_encoder" not in engines:
        raise ArtifactError(f"{folder} has ControlNets that read the control image's latents but no vae_encoder to "
                            "encode it; re-export the model with `sdrt export ... --controlnet CONTROLNET`")
    if inpainting:
        raise InputError("ControlNet with inpainting is not supported yet: generate with control_images and no "
                         "mask_image, on a model that is no inpainting one (an ordinary UNet or transformer)",
                         cli="ControlNet with inpainting is not supported yet: use --control-image without --mask, "
                             "on a model that is no inpainting one (an ordinary UNet or transformer)")
    return req


def feeds(backend: Backend, engines: dict[str, Engine], nets: tuple[str, ...], req: controlnet.ControlRequest,
          plan: samplers.SamplerPlan, lo: int, hi: int, height: int, width: int, rows: int,
          guided: bool) -> ControlFeeds:
    """The images at the latents' size, one per UNet row (uint8 pixels, or the VAE's latents for a net that reads
    them), and the scale table of rows [lo, hi)."""
    residuals = len(engines[nets[req.active[0]]].outputs)
    table = controlnet.scale_table(req, plan.steps, rows, residuals, guided)[lo:hi]
    images: list[Any] = []
    fixed: list[dict[str, Any]] = []
    for j, im in enumerate(req.images):
        mode = req.modes[j] if j < len(req.modes) else None
        fixed.append({} if mode is None else {MODE: backend.to_device(np.full(rows, mode, np.int32))})
        if im is None:
            images.append(None)
            continue
        px = controlnet.pixels(im, height, width)
        net = engines[nets[j]]
        if takes_latents(net):  # encoded once; the rows share it (diffusers encodes each row's copy alike)
            lat = backend.to_host(engines["vae_encoder"]({"image": backend.to_device(px[None])})["latent"])
            px = np.asarray(lat, dtype=net.inputs[COND].dtype)[0]
        images.append(backend.to_device(np.ascontiguousarray(np.broadcast_to(px, (rows, *px.shape)))))
    return ControlFeeds(images, table, fixed)
