"""Uploaded images in, generated images out: decoding with its size checked before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

# PIL refuses (warns, then raises past twice this) anything larger before decoding; sdrt's own check
# below is tighter and names the limit.
Image.MAX_IMAGE_PIXELS = 4096 * 4096


class ImageRefused(ValueError):
    """An upload that is not an image, or is larger than the server takes. ``field`` names the field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def decode_image(data: bytes, *, field: str, max_pixels: int, keep_alpha: bool = False) -> Image.Image:
    """PNG/JPEG/WebP bytes -> an RGB PIL image; the header's size is checked before decoding.
    ``keep_alpha``: the decoded image in its own mode (masks read its transparency)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRefused(f"{field} is {w}x{h} = {w * h} pixels; at most {max_pixels} are accepted",
                                   field)
            img.load()
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses before reading the size: say the server's own limit, not Pillow's
        raise ImageRefused(f"{field} has more than {max_pixels} pixels, the most this server accepts per "
                           "upload (sdrt serve --max-upload-pixels): send a smaller image", field) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageRefused(f"{field} is not a readable PNG, JPEG or WebP image ({e})", field) from e
    return img if keep_alpha else img.convert("RGB")


def decode_b64_image(text: str, *, field: str, max_pixels: int, keep_alpha: bool = False) -> Image.Image:
    """A base64 image, optionally as a ``data:image/...;base64,`` URL (as A1111 clients send)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageRefused(f"{field} is not valid base64 ({e})", field) from e
    return decode_image(raw, field=field, max_pixels=max_pixels, keep_alpha=keep_alpha)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def fit(image: Any, width: int, height: int) -> Any:
    """Resize an init image to the requested size (as A1111's resize mode 0 does)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image


def fit_all(width: int, height: int, *images: Any) -> list[Any]:
    """Each image (None kept) resized to width x height (``fit``); a route runs it off the event loop, as it does
    every step over a request's pixels."""
    return [None if im is None else fit(im, width, height) for im in images]
