"""The ``tensorrt`` backend: engine folders from ``sdrt build``, run with ``execute_async_v3`` on one stream.

Device memory, copies and the stream go through cuda-python (no torch). Everything runs on one CUDA
stream, in call order, and that is what makes the memory scheme below safe:

- ``DeviceArray``: a pointer, a shape and a dtype. Memory is allocated and freed stream-ordered
  (``cudaMallocAsync`` / ``cudaFreeAsync``), so dropping an array never races queued work.
- One scratch block (TensorRT's activation memory) serves every execution context: engines run one
  after another, so they can share the bytes. It is sized to the largest ``device_memory_size_v2``; a
  larger engine loaded later grows it and every context is pointed at the new block.
- Outputs land in buffers kept per engine and output name and reused, but never while the caller still
  holds an array handed out for them: the step graph's ``latents_next`` never overwrites the
  ``latents`` it is reading, and a result kept across calls stays intact.
- ``load(path)`` reads the folder's engine manifest (``sdrt-engines.json``) and refuses an engine built
  for another GPU, TensorRT version or runtime **before** deserializing anything, listing every reason
  and the command that rebuilds the folder (CompatibilityError).
- ``load(bytes)`` (the sampler's step graph, ``runtime/step_graph.py``) loads the engine that ``sdrt build``
  prebuilt from exactly those ONNX bytes (found in the folder's manifest by their sha256), so the lean
  runtime needs no builder and the first step pays no build. A folder without one (built by an older
  sdrt) gets the graph parsed with TensorRT's builder on first use, once per input shapes (a handful of
  elementwise layers: seconds), with a profile fixed to those shapes; the lean runtime has no builder and
  raises BackendUnavailable saying so.

TensorRT modules, tried in this order unless ``module=`` or ``SDRT_TENSORRT_MODULE`` names one: the
module the manifest says built the folder (``tensorrt`` or ``tensorrt_rtx``), then, for ``tensorrt``
engines, the lean runtime (``tensorrt_lean``, or ``tensorrt_lean_bindings`` as PyPI's
``tensorrt-lean-cu13-bindings`` wheel names it). The lean runtime runs only engines built with
``--version-compatible``; such plans carry host code, so ``engine_host_code_allowed`` is set for them:
load only engine folders you trust.

The denoising step as a CUDA graph
----------------------------------
``backend.capture_step(unet, step)`` returns a ``StepLoop``: UNet then step graph, captured as two CUDA
graphs over fixed device buffers (even steps read state A and write state B, odd steps the reverse, so
no engine writes what it reads). What changes per step (the timestep, the coefficient row, the noise)
is uploaded once per call as a table and copied row by row into fixed buffers before each launch.
``Pipeline`` runs its denoising loop this way whenever the backend has ``capture_step``::

    loop = backend.capture_step(unet, step)
    loop.start(latents=x_dev, unet_in=unet_in, x0_prev=zeros, cond=cond, guidance=g,
               timesteps=plan.timesteps, coeffs=plan.table, noise=step_noise)
    for i in range(n):
        loop.step(i)                   # 3 small device copies + 1 graph launch
        backend.synchronize()          # only for per-step timings / the callback
    x_dev = loop.latents               # valid until the next start()

``start`` captures on first use and whenever shapes change (after one warm-up run of each engine: TensorRT
finishes shape-dependent setup outside the capture); a failed capture, or ``TrtBackend(cuda_graph=False)``,
leaves ``loop.captured`` False with ``loop.reason`` and runs the same bindings directly, so results do
not depend on whether capture worked. The StepLoop's buffers are its own: the caller's arrays are copied
in at ``start`` and may be dropped afterwards.

What is verified, and what is not
---------------------------------
No GPU and no full TensorRT were available when this was written. Checked, against a fake TensorRT
and a fake cuda-python (tests/test_trt_backend.py: engines run by onnxruntime, stream work queued and
run in order, captured work replayed at each launch with the addresses bound at capture): the manifest
check comes before deserialization, I/O descriptions, dtypes, output-buffer reuse, scratch sizing and
regrowth, error messages, and the StepLoop's bindings and ping-pong (same latents as the plain loop, and
as a float64 numpy loop), and the whole pipeline from ``sdrt build`` to images (tests/test_trt_pipeline.py:
the ort-cpu images). The TensorRT calls type-check against tensorrt-stubs 10.13; every TensorRT and
cuda-python name used exists in the TensorRT 11.4 lean bindings, TensorRT for RTX 1.7 and cuda-bindings 13.4
(tests/test_trt_modules.py, on a CPU machine, where ``TrtBackend()`` then reports the missing driver), and
``build_onnx`` builds both step graphs with TensorRT for RTX's builder, which needs no GPU. NOT verified:
any run on a GPU (deserializing, executing), and that TensorRT's ``execute_async_v3`` captures as used here
(NVIDIA's diffusion demo does the same: a warm-up, then capture). For TensorRT for RTX, ``sdrt build`` sets
``BuilderFlag.REQUIRE_USER_ALLOCATION``, which its stream capture needs, and the loop asks
``is_stream_capturable()`` before capturing (a "no" runs the engines directly; ``Result.loop`` says so).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import mmap
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import Array, Backend, Engine, IOSpec
from .engine_manifest import (
    ENGINE_MANIFEST_NAME,
    EngineEnv,
    EngineManifest,
    EngineRecord,
    check_engine,
    detect_gpu,
)
from .errors import ArtifactError, BackendUnavailable, CompatibilityError, InputError, SdrtError

if TYPE_CHECKING:
    import tensorrt as trt

RUNTIME_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_lean", "tensorrt_lean_bindings")
LEAN_MODULES = ("tensorrt_lean", "tensorrt_lean_bindings")
RTX_MODULES = ("tensorrt_rtx", "tensorrt_rtx_bindings")  # the second: PyPI's tensorrt-rtx-cu13-bindings
CUDA_HINT = "pip install cuda-python (or: pip install 'sdrt[tensorrt]')"
FULL_TENSORRT_HINT = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"
LEAN_HINT = "pip install tensorrt-lean-cu13-libs tensorrt-lean-cu13-bindings"
TENSORRT_HINT = (
    f"install TensorRT from NVIDIA's package index ({FULL_TENSORRT_HINT}), or, for engines built with "
    f"`sdrt build --version-compatible`, the lean runtime from PyPI ({LEAN_HINT})"
)
_TRT_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}
_BROKEN_RUNTIMES: list[Any] = []  # runtimes that failed to initialize: never freed (that segfaults)
_BUFFERS_PER_OUTPUT = 4  # reusable buffers kept per output; beyond that, outputs are allocated and freed
_STEP_SHAPES_KEPT = 8  # step-graph engines kept per graph, one per input shapes
_CUDA_OOM = 2  # cudaErrorMemoryAllocation
STEP_OUTPUTS = ("latents_next", "x0", "unet_in_next")


class EngineRunError(SdrtError):
    """TensorRT or CUDA failed while running (out of device memory, a failed enqueue or capture)."""


# -- the libraries ----------------------------------------------------------------------------------

def import_cudart() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise BackendUnavailable(f"cuda-python is not installed ({'; '.join(errors)}); {CUDA_HINT}")


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


def runtime_mismatches(record: EngineRecord, lean: bool, version: str) -> list[str]:
    """What ``engine_manifest.env_mismatches`` does not know: which runtime may load which plan."""
    out = []
    flags = record.flags
    if lean and not flags.version_compatible:
        out.append("built without --version-compatible: the lean runtime runs only version-compatible engines")
    if flags.version_compatible and flags.exclude_lean_runtime and version != record.env.version:
        out.append(f"built with --exclude-lean-runtime by TensorRT {record.env.version}: only that exact version "
                   f"runs it, this is {version}")
    return out


def numpy_dtype(trt_dtype: Any, where: str) -> np.dtype[Any]:
    """TensorRT DataType -> numpy dtype, for the types an I/O tensor can have here."""
    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
    try:
        return _TRT_DTYPES[name]
    except KeyError:
        raise CompatibilityError(
            f"{where} is {name}, which sdrt cannot feed or read (it handles {', '.join(_TRT_DTYPES)}); "
            "re-export the component with float16 or float32 inputs and outputs and rebuild it"
        ) from None


def _dims(d: Any) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))


def io_specs(engine: trt.ICudaEngine, name: str) -> tuple[dict[str, IOSpec], dict[str, IOSpec]]:
    """The engine's inputs and outputs as IOSpecs; dynamic axes (-1) become None."""
    inputs: dict[str, IOSpec] = {}
    outputs: dict[str, IOSpec] = {}
    for i in range(engine.num_io_tensors):
        tensor = engine.get_tensor_name(i)
        mode = str(getattr(engine.get_tensor_mode(tensor), "name", "")).rsplit(".", 1)[-1]
        dtype = numpy_dtype(engine.get_tensor_dtype(tensor), f"{name}: tensor {tensor!r}")
        shape = tuple(d if d >= 0 else None for d in _dims(engine.get_tensor_shape(tensor)))
        if mode == "INPUT":
            inputs[tensor] = IOSpec(tensor, dtype, shape)
        elif mode == "OUTPUT":
            outputs[tensor] = IOSpec(tensor, dtype, shape)
    return inputs, outputs


