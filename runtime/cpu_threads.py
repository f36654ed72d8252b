"""The CPU threads a backend runs on when its caller names none: ``SDRT_THREADS``, else the backend's own default.

ONNX Runtime and OpenVINO size their thread pools by the machine's physical cores, not by a container's CPU quota:
several workers on one host (a server's replicas, a test run's processes) then run more threads than cores, and
ONNX Runtime's spinning threads take turns badly. ``SDRT_THREADS=N`` caps every backend that was not given
``threads=`` to N (``Pipeline.load(..., threads=...)`` and ``--threads`` still win).
"""

from __future__ import annotations

import os

from .errors import InputError

ENV = "SDRT_THREADS"


def default_threads() -> int | None:
    """``SDRT_THREADS`` as a count of 1 or more; None where it is unset or empty (the backend's own default)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"{ENV}={raw!r} is not a thread count: set it to a whole number of 1 or more (the CPU "
                         "threads each backend may use), or unset it for the backend's default (the physical cores)")
    return n
