"""What the pipeline's stages hand each other and the caller: ``PromptEmbeddings``, ``Latents``, ``Result``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import Array
from .inpaint import InpaintState, MaskCrop


@dataclass
class Result:
    images: list[Any]  # PIL images (empty when output="latents")
    timings: dict[str, Any]  # milliseconds per stage; "clock": "host" or "device"
    nonfinite: list[bool] = field(default_factory=list)  # per image: NaN/inf in the decoded pixels
    loop: str = ""  # how the denoising loop ran (step by step; tensorrt, ort-cuda: captured CUDA graphs or not, why)
    latents: np.ndarray | None = None  # the final latents [B, C, h, w] (output="latents")
    seed: list[int] | int | None = None  # the seed(s) used (drawn at random when the call gave none): pass
    # it back to reproduce the images


@dataclass(frozen=True)
class PromptEmbeddings:
    """Text conditioning for ``batch`` images, on the pipeline's device.

    ``hidden`` is [rows, tokens, C] and ``pooled`` [rows, P] (families with a pooled embedding; else None);
    guided embeddings hold ``2 * batch`` rows, the unconditional (negative) rows first, as the UNet's guided
    batch takes them.
    """

    hidden: Array
    pooled: Array | None
    batch: int
    guided: bool


@dataclass(frozen=True)
class Latents:
    """The denoising state between stages, on the pipeline's device.

    ``x``: latents [B, C, h, w]; ``x0``: the sampler's previous x0 prediction (the history a multistep
    sampler continues from; None before the first step); ``step``: the plan row the next ``denoise``
    starts at; ``noise``: every step's fresh noise [steps, B, C, h, w] for ancestral samplers (host).
    ``crop``: with ``padding_mask_crop``, the box the latents were generated from and the original it is pasted
    back into (``Pipeline.decode`` does it; ``inpaint.overlay`` does it for images decoded otherwise).
    """

    x: Array
    height: int
    width: int
    step: int = 0
    x0: Array | None = None
    noise: np.ndarray | None = None
    seed: list[int] | int | None = None
    inpaint: InpaintState | None = field(default=None, repr=False, compare=False)  # the mask conditioning
    reference: Array | None = field(default=None, repr=False, compare=False)  # an editing model's reference latents
    crop: MaskCrop | None = field(default=None, repr=False, compare=False)  # padding_mask_crop's box and original


def call_timings(clock: Any, *, image: bool, decoded: bool, t_start: float) -> dict[str, Any]:
    """A single call's ``Result.timings`` from its clock's marks (text, latents, loop set-up, each step, decode)
    and its host start time."""
    import time

    ms = clock.intervals_ms()
    steps_ms = ms[3:-1]
    timings: dict[str, Any] = {"text_encoder_ms": ms[0], "unet_steps_ms": steps_ms,
                               "unet_step_ms": float(np.median(steps_ms)), "clock": clock.kind}
    if image:
        timings["vae_encoder_ms"] = ms[1]
    if decoded:
        timings["vae_decoder_ms"] = ms[-1]
    timings["total_ms"] = (time.perf_counter() - t_start) * 1e3
    return timings
