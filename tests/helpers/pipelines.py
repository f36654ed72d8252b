"""Pipelines shared across a test module's tests: loaded once per (folder, backend), closed when the module ends.

The parity tests call one export many times; loading it per test would repeat the ONNX Runtime session
set-up. conftest's ``close_module_pipelines`` closes, at each module's end, those the module opened (keeping
them all to the session's end grew the test process by every module's pipelines); ``close_shared_pipelines``
closes any left at the session's end.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sdrt.runtime.pipeline import Pipeline

_OPEN: dict[tuple[str, str], Pipeline] = {}
_MODULE_CACHES: list[dict[Any, Any] | list[Any]] = []
C = TypeVar("C", dict[Any, Any], list[Any])

# how ``Result.loop`` begins on each stand-in backend ``loaded_on_any`` gives (which loop the call ran)
LOOP_WORDS = {"ort-cuda-path": "UNet + sampler step as one ONNX Runtime session", "openvino": "engines run step by step",
              "tensorrt": "captured CUDA graphs"}


def shared_pipeline(folder: Path, backend: str = "ort-cpu",
                    load: Callable[[], Pipeline] | None = None) -> Pipeline:
    """The shared pipeline of ``folder`` on ``backend`` (open until the module that opened it ends); ``load``:
    how to open it when it is not open yet (default ``Pipeline.load(folder, backend=backend)``)."""
    key = (str(folder), backend)
    if key not in _OPEN:
        _OPEN[key] = load() if load is not None else Pipeline.load(folder, backend=backend)
    return _OPEN[key]


def close_all() -> None:
    """Close every shared pipeline (each closes its backend), newest first."""
    while _OPEN:
        _OPEN.popitem()[1].close()


def module_cache(cache: C) -> C:
    """``cache`` (a test module's dict or list of diffusers reference pipelines) emptied when the module ends, as
    its shared pipelines close: a module-level cache would keep its torch models to the session's end."""
    _MODULE_CACHES.append(cache)
    return cache


@contextlib.contextmanager
def closing_opened() -> Iterator[None]:
    """Close, on leaving, the shared pipelines first opened inside (newest first; those open before stay open) and
    empty every ``module_cache``; then hand the freed heap back to the system (glibc keeps it otherwise)."""
    before = set(_OPEN)
    try:
        yield
    finally:
        opened = [k for k in _OPEN if k not in before]
        held = any(_MODULE_CACHES)
        for key in reversed(opened):
            _OPEN.pop(key).close()
        for cache in _MODULE_CACHES:
            cache.clear()
        if opened or held:  # a full collection costs a fraction of a second: only where something was let go
            gc.collect()
            trim_heap()


def trim_heap() -> None:
    """``malloc_trim(0)``: return the free heap pages to the system, where glibc is the allocator (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def ort_cuda_on_cpu(monkeypatch, *, cuda_graph: bool = False, max_cuda_graphs: int = 2,  # type: ignore[no-untyped-def]
                    fused_step: bool | None = None):
    """An ort-cuda backend in all but the device: OrtValues and IO binding (with ``cuda_graph``, its composed
    sessions), in CPU memory, on the CPU EP. It runs ort-cuda's code path here and says nothing of a GPU."""
    from sdrt.runtime.ort_backend import OrtBackend

    be = OrtBackend("cpu")
    be.io_binding, be.cuda_graph, be.max_cuda_graphs = True, cuda_graph, max_cuda_graphs
    if fused_step is not None:
        be.fused_step = fused_step
    monkeypatch.setattr(be, "providers_for", lambda name: ["CPUExecutionProvider"])
    return be


@contextlib.contextmanager
def loaded_on(folder: Path, backend: str, monkeypatch: pytest.MonkeyPatch | None = None, *,
              cuda_graph: bool = False) -> Iterator[Pipeline]:
    """``folder`` loaded for one test on ``backend``, closed after: ``"ort-cpu"``, ``"ort-cuda-path"`` (ort-cuda's code path on the
    CPU EP, ``ort_cuda_on_cpu`` with ``cuda_graph``: says nothing of a GPU) or ``"openvino"`` at fp32 (the test
    skipped where OpenVINO is not installed). Make the ort-cpu images first: the first patches how backends load."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino backend needs OpenVINO (pip install sdrt[openvino])")
        pipe = Pipeline.load(folder, backend="openvino", precision="fp32")
    elif backend == "ort-cpu":
        pipe = Pipeline.load(folder, backend="ort-cpu")
    else:
        assert backend == "ort-cuda-path" and monkeypatch is not None, backend
        monkeypatch.setattr("sdrt.runtime.backends.make_backend",
                            lambda *a, **k: ort_cuda_on_cpu(monkeypatch, cuda_graph=cuda_graph))
        pipe = Pipeline.load(folder, backend="ort-cuda")
    with pipe:
        yield pipe


@contextlib.contextmanager
def loaded_on_any(folder: Path, backend: str, request: pytest.FixtureRequest, engines: Path, *,
                  cfg: bool = True) -> Iterator[Pipeline]:
    """``loaded_on``'s backends (ort-cuda's code path with ``cuda_graph``), and ``"tensorrt"``: ``folder``'s engines
    built into ``engines`` on the TensorRT fakes (the ``fake_gpu`` fixture; batch 1..2, 64..96 px, ``cfg``: the
    profile's CFG rows), no device memory left after. Each says nothing of a GPU."""
    if backend != "tensorrt":
        with loaded_on(folder, backend, request.getfixturevalue("monkeypatch"), cuda_graph=True) as pipe:
            yield pipe
        return
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    cudart, _ = request.getfixturevalue("fake_gpu")
    build_engines(folder, engines, custom_profile(batch="1:1:2", height="64:64:96", width="64:96:96", cfg=cfg),
                  BuildOptions(workspace_gb=1))
    with Pipeline.load(engines, backend="tensorrt") as pipe:
        yield pipe
    assert cudart.alive()["allocations"] == 0
