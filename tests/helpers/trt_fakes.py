"""Fakes of cuda-python and TensorRT, as sdrt's tensorrt backend understands them.

Passing on them says the backend's own logic is consistent (order of checks, bindings, buffer reuse,
scratch sizing, the captured loop's ping-pong), not that it runs on a GPU:

- ``FakeCudart``: device memory is host memory (ctypes buffers); stream work (copies, frees, engine runs,
  graph launches) is queued and runs in order at a synchronize, as on a real stream; work queued while
  capturing is recorded and replayed by every launch of the graph, with the addresses bound at capture.
  Every access checks that the memory is still allocated, so a stale graph or a freed buffer fails.
- ``FakeTrt``: an "engine" is an ONNX graph run by onnxruntime on the host (``fake_plan``); its context
  checks that shapes, addresses and scratch memory were set before each run. ``with_builder`` adds what
  ``build_engines`` uses of the builder API.

conftest's ``fake_gpu`` wires them into sdrt (backend and builder).
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from sdrt.runtime.engine_manifest import EngineEnv

ENV = EngineEnv("tensorrt", "10.13.0.35", "Fake GPU", "9.0")


# -- fake cuda-python -----------------------------------------------------------------------------------

class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorStreamCaptureUnsupported = 900


class FakeCudart:
    """cuda-python's runtime API over host memory, with in-order stream queues and graph capture."""

    cudaError_t = Err
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, gpus: int = 1) -> None:
        self.gpus = gpus
        self.live: dict[int, int] = {}  # address -> bytes
        self.keep: dict[int, Any] = {}  # every buffer ever made stays allocated on the host: no segfaults
        self.queue: list[Any] = []
        self.capturing: list[Any] | None = None
        self.mallocs = 0
        self.launches = 0
        self.captures = 0
        self.syncs = 0  # host waits: stream and event synchronizations
        self.streams: set[int] = set()  # live streams, graph executables and events
        self.graphs: set[int] = set()
        self.events: dict[int, float | None] = {}  # event -> the fake device time it was reached, once run
        self.device_time = 0.0  # advanced by every stream operation (milliseconds)
        self._handles = 100
        self.graph_ops: dict[int, list[Any]] = {}
        self.current: dict[int, int] = {}  # thread id -> the device cudaSetDevice made current there
        self.copies = {1: 0, 2: 0, 3: 0}  # queued copies by cudaMemcpyKind: host->device, device->host, d->d
        self.copied = {1: 0, 2: 0, 3: 0}  # their bytes

    # devices and streams
    def cudaGetDeviceCount(self):
        return (Err.cudaSuccess, self.gpus) if self.gpus else (Err.cudaErrorInsufficientDriver, None)

    def cudaSetDevice(self, d):
        self.current[threading.get_ident()] = d
        return (Err.cudaSuccess,)

    def cudaGetDeviceProperties(self, d):
        return Err.cudaSuccess, SimpleNamespace(name=b"Fake GPU\x00", major=9, minor=0)

    def _handle(self) -> int:
        self._handles += 1
        return self._handles

    def cudaStreamCreateWithFlags(self, flags):
        s = self._handle()
        self.streams.add(s)
        return Err.cudaSuccess, s

    def cudaStreamDestroy(self, s):
        assert not self.queue, "destroying a stream with work still queued"
        self.streams.remove(s)
        return (Err.cudaSuccess,)

    def cudaGetErrorName(self, e):
        return Err.cudaSuccess, Err(int(e)).name.encode()

    def cudaGetErrorString(self, e):
        return Err.cudaSuccess, b"fake error"

    def cudaGetLastError(self):
        return (Err.cudaSuccess,)

    # memory
    def cudaMallocAsync(self, n, stream):
        if self.capturing is not None:
            return Err.cudaErrorStreamCaptureUnsupported, None
        buf = ctypes.create_string_buffer(max(int(n), 1))
        addr = ctypes.addressof(buf)
        self.keep[addr] = buf
        self.live[addr] = int(n)
        self.mallocs += 1
        return Err.cudaSuccess, addr

    def cudaFreeAsync(self, ptr, stream):
        assert ptr in self.live, "freeing memory that is not allocated"
        return self._enqueue(lambda: self.live.pop(ptr))

    def check_live(self, ptr: int, n: int) -> None:
        assert any(a <= ptr and ptr + n <= a + size for a, size in self.live.items()), \
            f"device access to {n} bytes at 0x{ptr:x}: not allocated (freed, or a stale address)"

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.copies[kind] += 1
        self.copied[kind] += int(n)

        def op() -> None:
            if kind in (1, 3):
                self.check_live(dst, n)
            if kind in (2, 3):
                self.check_live(src, n)
            ctypes.memmove(dst, src, n)
        return self._enqueue(op)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        def op() -> None:
            self.check_live(ptr, n)
            ctypes.memset(ptr, value, n)
        return self._enqueue(op)

    # streams and graphs
    def _enqueue(self, op):
        def timed() -> None:
            op()
            self.device_time += 0.25  # every operation takes a quarter of a millisecond of device time
        (self.capturing if self.capturing is not None else self.queue).append(timed)
        return (Err.cudaSuccess,)

    def _drain(self) -> None:
        while self.queue:
            self.queue.pop(0)()

    def cudaStreamSynchronize(self, stream):
        assert stream in self.streams, "synchronizing a destroyed stream"
        self.syncs += 1
        self._drain()
        return (Err.cudaSuccess,)

    # events: a record queues a timestamp in stream order
    def cudaEventCreate(self):
        e = self._handle()
        self.events[e] = None
        return Err.cudaSuccess, e

    def cudaEventRecord(self, event, stream):
        assert event in self.events and stream in self.streams
        if self.capturing is not None:
            return (Err.cudaErrorStreamCaptureUnsupported,)

        def reached() -> None:
            if event in self.events:  # a destroyed event is not reached (CUDA lets it be destroyed pending)
                self.events[event] = self.device_time
        self.queue.append(reached)
        return (Err.cudaSuccess,)

    def cudaEventSynchronize(self, event):
        self.syncs += 1
        self._drain()
        return (Err.cudaSuccess,)

    def cudaEventElapsedTime(self, start, end):
        a, b = self.events[start], self.events[end]
        assert a is not None and b is not None, "reading an event that was not reached"
        return Err.cudaSuccess, b - a

    def cudaEventDestroy(self, event):
        del self.events[event]
        return (Err.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None
        self.capturing = []
        return (Err.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capturing = self.capturing, None
        self.captures += 1
        return Err.cudaSuccess, list(ops or [])

    def cudaGraphInstantiate(self, graph, flags):
        exe = self._handle()
        self.graphs.add(exe)
        self.graph_ops[exe] = list(graph)
        return Err.cudaSuccess, exe

    def cudaGraphLaunch(self, exe, stream):
        assert exe in self.graphs, "launching a destroyed graph"
        self.launches += 1
        for op in self.graph_ops[exe]:
            self._enqueue(op)
        return (Err.cudaSuccess,)

    def cudaGraphDestroy(self, g):
        return (Err.cudaSuccess,)

    def cudaGraphExecDestroy(self, g):
        self.graphs.remove(g)
        del self.graph_ops[g]
        return (Err.cudaSuccess,)

    def alive(self) -> dict[str, int]:
        """What is still allocated or created on the fake device, after the queued work has run."""
        self._drain()
        return {"allocations": len(self.live), "streams": len(self.streams), "graphs": len(self.graphs),
                "events": len(self.events)}

    # test helpers
    def read(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        self.check_live(ptr, n)
        return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dt).reshape(shape).copy()

    def write(self, ptr: int, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        self.check_live(ptr, a.nbytes)
        ctypes.memmove(ptr, a.ctypes.data, a.nbytes)


# -- fake TensorRT --------------------------------------------------------------------------------------

class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_TO_TRT = {np.dtype(np.float32): DataType.FLOAT, np.dtype(np.float16): DataType.HALF,
           np.dtype(np.int32): DataType.INT32, np.dtype(np.int64): DataType.INT64, np.dtype(np.bool_): DataType.BOOL,
           np.dtype(np.uint8): DataType.UINT8}


def fake_plan(model: onnx.ModelProto | bytes, scratch: int = 4096, profile: dict[str, Any] | None = None) -> bytes:
    """A fake serialized engine: a JSON header (scratch bytes, profile ranges) and the ONNX graph."""
    body = model if isinstance(model, bytes) else model.SerializeToString()
    head = json.dumps({"scratch": scratch, "profile": profile or {}}).encode()
    return b"FAKEPLAN" + len(head).to_bytes(4, "little") + head + body


class FakeEngine:
    def __init__(self, trt: FakeTrt, plan: bytes) -> None:
        assert plan[:8] == b"FAKEPLAN"
        n = int.from_bytes(plan[8:12], "little")
        head = json.loads(plan[12:12 + n])
        self.trt = trt
        self.model = onnx.load_from_string(plan[12 + n:])
        self.session = ort.InferenceSession(plan[12 + n:], providers=["CPUExecutionProvider"])
        self.scratch = head["scratch"]
        self.profile = head["profile"]
        g = self.model.graph
        self.io = [(v, TensorIOMode.INPUT) for v in g.input] + [(v, TensorIOMode.OUTPUT) for v in g.output]
        self.by_name = {v.name: (v, mode) for v, mode in self.io}
        self.inputs = [v.name for v, m in self.io if m == TensorIOMode.INPUT]
        self.inferred: dict[Any, dict[str, tuple[int, ...]]] = {}

    num_io_tensors = property(lambda self: len(self.io))
    device_memory_size_v2 = property(lambda self: self.scratch)
    num_optimization_profiles = 1

    def get_device_memory_size_for_profile_v2(self, i):
        return self.scratch

    def get_tensor_name(self, i):
        return self.io[i][0].name

    def get_tensor_mode(self, name):
        return self.by_name[name][1]

    def dtype(self, name) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.by_name[name][0].type.tensor_type.elem_type))

    def get_tensor_dtype(self, name):
        return self.trt.dtype_override.get(name, _TO_TRT[self.dtype(name)])

    def dims(self, name) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in self.by_name[name][0].type.tensor_type.shape.dim]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.dims(name))

    def get_tensor_profile_shape(self, name, i):
        lo, hi = self.profile[name]
        return [tuple(lo), tuple(lo), tuple(hi)]

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED", "contexts must leave device memory to the backend"
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.runs = 0

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        e = self.engine
        dims = e.dims(name)
        if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
            return False
        if name in e.profile:
            lo, hi = e.profile[name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        e = self.engine
        if e.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes.get(name, e.get_tensor_shape(name))
        known = {}
        for n, shape in self.shapes.items():
            known.update({d: s for d, s in zip(e.dims(n), shape) if isinstance(d, str)})
        out = tuple(d if isinstance(d, int) else known.get(d, -1) for d in e.dims(name))
        if -1 in out and len(self.shapes) == len(e.inputs):  # exporter-named dims: run it, as TensorRT infers them
            key = tuple(sorted(self.shapes.items()))
            if key not in e.inferred:
                zeros = {n: np.zeros(shape, e.dtype(n)) for n, shape in self.shapes.items()}
                outs = [v.name for v, m in e.io if m == TensorIOMode.OUTPUT]
                e.inferred[key] = dict(zip(outs, (r.shape for r in e.session.run(outs, zeros))))
            out = e.inferred[key][name]
        return out

    def execute_async_v3(self, stream):
        e, cudart = self.engine, self.engine.trt.cudart
        names = [v.name for v, _ in e.io]
        assert all(n in self.addresses for n in names), "every I/O tensor needs an address"
        assert self.memory is not None and self.memory[1] >= e.scratch, "scratch memory missing or too small"
        inputs = [(v.name, self.shapes[v.name]) for v, m in e.io if m == TensorIOMode.INPUT]
        outputs = [(v.name, self.get_tensor_shape(v.name)) for v, m in e.io if m == TensorIOMode.OUTPUT]
        addresses, (scratch, _) = dict(self.addresses), self.memory  # bound now, as a captured kernel's
        spans = {n: (addresses[n], addresses[n] + int(np.prod(shape, dtype=np.int64)) * e.dtype(n).itemsize)
                 for n, shape in inputs + outputs}
        for o, _ in outputs:  # a real engine may write an output before it has read every input
            clash = [n for n, _ in inputs if spans[n][0] < spans[o][1] and spans[o][0] < spans[n][1]]
            assert not clash, f"output {o} overlaps input(s) {clash}"

        def op() -> None:
            if e.scratch:
                cudart.check_live(scratch, e.scratch)
            feeds = {n: cudart.read(addresses[n], shape, e.dtype(n)) for n, shape in inputs}
            results = e.session.run([n for n, _ in outputs], feeds)
            for (n, shape), r in zip(outputs, results):
                assert r.shape == shape
                cudart.write(addresses[n], r.astype(e.dtype(n)))
            self.runs += 1

        cudart._enqueue(op)
        return True


class FakeTrt:
    """The few TensorRT classes the backend uses; ``lean`` drops the builder, as the lean runtime does."""

    def __init__(self, cudart: FakeCudart, name: str = "tensorrt", version: str = "10.13.0.35",
                 lean: bool = False) -> None:
        self.__name__ = name
        self.__version__ = version
        self.cudart = cudart
        self.deserialized: list[int] = []
        self.built: list[dict[str, Any]] = []
        self.dtype_override: dict[str, Any] = {}
        self.runtimes: list[Any] = []
        trt = self

        class ILogger:
            Severity = globals()["Severity"]

            def __init__(self) -> None:
                pass

        class Runtime:
            def __init__(self, logger: Any) -> None:
                self.logger = logger
                self.engine_host_code_allowed = False
                trt.runtimes.append(self)

            def deserialize_cuda_engine(self, blob: Any) -> FakeEngine | None:
                data = bytes(blob)
                trt.deserialized.append(len(data))
                if data[:8] != b"FAKEPLAN":
                    self.logger.log(Severity.ERROR, "not a plan")
                    return None
                return FakeEngine(trt, data)

        self.ILogger, self.Runtime = ILogger, Runtime
        self.DataType, self.TensorIOMode = DataType, TensorIOMode
        self.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED="USER_MANAGED")
        if lean:
            return

        class Network:
            model: bytes = b""

        class Parser:
            num_errors = 0

            def __init__(self, network: Network, logger: Any) -> None:
                self.network = network

            def parse(self, model: bytes) -> bool:
                self.network.model = model
                return True

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, Any] = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = [list(lo), list(hi)]

        class Config:
            profile: Profile | None = None

            def add_optimization_profile(self, p: Profile) -> int:
                self.profile = p
                return 0

        class Builder:
            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                assert flags == 1 << 1, "the step graph is built strongly typed"
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                shapes = config.profile.shapes if config.profile else {}
                trt.built.append(shapes)
                return fake_plan(network.model, scratch=256, profile=shapes)

        self.Builder, self.OnnxParser = Builder, Parser
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)


