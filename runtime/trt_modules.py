"""Which TensorRT module to use, and its logger: one loader for the runtime and for ``sdrt build``.

TensorRT modules, tried in this order unless ``module=`` or ``SDRT_TENSORRT_MODULE`` names one: the
module the manifest says built the folder (``tensorrt`` or ``tensorrt_rtx``), then, for ``tensorrt``
engines, the lean runtime (``tensorrt_lean``, or ``tensorrt_lean_bindings`` as PyPI's
``tensorrt-lean-cu13-bindings`` wheel names it). The lean runtime runs only engines built with
``--version-compatible``; such plans carry host code, so ``engine_host_code_allowed`` is set for them:
load only engine folders you trust.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import MutableSequence, Sequence
from typing import Any

from .errors import BackendUnavailable, InputError

RUNTIME_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_lean", "tensorrt_lean_bindings")
LEAN_MODULES = ("tensorrt_lean", "tensorrt_lean_bindings")
RTX_MODULES = ("tensorrt_rtx", "tensorrt_rtx_bindings")  # the second: PyPI's tensorrt-rtx-cu13-bindings
FULL_TENSORRT_HINT = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
LEAN_HINT = "pip install tensorrt-lean-cu13-libs tensorrt-lean-cu13-bindings"
TENSORRT_HINT = (
    f"install TensorRT from NVIDIA's package index ({FULL_TENSORRT_HINT}), or, for engines built with "
    f"`sdrt build --version-compatible`, the lean runtime from PyPI ({LEAN_HINT})"
)


def module_candidates(module: str | None = None, built_with: str | None = None) -> list[str]:
    """TensorRT modules to try, in order: an explicit choice, ``SDRT_TENSORRT_MODULE``, else the one that
    built the folder (and, for ``tensorrt`` engines, the lean runtime), else all of them."""
    chosen = module or os.environ.get("SDRT_TENSORRT_MODULE")
    if chosen:
        if chosen not in RUNTIME_MODULES:
            raise InputError(f"unknown TensorRT module {chosen!r}; choose one of {RUNTIME_MODULES}")
        return list(RTX_MODULES) if chosen == "tensorrt_rtx" else [chosen]
    if built_with == "tensorrt_rtx":
        return list(RTX_MODULES)
    if built_with == "tensorrt":
        return ["tensorrt", *LEAN_MODULES]
    return list(RUNTIME_MODULES)


def import_tensorrt(names: Sequence[str]) -> Any:
    """The first of ``names`` that imports as a usable TensorRT runtime (a namespace of type stubs does not)."""
    tried = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            tried.append(f"{name}: {e}")
            continue
        if hasattr(mod, "Runtime"):
            return mod
        tried.append(f"{name}: only type stubs are installed, not the library")
    raise BackendUnavailable(f"TensorRT is not available ({'; '.join(tried)}); {TENSORRT_HINT}")


def backend_name(trt_module: Any) -> str:
    """The engine manifest's name for what built an engine this module can run."""
    return "tensorrt_rtx" if str(trt_module.__name__).startswith("tensorrt_rtx") else "tensorrt"


def make_logger(trt_module: Any, messages: MutableSequence[str]) -> Any:
    """A TensorRT logger keeping warnings and errors (to explain failures) and dropping the rest."""
    base = trt_module.ILogger
    sev = base.Severity
    keep = {sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING}

    class _Logger(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in keep:
                messages.append(f"{getattr(severity, 'name', severity)}: {msg}")

    return _Logger()