def scratch_size(engine: trt.ICudaEngine) -> int:
    """Bytes of activation memory a context of ``engine`` needs, over every optimization profile."""
    v2 = getattr(engine, "device_memory_size_v2", None)
    size = int(v2 if v2 is not None else engine.device_memory_size)
    per_profile = getattr(engine, "get_device_memory_size_for_profile_v2", None)
    if per_profile is not None:
        for i in range(int(getattr(engine, "num_optimization_profiles", 1))):
            size = max(size, int(per_profile(i)))
    return size


def make_logger(trt_module: Any, messages: deque[str]) -> Any:
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


# -- device memory ----------------------------------------------------------------------------------------

class _Device:
    """One GPU and one stream; the only code that calls cuda-python."""

    def __init__(self, cudart: Any, device_id: int) -> None:
        self.cudart = cudart
        self.device_id = device_id
        res = cudart.cudaGetDeviceCount()
        if int(res[0]) != 0:
            found = (f"no NVIDIA GPU or no NVIDIA driver found on this machine (CUDA reports "
                     f"{self._describe(res[0])}). The tensorrt backend needs an NVIDIA GPU and its driver")
            raise BackendUnavailable(f'{found}; on this machine use backend="ort-cpu"',
                                     cli=f"{found}; on this machine use --backend ort-cpu")
        if not 0 <= device_id < int(res[1]):
            raise BackendUnavailable(f"GPU {device_id} does not exist: CUDA sees {int(res[1])} GPU(s)")
        self.check(cudart.cudaSetDevice(device_id), f"selecting GPU {device_id}")
        flags = getattr(cudart, "cudaStreamNonBlocking", 1)  # no implicit sync with the legacy default stream
        self.stream = self.check(cudart.cudaStreamCreateWithFlags(flags), "creating a stream")
        self.handle = int(self.stream)

    def _describe(self, err: Any) -> str:
        name = desc = ""
        with contextlib.suppress(Exception):
            name = _text(self.cudart.cudaGetErrorName(err)[1])
            desc = _text(self.cudart.cudaGetErrorString(err)[1])
        return f"{name or err}: {desc}" if desc else str(name or err)

    def check(self, result: Any, what: str) -> Any:
        """Raise EngineRunError unless a cuda-python call's status is cudaSuccess; return its value(s)."""
        res = result if isinstance(result, tuple) else (result,)
        if int(res[0]) != 0:
            raise EngineRunError(f"CUDA failed {what}: {self._describe(res[0])}")
        return res[1] if len(res) == 2 else res[1:] or None

    def gpu(self) -> tuple[str | None, str | None]:
        """(name, compute capability) of this CUDA ordinal (NVML's numbering can differ from CUDA's)."""
        with contextlib.suppress(Exception):
            res = self.cudart.cudaGetDeviceProperties(self.device_id)
            if int(res[0]) == 0:
                prop = res[1]
                return _text(prop.name), f"{prop.major}.{prop.minor}"
        return detect_gpu(self.device_id)

    def malloc(self, nbytes: int) -> int:
        res = self.cudart.cudaMallocAsync(nbytes, self.stream)
        if int(res[0]) == _CUDA_OOM:
            raise EngineRunError(
                f"the GPU is out of memory (allocating {nbytes / 2**20:.1f} MiB); close other programs using it, "
                "or lower the batch size or image size"
            )
        return int(self.check(res, f"allocating {nbytes} bytes"))

    def free(self, ptr: int) -> None:
        self.check(self.cudart.cudaFreeAsync(ptr, self.stream), "freeing device memory")

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        """``kind``: "HostToDevice", "DeviceToHost" or "DeviceToDevice"; queued on the stream."""
        k = getattr(self.cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
        if nbytes:
            self.check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, k, self.stream), f"copying {kind}")

    def zero(self, ptr: int, nbytes: int) -> None:
        if nbytes:
            self.check(self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "clearing device memory")

    def synchronize(self) -> None:
        self.check(self.cudart.cudaStreamSynchronize(self.stream), "waiting for the stream")

    def capture(self, work: Callable[[], None]) -> _Graph:
        """Record the stream work ``work`` queues as a CUDA graph instead of running it."""
        cudart = self.cudart
        # thread-local: only this thread's calls must be capture-safe, not other threads' (e.g. a host copy)
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(cudart.cudaStreamBeginCapture(self.stream, mode), "starting a CUDA graph capture")
        try:
            work()
        except BaseException:
            res = cudart.cudaStreamEndCapture(self.stream)  # leave capture mode whatever happened
            if int(res[0]) == 0 and res[1] is not None:
                cudart.cudaGraphDestroy(res[1])
            cudart.cudaGetLastError()
            raise
        res = cudart.cudaStreamEndCapture(self.stream)
        if int(res[0]) != 0:
            cudart.cudaGetLastError()  # capture errors are not sticky: clear them for the direct path
        graph = self.check(res, "ending a CUDA graph capture")
        try:
            exe = self.check(cudart.cudaGraphInstantiate(graph, 0), "instantiating a CUDA graph")
        finally:
            cudart.cudaGraphDestroy(graph)  # the executable graph does not need it
        return _Graph(self, exe)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.cudart.cudaStreamSynchronize(self.stream)
            self.cudart.cudaStreamDestroy(self.stream)


