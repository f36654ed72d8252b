"""ONNX Runtime sessions as engines: :class:`OrtEngine`, its fixed bindings for CUDA graphs, and the helpers
that the ``ort-cpu`` / ``ort-cuda`` backend (``runtime/ort_backend.py``, whose notes say how IO binding and
CUDA graphs are used) and its composed step loop (``runtime/ort_loop.py``) share.

:class:`OrtBackendBase` declares what engines and the loop read of their backend, so that neither imports
``ort_backend``: the backend imports them. onnxruntime itself is imported on first use (``ort_module``).
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import CLOSED, Array, Backend, Engine, IOSpec
from .errors import ArtifactError, BackendUnavailable, CompatibilityError, DeviceMemoryError, InputError

ORT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype("float32"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(bool)": np.dtype("bool"),
}

# The run-option key that selects which captured CUDA graph a run replays; -1 runs without one.
GRAPH_ID_KEY = "gpu_graph_id"
# the first onnxruntime whose OrtValue.update_inplace takes an OrtValue (a device-side copy)
DEVICE_COPY_SINCE = "1.26"

# the ORT backend's modules log as one (the name users filter on)
log = logging.getLogger("sdrt.runtime.ort_backend")
# set (and logged) the first time a copy between OrtValues had to go through the host
_host_copy_reason: str | None = None


def ort_module() -> Any:
    import onnxruntime

    return onnxruntime


def _specs(args: list[Any]) -> dict[str, IOSpec]:
    return {a.name: IOSpec(a.name, ORT_TYPES[a.type], tuple(a.shape)) for a in args}


def run_options(graph_id: int) -> Any:
    opts = ort_module().RunOptions()
    opts.add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
    return opts


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else a.copy()  # (np.ascontiguousarray makes a 0-d array 1-d)


def _as_ortvalue(a: Array, device: str, device_id: int) -> Any:
    if isinstance(a, np.ndarray):
        return ort_module().OrtValue.ortvalue_from_numpy(_contiguous(a), device, device_id)
    return a


def _bound_run(session: Any, feeds: Mapping[str, Array], out_names: list[str], device: str, device_id: int,
               run_options: Any = None) -> dict[str, Any]:
    """One run with inputs bound as OrtValues and outputs allocated by ORT on ``device``."""
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, _as_ortvalue(value, device, device_id))
    for name in out_names:
        binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding, run_options)
    return dict(zip(out_names, binding.get_outputs()))


def copy_into(dst: Any, src: Array) -> None:
    """Copy ``src`` (an OrtValue on any device, or a numpy array) into the fixed buffer ``dst``."""
    if isinstance(src, np.ndarray):
        dst.update_inplace(_contiguous(src))
        return
    if src.data_ptr() == dst.data_ptr():
        return  # already there
    try:
        dst.update_inplace(src)  # device to device when both are on the GPU
    except TypeError:  # an onnxruntime before 1.26, whose update_inplace takes numpy only: through the host
        _note_host_copy()
        dst.update_inplace(src.numpy())


def _note_host_copy() -> None:
    global _host_copy_reason
    if _host_copy_reason is None:
        _host_copy_reason = (f"copies between OrtValues go through the host: onnxruntime {ort_module().__version__}'s "
                             f"OrtValue.update_inplace takes no OrtValue (it does from {DEVICE_COPY_SINCE}); "
                             f"pip install 'onnxruntime-gpu>={DEVICE_COPY_SINCE}'")
        log.warning("ort-cuda: %s", _host_copy_reason)


def host_copy_note() -> str:
    """"; <why>" once a copy between OrtValues has gone through the host in this process, else ""."""
    return f"; {_host_copy_reason}" if _host_copy_reason else ""


def is_allocation_failure(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(s in str(e) for s in _ALLOCATION_FAILED)


def run_failure(e: BaseException) -> str:
    """ORT's error, on one line and short enough for ``Result.loop``."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {msg[:240]}{'...' if len(msg) > 240 else ''}"


@dataclass
class _Slot:
    graph_id: int
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    binding: Any
    run_options: Any
    failed: str | None = None  # why a run under the graph id failed; the slot's calls then run uncaptured


