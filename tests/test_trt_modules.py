"""sdrt's TensorRT and CUDA calls against the real modules that PyPI has (no GPU needed).

The fakes (helpers/trt_fakes.py) and the stubs (test_trt_build.py) check logic and types; this checks
names and behaviour against the real bindings:

- ``tensorrt-lean-cu13-bindings`` (module ``tensorrt_lean_bindings``): the runtime's calls;
- ``tensorrt-rtx-cu13-bindings`` (module ``tensorrt_rtx_bindings``, TensorRT for RTX): the runtime's calls
  and the builder's, minus what TensorRT for RTX lacks or ignores, which export/trt_build.py must skip
  for it. It builds engines without a GPU (CPU-only ahead-of-time compilation), so the builder path
  runs here for real; deserializing and running an engine needs a GPU;
- ``cuda-python`` (``cuda.bindings.runtime``): every CUDA runtime call of the tensorrt backend (runtime/cuda.py
  and the modules beside it);
- the full ``tensorrt`` where it is installed.

What the code takes from those modules is collected from its syntax tree and must equal the tables
below, so a new TensorRT call fails here until it is listed (and so checked).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import os
import stat
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sdrt.export import trt_build
from sdrt.export.profiles import custom_profile
from sdrt.runtime import trt_backend as tb
from sdrt.runtime.engine_manifest import BuildFlags, EngineEnv, EngineManifest
from sdrt.runtime.errors import BackendUnavailable, InputError
from sdrt.runtime.step_graph import RESCALE_STEP_ENGINE, STEP_ENGINES, step_graph_bytes

from .helpers.trt_modules import FULL, LEAN, RTX

ROOT = Path(__file__).resolve().parents[1]
RTX_PIP = "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"
LEAN_PIP = "pip install tensorrt-lean-cu13-libs tensorrt-lean-cu13-bindings"
NEEDS_RTX = f"needs the TensorRT for RTX bindings: {RTX_PIP}"
NEEDS_CUDA = "needs cuda-python: pip install cuda-python"

BUILDER_FILES = ("export/trt_build.py", "export/refit.py")
RUNTIME_FILES = ("runtime/trt_backend.py", "runtime/trt_modules.py", "runtime/trt_engines.py", "runtime/trt_loop.py",
                 "runtime/cuda.py")
# the runtime loads, the builder builds: no function of the runtime may use TensorRT's builder
RUNTIME_BUILDER_SCOPES = ("<none>",)
CUDA_FILES = (*RUNTIME_FILES, "runtime/engine_manifest.py")


# -- what the code uses ---------------------------------------------------------------------------------
# Module-level names (dotted: classes, enum members). Attributes of the objects TensorRT returns are in
# the per-class tables; attributes only read behind getattr/hasattr fallbacks are in FALLBACKS.

RUNTIME_MODULE_NAMES = {
    "Runtime", "ICudaEngine", "IExecutionContext", "ILogger.Severity.INTERNAL_ERROR", "ILogger.Severity.ERROR",
    "ILogger.Severity.WARNING", "ExecutionContextAllocationStrategy.USER_MANAGED",
}
RUNTIME_BUILDER_MODULE_NAMES: set[str] = set()
BUILDER_MODULE_NAMES = {
    "Builder", "IBuilderConfig", "INetworkDefinition", "OnnxParser", "ITimingCache", "IProgressMonitor", "ILogger",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "ErrorCode.UNSUPPORTED_NODE",
    "BuilderFlag.FP16", "BuilderFlag.TF32", "BuilderFlag.REFIT", "BuilderFlag.VERSION_COMPATIBLE",
    "BuilderFlag.EXCLUDE_LEAN_RUNTIME", "MemoryPoolType.WORKSPACE", "HardwareCompatibilityLevel.AMPERE_PLUS",
    "BuilderFlag.REQUIRE_USER_ALLOCATION",  # TensorRT for RTX only (RTX_ONLY)
    # export/refit.py
    "Runtime", "Refitter", "Weights", "nptype", "DataType", "DataType.BF16",
}
# I/O tensor dtypes and modes, matched by their enum member names
DTYPE_NAMES = tuple(tb.TRT_DTYPES)
IO_MODES = ("INPUT", "OUTPUT")

RUNTIME_METHODS = {
    "Runtime": {"deserialize_cuda_engine", "engine_host_code_allowed"},
    "ICudaEngine": {"num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "get_tensor_profile_shape", "device_memory_size_v2", "get_device_memory_size_for_profile_v2",
                    "num_optimization_profiles", "create_execution_context"},
    "IExecutionContext": {"set_device_memory", "set_input_shape", "set_tensor_address", "get_tensor_shape",
                          "execute_async_v3", "is_stream_capturable"},
    "ILogger": {"log"},  # overridden: TensorRT calls it
}
BUILDER_METHODS = {
    "Builder": {"create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network", "logger"},
    "IBuilderConfig": {"set_flag", "set_memory_pool_limit", "add_optimization_profile", "progress_monitor",
                       "builder_optimization_level", "hardware_compatibility_level", "create_timing_cache",
                       "set_timing_cache"},
    "IOptimizationProfile": {"set_shape"},
    "OnnxParser": {"parse", "parse_from_file", "num_errors", "get_error"},
    "ParserError": {"code", "desc", "node", "node_name", "node_operator"},
    "ITimingCache": {"serialize"},
    "IProgressMonitor": {"phase_start", "step_complete", "phase_finish"},  # overridden: TensorRT calls them
    "ILogger": {"log"},
    # export/refit.py
    "Runtime": {"deserialize_cuda_engine"},
    "ICudaEngine": {"serialize"},
    "Refitter": {"get_all_weights", "get_missing_weights", "get_weights_prototype", "set_named_weights",
                 "refit_cuda_engine"},
    "Weights": {"dtype", "size"},
}
# read only when the first name is missing (older TensorRT): the first must exist, so the fallback is unused
FALLBACKS = {
    ("ICudaEngine", "device_memory_size"): ("ICudaEngine", "device_memory_size_v2"),
    ("ICudaEngine", "create_execution_context_without_device_memory"): ("ExecutionContextAllocationStrategy",
                                                                        "USER_MANAGED"),
    ("IExecutionContext", "device_memory"): ("IExecutionContext", "set_device_memory"),
}
# TensorRT for RTX only: what export/trt_build.py sets for it alone, and what the runtime asks only where present
RTX_ONLY = {"BuilderFlag.REQUIRE_USER_ALLOCATION": "engines use the memory the application gives: needed for stream "
                                                   "capture", "is_stream_capturable": "asked before capturing"}
# TensorRT for RTX: what export/trt_build.py must not touch for it, and why (checked below on the real module)
RTX_AVOIDED = {
    "BuilderFlag.FP16": "absent: networks are strongly typed",
    "BuilderFlag.TF32": "on by default",
    "builder_optimization_level": "accepted, but it times no tactics: left at its default",
    "BuilderFlag.VERSION_COMPATIBLE": "engines run only on the release that built them; the build looks for "
                                      "full TensorRT's lean runtime and fails",
    "BuilderFlag.EXCLUDE_LEAN_RUNTIME": "goes with VERSION_COMPATIBLE",
    "hardware_compatibility_level": "'unsupported in TensorRT-RTX' (its log)",
    "create_timing_cache": "deprecated no-op (DeprecationWarning)",
    "set_timing_cache": "deprecated no-op (DeprecationWarning)",
}

CUDA_NAMES = {
    "cudaGetDeviceCount", "cudaSetDevice", "cudaStreamNonBlocking", "cudaStreamCreateWithFlags", "cudaGetErrorName",
    "cudaGetErrorString", "cudaGetDeviceProperties", "cudaMallocAsync", "cudaFreeAsync", "cudaMemcpyKind",
    "cudaMemcpyAsync", "cudaMemsetAsync", "cudaStreamSynchronize", "cudaStreamCaptureMode",
    "cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal", "cudaStreamBeginCapture", "cudaStreamEndCapture",
    "cudaGraphDestroy", "cudaGetLastError", "cudaGraphInstantiate", "cudaGraphLaunch", "cudaGraphExecDestroy",
    "cudaStreamDestroy", "cudaEventCreate", "cudaEventRecord", "cudaEventSynchronize", "cudaEventElapsedTime",
    "cudaEventDestroy",
}
CUDA_COPY_KINDS = ("HostToDevice", "DeviceToHost", "DeviceToDevice")  # getattr(cudaMemcpyKind, f"cudaMemcpy{kind}")
CUDA_DEVICE_PROP = ("name", "major", "minor")

# attribute names the files use on their own objects that happen to match some TensorRT class's attribute
NOT_TENSORRT = {
    "append", "clear", "data", "dims", "dtype", "enqueue", "file", "flags", "itemsize", "major", "max", "min",
    "minor", "name", "nbytes", "numpy", "opt", "pop", "read", "refittable", "scale", "scales", "shape", "size", "type",
    "update", "weights", "write",
}


# -- collecting it from the code ------------------------------------------------------------------------------

def _prefixes(names: set[str]) -> set[str]:
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


class _Collector(ast.NodeVisitor):
    """Dotted names read from a module object: ``trt.X.Y``, ``self.trt.X``, ``getattr(t, "X", None)``,
    through local aliases (``t = self.trt``, ``base = trt_module.ILogger``), each with its scope."""

    def __init__(self, roots: set[str], attr_roots: set[str], importers: set[str]) -> None:
        self.roots, self.attr_roots, self.importers = roots, attr_roots, importers
        self.aliases: dict[str, str] = {r: "" for r in roots}
        self.scope: list[str] = []
        self.found: dict[str, set[str]] = {}

    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is not None:
                return f"{base}.{node.attr}".lstrip(".")
            return "" if node.attr in self.attr_roots else None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                base = self.resolve(node.args[0])
                return None if base is None else f"{base}.{node.args[1].value!s}".lstrip(".")
            if node.func.id in self.importers:
                return ""
        return None

    def _record(self, node: ast.AST) -> None:
        name = self.resolve(node)
        if name and not name.split(".")[-1].startswith("__"):
            self.found.setdefault(name, set()).add(".".join(self.scope))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._record(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == "getattr":
            self._record(node)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        value = self.resolve(node.value)
        for target in node.targets:
            self.visit(target)
            if isinstance(target, ast.Name):
                if value is not None:
                    self.aliases[target.id] = value
                elif target.id not in self.roots:
                    self.aliases.pop(target.id, None)

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        saved = dict(self.aliases)
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        self.aliases = saved

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped


def _collect(path: str, roots: set[str], attr_roots: set[str], importers: frozenset[str] = frozenset()
             ) -> dict[str, set[str]]:
    c = _Collector(set(roots), set(attr_roots), set(importers))
    c.visit(ast.parse((ROOT / path).read_text(), path))
    return c.found


def _trt_names(path: str) -> dict[str, set[str]]:
    return _collect(path, {"trt", "trt_module"}, {"trt"}, frozenset({"import_tensorrt", "load_tensorrt"}))


def _runtime_split() -> tuple[set[str], set[str]]:
    """The runtime's module-level names: (used by the runtime proper, used only where it builds)."""
    found: dict[str, set[str]] = {}
    for path in RUNTIME_FILES:
        for name, scopes in _trt_names(path).items():
            found.setdefault(name, set()).update(scopes)
    building = {n for n, scopes in found.items() if all(s.startswith(RUNTIME_BUILDER_SCOPES) for s in scopes)}
    return set(found) - building, building


