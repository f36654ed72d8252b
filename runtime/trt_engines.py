"""TensorRT engines of an engine folder: I/O descriptions, output buffers, the shared scratch block.

- One scratch block (TensorRT's activation memory) serves every execution context: engines run one
  after another, so they can share the bytes. It is sized to the largest ``device_memory_size_v2``; a
  larger engine loaded later grows it and every context is pointed at the new block. A second backend
  made with ``TrtBackend(share=...)`` (an SDXL refiner beside its base) joins the same block.
- Outputs land in buffers kept per engine and output name and reused, but never while the caller still
  holds an array handed out for them: the step graph's ``latents_next`` never overwrites the
  ``latents`` it is reading, and a result kept across calls stays intact.
- An engine folder's manifest (``sdrt-engines.json``) says which module built it (``built_with``) and
  which runtime may load which plan (``runtime_mismatches``); the plan file is memory-mapped (``map_plan``).
- :class:`TrtBackendBase` declares what engines and the captured loop (``runtime/trt_loop.py``) use of their
  backend, so neither imports ``runtime/trt_backend.py``: the backend imports them.
"""

from __future__ import annotations

import abc
import contextlib
import mmap
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cuda import CLOSED, Allocation, Device, DeviceArray, EngineRunError
from .engine import Array, Backend, Engine, IOSpec
from .engine_manifest import EngineManifest, EngineRecord
from .errors import CompatibilityError, InputError, SdrtError

if TYPE_CHECKING:
    import tensorrt as trt

TRT_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}
BUFFERS_PER_OUTPUT = 4  # reusable buffers kept per output; beyond that, outputs are allocated and freed


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
        return TRT_DTYPES[name]
    except KeyError:
        raise CompatibilityError(
            f"{where} is {name}, which sdrt cannot feed or read (it handles {', '.join(TRT_DTYPES)}); "
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


class _Slot:
    def __init__(self, mem: Allocation, user: DeviceArray) -> None:
        self.mem = mem
        self.user: Callable[[], DeviceArray | None] = weakref.ref(user)


class _OutputBuffers:
    """Per output name, up to ``limit`` device buffers of the current shape. A buffer is reused only once
    no array handed out for it is alive, so an output never overwrites an array the caller holds (the
    same call's inputs included). A new shape for a name drops its old buffers (memory goes with the
    last view)."""

    def __init__(self, device: Device, limit: int = BUFFERS_PER_OUTPUT) -> None:
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
        mem = Allocation(self.device, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        self.allocations += 1
        if len(slots) >= self.limit:
            return DeviceArray(mem, shape, dtype)  # the caller keeps many: this one is theirs alone
        arr = DeviceArray(mem, shape, dtype, owned=False)
        slots.append(_Slot(mem, arr))
        return arr

    def close(self) -> None:
        """Free every kept buffer now (arrays handed out over them are then unusable)."""
        slots, self.slots = self.slots, {}
        for _, _, kept in slots.values():
            for slot in kept:
                slot.mem.free()


class SharedScratch:
    """One block of TensorRT activation memory for every execution context (engines run one after another
    on one stream). Grows to the largest need; growing re-points every context and bumps ``generation``
    (CUDA graphs captured before hold the old address and must be captured again)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.mem: Allocation | None = None
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
        # the old block is freed before the new one is allocated: both calls are stream-ordered, so work already
        # queued still reads the old bytes, and the pool can hand them to the new block; the peak stays one block
        # (the larger need), as when a second model (an SDXL refiner) joins with a larger engine
        if self.mem is not None:
            self.mem.free()
            self.mem = None
        mem = Allocation(self.device, need)
        self.mem, self.size = mem, need
        self.generation += 1
        for user in list(self.users):
            user.set_scratch(mem.ptr, need)

    def close(self) -> None:
        mem, self.mem, self.size = self.mem, None, 0
        self.users = weakref.WeakSet()
        if mem is not None:
            mem.free()


# -- engines ---------------------------------------------------------------------------------------------

class TrtBackendBase(Backend):
    """What a :class:`TrtEngine` and the captured step loop use of their backend; ``trt_backend.TrtBackend``
    sets and implements it."""

    device: Device  # the GPU and its stream
    trt: Any  # the TensorRT module in use
    scratch: SharedScratch
    cuda_graph: bool  # capture the step loop as CUDA graphs
    per_step_reads = False  # the step loop is captured whole: a feature cache follows a fixed schedule
    loads_on_demand = False  # the scratch block is sized over the engines loaded with the model

    @abc.abstractmethod
    def messages(self) -> str:
        """TensorRT's recent warnings and errors, for error messages."""

    @abc.abstractmethod
    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        """An uninitialized device array."""

    @abc.abstractmethod
    def copy(self, dst: DeviceArray, src: DeviceArray) -> None:
        """Queue a device-to-device copy between arrays of the same dtype and size."""

    @abc.abstractmethod
    def as_device(self, a: Array) -> DeviceArray:
        """A device array as is; a numpy array copied to the device."""


class TrtEngine(Engine):
    """One deserialized TensorRT engine with its execution context (memory: the backend's shared scratch)."""

    backend: TrtBackendBase

    def __init__(self, backend: TrtBackendBase, cuda_engine: trt.ICudaEngine, name: str) -> None:
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
        self.closed = False
        self.buffers = _OutputBuffers(backend.device)
        backend.scratch.attach(self, scratch_size(cuda_engine))

    def set_scratch(self, ptr: int, size: int) -> None:
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(ptr, size)
        else:  # TensorRT before 10.1
            self.context.device_memory = ptr  # type: ignore[attr-defined]

    def close(self) -> None:
        """Release the execution context, the engine and the output buffers (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.buffers.close()
        del self.context  # the context before the engine it came from
        del self.cuda_engine

    def require_open(self) -> None:
        if self.closed:
            raise InputError(f"{self.name}: {CLOSED}")

    def check(self, feeds: Mapping[str, Array]) -> None:
        self.require_open()  # before the inputs: after close() nothing about them matters
        super().check(feeds)

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        self.require_open()
        arrays = {n: self.backend.as_device(v) for n, v in feeds.items()}
        self.bind_inputs(arrays)
        outs = {n: self.buffers.take(n, self.output_shape(n), spec.dtype) for n, spec in self.outputs.items()}
        self.bind_outputs(outs)
        self.enqueue()
        return dict(outs)

    def bind_inputs(self, arrays: Mapping[str, DeviceArray]) -> None:
        self.require_open()
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


def built_with(folder: Path | None) -> str | None:
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
def map_plan(path: Path) -> Iterator[Any]:
    """The engine file's bytes, memory-mapped (a UNet plan is GBs: no second copy in host memory)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        yield m
