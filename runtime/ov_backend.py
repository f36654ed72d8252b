"""OpenVINO backend (``openvino``): every graph of an sdrt export compiled by OpenVINO's runtime.

The same ONNX files the ONNX Runtime backends load are compiled with ``ov.Core().compile_model``; nothing
is converted ahead of time. Arrays on this backend are ``ov.Tensor`` objects in host memory.

* **Precision.** ``precision="auto"`` asks the device for bf16 where it reports the capability (CPUs with
  AVX512_BF16 or AMX; ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``) and f32 otherwise; ``"bf16"`` and
  ``"f32"`` (or ``"fp32"``) force one (bf16 on a device without it is refused). The graphs keep their fp32 (or fp16)
  interface: bf16 is OpenVINO's internal inference precision, so the dtypes the pipeline sees (uint8
  images, a bool ``finite``, int32 ``input_ids``) are the export's.
  The text encoders run at f32 whatever the precision (the pipeline loads them ``exact``): they run once per
  prompt, and OpenVINO's bf16 mode also lowers the float32 softmax and norms a model keeps, which T5 does not
  survive (a T5 encoder with full-size-scaled weights: 61.5% off PyTorch's fp32 output in bf16 mode, where
  PyTorch's own bf16 module is 8.9% off; f32: 1.8e-5). ``describe()`` names the engines so loaded.
* **Model cache.** Compiled models are kept in ``cache_dir``, by default ``$XDG_CACHE_HOME/sdrt/openvino``
  (``~/.cache/sdrt/openvino``), never inside the export folder: a second load of the same export on the same
  device and precision maps the compiled blobs instead of compiling again. The first load does not wait for
  them: each blob is written in the background after its compile (runtime/ov_blobs.py; ``close`` waits for
  those writes). ``cache_dir=False`` turns the cache off. It is bounded (``cache_max_gb``, 64 GB by default): the
  least recently used blobs go past it.
* **Tensors stay in OpenVINO between steps.** An engine call returns output tensors that OpenVINO
  allocated for the caller (no copy, valid until dropped). The denoising loop (:class:`OvStepLoop`) goes
  further: the UNet writes into one fixed buffer and the step graph into two sets of fixed buffers it
  alternates between, so a step allocates and copies nothing.
* **Static shapes** (``static_shapes=True``): each engine is compiled for the exact input shapes of its
  first call at those shapes (and again for each new shape) instead of once with dynamic axes.
* **Devices.** ``device`` is any OpenVINO device name (``CPU`` by default, ``GPU``, ``GPU.1``, ``NPU``);
  one that this machine's OpenVINO does not list is refused with the list it has.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cpu_threads import default_threads
from .engine import Array, Backend, Engine, IOSpec
from .errors import ArtifactError, BackendUnavailable, InputError
from .feature_cache import CHANGE
from .ov_blobs import BlobCache, max_gb
from .step_loop import STEP_OUTPUTS, UNET_OUTPUT, PlainStepLoop

PRECISIONS = ("auto", "bf16", "f32")
PRECISION_ALIASES = {"fp32": "f32"}  # the CLI's and the bench's name for f32
# OpenVINO's names for the inference precision hint
_HINT = {"bf16": "bf16", "f32": "f32"}


def _ov() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(
            f"the openvino backend needs the OpenVINO runtime ({e}); pip install 'sdrt[openvino]'",
            cli="the openvino backend needs the OpenVINO runtime; pip install 'sdrt[openvino]', or use "
                "--backend ort-cpu",
        ) from e
    return openvino


def available() -> bool:
    """Whether the OpenVINO runtime can be imported here."""
    try:
        _ov()
    except BackendUnavailable:
        return False
    return True


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sdrt/openvino``, or ``~/.cache/sdrt/openvino``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdrt" / "openvino"


def _dims(pshape: Any) -> tuple[int | None, ...]:
    return tuple(d.get_length() if d.is_static else None for d in pshape)


def _port_names(ports: Sequence[Any], model_ports: Sequence[Any] | None) -> list[str | None]:
    """The graph's own names of ``ports``. An uncompiled model's ports carry them (``any_name``); a
    compiled model's port may also carry the names of tensors OpenVINO merged into it (``/Cast_output_0``
    beside ``input_ids``, ``x_next_f`` beside ``latents_next``). Without the uncompiled model, a port with
    one name not starting with "/" (the exporter's internal names do) is certain; None where it is not."""
    if model_ports is not None:
        return [str(p.any_name) for p in model_ports]
    out: list[str | None] = []
    for p in ports:
        plain = sorted(n for n in p.get_names() if not n.startswith("/"))
        out.append(plain[0] if len(plain) == 1 else None)
    return out


def _specs(ports: Sequence[Any], names: Sequence[str]) -> dict[str, IOSpec]:
    return {n: IOSpec(n, np.dtype(p.element_type.to_dtype()), _dims(p.get_partial_shape())) for n, p in zip(names, ports)}


class OvEngine(Engine):
    """One compiled graph. Calls are serialized per engine (one infer request each)."""

    backend: OvBackend

    def __init__(self, backend: OvBackend, path: str | bytes, name: str, config: Mapping[str, Any]) -> None:
        self.name = name
        self.backend = backend
        self.config = dict(config)  # its compile settings: the backend's, or an exact load's (f32)
        self._lock = threading.Lock()
        core = backend.core
        if isinstance(path, str) and not os.path.isfile(path):
            raise ArtifactError(f"{path} is missing; re-export the model with `sdrt export`")
        label = path if isinstance(path, str) else name
        self._model: Any = None
        self._compiled: dict[tuple[Any, ...], Any] = {}
        self._requests: dict[tuple[tuple[Any, ...], str], Any] = {}
        self._source = path
        self._blob_maps: list[Any] = []  # the mapped cache blobs the compiled models were imported from
        if backend.static_shapes or not isinstance(path, str):
            try:
                self._model = core.read_model(path)
            except Exception as e:  # OpenVINO raises its own untyped RuntimeErrors
                raise ArtifactError(f"cannot read {label}: {e}. The file is corrupt or incomplete; re-export it") from e
        if backend.static_shapes:
            described = self._model
        else:
            # a path lets OpenVINO's model cache skip reading the ONNX file on a hit
            described = self._compiled[()] = self._compile(path if self._model is None else self._model, label, ())
        src = self._model
        names = {k: _port_names(getattr(described, k), None if src is None else getattr(src, k))
                 for k in ("inputs", "outputs")}
        if any(n is None for v in names.values() for n in v):  # ambiguous names: ask the ONNX file itself
            src = core.read_model(path)
            names = {k: _port_names(getattr(described, k), getattr(src, k)) for k in ("inputs", "outputs")}
        del src
        if not backend.static_shapes:
            self._model = None
        self.inputs = _specs(described.inputs, names["inputs"])  # type: ignore[arg-type]
        self.outputs = _specs(described.outputs, names["outputs"])  # type: ignore[arg-type]
        self._out_types = {n: p.element_type for n, p in zip(self.outputs, described.outputs)}

    def _compile(self, model: Any, label: str, shapes: tuple[Any, ...]) -> Any:
        """The compiled model of ``model`` at ``shapes`` (``()``: dynamic): from the model cache's blob when it has
        one, else compiled here, its blob then written in the background."""
        be = self.backend
        key = None
        if be.blobs is not None:
            try:
                key = be.blobs.key(self._source, shapes, self.config)
            except Exception:  # noqa: BLE001 - an unreadable graph: the compile below says what is wrong with it
                key = None
            hit = be.blobs.load(key, self.config) if key is not None else None
            if hit is not None:
                compiled, mapped = hit
                self._blob_maps.append(mapped)
                be.compiles.append((self.name, "mapped"))
                return compiled
        try:
            compiled = be.core.compile_model(model, be.device, self.config)
        except Exception as e:
            raise ArtifactError(
                f"OpenVINO cannot compile {label} for {be.device} ({str(e).strip()[:400]}). If the file is "
                "intact, try backend='ort-cpu'",
                cli=f"OpenVINO cannot compile {label} for {be.device} ({str(e).strip()[:400]}). If the file is "
                    "intact, try --backend ort-cpu",
            ) from e
        if key is not None and be.blobs is not None:
            be.blobs.store(compiled, key)
        be.compiles.append((self.name, "compiled"))
        return compiled

    def _signature(self, feeds: Mapping[str, Array]) -> tuple[Any, ...]:
        if not self.backend.static_shapes:
            return ()
        return tuple((n, tuple(self.backend.meta(feeds[n])[1])) for n in self.inputs)

    def request(self, feeds: Mapping[str, Array], role: str = "call") -> Any:
        """The infer request for these feeds' shapes. ``role`` keeps the loop's request (whose outputs are
        fixed buffers) apart from plain calls; each is created on first use."""
        sig = self._signature(feeds)
        key = (sig, role)
        req = self._requests.get(key)
        if req is None:
            compiled = self._compiled.get(sig)
            if compiled is None:
                assert self._model is not None
                model = self._model.clone()
                model.reshape({n: list(s) for n, s in sig})
                compiled = self._compiled[sig] = self._compile(model, self.name, sig)
            req = self._requests[key] = compiled.create_infer_request()
        return req

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        ov, be = self.backend.ov, self.backend
        with self._lock:
            req = self.request(feeds)
            for name, value in feeds.items():
                req.set_tensor(name, be.to_device(value) if isinstance(value, np.ndarray) else value)
            # fresh, empty output tensors: OpenVINO sizes and fills them, and the caller owns them (no copy)
            # (a statically shaped output must be given its exact shape)
            outs = {}
            for name, port in zip(self.outputs, req.model_outputs):
                ps = port.get_partial_shape()
                shape = ps.to_shape() if ps.is_static else ov.Shape([0] * len(ps))
                outs[name] = ov.Tensor(self._out_types[name], shape)
                req.set_tensor(name, outs[name])
            req.infer()
            return outs

    def run_into(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any], read: Sequence[str] = ()) -> dict[str, Any]:
        """One call writing into the given output tensors (the loop's fixed buffers); returns the outputs named in
        ``read`` as the loop request's own tensors (valid, and rewritten, until its next call)."""
        with self._lock:
            req = self.request(feeds, "loop")
            for name, value in feeds.items():
                req.set_tensor(name, value)
            for name, value in outputs.items():
                req.set_tensor(name, value)
            req.infer()
            return {name: req.get_tensor(name) for name in read}

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()
        self._model = None
        self._blob_maps.clear()


