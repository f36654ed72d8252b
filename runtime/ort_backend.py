"""ONNX Runtime backends: ``ort-cpu`` (numpy on the host) and ``ort-cuda`` (OrtValues on the GPU).

``ort-cuda`` keeps every tensor on the device with IO binding: inputs are bound as OrtValues, outputs
are allocated there and fed straight to the next engine, so the denoising loop never copies latents to
the host. Where the manifest records an ``ort-cuda`` variant of a component (ONNX Runtime's fused
operators: MultiHeadAttention, GroupNorm, NhwcConv, ...), :meth:`OrtBackend.graph_for` names it.

CUDA graphs (``OrtBackend("cuda", cuda_graph=True)``, opt-in) replay a captured launch sequence instead
of launching every kernel from Python. ORT captures one graph per run-option ``gpu_graph_id``, and a
replay reads and writes the device addresses it was captured with, so per input shape an engine keeps
fixed input and output buffers (:class:`StaticBindings`): new inputs are copied into them on the device
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
The engines, their fixed bindings and the helpers both share are in ``runtime/ort_engine.py``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from .cpu_threads import default_threads
from .engine import CLOSED, Array, Backend, Engine
from .errors import BackendUnavailable, InputError
from .manifest import Component
from .ort_engine import (
    DEVICE_COPY_SINCE,
    GRAPH_ID_KEY,
    ORT_TYPES,
    OrtBackendBase,
    OrtEngine,
    StaticBindings,
    copy_into,
    load_error,
    ort_module,
)
from .ort_loop import make_step_loop
from .step_loop import StepLoop

# with the names of ort_engine that callers (and tests) reach through this module
__all__ = [
    "CONV_ALGO_SEARCH",
    "DEVICE_COPY_SINCE",
    "GRAPH_ID_KEY",
    "OrtBackend",
    "OrtEngine",
    "StaticBindings",
    "copy_into",
    "cuda_available",
    "cuda_provider_options",
    "load_error",
    "ort_module",
]

CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


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



class OrtBackend(OrtBackendBase):
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
        ort = ort_module()
        self.device = device
        # ort-cuda keeps tensors as OrtValues in ``memory`` ("cuda") with IO binding; ort-cpu passes numpy
        self.io_binding = device == "cuda"
        self.memory = "cuda" if device == "cuda" else "cpu"
        self.device_id = device_id
        self.threads = threads if threads is not None else default_threads()
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

    def step_loop(self, unet: Engine, step: Engine, controlnets: Sequence[Engine | None] = (),
                  shallow: Engine | None = None, shallow_nets: Sequence[Engine | None] = ()) -> StepLoop:
        """ort-cuda with ``cuda_graph``: UNet and step graph composed into one session, captured as one CUDA
        graph per step (``runtime/ort_loop.py``); elsewhere, and with ControlNets or DeepCache's shallow path,
        the engines run step by step."""
        return make_step_loop(self, unet, step, controlnets, shallow, shallow_nets)

    def refuses(self, component: Component) -> str | None:
        if component.precision == "bf16" and self.device == "cpu":
            return ("a bf16 graph, which ONNX Runtime's CPU provider cannot run (it has no bf16 kernels): use "
                    "backend openvino (pip install 'sdrt[openvino]'), ort-cuda or tensorrt, or export fp32 graphs "
                    "(sdrt export --fp32)")
        return None

    def load(self, path: str | bytes, name: str, *, exact: bool = False) -> Engine:
        """Load a graph from a file path, or from serialized bytes (the sampler's step graph). Every graph runs at
        its own precision (``exact`` changes nothing)."""
        self._require_open()
        return OrtEngine(self, path, name)

    def to_device(self, a: np.ndarray) -> Array:
        self._require_open()
        if not a.flags.c_contiguous:
            a = a.copy()  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        if not self.io_binding:
            return a
        return ort_module().OrtValue.ortvalue_from_numpy(a, self.memory, self.device_id)

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
        out = ort_module().OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.memory, self.device_id)
        copy_into(out, a)
        return out

    def meta(self, a: Array) -> tuple[np.dtype[Any], tuple[int, ...]]:
        if isinstance(a, np.ndarray):
            return a.dtype, a.shape
        return ORT_TYPES[a.data_type()], tuple(a.shape())


def cuda_available() -> bool:
    try:
        return "CUDAExecutionProvider" in ort_module().get_available_providers()
    except ImportError:
        return False