def _attribute_names(paths: tuple[str, ...], defs: bool = False) -> set[str]:
    """Every ``.attr`` and getattr/hasattr name string in the files (``defs``: and every function defined,
    for the overrides TensorRT calls)."""
    out: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse((ROOT / path).read_text(), path)):
            if isinstance(node, ast.Attribute):
                out.add(node.attr)
            elif defs and isinstance(node, ast.FunctionDef):
                out.add(node.name)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                out.add(str(node.args[1].value))
    return out


def _source(paths: tuple[str, ...]) -> str:
    return "\n".join((ROOT / p).read_text() for p in paths)


# -- the real modules ---------------------------------------------------------------------------------------

RUNTIMES = [pytest.param(m, id=m.__name__) for m in (FULL, RTX, LEAN) if m is not None]
BUILDERS = [pytest.param(m, id=m.__name__) for m in (FULL, RTX) if m is not None]


def _cudart() -> Any:
    try:
        return tb.import_cudart()
    except BackendUnavailable:
        return None


CUDART = _cudart()


def _gpu_present() -> bool:
    if CUDART is None:
        return False
    res = CUDART.cudaGetDeviceCount()
    return int(res[0]) == 0 and int(res[1]) > 0


def _missing(mod: ModuleType, names: set[str]) -> list[str]:
    out = []
    for name in sorted(names):
        obj: Any = mod
        for part in name.split("."):
            if not hasattr(obj, part):
                out.append(name)
                break
            obj = getattr(obj, part)
    return out