def refuse_enqueue_in_capture(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart) -> None:
    """Make every engine enqueue fail while the stream captures, as TensorRT's bindings do (RuntimeError)."""
    real = FakeContext.execute_async_v3

    def refuse_in_capture(self, stream):
        if cudart.capturing is not None:
            raise RuntimeError("enqueueV3: operation not permitted when stream is capturing")
        return real(self, stream)

    monkeypatch.setattr(FakeContext, "execute_async_v3", refuse_in_capture)


# -- the builder API of build_engines ----------------------------------------------------------------------

class _Monitor:
    def __init__(self) -> None:
        pass


def with_builder(trt: FakeTrt) -> FakeTrt:
    """Add what ``build_engines`` uses of the builder API to a FakeTrt: parse_from_file, the config's flags,
    pools, timing cache and progress monitor. The "engine" it builds is the parsed ONNX graph."""
    calls: dict[str, Any] = {"flags": [], "monitors": 0}
    trt.build_calls = calls  # type: ignore[attr-defined]
    parser_cls, builder_cls = trt.OnnxParser, trt.Builder

    class Parser(parser_cls):  # type: ignore[misc, valid-type]
        def parse_from_file(self, path: str) -> bool:
            self.network.model = onnx.load(path).SerializeToString()  # external data folded in
            return True

    class Cache:
        def serialize(self) -> bytes:
            return b"fake timing cache"

    class Config:
        profile: Any = None
        builder_optimization_level = 3
        progress_monitor: Any = None

        def set_flag(self, flag: Any) -> None:
            calls["flags"].append(flag)

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            calls["workspace"] = size

        def create_timing_cache(self, data: bytes) -> Cache:
            return Cache()

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            return True

        def add_optimization_profile(self, p: Any) -> int:
            self.profile = p
            return 0

    class Builder(builder_cls):  # type: ignore[misc, valid-type]
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_builder_config(self) -> Config:
            return Config()

        def build_serialized_network(self, network: Any, config: Config) -> bytes:
            if config.progress_monitor is not None:
                calls["monitors"] += 1
                config.progress_monitor.phase_start("Building engine", None, 1)
            shapes = config.profile.shapes if config.profile else {}
            trt.built.append(shapes)
            return fake_plan(network.model, scratch=512, profile=shapes)

    trt.OnnxParser, trt.Builder = Parser, Builder
    trt.IProgressMonitor = _Monitor  # type: ignore[attr-defined]
    trt.ILogger.Severity = Severity
    trt.BuilderFlag = SimpleNamespace(FP16="FP16", TF32="TF32", REFIT="REFIT", VERSION_COMPATIBLE="VC",
                                      EXCLUDE_LEAN_RUNTIME="XL")
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    return trt
