"""Helpers for the serve tests: a real server on a free loopback port, decoded images, metric values."""

from __future__ import annotations

import base64
import io

import numpy as np

from sdrt.serve.live import LiveServer, free_port

__all__ = ["LiveServer", "free_port", "metric", "pixels"]



def pixels(b64_png: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))).convert("RGB"))


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value from Prometheus text (0 when absent)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0
