"""The real TensorRT modules PyPI has, where installed (``None`` where not): TensorRT for RTX (builder and
runtime, builds without a GPU), the lean runtime, and the full TensorRT."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_first(*names: str, needs: str) -> ModuleType | None:
    """The first of ``names`` that imports and has the attribute ``needs`` (type stubs alone do not)."""
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, needs):
            return mod
    return None


RTX = import_first("tensorrt_rtx", "tensorrt_rtx_bindings", needs="Builder")
LEAN = import_first("tensorrt_lean", "tensorrt_lean_bindings", needs="Runtime")
FULL = import_first("tensorrt", needs="Builder")