def _missing_methods(mod: ModuleType, table: dict[str, set[str]]) -> list[str]:
    return [f"{cls}.{m}" for cls, names in sorted(table.items()) for m in sorted(names)
            if not hasattr(getattr(mod, cls, None), m)]


# -- the tables match the code (no TensorRT needed) --------------------------------------------------------------

def test_the_tables_list_every_tensorrt_name_the_code_takes() -> None:
    builder = set().union(*(_trt_names(p) for p in BUILDER_FILES))
    assert builder == _prefixes(BUILDER_MODULE_NAMES), "update BUILDER_MODULE_NAMES"
    runtime, building = _runtime_split()
    assert runtime == _prefixes(RUNTIME_MODULE_NAMES), "update RUNTIME_MODULE_NAMES"
    assert building == _prefixes(RUNTIME_BUILDER_MODULE_NAMES), "update RUNTIME_BUILDER_MODULE_NAMES"
    assert {n for n in RTX_AVOIDED if "." in n} <= BUILDER_MODULE_NAMES
    assert {n for n in RTX_AVOIDED if "." not in n} <= BUILDER_METHODS["IBuilderConfig"]
    # every listed method is still used (a stale table checks nothing)
    used_builder = _attribute_names((*BUILDER_FILES, *RUNTIME_FILES), defs=True)
    used_runtime = _attribute_names(RUNTIME_FILES, defs=True)
    stale = [f"{c}.{m}" for c, ms in BUILDER_METHODS.items() for m in ms if m not in used_builder]
    stale += [f"{c}.{m}" for c, ms in RUNTIME_METHODS.items() for m in ms if m not in used_runtime]
    stale += [f"{c}.{m}" for c, m in FALLBACKS if m not in used_runtime]
    assert stale == []
    source = _source(RUNTIME_FILES)
    assert all(f'"{k}"' in source for k in (*DTYPE_NAMES, *IO_MODES, *CUDA_COPY_KINDS))