def _text(raw: Any) -> str:
    return raw.decode(errors="replace").rstrip("\x00") if isinstance(raw, bytes) else str(raw)


class _Graph:
    """An instantiated CUDA graph, destroyed with this object."""

    def __init__(self, device: _Device, exe: Any) -> None:
        self.device, self.exe = device, exe

    def launch(self) -> None:
        self.device.check(self.device.cudart.cudaGraphLaunch(self.exe, self.device.stream), "launching a CUDA graph")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.device.cudart.cudaGraphExecDestroy(self.exe)


class _Allocation:
    """Device memory, freed (stream-ordered) when the last array using it is gone, or at ``free()``."""

    def __init__(self, device: _Device, nbytes: int) -> None:
        self.device = device  # keeps the stream alive as long as memory ordered on it exists
        self.nbytes = nbytes
        self.ptr = device.malloc(nbytes) if nbytes else 0

    def free(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            self.device.free(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
            self.free()


class DeviceArray:
    """A C-contiguous array in device memory: ``ptr``, ``shape``, ``dtype``.

    ``owned`` arrays (from ``to_device``/``empty``) free their memory when dropped or at ``free()``.
    Views (engine outputs, rows of a table) share memory that something else keeps; their ``free()``
    only lets go of it.
    """

    def __init__(self, mem: _Allocation, shape: Sequence[int], dtype: Any, *, offset: int = 0,
                 owned: bool = True) -> None:
        self._mem: _Allocation | None = mem
        self.shape = tuple(int(d) for d in shape)
        self.dtype: np.dtype[Any] = np.dtype(dtype)
        self.offset = offset
        self.owned = owned
        if offset + self.nbytes > mem.nbytes:
            raise ValueError(f"{self.nbytes} bytes at offset {offset} do not fit in {mem.nbytes}")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ptr(self) -> int:
        if self._mem is None or (self._mem.nbytes and not self._mem.ptr):
            raise InputError(f"this device array ({self.describe()}) was freed")
        return self._mem.ptr + self.offset if self._mem.ptr else 0

    def view(self) -> DeviceArray:
        """Another array over the same memory, which it does not own."""
        if self._mem is None:
            raise InputError(f"this device array ({self.describe()}) was freed")
        return DeviceArray(self._mem, self.shape, self.dtype, offset=self.offset, owned=False)

    def row(self, i: int) -> DeviceArray:
        """``self[i]`` as a view (the first axis of a table)."""
        if self._mem is None or not 0 <= i < self.shape[0]:
            raise IndexError(i)
        step = self.nbytes // self.shape[0]
        return DeviceArray(self._mem, self.shape[1:], self.dtype, offset=self.offset + i * step, owned=False)

    def free(self) -> None:
        """Release the memory now rather than when the array is collected (a view only drops its reference)."""
        mem, self._mem = self._mem, None
        if mem is not None and self.owned:
            mem.free()

    def describe(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"

    def __repr__(self) -> str:
        state = "freed" if self._mem is None else f"0x{self._mem.ptr + self.offset:x}"
        return f"DeviceArray({self.describe()}, {state})"


class _Slot:
    def __init__(self, mem: _Allocation, user: DeviceArray) -> None:
        self.mem = mem
        self.user: Callable[[], DeviceArray | None] = weakref.ref(user)


class _OutputBuffers:
    """Per output name, up to ``limit`` device buffers of the current shape. A buffer is reused only once
    no array handed out for it is alive, so an output never overwrites an array the caller holds (the
    same call's inputs included). A new shape for a name drops its old buffers (memory goes with the
    last view)."""

    def __init__(self, device: _Device, limit: int = _BUFFERS_PER_OUTPUT) -> None:
        self.device = device
        self.limit = limit
        self.slots: dict[str, tuple[tuple[int, ...], np.dtype[Any], list[_Slot]]] = {}
        self.allocations = 0  # counted for tests and diagnostics

    def take(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> DeviceArray:
        entry = self.slots.get(name)
        if entry is None or entry[0] != shape or entry[1] != dtype:
            entry = (shape, dtype, [])
            self.slots[name] = entry
        slots = entry[2]
        for slot in slots:
            if slot.user() is None:
                arr = DeviceArray(slot.mem, shape, dtype, owned=False)
                slot.user = weakref.ref(arr)
                return arr
        mem = _Allocation(self.device, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        self.allocations += 1
        if len(slots) >= self.limit:
            return DeviceArray(mem, shape, dtype)  # the caller keeps many: this one is theirs alone
        arr = DeviceArray(mem, shape, dtype, owned=False)
        slots.append(_Slot(mem, arr))
        return arr


class _SharedScratch:
    """One block of TensorRT activation memory for every execution context (engines run one after another
    on one stream). Grows to the largest need; growing re-points every context and bumps ``generation``
    (CUDA graphs captured before hold the old address and must be captured again)."""

    def __init__(self, device: _Device) -> None:
        self.device = device
        self.mem: _Allocation | None = None
        self.size = 0
        self.generation = 0
        self.users: weakref.WeakSet[TrtEngine] = weakref.WeakSet()

    @property
    def ptr(self) -> int:
        return self.mem.ptr if self.mem is not None else 0

    def attach(self, user: TrtEngine, need: int) -> None:
        if need > self.size:
            self._grow(need)
        self.users.add(user)
        user.set_scratch(self.ptr, self.size)

    def _grow(self, need: int) -> None:
        mem = _Allocation(self.device, need)
        old, self.mem, self.size = self.mem, mem, need
        self.generation += 1
        for user in list(self.users):
            user.set_scratch(mem.ptr, need)
        if old is not None:
            old.free()  # stream-ordered: after the work already queued on it


# -- engines ---------------------------------------------------------------------------------------------

class TrtEngine(Engine):
    """One deserialized TensorRT engine with its execution context (memory: the backend's shared scratch)."""

    backend: TrtBackend

    def __init__(self, backend: TrtBackend, cuda_engine: trt.ICudaEngine, name: str) -> None:
        self.name = name
        self.backend = backend
        self.cuda_engine = cuda_engine
        self.inputs, self.outputs = io_specs(cuda_engine, name)
        strategy = getattr(getattr(backend.trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        if strategy is not None:
            context = cuda_engine.create_execution_context(strategy)
        else:  # TensorRT before 10
            context = cuda_engine.create_execution_context_without_device_memory()
        if context is None:
            raise EngineRunError(f"{name}: TensorRT could not create an execution context "
                                 f"({backend.messages() or 'no message'})")
        self.context: trt.IExecutionContext = context
        self.buffers = _OutputBuffers(backend.device)
        backend.scratch.attach(self, scratch_size(cuda_engine))

    def set_scratch(self, ptr: int, size: int) -> None:
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(ptr, size)
        else:  # TensorRT before 10.1
            self.context.device_memory = ptr  # type: ignore[attr-defined]

    def resolve(self, shapes: Mapping[str, tuple[int, ...]]) -> TrtEngine:
        return self

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        arrays = {n: self.backend.as_device(v) for n, v in feeds.items()}
        self.bind_inputs(arrays)
        outs = {n: self.buffers.take(n, self.output_shape(n), spec.dtype) for n, spec in self.outputs.items()}
        self.bind_outputs(outs)
        self.enqueue()
        return dict(outs)

    def bind_inputs(self, arrays: Mapping[str, DeviceArray]) -> None:
        for name in self.inputs:
            a = arrays[name]
            if not self.context.set_input_shape(name, a.shape):
                raise self._profile_error(name, a.shape)
            self.context.set_tensor_address(name, a.ptr)

    def output_shape(self, name: str) -> tuple[int, ...]:
        shape = _dims(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise EngineRunError(f"{self.name}: output {name!r} has shape {list(shape)} after setting the inputs: "
                                 "data-dependent output shapes are not supported")
        return shape

    def bind_outputs(self, arrays: Mapping[str, DeviceArray]) -> None:
        for name in self.outputs:
            a = arrays[name]
            want = self.output_shape(name)
            if a.shape != want or a.dtype != self.outputs[name].dtype:
                raise EngineRunError(f"{self.name}: output buffer {name!r} is {a.describe()}, the engine writes "
                                     f"{self.outputs[name].dtype.name}{list(want)}")
            self.context.set_tensor_address(name, a.ptr)

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.backend.device.handle):
            raise EngineRunError(f"{self.name}: TensorRT failed to run ({self.backend.messages() or 'no message'})")

    def _profile_error(self, name: str, shape: tuple[int, ...]) -> InputError:
        try:
            lo, _, hi = (list(_dims(d)) for d in self.cuda_engine.get_tensor_profile_shape(name, 0))
            span = f"from {lo} to {hi}"
        except Exception:  # noqa: BLE001 - the range is only for the message
            span = "unknown"
        return InputError(
            f"{self.name}: input {name!r} of shape {list(shape)} is outside the engine's profile ({span}); "
            "rebuild the engines with a profile that covers it, e.g. "
            "`sdrt build ONNX_DIR --out ENGINE_DIR --dynamic 256:512:1024 --batch 1:1:4`"
        )


def onnx_specs(model_bytes: bytes) -> tuple[dict[str, IOSpec], dict[str, IOSpec]]:
    """IOSpecs of an ONNX graph's inputs (initializers excluded) and outputs; named axes stay names."""
    import onnx
    from onnx import helper

    graph = onnx.load_from_string(model_bytes).graph
    weights = {t.name for t in graph.initializer}

    def spec(v: Any) -> IOSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        return IOSpec(v.name, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), dims)

    return ({v.name: spec(v) for v in graph.input if v.name not in weights},
            {v.name: spec(v) for v in graph.output})


class OnnxTrtEngine(Engine):
    """An ONNX graph given as bytes (the sampler's step graph), built into a TensorRT engine on first use,
    once per input shapes, with a profile fixed to those shapes."""

    backend: TrtBackend

    def __init__(self, backend: TrtBackend, model_bytes: bytes, name: str) -> None:
        if not (hasattr(backend.trt, "Builder") and hasattr(backend.trt, "OnnxParser")):
            raise BackendUnavailable(
                f"{name}: {backend.module} has no builder, and the sampler step graph is built on the fly; "
                f"run with the full TensorRT ({FULL_TENSORRT_HINT}), or use backend='ort-cuda'"
            )
        self.name = name
        self.backend = backend
        self.model_bytes = model_bytes
        self.inputs, self.outputs = onnx_specs(model_bytes)
        self.built: dict[tuple[tuple[str, tuple[int, ...]], ...], TrtEngine] = {}

    def resolve(self, shapes: Mapping[str, tuple[int, ...]]) -> TrtEngine:
        key = tuple((n, tuple(int(d) for d in shapes[n])) for n in self.inputs)
        engine = self.built.get(key)
        if engine is None:
            cuda_engine = self.backend.build_onnx(self.model_bytes, self.inputs, dict(key), self.name)
            engine = self.built[key] = TrtEngine(self.backend, cuda_engine, self.name)
            while len(self.built) > _STEP_SHAPES_KEPT:
                del self.built[next(iter(self.built))]
        return engine

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        arrays = {n: self.backend.as_device(v) for n, v in feeds.items()}
        return self.resolve({n: a.shape for n, a in arrays.items()}).run(arrays)


# -- the backend ---------------------------------------------------------------------------------------------

class TrtBackend(Backend):
    """TensorRT engines on one GPU and one CUDA stream. Not thread-safe: one pipeline drives it."""

    name = "tensorrt"

    def __init__(self, folder: str | Path | None = None, device_id: int = 0, cuda_graph: bool = True,
                 module: str | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        problems: list[SdrtError] = []
        cudart = trt_module = None
        try:
            cudart = import_cudart()
        except BackendUnavailable as e:
            problems.append(e)
        try:
            trt_module = import_tensorrt(module_candidates(module, _built_with(self.folder)))
        except BackendUnavailable as e:
            problems.append(e)
        device = None
        if cudart is not None:
            try:
                device = _Device(cudart, device_id)  # before trt.Runtime: it can crash without a GPU
            except (BackendUnavailable, EngineRunError) as e:
                problems.append(e)
        if problems or device is None or trt_module is None:
            head = "the tensorrt backend cannot run here:\n  - "
            raise BackendUnavailable(head + "\n  - ".join(str(p) for p in problems),
                                     cli=head + "\n  - ".join(p.for_cli() for p in problems))
        self.device = device
        self.trt = trt_module
        self.module = str(trt_module.__name__)
        self.lean = self.module in LEAN_MODULES
        self.log: deque[str] = deque(maxlen=32)
        self.logger = make_logger(trt_module, self.log)
        runtime = trt_module.Runtime(self.logger)
        failed = [m for m in self.log if m.startswith(("ERROR", "INTERNAL_ERROR"))]
        if failed:
            # the bindings return an object over a null runtime: using or freeing it crashes the process, so
            # it is kept alive (and unused) until exit
            _BROKEN_RUNTIMES.append(runtime)
            raise BackendUnavailable(f"{self.module} could not create its runtime: {' | '.join(failed[-3:])}")
        self.runtime: trt.Runtime = runtime
        self.scratch = _SharedScratch(device)
        self.manifest: EngineManifest | None = None  # of the first engine folder loaded from
        self._checked: dict[Path, EngineManifest] = {}
        self._pending: list[np.ndarray] = []  # host arrays of copies still queued
        self._loops: dict[tuple[int, int], StepLoop] = {}
        self._builder: Any = None

    def messages(self) -> str:
        """TensorRT's recent warnings and errors, for error messages."""
        return " | ".join(list(self.log)[-6:])

    # -- loading --------------------------------------------------------------------------------------
    def load(self, path: str | bytes, name: str) -> Engine:
        """An engine file of an sdrt engine folder (checked against the folder's manifest first), or an
        ONNX graph as bytes (the sampler step graph, built on first use)."""
        if isinstance(path, (bytes, bytearray, memoryview)):
            rec = self.prebuilt(bytes(path))
            if rec is not None and self.folder is not None:
                return self.load(str(self.folder / rec.file), rec.component)
            return OnnxTrtEngine(self, bytes(path), name)
        file = Path(path)
        manifest = self.check_folder(file.parent)  # before anything is deserialized
        record = manifest.record(name)
        if record.file != file.name:
            raise ArtifactError(f"{name}: the export manifest names {file.name}, the engine manifest {record.file}; "
                                f"the folder is inconsistent, rebuild it: {manifest.build_command}")
        if record.flags.version_compatible:
            self.runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime it runs on
        self.log.clear()
        with _plan(file) as blob:
            try:
                cuda_engine = self.runtime.deserialize_cuda_engine(blob)
            except TypeError:  # bindings that take only bytes, not a memory map
                cuda_engine = self.runtime.deserialize_cuda_engine(blob[:])
        if cuda_engine is None:
            raise ArtifactError(
                f"{self.module} {self.trt.__version__} could not deserialize {file} ({self.messages() or 'no message'}); "
                f"the file is corrupt or not what its manifest says. Rebuild it: {manifest.build_command}"
            )
        return TrtEngine(self, cuda_engine, name)

    def prebuilt(self, model_bytes: bytes) -> EngineRecord | None:
        """The engine that ``sdrt build`` made from exactly this ONNX graph (a sampler step graph), in the
        engine folder this backend was opened on, or None (the graph is then built on first use)."""
        if self.folder is None or not (self.folder / ENGINE_MANIFEST_NAME).is_file():
            return None
        digest = hashlib.sha256(model_bytes).hexdigest()
        manifest = self.check_folder(self.folder)
        for r in manifest.engines:
            if r.onnx_sha256 == digest:
                return r
        return None

    def environment(self) -> EngineEnv:
        """Where engines are being loaded: this TensorRT and this GPU, in the engine manifest's terms."""
        gpu_name, cc = self.device.gpu()
        return EngineEnv(backend_name(self.trt), str(self.trt.__version__), gpu_name, cc)

    def check_folder(self, folder: Path) -> EngineManifest:
        """Read and check an engine folder's manifest once: CompatibilityError lists every engine that
        cannot run here and the command that rebuilds the folder."""
        key = folder.resolve()
        if key in self._checked:
            return self._checked[key]
        manifest = EngineManifest.read(folder)
        env = self.environment()
        runtime_problems = [f"{r.component}: {m}" for r in manifest.engines
                            for m in runtime_mismatches(r, self.lean, env.version)]
        if runtime_problems:
            raise CompatibilityError(
                f"the engines cannot be used with {self.module} {env.version}:\n  - " + "\n  - ".join(runtime_problems)
                + f"\nrebuild them with --version-compatible, or install the full TensorRT ({FULL_TENSORRT_HINT});"
                f" the folder's build command:\n  {manifest.build_command}"
            )
        check_engine(manifest, env, folder=folder)
        self._checked[key] = manifest
        if self.manifest is None:
            self.manifest = manifest
        return manifest

    def build_onnx(self, model_bytes: bytes, inputs: Mapping[str, IOSpec], shapes: Mapping[str, tuple[int, ...]],
                   name: str) -> trt.ICudaEngine:
        """Build and deserialize a small ONNX graph for exactly these input shapes."""
        t = self.trt
        if self._builder is None:
            self._builder = t.Builder(self.logger)
        builder: trt.Builder = self._builder
        strongly = getattr(getattr(t, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
        network = builder.create_network(0 if strongly is None else 1 << int(strongly))
        parser = t.OnnxParser(network, self.logger)
        self.log.clear()
        if not parser.parse(model_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CompatibilityError(f"{self.module} {t.__version__} cannot parse {name}: {errors or self.messages()}")
        config = builder.create_builder_config()
        dynamic = [n for n, s in inputs.items() if not all(isinstance(d, int) for d in s.shape)]
        if dynamic:
            profile = builder.create_optimization_profile()
            for n in dynamic:
                profile.set_shape(n, shapes[n], shapes[n], shapes[n])  # type: ignore[arg-type]  # tuples work as Dims
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        del parser
        if plan is None:
            raise EngineRunError(f"{name}: TensorRT could not build it for {dict(shapes)} ({self.messages() or 'no message'})")
        engine = self.runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineRunError(f"{name}: TensorRT could not load the engine it built ({self.messages() or 'no message'})")
        return engine

    # -- arrays -----------------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        dt = np.dtype(dtype)
        return DeviceArray(_Allocation(self.device, int(np.prod(shape, dtype=np.int64)) * dt.itemsize), shape, dt)

    def to_device(self, a: np.ndarray) -> Array:
        a = np.asarray(a)
        if a.dtype not in _TRT_DTYPES.values():
            raise InputError(f"cannot put a {a.dtype} array on the device; use one of "
                             f"{', '.join(d.name for d in _TRT_DTYPES.values())}")
        if not a.flags.c_contiguous:
            a = a.copy()  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        out = self.empty(a.shape, a.dtype)
        self.device.copy(out.ptr, a.ctypes.data, a.nbytes, "HostToDevice")
        self._pending.append(a)  # a pageable source may be read after this returns: keep it until a sync
        return out

    def to_host(self, a: Array) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        arr = self._device_array(a)
        out = np.empty(arr.shape, arr.dtype)
        self.device.copy(out.ctypes.data, arr.ptr, arr.nbytes, "DeviceToHost")
        self.synchronize()
        return out

    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        """Queue a device-to-device copy between arrays of the same dtype and size."""
        if dst.dtype != src.dtype or dst.nbytes != src.nbytes:
            raise InputError(f"cannot copy {src.describe()} into {dst.describe()}")
        self.device.copy(dst.ptr, src.ptr, src.nbytes, "DeviceToDevice")

    def meta(self, a: Array) -> tuple[np.dtype[Any], tuple[int, ...]]:
        if isinstance(a, (DeviceArray, np.ndarray)):
            return a.dtype, tuple(a.shape)
        raise InputError(f"expected a device array (from to_device) or a numpy array, got {type(a).__name__}")

    def as_device(self, a: Array) -> DeviceArray:
        """A device array as is; a numpy array copied to the device."""
        return self.to_device(a) if isinstance(a, np.ndarray) else self._device_array(a)

    def _device_array(self, a: Any) -> DeviceArray:
        if not isinstance(a, DeviceArray):
            raise InputError(f"expected a device array (from to_device) or a numpy array, got {type(a).__name__}")
        return a

    def synchronize(self) -> None:
        self.device.synchronize()
        self._pending.clear()

    # -- the captured step -----------------------------------------------------------------------------
    def capture_step(self, unet: Engine, step: Engine) -> StepLoop:
        """The denoising step (``unet`` then the sampler ``step`` graph) as a StepLoop, kept per engine pair;
        see the module docstring."""
        u, s = self._own(unet), self._own(step)
        key = (id(u), id(s))
        loop = self._loops.get(key)
        if loop is None or loop.unet is not u or loop.step_engine is not s:
            loop = self._loops[key] = StepLoop(self, u, s)
        return loop

    def _own(self, e: Engine) -> TrtEngine | OnnxTrtEngine:
        if not isinstance(e, (TrtEngine, OnnxTrtEngine)) or e.backend is not self:
            raise InputError(f"capture_step takes engines loaded by this backend, not {type(e).__name__}")
        return e


def _built_with(folder: Path | None) -> str | None:
    """The module that built an engine folder (from its manifest), or None when that cannot be read."""
    if folder is None:
        return None
    try:
        manifest = EngineManifest.read(folder)
    except SdrtError:
        return None  # load() reports it
    names = {r.env.backend for r in manifest.engines}
    return names.pop() if len(names) == 1 else None


@contextlib.contextmanager
def _plan(path: Path) -> Iterator[Any]:
    """The engine file's bytes, memory-mapped (a UNet plan is GBs: no second copy in host memory)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        yield m


# -- the captured denoising step -----------------------------------------------------------------------------

class StepLoop:
    """UNet then sampler step graph, over fixed device buffers, as two CUDA graphs (even and odd steps).

    Even steps read state A (latents, x0, UNet input) and write state B; odd steps the reverse. The
    timestep, coefficient row and noise of step i are copied from per-call tables into fixed buffers
    before each launch. Without a capture (disabled or failed: ``captured``/``reason``) the same bindings
    run directly.
    """

    def __init__(self, backend: TrtBackend, unet: TrtEngine | OnnxTrtEngine, step: TrtEngine | OnnxTrtEngine) -> None:
        self.backend = backend
        self.unet = unet
        self.step_engine = step
        self.captured = False
        self.reason = "not started"
        self._key: tuple[Any, ...] | None = None
        self._generation = -1
        self._graphs: list[_Graph] = []
        self._done = 0
        self._steps = 0
        self._tables: dict[str, DeviceArray] = {}
        self.buf: dict[str, Any] = {}

    # -- the public calls -----------------------------------------------------------------------------
    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array], timesteps: Sequence[float] | np.ndarray,
              coeffs: np.ndarray, guidance: Array | None = None, x0_prev: Array | None = None,
              noise: np.ndarray | None = None) -> None:
        """Set up a run of ``len(timesteps)`` steps: copy the starting state and conditioning in, upload
        the per-step tables, and (re)capture when the shapes changed."""
        be = self.backend
        x, u = be.as_device(latents), be.as_device(unet_in)
        conds = {k: be.as_device(v) for k, v in cond.items()}
        g = None if guidance is None else be.as_device(guidance)
        ts, cf = np.asarray(timesteps), np.asarray(coeffs)
        n = len(ts)
        if n < 1 or cf.ndim != 2 or cf.shape[0] != n:
            raise InputError(f"coeffs must be [steps, columns] with one row per timestep ({n}), got {list(cf.shape)}")
        if noise is not None and np.shape(noise) != (n, *x.shape):
            raise InputError(f"noise must be [steps, *latents.shape] = {[n, *x.shape]}, got {list(np.shape(noise))}")
        key = (x.shape, x.dtype, u.shape, u.dtype, g is None, cf.shape[1],
               tuple(sorted((k, v.shape, v.dtype.str) for k, v in conds.items())))
        if key != self._key or (self.captured and self._generation != be.scratch.generation):
            self._setup(x, u, conds, g, cf.shape[1])
            self._key = key
        b = self.buf
        be.copy(b["lat"][0], x)
        be.copy(b["uin"][0], u)
        if x0_prev is None:
            be.device.zero(b["x0"][0].ptr, b["x0"][0].nbytes)
        else:
            be.copy(b["x0"][0], be.as_device(x0_prev))
        for k, v in conds.items():
            be.copy(b["cond"][k], v)
        if g is not None:
            be.copy(b["g"], g)
        t = b["t"]
        rows = np.broadcast_to(ts.astype(t.dtype).reshape(n, *([1] * len(t.shape))), (n, *t.shape))
        self._tables = {"t": be.as_device(np.ascontiguousarray(rows)),
                        "c": be.as_device(np.ascontiguousarray(cf, dtype=b["c"].dtype))}
        if noise is None:
            be.device.zero(b["noise"].ptr, b["noise"].nbytes)
        else:
            self._tables["noise"] = be.as_device(np.ascontiguousarray(noise, dtype=b["noise"].dtype))
        self._done, self._steps = 0, n

    def step(self, i: int) -> None:
        """Queue step ``i`` (call in order, 0 .. steps-1, after ``start``)."""
        if self._key is None or not 0 <= i < self._steps:
            raise InputError(f"step {i} is outside the {self._steps} steps of the last start()")
        be, b = self.backend, self.buf
        be.copy(b["t"], self._tables["t"].row(i))
        be.copy(b["c"], self._tables["c"].row(i))
        if "noise" in self._tables:
            be.copy(b["noise"], self._tables["noise"].row(i))
        parity = self._done % 2
        if self.captured and self._generation != be.scratch.generation:
            self._recapture(parity)
        if self.captured:
            self._graphs[parity].launch()
        else:
            self._enqueue(parity)
        self._done += 1

    @property
    def latents(self) -> DeviceArray:
        """The latents after the steps run so far (a view: valid until the next ``start``)."""
        if self._key is None:
            raise InputError("start() the loop first")
        lat: DeviceArray = self.buf["lat"][self._done % 2]
        return lat.view()

    # -- internals ------------------------------------------------------------------------------------
    def _setup(self, x: DeviceArray, u: DeviceArray, conds: Mapping[str, DeviceArray], g: DeviceArray | None,
               columns: int) -> None:
        be = self.backend
        self._key, self._graphs, self.captured = None, [], False
        unet_feeds_names = set(self.unet.inputs)
        if unet_feeds_names != {"sample", "timestep", *conds}:
            raise InputError(f"unet takes {sorted(unet_feeds_names)}; cond must hold all but sample and timestep, "
                             f"got {sorted(conds)}")
        t_spec = self.unet.inputs["timestep"]
        b: dict[str, Any] = {
            "lat": [be.empty(x.shape, x.dtype) for _ in range(2)],
            "x0": [be.empty(x.shape, x.dtype) for _ in range(2)],
            "uin": [be.empty(u.shape, u.dtype) for _ in range(2)],
            "t": be.empty((u.shape[0],) if len(t_spec.shape) == 1 else (), t_spec.dtype),
            "cond": {k: be.empty(v.shape, v.dtype) for k, v in conds.items()},
        }
        unet_feeds = {"sample": b["uin"][0], "timestep": b["t"], **b["cond"]}
        self.unet.check(unet_feeds)
        unet_e = self.unet.resolve({k: v.shape for k, v in unet_feeds.items()})
        unet_e.bind_inputs(unet_feeds)
        out_name = "out_sample" if "out_sample" in unet_e.outputs else next(iter(unet_e.outputs))
        b["out"] = be.empty(unet_e.output_shape(out_name), unet_e.outputs[out_name].dtype)
        st = self.step_engine.inputs
        b["c"] = be.empty((columns,), st["coeffs"].dtype)
        b["noise"] = be.empty(x.shape, st["noise"].dtype)
        b["g"] = None if g is None else be.empty(g.shape, g.dtype)
        self.buf = b
        step_feeds = self._step_feeds(0)
        self.step_engine.check(step_feeds)
        if set(self.step_engine.outputs) != set(STEP_OUTPUTS):
            raise InputError(f"{self.step_engine.name} must have outputs {STEP_OUTPUTS}, has {sorted(self.step_engine.outputs)}")
        step_e = self.step_engine.resolve({k: v.shape for k, v in step_feeds.items()})
        self._unet_e, self._out_name, self._step_e = unet_e, out_name, step_e
        self._capture()

    def _step_feeds(self, p: int) -> dict[str, DeviceArray]:
        b = self.buf
        feeds = {"latents": b["lat"][p], "unet_out": b["out"], "coeffs": b["c"], "x0_prev": b["x0"][p],
                 "noise": b["noise"]}
        if b["g"] is not None:
            feeds["guidance"] = b["g"]
        return feeds

    def _enqueue(self, p: int) -> None:
        """Bind step parity ``p`` (read state p, write state 1 - p) and queue UNet, then step graph."""
        b = self.buf
        self._unet_e.bind_inputs({"sample": b["uin"][p], "timestep": b["t"], **b["cond"]})
        self._unet_e.bind_outputs({self._out_name: b["out"]})
        self._unet_e.enqueue()
        self._step_e.bind_inputs(self._step_feeds(p))
        self._step_e.bind_outputs({"latents_next": b["lat"][1 - p], "x0": b["x0"][1 - p],
                                   "unet_in_next": b["uin"][1 - p]})
        self._step_e.enqueue()

    def _capture(self) -> None:
        be = self.backend
        self._graphs, self.captured = [], False
        if not be.cuda_graph:
            self.reason = "CUDA graphs are off (TrtBackend(cuda_graph=False))"
            return
        graphs = []
        refuse = [e.name for e in (self._unet_e, self._step_e)
                  if hasattr(e.context, "is_stream_capturable") and not e.context.is_stream_capturable(be.device.handle)]
        if refuse:  # TensorRT for RTX says so up front (data-dependent shapes, on-device control flow)
            self.reason = f"TensorRT cannot stream-capture {', '.join(refuse)} here; running the engines directly"
            return
        try:
            for p in (0, 1):
                self._enqueue(p)  # warm-up: TensorRT's shape-dependent setup happens outside the capture
                graphs.append(be.device.capture(functools.partial(self._enqueue, p)))
            be.synchronize()
        except (EngineRunError, InputError) as e:
            self.reason = f"CUDA graph capture failed, running the engines directly: {e}"
            return
        self._graphs, self.captured, self.reason = graphs, True, ""
        self._generation = be.scratch.generation

    def _recapture(self, parity: int) -> None:
        """Capture again (the scratch block moved) without losing the state the next step reads: the warm-up
        runs write both states."""
        be, b = self.backend, self.buf
        saved = []
        for k in ("lat", "x0", "uin"):
            keep = be.empty(b[k][parity].shape, b[k][parity].dtype)
            be.copy(keep, b[k][parity])
            saved.append((k, keep))
        self._capture()
        for k, keep in saved:
            be.copy(b[k][parity], keep)
