"""The ``tensorrt`` backend: engine folders from ``sdrt build``, run with ``execute_async_v3`` on one stream.

- ``load(path)`` reads the folder's engine manifest (``sdrt-engines.json``) and refuses an engine built
  for another GPU, TensorRT version or runtime **before** deserializing anything, listing every reason
  and the command that rebuilds the folder (CompatibilityError).
- ``load(bytes)`` (the sampler's step graph, ``runtime/step_graph.py``) loads the engine that ``sdrt build``
  prebuilt from exactly those ONNX bytes (found in the folder's manifest by their sha256), so the lean
  runtime needs no builder and the first step pays no build. The runtime loads, the builder builds: a
  folder without them (built by an older sdrt) is refused with the command that rebuilds it.

Its parts, by concern: ``runtime/cuda.py`` (cuda-python: device memory, the stream, CUDA graphs),
``runtime/trt_modules.py`` (which TensorRT module, and its logger), ``runtime/trt_engines.py`` (engines,
output buffers, the shared scratch block, engine-folder helpers), ``runtime/trt_loop.py`` (the denoising
step captured as CUDA graphs).

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
``sdrt build`` builds both step graphs with TensorRT for RTX's builder, which needs no GPU. NOT verified:
any run on a GPU (deserializing, executing), and that TensorRT's ``execute_async_v3`` captures as used here
(NVIDIA's diffusion demo does the same: a warm-up, then capture). For TensorRT for RTX, ``sdrt build`` sets
``BuilderFlag.REQUIRE_USER_ALLOCATION``, which its stream capture needs, and the loop asks
``is_stream_capturable()`` before capturing (a "no" runs the engines directly; ``Result.loop`` says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cuda import (
    CLOSED,
    CUDA_HINT,
    Allocation,
    Device,
    DeviceArray,
    DeviceClock,
    EngineRunError,
    import_cudart,
)
from .engine import Array, Backend, Engine
from .engine_manifest import (
    ENGINE_MANIFEST_NAME,
    EngineEnv,
    EngineManifest,
    EngineRecord,
    ProfileShapes,
    check_engine,
)
from .errors import ArtifactError, BackendUnavailable, CompatibilityError, InputError, SdrtError
from .step_loop import PlainStepLoop, StepLoop, cheap_nets
from .trt_engines import (
    BUFFERS_PER_OUTPUT,
    TRT_DTYPES,
    SharedScratch,
    TrtBackendBase,
    TrtEngine,
    built_with,
    io_specs,
    map_plan,
    numpy_dtype,
    runtime_mismatches,
    scratch_size,
)
from .trt_loop import CapturedStepLoop
from .trt_modules import (
    FULL_TENSORRT_HINT,
    LEAN_HINT,
    LEAN_MODULES,
    RTX_MODULES,
    RUNTIME_MODULES,
    TENSORRT_HINT,
    backend_name,
    import_tensorrt,
    make_logger,
    module_candidates,
)

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "BUFFERS_PER_OUTPUT",
    "CUDA_HINT",
    "FULL_TENSORRT_HINT",
    "LEAN_HINT",
    "LEAN_MODULES",
    "RTX_MODULES",
    "RUNTIME_MODULES",
    "TENSORRT_HINT",
    "TRT_DTYPES",
    "CapturedStepLoop",
    "Device",
    "DeviceArray",
    "EngineRunError",
    "TrtBackend",
    "TrtEngine",
    "backend_name",
    "import_cudart",
    "import_tensorrt",
    "io_specs",
    "make_logger",
    "module_candidates",
    "numpy_dtype",
    "runtime_mismatches",
    "scratch_size",
]
_BROKEN_RUNTIMES: list[Any] = []  # runtimes that failed to initialize: never freed (that segfaults)


# -- the backend ---------------------------------------------------------------------------------------------

class TrtBackend(TrtBackendBase):
    """TensorRT engines on one GPU and one CUDA stream. Not thread-safe: one pipeline drives it, from any
    thread (``make_current`` selects the GPU in the calling thread).

    ``close()`` releases every engine, execution context, device buffer, the scratch block, captured
    graphs and step loops, and the stream; using the backend or anything loaded from it afterwards raises
    InputError. Dropping the last reference releases the same without ``close()`` (no reference cycles)."""

    name = "tensorrt"
    # set by __init__, either made here or taken from the backend shared with
    device_id: int
    device: Device
    trt: Any
    module: str
    lean: bool
    log: deque[str]
    logger: Any
    runtime: trt.Runtime
    scratch: SharedScratch
    # the backends over this device and scratch (share=); weak, so that dropping a backend still frees it
    _holders: weakref.WeakSet[TrtBackend]

    def __init__(self, folder: str | Path | None = None, device_id: int = 0, cuda_graph: bool = True,
                 module: str | None = None, share: TrtBackend | None = None) -> None:
        """``share``: another backend whose GPU, stream, TensorRT runtime and scratch block this one uses (two
        models in one process, such as an SDXL base and its refiner: they run one after another, so one
        activation block, the larger need, serves both). Each backend closes its own engines; the shared
        device memory goes with the last of them."""
        self.folder = Path(folder) if folder is not None else None
        self.device_id = device_id if share is None else share.device_id
        self.cuda_graph = cuda_graph
        self._checked: dict[Path, EngineManifest] = {}
        self._pending: list[np.ndarray] = []  # host arrays of copies still queued
        self._loops: dict[tuple[Any, ...], CapturedStepLoop] = {}
        self.manifest: EngineManifest | None = None  # of the first engine folder loaded from
        if share is not None:
            share._require_open()
            self.device, self.trt, self.module, self.lean = share.device, share.trt, share.module, share.lean
            self.log, self.logger, self.runtime = share.log, share.logger, share.runtime
            self.scratch, self._holders = share.scratch, share._holders
            self._holders.add(self)
            self.closed = False
            return
        problems: list[SdrtError] = []
        cudart = trt_module = None
        try:
            cudart = import_cudart()
        except BackendUnavailable as e:
            problems.append(e)
        try:
            trt_module = import_tensorrt(module_candidates(module, built_with(self.folder)))
        except BackendUnavailable as e:
            problems.append(e)
        device = None
        if cudart is not None:
            try:
                device = Device(cudart, device_id)  # before trt.Runtime: it can crash without a GPU
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
        self.log = deque(maxlen=32)
        self.logger = make_logger(trt_module, self.log)
        runtime = trt_module.Runtime(self.logger)
        failed = [m for m in self.log if m.startswith(("ERROR", "INTERNAL_ERROR"))]
        if failed:
            # the bindings return an object over a null runtime: using or freeing it crashes the process, so
            # it is kept alive (and unused) until exit
            _BROKEN_RUNTIMES.append(runtime)
            raise BackendUnavailable(f"{self.module} could not create its runtime: {' | '.join(failed[-3:])}")
        self.runtime = runtime
        self.scratch = SharedScratch(device)
        self._holders = weakref.WeakSet([self])
        self.closed = False

    # -- the Backend interface beyond engines and arrays ----------------------------------------------------
    def check_request(self, batch: int, height: int, width: int, guided: bool) -> None:
        """InputError when the engine folder's build profile does not cover the request."""
        self._require_open()
        if self.manifest is not None:
            self.manifest.profile.check_request(batch, height, width, guided=guided)

    def check_t5_tokens(self, tokens: int, default: int) -> None:
        """InputError when the engine folder's build profile does not cover this T5 length."""
        self._require_open()
        if self.manifest is not None:
            self.manifest.profile.check_t5_tokens(tokens, default)

    @property
    def profile(self) -> ProfileShapes | None:
        """The engine folder's build profile (None before a folder is loaded)."""
        return None if self.manifest is None else self.manifest.profile

    def make_current(self) -> None:
        self._require_open()
        self.device.make_current()

    def clock(self) -> DeviceClock:
        """Stage and step times from CUDA events on the stream (synchronized once, when read)."""
        self._require_open()
        return DeviceClock(self.device)

    def close(self) -> None:
        """Release everything on the device now, in dependency order (idempotent)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.device.make_current()  # the closing thread may have another GPU current (or none yet)
            self.device.synchronize()  # queued work may still read what is freed below
        loops, self._loops = self._loops, {}
        for loop in loops.values():
            loop.close()
        for engine in list(self.scratch.users):
            if engine.backend is self:
                engine.close()
        self._pending.clear()
        self._holders.discard(self)
        if not self._holders:  # the last backend over this device: the shared memory and the stream go now
            self.scratch.close()
            self.device.close()  # what is left (arrays the caller holds), then the stream
        del self.runtime  # after every engine deserialized by it

    def _require_open(self) -> None:
        if self.closed:
            raise InputError(f"this tensorrt backend is closed: {CLOSED}")

    def messages(self) -> str:
        """TensorRT's recent warnings and errors, for error messages."""
        return " | ".join(list(self.log)[-6:])

    # -- loading --------------------------------------------------------------------------------------
    def load(self, path: str | bytes, name: str, *, exact: bool = False) -> Engine:
        """An engine file of an sdrt engine folder (checked against the folder's manifest first), or an
        ONNX graph as bytes (the sampler step graph), which ``sdrt build`` prebuilt into the folder. An engine's
        precision is the build's (``exact`` changes nothing)."""
        self._require_open()
        if isinstance(path, (bytes, bytearray, memoryview)):
            rec = self.prebuilt(bytes(path))
            if rec is None or self.folder is None:
                raise self._not_prebuilt(name)
            return self.load(str(self.folder / rec.file), rec.component)
        file = Path(path)
        manifest = self.check_folder(file.parent)  # before anything is deserialized
        record = manifest.record(name)
        if record.file != file.name:
            raise ArtifactError(f"{name}: the export manifest names {file.name}, the engine manifest {record.file}; "
                                f"the folder is inconsistent, rebuild it: {manifest.build_command}")
        if record.flags.version_compatible:
            self.runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime it runs on
        self.log.clear()
        with map_plan(file) as blob:
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
        engine folder this backend was opened on, or None."""
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

    def _not_prebuilt(self, name: str) -> ArtifactError:
        has_manifest = self.folder is not None and (self.folder / ENGINE_MANIFEST_NAME).is_file()
        command = (self.check_folder(self.folder).build_command if has_manifest and self.folder is not None
                   else "sdrt build ONNX_DIR --out ENGINE_DIR")
        where = f"the engine folder {self.folder}" if self.folder is not None else "no engine folder (TrtBackend(folder))"
        return ArtifactError(
            f"{name}: {where} has no prebuilt engine for this graph (every folder `sdrt build` makes "
            f"holds them, and the runtime does not build engines: the folder is incomplete); rebuild it: {command}"
        )

    # -- arrays -----------------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        self._require_open()
        dt = np.dtype(dtype)
        return DeviceArray(Allocation(self.device, int(np.prod(shape, dtype=np.int64)) * dt.itemsize), shape, dt)

    def to_device(self, a: np.ndarray) -> Array:
        a = np.asarray(a)
        if a.dtype not in TRT_DTYPES.values():
            raise InputError(f"cannot put a {a.dtype} array on the device; use one of "
                             f"{', '.join(d.name for d in TRT_DTYPES.values())}")
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

    def shares_memory_with(self, other: Backend) -> bool:
        """This backend and those made with ``share=`` over it (one GPU, one stream) read each other's arrays."""
        return other is self or (isinstance(other, TrtBackend) and other.device is self.device)

    def clone(self, a: Array) -> DeviceArray:
        """A new device array equal to ``a``, copied on the device (queued on the stream)."""
        src = self.as_device(a)
        out = self.empty(src.shape, src.dtype)
        self.copy(out, src)
        return out

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
        self._require_open()
        self.device.synchronize()
        self._pending.clear()

    # -- the captured step -----------------------------------------------------------------------------
    def step_loop(self, unet: Engine, step: Engine, controlnets: Sequence[Engine | None] = (),
                  shallow: Engine | None = None, shallow_nets: Sequence[Engine | None] = ()) -> StepLoop:
        """The denoising step (the active ``controlnets``, ``unet`` or on the steps ``start(full=...)`` marks
        False DeepCache's ``shallow`` path, then the sampler ``step`` graph) captured as CUDA graphs, kept per
        set of engines (runtime/trt_loop.py). A denoiser that is not one engine (skip-layer guidance's: the
        transformer, then on some steps its skip pass; runtime/layer_skip.py) runs step by step instead, each engine
        on the stream as the captured loop runs it."""
        self._require_open()
        if isinstance(unet, Engine) and not isinstance(unet, TrtEngine) and unet.backend is self:
            plain = PlainStepLoop(self, unet, self._own(step), controlnets, shallow, shallow_nets)
            plain.reason = f"{unet.name} is not one engine: the loop captures engines"
            return plain
        u, s = self._own(unet), self._own(step)
        nets = tuple(None if n is None else self._own(n) for n in controlnets)
        sh = None if shallow is None else self._own(shallow)
        small = tuple(None if n is None else self._own(n) for n in shallow_nets)
        for k in [k for k, lp in self._loops.items() if not lp.alive()]:  # loops over dropped engines
            self._loops.pop(k).close()
        key = (id(u), id(s), None if sh is None else id(sh), *(None if n is None else id(n) for n in nets),
               *(None if n is None else id(n) for n in small))
        loop = self._loops.get(key)
        same_nets = loop is not None and [None if r is None else r() for r in loop._nets] == list(nets)
        same_shallow = loop is not None and (None if loop._shallow is None else loop._shallow()) is sh
        if same_shallow and loop is not None:
            same_shallow = loop.cheap_controlnets == list(cheap_nets(nets, small if sh is not None else ()))
        if loop is None or loop._unet() is not u or loop._step() is not s or not same_nets or not same_shallow:
            loop = self._loops[key] = CapturedStepLoop(self, u, s, nets, sh, small)
        return loop


    def _own(self, e: Engine) -> TrtEngine:
        if not isinstance(e, TrtEngine) or e.backend is not self:
            raise InputError(f"step_loop takes engines loaded by this backend, not {type(e).__name__}")
        return e