def test_the_cuda_table_lists_every_cuda_call() -> None:
    found: set[str] = set()
    for path in CUDA_FILES:
        found |= set(_collect(path, {"cudart"}, {"cudart"}))
    found.discard("cudaMemcpyKind")  # members named with an f-string: CUDA_COPY_KINDS
    assert found == _prefixes(CUDA_NAMES) - {"cudaMemcpyKind"}


# -- against the real modules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mod", RUNTIMES or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"needs a TensorRT runtime: {LEAN_PIP} (or {RTX_PIP})"))])
def test_the_runtime_calls_exist(mod: ModuleType) -> None:
    assert _missing(mod, RUNTIME_MODULE_NAMES) == []
    only_rtx = set() if mod is RTX else set(RTX_ONLY)  # asked behind hasattr: absent from the others
    assert _missing_methods(mod, {c: ms - only_rtx for c, ms in RUNTIME_METHODS.items()}) == []
    for (cls, _), (pcls, primary) in FALLBACKS.items():
        assert hasattr(getattr(mod, pcls), primary), f"{cls} fallback would be used"
    assert set(DTYPE_NAMES) <= set(mod.DataType.__members__)
    assert set(IO_MODES) <= set(mod.TensorIOMode.__members__)
    # the runtime reads enum members by name: the real ones parse
    assert [tb.numpy_dtype(getattr(mod.DataType, n), "t") for n in DTYPE_NAMES] == list(tb.TRT_DTYPES.values())
    assert str(mod.TensorIOMode.INPUT.name).rsplit(".", 1)[-1] == "INPUT"
    assert tb.import_tensorrt([mod.__name__]) is mod
    assert tb.backend_name(mod) == ("tensorrt_rtx" if mod is RTX else "tensorrt")
    # the logger subclass works with the real trampoline: a Runtime takes it (no GPU needed to create one)
    log: deque[str] = deque()
    logger = tb.make_logger(mod, log)
    logger.log(mod.ILogger.Severity.WARNING, "w")
    logger.log(mod.ILogger.Severity.INFO, "i")
    assert list(log)[-1:] == ["WARNING: w"] and not any("i" == m.rsplit(": ", 1)[-1] for m in log)
    if mod is RTX or _gpu_present():
        # TensorRT for RTX creates a Runtime without a driver; the lean runtime returns one over a null
        # pointer that segfaults when used or freed (TrtBackend opens the GPU first, so it never gets there)
        log.clear()
        runtime = mod.Runtime(logger)
        assert not any(m.startswith(("ERROR", "INTERNAL_ERROR")) for m in log), list(log)
        runtime.engine_host_code_allowed = True
        assert runtime.engine_host_code_allowed is True


