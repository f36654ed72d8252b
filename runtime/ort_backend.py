"""ONNX Runtime backends: ``ort-cpu`` (numpy on the host) and ``ort-cuda`` (OrtValues on the GPU).

``ort-cuda`` keeps every tensor on the device with IO binding: inputs are bound as OrtValues, outputs
are allocated there and fed straight to the next engine, so the denoising loop never copies latents to
the host. Where the manifest records an ``ort-cuda`` variant of a component (ONNX Runtime's fused
operators: MultiHeadAttention, GroupNorm, NhwcConv, ...), :meth:`OrtBackend.graph_for` names it.

CUDA graphs (``OrtBackend("cuda", cuda_graph=True)``, opt-in) replay a captured launch sequence instead
of launching every kernel from Python. ORT captures one graph per run-option ``gpu_graph_id``, and a
replay reads and writes the device addresses it was captured with, so per input shape an engine keeps
fixed input and output buffers (:class:`_StaticBindings`): new inputs are copied into them on the device
(``OrtValue.update_inplace``: in ORT's CUDA data transfer a device-to-device ``cudaMemcpy`` followed by
a synchronize, so it completes before the next run is launched; the source was written by a run that
ORT synchronized at its end), and the outputs returned are those fixed buffers. ``update_inplace`` takes
an OrtValue source from onnxruntime 1.26 (the ``cuda`` extra's floor); an older onnxruntime copies
through the host, which the log says once and ``Result.loop`` on every call after.
A run under a graph id that fails (ORT's capture or replay) is not fatal: that shape's calls run
uncaptured from then on (``gpu_graph_id`` -1, ORT-allocated outputs) and the loop's description says why.
Constraints, all ORT's or CUDA's:

* every node must run on the CUDA EP, apart from shape computations ORT places on the CPU without
  copies (ORT refuses the session otherwise; sdrt raises BackendUnavailable);
* a captured graph holds its activation memory for the life of the session, so at most
  ``max_cuda_graphs`` shapes per engine are captured; further shapes run uncaptured;
* an engine's outputs are valid until its next call at the same shapes, which overwrites them (the
  pipeline consumes each output before calling that engine again);
* calls on one engine are serialized (the fixed buffers are shared).

The denoising loop goes further (``OrtBackend.step_loop``, ``runtime/ort_loop.py``): with ``cuda_graph``
the UNet and the sampler step graph are composed into one session, so a whole step is one captured graph.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import CLOSED, Array, Backend, Engine, IOSpec
from .errors import ArtifactError, BackendUnavailable, CompatibilityError, DeviceMemoryError, InputError

if TYPE_CHECKING:
    from .step_loop import StepLoop

_ORT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype("float32"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(bool)": np.dtype("bool"),
}

CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
# The run-option key that selects which captured CUDA graph a run replays; -1 runs without one.
GRAPH_ID_KEY = "gpu_graph_id"
# the first onnxruntime whose OrtValue.update_inplace takes an OrtValue (a device-side copy)
DEVICE_COPY_SINCE = "1.26"

log = logging.getLogger(__name__)
# set (and logged) the first time a copy between OrtValues had to go through the host
_host_copy_reason: str | None = None


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _specs(args: list[Any]) -> dict[str, IOSpec]:
    return {a.name: IOSpec(a.name, _ORT_TYPES[a.type], tuple(a.shape)) for a in args}


def cuda_provider_options(
    device_id: int = 0,
    *,
    cuda_graph: bool = False,
    conv_algo_search: str | None = None,
    prefer_nhwc: bool = False,
    gpu_mem_limit: int | None = None,
) -> dict[str, str]:
    """CUDA EP options (ORT's documented keys, as strings).

    * ``conv_algo_search``: cuDNN's convolution algorithm choice. EXHAUSTIVE benchmarks every algorithm
      once per new shape (the fastest kernels, seconds of warm-up per shape); HEURISTIC asks cuDNN's
      heuristics (no warm-up). Default: EXHAUSTIVE with CUDA graphs (shapes are static, the search is
      paid once), HEURISTIC otherwise.
    * ``arena_extend_strategy=kSameAsRequested``: the memory arena grows by what is asked, not to the
      next power of two (less VRAM held for SD's few large activations).
    * ``prefer_nhwc``: let ORT's layout transformer run NCHW convolutions in NHWC. The fused variant
      already carries NhwcConv (a contrib operator with its own kernel), so it is off by default.
    """
    search = conv_algo_search or ("EXHAUSTIVE" if cuda_graph else "HEURISTIC")
    if search not in CONV_ALGO_SEARCH:
        raise InputError(f"conv_algo_search {search!r} is not one of {', '.join(CONV_ALGO_SEARCH)}")
    opts = {
        "device_id": str(int(device_id)),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": search,
        "cudnn_conv_use_max_workspace": "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
        "prefer_nhwc": "1" if prefer_nhwc else "0",
    }
    if gpu_mem_limit is not None:
        opts["gpu_mem_limit"] = str(int(gpu_mem_limit))
    return opts


def _run_options(graph_id: int) -> Any:
    opts = _ort().RunOptions()
    opts.add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
    return opts


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else a.copy()  # (np.ascontiguousarray makes a 0-d array 1-d)


def _as_ortvalue(a: Array, device: str, device_id: int) -> Any:
    if isinstance(a, np.ndarray):
        return _ort().OrtValue.ortvalue_from_numpy(_contiguous(a), device, device_id)
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


def _copy_into(dst: Any, src: Array) -> None:
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
        _host_copy_reason = (f"copies between OrtValues go through the host: onnxruntime {_ort().__version__}'s "
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


class _StaticBindings:
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
        self._uncaptured = _run_options(-1)
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
                    _copy_into(buf, feeds[name])
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
        ort = _ort()
        binding = self.session.io_binding()
        inputs, outputs = {}, {}
        for name, a in feeds.items():
            dtype = a.dtype if isinstance(a, np.ndarray) else _ORT_TYPES[a.data_type()]
            shape = a.shape if isinstance(a, np.ndarray) else a.shape()
            inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device,
                                                                     self.device_id)
            binding.bind_ortvalue_input(name, inputs[name])
        for name, o in outs.items():
            outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                list(o.shape()), _ORT_TYPES[o.data_type()], self.device, self.device_id)
            binding.bind_ortvalue_output(name, outputs[name])
        return _Slot(graph_id, inputs, outputs, binding, _run_options(graph_id))


class OrtEngine(Engine):
    def __init__(self, backend: OrtBackend, path: str | bytes, name: str, captured: bool | None = None) -> None:
        ort = _ort()
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
            raise _load_error(path if isinstance(path, str) else name, e, captured) from e
        self.inputs = _specs(self.session.get_inputs())
        self.outputs = _specs(self.session.get_outputs())
        self._out_names = list(self.outputs)
        self._static = (_StaticBindings(self.session, self._out_names, backend.memory, backend.device_id,
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
                    f"{self.name}: {self.backend.name} could not allocate memory ({_allocation_detail(e)}); lower "
                    "the image size or batch"
                ) from e
            raise


# how ONNX Runtime reports a failed allocation (its arena on any device; the C++ allocator on the host)
_ALLOCATION_FAILED = ("Failed to allocate memory", "bad_alloc", "out of memory")


def _allocation_detail(e: Exception) -> str:
    """ORT's message without its C++ source location and signature."""
    msg = " ".join(str(e).split())
    at = msg.find("Failed to allocate")
    return msg[at:] if at >= 0 else (msg[:200] or type(e).__name__)


def _load_error(path: str, e: Exception, captured: bool) -> Exception:
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


class OrtBackend(Backend):
    """``ort-cpu`` or ``ort-cuda``. Sessions are thread-safe; IO bindings are made per call.

    ``cuda_graph`` (ort-cuda only) captures the engines named in ``graph_engines`` as CUDA graphs, at
    most ``max_cuda_graphs`` input shapes each (see the module notes for the constraints), and runs the
    denoising loop as UNet + step graph composed into one session (``runtime/ort_loop.py``), for at most
    ``max_composed_sessions`` step-graph variants at once: each holds a copy of the UNet's weights on the
    device; further variants run the two engines step by step.
    """

    def __init__(
        self,
        device: str = "cpu",
        device_id: int = 0,
        threads: int | None = None,
        *,
        cuda_graph: bool = False,
        graph_engines: Collection[str] = ("unet",),
        max_cuda_graphs: int = 2,
        max_composed_sessions: int = 2,
        conv_algo_search: str | None = None,
        prefer_nhwc: bool = False,
        gpu_mem_limit: int | None = None,
    ) -> None:
        ort = _ort()
        self.device = device
        # ort-cuda keeps tensors as OrtValues in ``memory`` ("cuda") with IO binding; ort-cpu passes numpy
        self.io_binding = device == "cuda"
        self.memory = "cuda" if device == "cuda" else "cpu"
        self.device_id = device_id
        self.threads = threads
        self.name = f"ort-{device}"
        self.cuda_graph = cuda_graph
        self.graph_engines = frozenset(graph_engines)
        self.max_cuda_graphs = max_cuda_graphs
        if max_composed_sessions < 0:
            raise InputError(f"max_composed_sessions must be 0 or more, got {max_composed_sessions}")
        # each composed UNet + step session holds a copy of the UNet's weights on the device
        self.max_composed_sessions = max_composed_sessions
        # the composed UNet + step loop: None = with cuda_graph on ort-cuda; True runs it without CUDA graphs
        # (the tests run it that way on the CPU EP, over OrtValues in host memory)
        self.fused_step: bool | None = None
        available = ort.get_available_providers()
        if device == "cpu":
            if cuda_graph:
                raise InputError("cuda_graph needs the ort-cuda backend; ort-cpu has no CUDA graphs")
            self.providers: list[Any] = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in available:
                found = ("ort-cuda needs onnxruntime-gpu with CUDA, and an NVIDIA GPU with its driver (this "
                         f"onnxruntime has the providers: {', '.join(available)}); pip install onnxruntime-gpu on a "
                         "machine with an NVIDIA GPU")
                raise BackendUnavailable(f'{found}, or use backend="ort-cpu"',
                                         cli=f"{found}, or use --backend ort-cpu")
            if max_cuda_graphs < 1:
                raise InputError(f"max_cuda_graphs must be at least 1, got {max_cuda_graphs}")
            self._cuda_options = {
                graph: cuda_provider_options(device_id, cuda_graph=graph, conv_algo_search=conv_algo_search,
                                             prefer_nhwc=prefer_nhwc, gpu_mem_limit=gpu_mem_limit)
                for graph in (False, True)
            }
            self.providers = [("CUDAExecutionProvider", self._cuda_options[False]), "CPUExecutionProvider"]
        else:
            raise ValueError(device)
        self._lock = threading.Lock()
        self._engines: weakref.WeakSet[OrtEngine] = weakref.WeakSet()
        self.closed = False

    def close(self) -> None:
        """Release every session and IO binding loaded from this backend (idempotent)."""
        self.closed = True
        for engine in list(self._engines):
            engine.close()

    def _require_open(self) -> None:
        if self.closed:
            raise InputError(f"this {self.name} backend is closed: {CLOSED}")

    def captures(self, name: str) -> bool:
        """Whether the engine ``name`` runs as a CUDA graph."""
        return self.io_binding and self.cuda_graph and name in self.graph_engines

    def providers_for(self, name: str) -> list[Any]:
        if not self.captures(name):
            return self.providers
        return self.graph_providers()

    def graph_providers(self) -> list[Any]:
        """The providers of a session that captures CUDA graphs (the host's providers on ort-cpu)."""
        if not self.io_binding or self.device != "cuda":
            return self.providers
        return [("CUDAExecutionProvider", self._cuda_options[True]), "CPUExecutionProvider"]

    def step_loop(self, unet: Engine, step: Engine, controlnets: Sequence[Engine | None] = ()) -> StepLoop:
        """ort-cuda with ``cuda_graph``: UNet and step graph composed into one session, captured as one CUDA
        graph per step (``runtime/ort_loop.py``); elsewhere, and with ControlNets, the engines run step by
        step."""
        from .ort_loop import make_step_loop

        return make_step_loop(self, unet, step, controlnets)

    def load(self, path: str | bytes, name: str) -> Engine:
        """Load a graph from a file path, or from serialized bytes (the sampler's step graph)."""
        self._require_open()
        return OrtEngine(self, path, name)

    def to_device(self, a: np.ndarray) -> Array:
        self._require_open()
        if not a.flags.c_contiguous:
            a = a.copy()  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        if not self.io_binding:
            return a
        return _ort().OrtValue.ortvalue_from_numpy(a, self.memory, self.device_id)

    def to_host(self, a: Array) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else a.numpy()

    def shares_memory_with(self, other: Backend) -> bool:
        """Backends of one kind on one device read each other's OrtValues."""
        return other is self or (isinstance(other, OrtBackend) and other.name == self.name
                                 and other.device_id == self.device_id)

    def clone(self, a: Array) -> Array:
        """A new array equal to ``a``: a numpy copy, or an OrtValue filled on the device (no host trip)."""
        if isinstance(a, np.ndarray):
            return self.to_device(a.copy())
        self._require_open()
        dtype, shape = self.meta(a)
        out = _ort().OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.memory, self.device_id)
        _copy_into(out, a)
        return out

    def meta(self, a: Array) -> tuple[np.dtype[Any], tuple[int, ...]]:
        if isinstance(a, np.ndarray):
            return a.dtype, a.shape
        return _ORT_TYPES[a.data_type()], tuple(a.shape())


def cuda_available() -> bool:
    try:
        return "CUDAExecutionProvider" in _ort().get_available_providers()
    except ImportError:
        return False
