"""Fixed seeds and the inputs the tests feed: control images, an image with a mask.

Seeds are derived from a test's parameters with CRC-32, never with ``hash()``: Python salts string hashes
per process, so a failure seeded by ``hash()`` cannot be replayed.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np


def seed_for(*parts: object) -> int:
    """A 32-bit seed that depends only on ``parts`` (their repr): the same in every process."""
    return zlib.crc32(repr(parts).encode())


def control_image(seed: int, w: int = 90, h: int = 70) -> Any:
    """Blocks and stripes at a size other than the output's, so the Lanczos resize matters."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        a[y:y + rng.integers(5, 30), x:x + rng.integers(5, 30)] = rng.integers(0, 256, 3)
    a[:, ::7] = 255
    return Image.fromarray(a)


def image_and_mask(w: int = 120, h: int = 80):
    """A noisy image and a mask with a soft-edged white box, so resizing and binarizing both matter."""
    from PIL import Image

    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    m = np.zeros((h, w), np.float32)
    m[h // 4: 3 * h // 4, w // 3: 5 * w // 6] = 255
    m[:, : w // 6] = np.linspace(0, 255, h)[:, None]  # a ramp: Lanczos then the 0.5 threshold decide
    return img, Image.fromarray(m.astype(np.uint8), mode="L")


def box_mask(w: int = 120, h: int = 80):
    """A hard-edged white box off the image's centre (x 60..110, y 5..40 of 120 x 80): ``padding_mask_crop``'s box
    lies against the top edge and must be moved and widened to the output's aspect ratio."""
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[h // 16: h // 2, w // 2: 11 * w // 12] = 255
    return Image.fromarray(m, mode="L")
