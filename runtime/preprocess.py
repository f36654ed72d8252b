"""Control-image preprocessors: what turns a photo into the conditioning a ControlNet was trained on.

``canny`` is OpenCV's Canny edge detector (``cv2.Canny`` on the 8-bit pixels, thresholds ``low`` and
``high``), white edges on black as three equal channels, as diffusers' ControlNet examples prepare it.
OpenCV comes from sdrt's optional ``control`` extra (``pip install "sdrt[control]"``), imported only here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

INSTALL = 'pip install "sdrt[control]" (from a checkout of sdrt: pip install ".[control]")'


def _cv2() -> Any:
    try:
        import cv2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"OpenCV is not installed (No module named 'cv2'): the canny preprocessor needs "
                                  f"sdrt's 'control' extra. Install it: {INSTALL}", name="cv2") from e
    return cv2


def canny(image: Any, low: float = 100, high: float = 200) -> Any:
    """An RGB PIL image (or a uint8 array [H, W] / [H, W, 3]) -> its Canny edges as an RGB PIL image of the
    same size: 255 on edges, 0 elsewhere. ``low`` < ``high``, both in 0..1000 (hysteresis thresholds on the
    gradient magnitude, as OpenCV's)."""
    from PIL import Image

    for label, v in (("canny low", low), ("canny high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 <= v <= 1000:
            raise InputError(f"{label} threshold must be a number from 0 to 1000, got {v!r} (100 and 200 are usual)",
                             cli=f"--{label.replace(' ', '-')} must be a number from 0 to 1000, got {v!r}")
    if not low < high:
        raise InputError(f"the canny thresholds must have low < high, got {low} and {high} (100 and 200 are usual)",
                         cli=f"--canny-low {low} must be below --canny-high {high}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise InputError(f"canny takes 8-bit pixels (an RGB or L image, a uint8 array), got {arr.dtype}{list(arr.shape)}")
    edges = _cv2().Canny(np.ascontiguousarray(arr), float(low), float(high))
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
