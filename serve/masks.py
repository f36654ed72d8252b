"""The two APIs' masks, read into the pipeline's: a grayscale image, white = repaint.

OpenAI's edits: the mask is a PNG with an alpha channel whose fully transparent pixels (alpha 0) are the
region to edit, of the image's size; without a mask, the image's own fully transparent pixels are. A1111:
white = repaint (or, for an image with transparency, its opaque pixels, as A1111's ``create_binary_mask``
reads a sketch), binarized at 128, optionally inverted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .images import ImageRefused


def alpha_of(img: Image.Image) -> np.ndarray | None:
    """The image's alpha channel as uint8 [H, W], or None when it has none."""
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return None
    return np.asarray(img.convert("RGBA"))[..., 3]


def _edit_region(alpha: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")


def openai_mask(mask: Image.Image, image: Image.Image) -> Image.Image:
    """OpenAI's ``mask`` -> white = repaint; ImageRefused (field ``mask``) names what is wrong."""
    if mask.size != image.size:
        (w, h), (iw, ih) = mask.size, image.size
        raise ImageRefused(f"mask is {w}x{h} but image is {iw}x{ih}: the mask must have the image's size", "mask")
    alpha = alpha_of(mask)
    if alpha is None:
        raise ImageRefused(f"mask has no alpha channel (mode {mask.mode}): send a PNG with transparency, whose "
                           "fully transparent pixels (alpha 0) mark the region to edit", "mask")
    if not (alpha == 0).any():
        raise ImageRefused("mask has no fully transparent pixel (alpha 0), so nothing would be edited: make the "
                           "region to edit transparent", "mask")
    return _edit_region(alpha)


def openai_image_mask(image: Image.Image) -> Image.Image | None:
    """Without ``mask``: the image's fully transparent pixels as the mask, or None (plain img2img) when it
    has none."""
    alpha = alpha_of(image)
    if alpha is None or not (alpha == 0).any():
        return None
    return _edit_region(alpha)


def a1111_mask(mask: Image.Image, invert: bool) -> Image.Image:
    """A1111's ``mask`` (white = repaint) as its ``create_binary_mask`` reads it, then ``inpainting_mask_invert``."""
    alpha = alpha_of(mask)
    gray: Any = Image.fromarray(alpha) if alpha is not None and (alpha != 255).any() else mask.convert("L")
    binary = gray.point(lambda v: 255 if v > 128 else 0)
    return ImageOps.invert(binary) if invert else binary
