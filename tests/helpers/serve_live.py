"""Helpers for the serve tests: a real server on a free loopback port, decoded images, metric values."""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import httpx
import numpy as np

from sdrt.serve.live import LiveServer, free_port

__all__ = ["LiveServer", "answers_while_held", "free_port", "metric", "pixels"]



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


def answers_while_held(url: str, path: str, body: dict[str, Any], headers: dict[str, str], inside: threading.Event,
                       release: threading.Event) -> httpx.Response:
    """POST ``body`` to ``path`` in a thread; once the step a test slowed says it is ``inside`` (and waits for
    ``release``), the server must answer /healthz within 2 s (its event loop not blocked by that step); then release
    it and return the POST's response."""
    got: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: got.setdefault("r", httpx.post(f"{url}{path}", headers=headers, timeout=120,
                                                                        **body)))
    t.start()
    try:
        assert inside.wait(60), "the slowed step never ran"
        t0 = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
        t.join()
    return got["r"]