class OvStepLoop(PlainStepLoop):
    """The denoising loop with no allocation or copy per step.

    ``start`` allocates the buffers once, shaped by the step graph's contract (``out_sample`` with the
    UNet input's rows and the latents' channels, ``unet_in_next`` like the UNet input, ``latents_next`` and
    ``x0`` like the latents): the UNet writes
    into one fixed buffer and the step graph into two sets, alternating, so a step never reads a tensor it
    is writing. The loop has its own infer request per engine, so the UNet holds one request's memory
    (the pipeline never calls the UNet outside the loop). ``latents`` and ``x0`` are those buffers: valid
    until the next ``start``. ControlNets (when the loop runs them) return the output tensors OpenVINO
    allocated for their request, fed to the UNet as they are (no copy).
    """

    def __init__(self, backend: OvBackend, unet: OvEngine, step: OvEngine,
                 controlnets: Sequence[Engine | None] = (), shallow: Engine | None = None,
                 shallow_nets: Sequence[Engine | None] = ()) -> None:
        super().__init__(backend, unet, step, controlnets, shallow, shallow_nets)
        self._unet_out: Any = None
        self._sets: list[dict[str, Any]] = []

    def start(self, **kwargs: Any) -> None:
        super().start(**kwargs)
        ov, meta = self.backend.ov, self.backend.meta  # type: ignore[attr-defined]
        s = self._state

        def like(t: Any) -> Any:
            dtype, shape = meta(t)
            return ov.Tensor(np.zeros(shape, dtype))

        # the UNet predicts the latents' channels for each of its input rows (a 9-channel inpainting UNet
        # takes latents + mask + masked-image latents, and predicts 4)
        _, lat_shape = meta(s["latents"])
        rows = meta(s["unet_in"])[1][0]
        self._unet_out = ov.Tensor(np.zeros((rows, *lat_shape[1:]), self.unet.outputs[UNET_OUTPUT].dtype))
        states = ("latents", "x0", "unet_in")  # what each step-graph output becomes in the loop's state
        self._sets = [{out: like(s[state]) for out, state in zip(STEP_OUTPUTS, states)} for _ in range(2)]

    def _run_unet(self, feeds: Mapping[str, Any]) -> Any:
        unet = self.unet
        assert isinstance(unet, OvEngine)
        unet.check(feeds)
        unet.run_into(feeds, {UNET_OUTPUT: self._unet_out})
        return self._unet_out

    def _run_unet_feature(self, feeds: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        # what the cheap steps reuse stays in the UNet request's own output tensors (no copy): only the next
        # full step rewrites them, and only the cheap steps before it read them
        unet = self.unet
        assert isinstance(unet, OvEngine)
        unet.check(feeds)
        kept = unet.run_into(feeds, {UNET_OUTPUT: self._unet_out}, read=self._kept_names)
        return self._unet_out, kept

    def _run_shallow(self, feeds: Mapping[str, Any]) -> tuple[Any, Any]:
        shallow = self.shallow
        assert isinstance(shallow, OvEngine)
        shallow.check(feeds)
        extra = shallow.run_into(feeds, {UNET_OUTPUT: self._unet_out}, read=[o for o in shallow.outputs if o == CHANGE])
        return self._unet_out, extra.get(CHANGE)

    def _run_step(self, feeds: Mapping[str, Any], i: int) -> Any:
        step = self.step_engine
        assert isinstance(step, OvEngine)
        out = self._sets[i % 2]
        step.check(feeds)
        step.run_into(feeds, out)
        return out

    def close(self) -> None:
        super().close()
        self._unet_out, self._sets = None, []


class OvBackend(Backend):
    """``openvino``: OpenVINO's runtime on ``device`` (``CPU`` by default).

    ``threads``: ``INFERENCE_NUM_THREADS`` (None: ``SDRT_THREADS`` where set, else OpenVINO's default, the
    physical cores).
    ``precision``: ``auto`` (bf16 where the device has it, else f32), ``bf16`` or ``f32`` (``fp32``).
    ``cache_dir``: where compiled models are cached (None: :func:`default_cache_dir`; False: no cache).
    ``cache_max_gb``: the cache's bound, least recently used blobs removed past it (None: ``SDRT_OPENVINO_CACHE_GB``,
    else 64; ``math.inf``: none).
    ``static_shapes``: compile per input shape instead of once with dynamic axes.
    """

    name = "openvino"

    def __init__(self, device: str = "CPU", threads: int | None = None, *, precision: str = "auto",
                 cache_dir: str | os.PathLike[str] | None | bool = None, static_shapes: bool = False,
                 cache_max_gb: float | None = None) -> None:
        bound = max_gb(cache_max_gb) if cache_dir is not False else None
        self.ov = _ov()
        precision = PRECISION_ALIASES.get(precision, precision)
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)} (or fp32)",
                             cli=f"--precision {precision} is not one of auto, bf16, fp32")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be at least 1, got {threads}")
        threads = threads if threads is not None else default_threads()
        self.core = self.ov.Core()
        devices = list(self.core.available_devices)  # e.g. ["CPU", "GPU.0", "GPU.1"]
        wanted = device.upper()
        if not any(d == wanted or d.split(".")[0] == wanted for d in devices):
            raise BackendUnavailable(
                f"OpenVINO has no {device!r} device here (it has: {', '.join(devices) or 'none'}); "
                "pass device= one of those (CPU runs everywhere OpenVINO does)",
                cli=f"OpenVINO has no {device!r} device here (it has: {', '.join(devices) or 'none'}); "
                    "use one of those, or --backend ort-cpu",
            )
        self.device = wanted
        caps = set(self.core.get_property(wanted, "OPTIMIZATION_CAPABILITIES"))
        self.bf16_supported = "BF16" in caps
        if precision == "auto":
            precision = "bf16" if self.bf16_supported else "f32"
        elif precision == "bf16" and not self.bf16_supported:
            raise BackendUnavailable(
                f"{wanted} has no bf16 support (OpenVINO reports {', '.join(sorted(caps))}); use precision='f32' "
                "or 'auto'",
                cli=f"{wanted} has no bf16 support (OpenVINO reports {', '.join(sorted(caps))}); use --precision "
                    "f32 or auto",
            )
        self.precision = precision
        self.threads = threads
        self.static_shapes = static_shapes
        if cache_dir is False:
            self.cache_dir: Path | None = None
        else:
            self.cache_dir = Path(cache_dir) if isinstance(cache_dir, (str, os.PathLike)) else default_cache_dir()
        self.config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            # one request at a time, as fast as possible: the pipeline's calls are serialized
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None and wanted == "CPU":
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if self.cache_dir is not None:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot create the OpenVINO model cache {self.cache_dir} ({e}); pass "
                                 "cache_dir= a writable folder, or cache_dir=False") from e
        self.blobs = None if self.cache_dir is None or bound is None else BlobCache(
            self.cache_dir, self.ov, self.core, wanted, self.config, bound)
        self._engines: list[OvEngine] = []
        self.exact: list[str] = []  # the engines loaded exact, at f32 where the backend's precision is lower
        # (engine, "mapped" from the model cache or "compiled" here) for each compiled model, in order
        self.compiles: list[tuple[str, str]] = []
        self._closed = False

    def describe(self) -> str:
        return (f"OpenVINO {self.ov.__version__} on {self.device}, {self.precision}"
                + (f" ({', '.join(self.exact)} at f32)" if self.exact else "")
                + (f", {self.threads} threads" if self.threads else ""))

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this openvino backend was closed; create a new one")

    def load(self, path: str | bytes, name: str, *, exact: bool = False) -> Engine:
        """Compile a graph from a file path, or from serialized ONNX bytes (the sampler's step graph). ``exact``: at
        f32 whatever the backend's precision (OpenVINO's bf16 mode also lowers the float32 softmax and norms a
        model keeps: a T5 encoder 61.5% off PyTorch's fp32, PyTorch's own bf16 module 8.9%)."""
        self._check_open()
        config = {**self.config, "INFERENCE_PRECISION_HINT": _HINT["f32"]} if exact else self.config
        engine = OvEngine(self, path, name, config)
        self._engines.append(engine)
        if exact and self.precision != "f32" and name not in self.exact:
            self.exact.append(name)
        return engine

    def to_device(self, a: np.ndarray) -> Array:
        if isinstance(a, self.ov.Tensor):
            return a
        if not a.flags.c_contiguous or not a.flags.writeable:
            # (np.ascontiguousarray would turn a 0-d scalar into shape [1]); OpenVINO shares only writeable
            # memory, and an array from a PIL image is read-only
            a = a.copy()
        return self.ov.Tensor(a, shared_memory=True)  # as ort-cpu passes numpy arrays: no copy

    def to_host(self, a: Array) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        return np.array(a.data, copy=True)  # a tensor may be a loop buffer that the next step overwrites

    def meta(self, a: Array) -> tuple[np.dtype[Any], tuple[int, ...]]:
        if isinstance(a, np.ndarray):
            return a.dtype, a.shape
        return np.dtype(a.element_type.to_dtype()), tuple(int(d) for d in a.shape)

    def step_loop(self, unet: Engine, step: Engine, controlnets: Sequence[Engine | None] = (),
                  shallow: Engine | None = None, shallow_nets: Sequence[Engine | None] = ()) -> PlainStepLoop:
        if isinstance(unet, OvEngine) and isinstance(step, OvEngine) and isinstance(shallow, (OvEngine, type(None))):
            return OvStepLoop(self, unet, step, controlnets, shallow, shallow_nets)
        return PlainStepLoop(self, unet, step, controlnets, shallow, shallow_nets)

    def settle(self) -> float:
        t0 = time.perf_counter()
        if self.blobs is not None:
            self.blobs.wait()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Release every engine, after the model cache's blob writes have finished (a blob left unwritten
        would cost the next load a compile)."""
        if self.blobs is not None:
            self.blobs.close()  # the pending writes, then the cache trimmed to its bound
        for e in self._engines:
            e.close()
        self._engines = []
        self._closed = True
