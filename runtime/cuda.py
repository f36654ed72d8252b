"""CUDA through cuda-python (no torch): one GPU, one stream, device memory, CUDA graphs.

Everything runs on one CUDA stream, in call order, and that is what makes the memory scheme safe:
``DeviceArray`` is a pointer, a shape and a dtype; memory is allocated and freed stream-ordered
(``cudaMallocAsync`` / ``cudaFreeAsync``), so dropping an array never races queued work.
``Device.capture`` records the work a callable queues as a CUDA graph instead of running it.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .engine import CLOSED, Clock
from .engine_manifest import detect_gpu
from .errors import BackendUnavailable, InputError, SdrtError

CUDA_HINT = "pip install cuda-python (or: pip install 'sdrt[tensorrt]')"
_CUDA_OOM = 2  # cudaErrorMemoryAllocation


class EngineRunError(SdrtError):
    """TensorRT or CUDA failed while running (out of device memory, a failed enqueue or capture)."""


def import_cudart() -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise BackendUnavailable(f"cuda-python is not installed ({'; '.join(errors)}); {CUDA_HINT}")


# -- device memory ----------------------------------------------------------------------------------------

class Device:
    """One GPU and one stream; the only code that calls cuda-python.

    ``close()`` frees every allocation still alive on it (the arrays over them then refuse use), destroys
    every graph and event made on it, and then the stream; dropping the last reference does the same."""

    def __init__(self, cudart: Any, device_id: int) -> None:
        self.cudart = cudart
        self.device_id = device_id
        self.closed = False
        self.allocations: weakref.WeakSet[Allocation] = weakref.WeakSet()
        self.graphs: weakref.WeakSet[Graph] = weakref.WeakSet()
        self.events: weakref.WeakSet[DeviceClock] = weakref.WeakSet()
        self.stream: Any = None
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

    def make_current(self) -> None:
        """Select this GPU in the calling thread (CUDA's current device is per thread)."""
        self.check(self.cudart.cudaSetDevice(self.device_id), f"selecting GPU {self.device_id}")

    def require_open(self) -> None:
        if self.closed:
            raise InputError(CLOSED)

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
        self.require_open()
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
        self.require_open()
        k = getattr(self.cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
        if nbytes:
            self.check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, k, self.stream), f"copying {kind}")

    def zero(self, ptr: int, nbytes: int) -> None:
        if nbytes:
            self.check(self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "clearing device memory")

    def synchronize(self) -> None:
        self.require_open()
        self.check(self.cudart.cudaStreamSynchronize(self.stream), "waiting for the stream")

    def capture(self, work: Callable[[], None]) -> Graph:
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
        return Graph(self, exe)

    def close(self) -> None:
        """Free what is still allocated, destroy graphs and events, wait for the stream and destroy it
        (idempotent)."""
        if self.closed:
            return
        for graph in list(self.graphs):
            graph.close()
        for clock in list(self.events):
            clock.close()
        for mem in list(self.allocations):
            mem.free()
        self.closed = True
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
                self.cudart.cudaStreamSynchronize(stream)
                self.cudart.cudaStreamDestroy(stream)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _text(raw: Any) -> str:
    return raw.decode(errors="replace").rstrip("\x00") if isinstance(raw, bytes) else str(raw)


class Graph:
    """An instantiated CUDA graph, destroyed with this object."""

    def __init__(self, device: Device, exe: Any) -> None:
        self.device, self.exe = device, exe
        device.graphs.add(self)

    def launch(self) -> None:
        if self.exe is None:
            raise InputError(f"this CUDA graph was destroyed: {CLOSED}")
        self.device.check(self.device.cudart.cudaGraphLaunch(self.exe, self.device.stream), "launching a CUDA graph")

    def close(self) -> None:
        exe, self.exe = self.exe, None
        if exe is not None:
            self.device.cudart.cudaGraphExecDestroy(exe)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Allocation:
    """Device memory, freed (stream-ordered) when the last array using it is gone, or at ``free()``."""

    def __init__(self, device: Device, nbytes: int) -> None:
        self.device = device  # keeps the stream alive as long as memory ordered on it exists
        self.nbytes = nbytes
        self.ptr = device.malloc(nbytes) if nbytes else 0
        device.allocations.add(self)

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

    def __init__(self, mem: Allocation, shape: Sequence[int], dtype: Any, *, offset: int = 0,
                 owned: bool = True) -> None:
        self._mem: Allocation | None = mem
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
        if self._mem is not None and self._mem.device.closed:
            raise InputError(f"this device array ({self.describe()}) is gone: {CLOSED}")
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


class DeviceClock(Clock):
    """Marks as CUDA events recorded on the stream: no synchronization per mark, one when the times are
    read, and the times are the device's (as a PyTorch baseline timed with CUDA events measures)."""

    kind = "device"

    def __init__(self, device: Device) -> None:
        self.device = device
        self._events: list[Any] = []
        device.events.add(self)

    def mark(self) -> None:
        d = self.device
        d.require_open()
        event = d.check(d.cudart.cudaEventCreate(), "creating a CUDA event")
        self._events.append(event)
        d.check(d.cudart.cudaEventRecord(event, d.stream), "recording a CUDA event")

    def intervals_ms(self) -> list[float]:
        if len(self._events) < 2:
            return []
        d = self.device
        d.require_open()
        d.check(d.cudart.cudaEventSynchronize(self._events[-1]), "waiting for a CUDA event")
        return [float(d.check(d.cudart.cudaEventElapsedTime(a, b), "reading CUDA event times"))
                for a, b in zip(self._events, self._events[1:])]

    def close(self) -> None:
        events, self._events = self._events, []
        for event in events:
            with contextlib.suppress(Exception):
                self.device.cudart.cudaEventDestroy(event)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
