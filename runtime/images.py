"""Images in and out of the pipeline: a PIL image or uint8 array -> the encoder's uint8 batch, resized as
diffusers does."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError


def to_uint8(image: Any, height: int | None, width: int | None, multiple: int) -> np.ndarray:
    """A PIL image or uint8 array [H, W, 3] -> uint8 [1, H, W, 3], resized as diffusers does."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"image array must be uint8 [H, W, 3], got {image.dtype}{list(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL image or a uint8 [H, W, 3] array, not {type(image).__name__}")
    image = image.convert("RGB")
    w = width or image.width
    h = height or image.height
    w, h = w - w % multiple, h - h % multiple
    if w <= 0 or h <= 0:
        raise InputError(f"image is {image.width}x{image.height}: img2img needs at least {multiple}x{multiple} pixels")
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)[None]


def to_pil(pixels: np.ndarray) -> list[Any]:
    """uint8 [B, H, W, 3] -> PIL images."""
    from PIL import Image

    return [Image.fromarray(p) for p in pixels]


def nonfinite_message(nonfinite: list[bool], fp16_vae: bool) -> str:
    """The warning for images that decoded to NaN/inf, with the likely cause."""
    what = f"{sum(nonfinite)} of {len(nonfinite)} images decoded to NaN/inf; their pixels are not meaningful."
    if fp16_vae:
        return what + " An fp16 VAE overflows on some models: re-export with the VAE in fp32 (`sdrt export ... --vae-fp32`)."
    # an fp32 VAE does not overflow: what reached it was not finite
    return what + (" The VAE runs in fp32, so the latents reaching it were not finite: an overflow in an fp16 UNet "
                   "(re-export with `--fp32` to check).")
