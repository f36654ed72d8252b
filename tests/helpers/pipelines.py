"""Pipelines shared across tests: loaded once per (folder, backend), closed when the session ends.

The parity tests call one export many times; loading it per test would repeat the ONNX Runtime session
set-up. conftest's ``close_shared_pipelines`` closes every pipeline opened here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdrt.runtime.pipeline import Pipeline

_OPEN: dict[tuple[str, str], Pipeline] = {}


def shared_pipeline(folder: Path, backend: str = "ort-cpu",
                    load: Callable[[], Pipeline] | None = None) -> Pipeline:
    """The session's pipeline of ``folder`` on ``backend``; ``load``: how to open it when it is not open
    yet (default ``Pipeline.load(folder, backend=backend)``)."""
    key = (str(folder), backend)
    if key not in _OPEN:
        _OPEN[key] = load() if load is not None else Pipeline.load(folder, backend=backend)
    return _OPEN[key]


def close_all() -> None:
    """Close every shared pipeline (each closes its backend), newest first."""
    while _OPEN:
        _OPEN.popitem()[1].close()


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