@pytest.mark.skipif(LEAN is None, reason=f"needs the TensorRT lean runtime bindings: {LEAN_PIP}")
def test_the_lean_runtime_is_found_and_cannot_build(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LEAN is not None
    monkeypatch.delenv("SDRT_TENSORRT_MODULE", raising=False)
    assert tb.import_tensorrt(tb.module_candidates(built_with="tensorrt")).__name__ in (
        "tensorrt", *tb.LEAN_MODULES)
    assert not hasattr(LEAN, "Builder") and not hasattr(LEAN, "OnnxParser")  # the runtime never needs them


@pytest.mark.parametrize("mod", BUILDERS or [pytest.param(None, marks=pytest.mark.skip(reason=NEEDS_RTX))])
def test_the_builder_calls_exist(mod: ModuleType) -> None:
    skipped = set(RTX_AVOIDED) if mod is RTX else set(RTX_ONLY)
    guarded = {"BuilderFlag.FP16"}  # TensorRT 11 has no weak typing: make_config checks for it
    assert _missing(mod, (BUILDER_MODULE_NAMES | RUNTIME_BUILDER_MODULE_NAMES) - skipped - guarded) == []
    table = {c: {m for m in ms if m not in skipped} for c, ms in BUILDER_METHODS.items()}
    assert _missing_methods(mod, table) == []


def test_what_tensorrt_for_rtx_lacks_is_what_the_builder_skips(rtx: ModuleType) -> None:
    """The differences RTX_AVOIDED names are real in this TensorRT for RTX."""
    assert not hasattr(rtx.BuilderFlag, "FP16") and not hasattr(rtx.BuilderFlag, "INT8")
    messages: list[str] = []
    builder = rtx.Builder(tb.make_logger(rtx, messages))
    config = builder.create_builder_config()
    assert config.get_flag(rtx.BuilderFlag.TF32)  # on without being set
    messages.clear()
    config.hardware_compatibility_level = rtx.HardwareCompatibilityLevel.AMPERE_PLUS
    assert any("unsupported in TensorRT-RTX" in m for m in messages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    assert any("no-op" in str(w.message) for w in caught)


@pytest.mark.skipif(not (RTX or LEAN or FULL), reason=f"needs a TensorRT module: {LEAN_PIP} (or {RTX_PIP})")
def test_no_tensorrt_call_is_missing_from_the_tables() -> None:
    """Any attribute the files read that some real TensorRT class has must be in a table (or be one of
    the files' own names that merely coincide)."""
    api: set[str] = set()
    for mod in (FULL, RTX, LEAN):
        if mod is not None:
            for _, cls in inspect.getmembers(mod, inspect.isclass):
                api |= {a for a in dir(cls) if not a.startswith("_")}
    listed = set().union(*RUNTIME_METHODS.values(), *BUILDER_METHODS.values(), {m for _, m in FALLBACKS},
                         *(n.split(".") for n in BUILDER_MODULE_NAMES | RUNTIME_MODULE_NAMES | RUNTIME_BUILDER_MODULE_NAMES
                           | set(RTX_AVOIDED)))
    used = _attribute_names((*BUILDER_FILES, *RUNTIME_FILES)) & api
    assert sorted(used - listed - NOT_TENSORRT) == [], "a TensorRT call to list (or a name of sdrt's own: NOT_TENSORRT)"


@pytest.mark.skipif(CUDART is None, reason=NEEDS_CUDA)
def test_the_cuda_calls_exist() -> None:
    assert _missing(CUDART, CUDA_NAMES) == []
    assert _missing(CUDART, {f"cudaMemcpyKind.cudaMemcpy{k}" for k in CUDA_COPY_KINDS}) == []
    prop = CUDART.cudaDeviceProp()
    assert all(hasattr(prop, a) for a in CUDA_DEVICE_PROP)
    res = CUDART.cudaGetDeviceCount()
    assert isinstance(res, tuple) and len(res) == 2  # (status, count): the shape Device reads
    if int(res[0]) != 0:  # no driver or GPU here: the backend says why, in CUDA's words
        name = CUDART.cudaGetErrorName(res[0])[1].decode()
        with pytest.raises(BackendUnavailable, match=f"no NVIDIA GPU or no NVIDIA driver .*CUDA reports {name}"):
            tb.Device(CUDART, 0)


# -- the builder on TensorRT for RTX, for real (CPU-only ahead-of-time compilation) ---------------------------

class _Recorder:
    """Wraps a TensorRT object and records the attributes read, set and the flags set through it."""

    def __init__(self, obj: Any, seen: set[str]) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name: str) -> Any:
        self._seen.add(name)
        value = getattr(self._obj, name)
        if name == "set_flag":
            def set_flag(flag: Any) -> Any:
                self._seen.add(f"BuilderFlag.{flag.name}")
                return value(flag)
            return set_flag
        if name == "create_builder_config":
            return lambda: _Recorder(value(), self._seen)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._seen.add(name)
        setattr(self._obj, name, value)

    def unwrap(self) -> Any:
        return self._obj


@pytest.fixture
def rtx(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    if RTX is None:
        pytest.skip(NEEDS_RTX)
    yield RTX


def _flags(**kw: Any) -> BuildFlags:
    return dataclasses.replace(trt_build.BuildOptions().flags("fp16"), **kw)


@pytest.mark.parametrize("flags", [
    _flags(), _flags(fp16=True, strongly_typed=False), _flags(opt_level=5, workspace_bytes=1 << 28),
    _flags(refittable=True),
], ids=["default", "weakly-typed", "opt-level-and-workspace", "refittable"])
def test_the_config_avoids_what_rtx_lacks(rtx: ModuleType, flags: BuildFlags) -> None:
    messages: list[str] = []
    seen: set[str] = set()
    builder = _Recorder(rtx.Builder(tb.make_logger(rtx, messages)), seen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = trt_build.make_config(rtx, builder, flags, None)
    assert sorted(seen & set(RTX_AVOIDED)) == []
    assert [str(w.message) for w in caught if "TensorRT" in str(w.message)] == []
    assert not any("unsupported" in m for m in messages), messages
    assert isinstance(config.unwrap(), rtx.IBuilderConfig)
    assert ("BuilderFlag.REFIT" in seen) == flags.refittable
    assert "BuilderFlag.REQUIRE_USER_ALLOCATION" in seen  # its stream capture needs it


@pytest.mark.parametrize("flags, match", [
    (_flags(version_compatible=True), "version-compatible"),
    (_flags(version_compatible=True, exclude_lean_runtime=True), "version-compatible"),
    (_flags(hardware_compatibility="ampere_plus"), "hardware-compatible"),
])
def test_rtx_refuses_what_it_cannot_build(rtx: ModuleType, flags: BuildFlags, match: str) -> None:
    builder = rtx.Builder(tb.make_logger(rtx, []))
    with pytest.raises(InputError, match=match):
        trt_build.make_config(rtx, builder, flags, None)


def test_the_builder_finds_tensorrt_for_rtx_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    if RTX is None:
        pytest.skip(NEEDS_RTX)
    monkeypatch.delenv("SDRT_TENSORRT_MODULE", raising=False)
    assert trt_build.load_tensorrt("tensorrt_rtx") is RTX
    monkeypatch.setenv("SDRT_TENSORRT_MODULE", "tensorrt_rtx")
    assert trt_build.load_tensorrt() is RTX
    monkeypatch.delenv("SDRT_TENSORRT_MODULE")
    if FULL is None:
        # not chosen by name, the only TensorRT installed is the default, also as PyPI's tensorrt_rtx_bindings
        assert trt_build.load_tensorrt() is RTX


def _engine_plans(onnx_dir: Path, components: tuple[str, ...]) -> list[trt_build.EnginePlan]:
    env = EngineEnv("tensorrt_rtx", str(RTX.__version__ if RTX else ""), None, None)
    _, plans = trt_build.plan_engines(onnx_dir, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                                      trt_build.BuildOptions(module="tensorrt_rtx"), env)
    return [p for p in plans if p.record.component in components]


def test_build_engines_on_rtx_without_a_gpu(rtx: ModuleType, tiny_export, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """build_engines end to end on TensorRT for RTX: parse, config, profile, progress monitor, build,
    engine folder and manifest; a timing cache is not used; a second run reuses the engines. (The text
    encoder and the two sampler step graphs: the UNet takes about 20 s on 2 cores.)"""
    src = tiny_export("sd15-tiny")
    plan_engines = trt_build.plan_engines

    def text_encoder_only(*args: Any, **kwargs: Any) -> Any:
        manifest, plans = plan_engines(*args, **kwargs)
        return manifest, [p for p in plans if p.record.component in ("text_encoder", *STEP_ENGINES.values(), RESCALE_STEP_ENGINE)]

    monkeypatch.setattr(trt_build, "plan_engines", text_encoder_only)
    out, cache = tmp_path / "engines", tmp_path / "t.timing.cache"
    messages: list[str] = []
    opts = trt_build.BuildOptions(module="tensorrt_rtx", workspace_gb=1, timing_cache=cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = trt_build.build_engines(src, out, custom_profile(batch="1:1:2"), opts, progress=messages.append)
    assert [str(w.message) for w in caught if "TensorRT" in str(w.message)] == []
    assert not cache.exists() and any("no timing cache" in msg for msg in messages)
    assert any("Building engine" in msg for msg in messages)  # the progress monitor was called
    assert [r.component for r in m.engines] == ["text_encoder", "sampler_step_cfg", "sampler_step",
                                                "sampler_step_cfg_rescale"]
    for rec in m.engines:
        assert rec.env.backend == "tensorrt_rtx" and rec.env.version == rtx.__version__
        assert (out / rec.file).stat().st_size == rec.size_bytes > 0
    # the step graphs are found by the digest of the bytes the runtime makes (fp32 export: fp32 graphs)
    for (guided, rescale), rec in zip(((True, False), (False, False), (True, True)), m.engines[1:]):
        assert rec.onnx_sha256 == hashlib.sha256(step_graph_bytes(guided, "float32", rescale=rescale)).hexdigest()
    assert EngineManifest.read(out).engines == m.engines
    assert "--tensorrt-module tensorrt_rtx" in m.build_command
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {p: 0o666 & ~umask for p in modes}  # engines and copied assets: a plain write's mode
    messages.clear()
    trt_build.build_engines(src, out, custom_profile(batch="1:1:2"), opts, progress=messages.append)
    assert sum("up to date, reused" in msg for msg in messages) == 4


@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder"])
def test_the_vae_graphs_parse_in_tensorrt(rtx: ModuleType, tiny_export, component: str) -> None:
    (plan,) = _engine_plans(tiny_export("sd15-tiny"), (component,))
    builder = rtx.Builder(tb.make_logger(rtx, []))
    network, _parser = trt_build.parse_onnx(rtx, builder, plan.onnx_path, builder.logger, component, True)
    assert network.num_inputs == 1


@pytest.mark.skipif(RTX is None or RTX.__name__ != "tensorrt_rtx_bindings", reason=f"{NEEDS_RTX} (the PyPI wheel)")
def test_the_runtime_finds_pypi_tensorrt_for_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDRT_TENSORRT_MODULE", raising=False)
    assert tb.import_tensorrt(tb.module_candidates(built_with="tensorrt_rtx")) is RTX


@pytest.mark.slow  # builds every engine on TensorRT for RTX: 0.5-1 min a case on 2 busy cores
@pytest.mark.parametrize("preset, shape, module", [
    # no --tensorrt-module: where TensorRT for RTX is the only TensorRT, it is "whichever is installed"
    ("sd15-tiny", ["--height", "64"], []),
    ("sd21-tiny", ["--batch", "1:1:2", "--height", "64:64:96", "--width", "64:96:128"],  # dynamic
     ["--tensorrt-module", "tensorrt_rtx"]),
    ("sdxl-tiny", ["--height", "64"], ["--tensorrt-module", "tensorrt_rtx"]),  # two text encoders, pooled
    # output, time ids; fp32 VAE
])
def test_sdrt_build_makes_a_whole_engine_folder_on_rtx(rtx: ModuleType, tiny_export, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, preset: str,
                                                       shape: list[str], module: list[str]) -> None:
    """The command itself on a real TensorRT builder (TensorRT for RTX, which builds without a GPU): every
    component of an export and both step graphs, with progress, a complete manifest, the export's assets,
    and an sdrt.json that points the pipeline at the engines. (Running them needs a GPU.)"""
    from sdrt.cli import main

    if not module:
        if FULL is not None:
            pytest.skip("the full TensorRT is installed: it, not TensorRT for RTX, is the default")
        monkeypatch.delenv("SDRT_TENSORRT_MODULE", raising=False)
    src, out = tiny_export(preset, "fp16"), tmp_path / "engines"
    assert main(["build", str(src), "--out", str(out), *shape, *module]) == 0
    printed = capsys.readouterr().out
    m = EngineManifest.read(out)
    names = ["text_encoder", "unet", "vae_decoder", "vae_encoder", "sampler_step_cfg", "sampler_step",
             "sampler_step_cfg_blend", "sampler_step_blend", "sampler_step_cfg_rescale", "sampler_input_cfg",
             "sampler_input"]
    # SDXL: an fp32 VAE around the fp16 UNet, so the latents' casts (img2img's noising is one), and the
    # embeddings' join
    names += (["text_encoder_2", "latents_float16_to_float32", "text_join_fp16_fp16_pooled_fp16_to_fp16",
               "image_noise_float32_to_float16"] if preset == "sdxl-tiny" else ["image_noise_float16_to_float16"])
    assert sorted(r.component for r in m.engines) == sorted(names)
    vae_fp32 = {"vae_decoder", "vae_encoder", "latents_float16_to_float32"} if preset == "sdxl-tiny" else set()
    for rec in m.engines:
        assert (out / rec.file).stat().st_size == rec.size_bytes > 0, rec.component
        assert rec.precision == ("fp32" if rec.component in vae_fp32 else "fp16"), rec.component
        assert rec.env.backend == "tensorrt_rtx" and rec.build_seconds > 0
        assert f"{rec.component}: built in" in printed
    from sdrt.runtime.manifest import ExportManifest

    export = ExportManifest.read(out)
    assert export.kind == "tensorrt" and export.components["unet"].path == "unet.engine"
    assert (out / "tokenizer").is_dir() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no partial folder left behind


@pytest.mark.slow  # builds every engine on TensorRT for RTX: about 3 min on 2 busy cores
def test_sdrt_build_makes_controlnet_engines_on_rtx(rtx: ModuleType, tiny_controlnet_export, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A ControlNet export (two nets) builds every engine on a real TensorRT builder: the ControlNets (uint8
    control image, scale table) and unet_control (the residuals at every downsampled size, dynamic)."""
    from sdrt.cli import main
    from sdrt.runtime.manifest import ExportManifest

    src, out = tiny_controlnet_export("sd15-tiny", "fp16", 2), tmp_path / "engines"
    shape = ["--batch", "1:1:2", "--height", "64:64:96", "--width", "64:96:128"]
    assert main(["build", str(src), "--out", str(out), *shape, "--tensorrt-module", "tensorrt_rtx"]) == 0
    printed = capsys.readouterr().out
    m = EngineManifest.read(out)
    by_name = {r.component: r for r in m.engines}
    for name in ("unet", "controlnet_0", "controlnet_1", "unet_control"):
        rec = by_name[name]
        assert (out / rec.file).stat().st_size == rec.size_bytes > 0, name
        assert rec.precision == "fp16" and f"{name}: built in" in printed
    res = {s.name: s for s in by_name["unet_control"].shapes}
    assert res["controlnet_1_mid"].max == (4, 64, 2, 2)  # 96 x 128 px -> 12 x 16 latent -> / 8
    assert {s.name: s for s in by_name["controlnet_0"].shapes}["controlnet_cond"].min == (2, 64, 64, 3)
    export = ExportManifest.read(out)
    assert export.controlnets == ("controlnet_0", "controlnet_1")
    assert export.components["unet_control"].path == "unet_control.engine"


@pytest.mark.slow  # builds the UNet on TensorRT for RTX: about 30 s on 2 cores
def test_a_locon_slotted_unet_builds_on_rtx(rtx: ModuleType, slotted_export, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA slots on a real TensorRT builder: the LoCon-slotted UNet (``--lora-slots 8:attn-ff-conv``, fp16), whose
    convolutions take part of their weights as graph inputs (``down`` [rank, in, kh, kw] convolving with the
    layer's own kernel), builds; every factor is an engine input with its static shape."""
    from sdrt.runtime.manifest import ExportManifest

    src = slotted_export("sd15-tiny", "8:attn-ff-conv", "fp16")
    plan_engines = trt_build.plan_engines

    def unet_only(*args: Any, **kwargs: Any) -> Any:
        manifest, plans = plan_engines(*args, **kwargs)
        return manifest, [p for p in plans if p.record.component == "unet"]

    monkeypatch.setattr(trt_build, "plan_engines", unet_only)
    out = tmp_path / "engines"
    m = trt_build.build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                                trt_build.BuildOptions(module="tensorrt_rtx", workspace_gb=1))
    (rec,) = m.engines
    assert rec.component == "unet" and (out / rec.file).stat().st_size == rec.size_bytes > 0
    inputs = ExportManifest.read(src).components["unet"].inputs
    slots = {s.name: s for s in rec.shapes if s.name.startswith("lora.")}
    assert set(slots) == {t.name for t in inputs if t.name.startswith("lora.")}
    convs = [s for s in slots.values() if len(s.min) == 4 and s.name.endswith(".down") and s.min[2:] == (3, 3)]
    assert convs and all(s.min == s.opt == s.max for s in slots.values())
    assert all(s.min[0 if s.name.endswith(".down") else 1] == 8 for s in slots.values())  # the rank