class StaticBindings:
    """Fixed device buffers per input-shape signature, bound once, for CUDA graph capture and replay.

    The first call at a new signature runs uncaptured (``gpu_graph_id`` -1) on ORT-allocated outputs,
    which gives the output shapes; the buffers are then allocated and bound, and later calls copy their
    inputs in and run under the signature's graph id: ORT runs it uncaptured once or twice (by version),
    then captures, then replays. Beyond ``max_graphs`` signatures, calls run uncaptured; so do a signature's calls once a run
    under its graph id failed (``failure`` says why).
    """

    def __init__(self, session: Any, out_names: list[str], device: str, device_id: int,
                 max_graphs: int) -> None:
        self.session = session
        self.out_names = out_names
        self.device = device
        self.device_id = device_id
        self.max_graphs = max_graphs
        self.slots: dict[tuple[Any, ...], _Slot] = {}
        self._uncaptured = run_options(-1)
        self._lock = threading.Lock()

    @staticmethod
    def _signature(feeds: Mapping[str, Array]) -> tuple[Any, ...]:
        sig = []
        for name in sorted(feeds):
            a = feeds[name]
            shape = a.shape if isinstance(a, np.ndarray) else a.shape()
            sig.append((name, tuple(int(d) for d in shape)))
        return tuple(sig)

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Any]:
        key = self._signature(feeds)
        with self._lock:
            slot = self.slots.get(key)
            if slot is None:
                outs = _bound_run(self.session, feeds, self.out_names, self.device, self.device_id,
                                  self._uncaptured)
                if len(self.slots) < self.max_graphs:
                    self.slots[key] = self._make_slot(len(self.slots), feeds, outs)
                return outs
            if slot.failed is None:
                for name, buf in slot.inputs.items():
                    copy_into(buf, feeds[name])
                try:
                    self.session.run_with_iobinding(slot.binding, slot.run_options)
                    return dict(slot.outputs)
                except Exception as e:  # onnxruntime raises its own untyped errors (capture, replay)
                    if is_allocation_failure(e):
                        raise
                    slot.failed = run_failure(e)
                    log.warning("the run under CUDA graph %d failed (%s); its shape runs uncaptured from now on",
                                slot.graph_id, slot.failed)
            return _bound_run(self.session, feeds, self.out_names, self.device, self.device_id, self._uncaptured)

    @property
    def failure(self) -> str | None:
        """Why runs under a graph id failed (the first such shape), or None."""
        return next((s.failed for s in self.slots.values() if s.failed), None)

    def _make_slot(self, graph_id: int, feeds: Mapping[str, Array], outs: Mapping[str, Any]) -> _Slot:
        ort = ort_module()
        binding = self.session.io_binding()
        inputs, outputs = {}, {}
        for name, a in feeds.items():
            dtype = a.dtype if isinstance(a, np.ndarray) else ORT_TYPES[a.data_type()]
            shape = a.shape if isinstance(a, np.ndarray) else a.shape()
            inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device,
                                                                     self.device_id)
            binding.bind_ortvalue_input(name, inputs[name])
        for name, o in outs.items():
            outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                list(o.shape()), ORT_TYPES[o.data_type()], self.device, self.device_id)
            binding.bind_ortvalue_output(name, outputs[name])
        return _Slot(graph_id, inputs, outputs, binding, run_options(graph_id))


class OrtBackendBase(Backend):
    """What an :class:`OrtEngine` and the composed step loop read of their backend; ``ort_backend.OrtBackend``
    sets and implements it (see there for each setting)."""

    name: str
    device: str  # "cpu" or "cuda"
    device_id: int
    memory: str  # where arrays live: "cuda" (OrtValues, IO binding) or "cpu" (numpy)
    io_binding: bool
    threads: int | None
    providers: list[Any]
    cuda_graph: bool
    max_cuda_graphs: int
    max_composed_sessions: int
    fused_step: bool | None
    _engines: weakref.WeakSet[OrtEngine]

    @abc.abstractmethod
    def captures(self, name: str) -> bool:
        """Whether the engine ``name`` runs as a CUDA graph."""

    @abc.abstractmethod
    def providers_for(self, name: str) -> list[Any]:
        """The execution providers of the engine ``name``'s session."""

    @abc.abstractmethod
    def graph_providers(self) -> list[Any]:
        """The providers of a session that captures CUDA graphs (the host's providers on ort-cpu)."""


class OrtEngine(Engine):
    backend: OrtBackendBase

    def __init__(self, backend: OrtBackendBase, path: str | bytes, name: str, captured: bool | None = None) -> None:
        ort = ort_module()
        self.name = name
        self.source = path  # the graph it was loaded from (the fused step loop composes from it)
        self.backend = backend
        self._bound: bool = backend.io_binding
        self._memory: str = backend.memory
        self._device_id: int = backend.device_id
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if backend.threads:
            opts.intra_op_num_threads = backend.threads
        # fatal only: a graph that fails to load is reported by sdrt's own error (ORT's text included), so
        # ORT's native log line would say it twice, in red, before the message that names the fix
        opts.log_severity_level = 4
        base_dir = getattr(path, "base_dir", None)  # graph bytes whose weights are files there (Optimum's)
        if base_dir:
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
        if isinstance(path, str) and not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing; re-export the model with `sdrt export`")
        providers = (backend.providers_for(name) if captured is None
                     else backend.graph_providers() if captured else backend.providers)
        captured = backend.captures(name) if captured is None else captured
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise load_error(path if isinstance(path, str) else name, e, captured) from e
        self.inputs = _specs(self.session.get_inputs())
        self.outputs = _specs(self.session.get_outputs())
        self._out_names = list(self.outputs)
        self._static = (StaticBindings(self.session, self._out_names, backend.memory, backend.device_id,
                                        backend.max_cuda_graphs) if captured else None)
        self.closed = False
        backend._engines.add(self)

    @property
    def capture_failure(self) -> str | None:
        """Why runs under a CUDA graph failed (those calls ran uncaptured), or None."""
        return None if self._static is None else self._static.failure

    def close(self) -> None:
        """Drop the session and its bindings (their device memory and captured graphs go with them)."""
        self.closed = True
        self._static = None
        self.__dict__.pop("session", None)

    def check(self, feeds: Mapping[str, Array]) -> None:
        if self.closed:
            raise InputError(f"{self.name}: {CLOSED}")
        super().check(feeds)

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        try:
            if not self._bound:
                outs = self.session.run(self._out_names, dict(feeds))
                return dict(zip(self._out_names, outs))
            if self._static is not None:
                return self._static.run(feeds)
            return _bound_run(self.session, feeds, self._out_names, self._memory, self._device_id)
        except Exception as e:  # onnxruntime raises its own untyped errors (RuntimeException, Fail)
            if is_allocation_failure(e):
                raise DeviceMemoryError(
                    f"{self.name}: {self.backend.name} could not allocate memory ({allocation_detail(e)}); lower "
                    "the image size or batch"
                ) from e
            raise


# how ONNX Runtime reports a failed allocation (its arena on any device; the C++ allocator on the host)
_ALLOCATION_FAILED = ("Failed to allocate memory", "bad_alloc", "out of memory")


def allocation_detail(e: Exception) -> str:
    """ORT's message without its C++ source location and signature."""
    msg = " ".join(str(e).split())
    at = msg.find("Failed to allocate")
    return msg[at:] if at >= 0 else (msg[:200] or type(e).__name__)


def load_error(path: str, e: Exception, captured: bool) -> Exception:
    msg = str(e)
    if captured and "CUDA Graph" in msg:
        return BackendUnavailable(
            f"{path} cannot run as a CUDA graph: ORT needs every node on the CUDA EP ({msg.strip()}). "
            "Load it without cuda_graph=True"
        )
    if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
        return CompatibilityError(
            f"{path} uses an operator this onnxruntime cannot run on the chosen device ({msg.strip()}). "
            "A fused ort-cuda graph needs onnxruntime-gpu and the CUDA EP; re-make it with this onnxruntime "
            "(`sdrt export --ort-cuda`) or use the plain export"
        )
    return ArtifactError(f"cannot load {path}: {msg.strip().rstrip('.')}. The file is corrupt or incomplete; "
                         "re-export it")

