"""ort-cuda's denoising loop as one session per step: the UNet and the sampler step graph composed.

ONNX Runtime captures a CUDA graph per session, so with two engines a step is two replays with host
work between them. :func:`make_step_loop` (``OrtBackend.step_loop``) composes the UNet and the step graph
into one model (``runtime/ort_compose.py``: no weights are read or copied) and returns a
:class:`FusedStepLoop` over one session, run with IO binding over fixed buffers, as TensorRT's
``CapturedStepLoop`` does: even steps read state A (latents, x0, UNet input) and write state B, odd steps
the reverse, so no run writes what it reads. Each parity has its own binding and ``gpu_graph_id``; ORT
captures each on its first runs at a shape and replays it after. What changes per step (timestep,
coefficient row, noise) is uploaded once per ``start`` and copied into the fixed buffers before each run.

The loop keeps at most ``max_cuda_graphs`` shapes (two graph ids each, since each captured graph holds its
activation memory for the session's life); a further shape runs the two engines step by step
(:class:`PlainStepLoop`), and ``describe()`` says so. Where the fused loop does not apply (ort-cpu,
``cuda_graph`` off, graphs that cannot be composed) the plain loop runs, with the reason.

Memory: the composed session holds its own copy of the UNet's weights on the device (ORT does not share
initializers between sessions), beside the UNet engine's, one per step-graph variant in use (guided,
unguided, inpainting, rescale). ``OrtBackend(max_composed_sessions=2)`` bounds them: a variant beyond the
limit gets the plain loop, saying why, and closing a loop (the pipeline's ``close()``) frees its session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .engine import Array, Engine
from .errors import CompatibilityError, DeviceMemoryError, InputError, SdrtError
from .ort_backend import _ALLOCATION_FAILED, OrtEngine, _allocation_detail, _copy_into, _ort, _run_options
from .step_loop import ControlFeeds, PlainStepLoop, StepLoop

if TYPE_CHECKING:
    from .ort_backend import OrtBackend

STEP_OUTPUTS = ("latents_next", "x0", "unet_in_next")
FUSED_NAME = "unet_step"


def fused_step_reason(backend: OrtBackend, unet: Engine, step: Engine) -> str | None:
    """None where the fused loop applies, else why the plain loop runs ("" on a backend without CUDA
    graphs at all: nothing was declined)."""
    forced = backend.fused_step
    if forced is False:
        return "the composed UNet + step loop is off (fused_step=False)"
    if not backend.io_binding:
        return ""
    if not backend.cuda_graph and not forced:
        return "CUDA graphs are off (OrtBackend(cuda_graph=False)): UNet and step graph run one after the other"
    for e in (unet, step):
        if not isinstance(e, OrtEngine) or e.backend is not backend:
            return f"{e.name} is not an engine of this backend"
    assert isinstance(unet, OrtEngine)
    if not isinstance(unet.source, str) and not getattr(unet.source, "base_dir", None):
        return "the UNet was loaded from bytes without its weights folder"
    if "out_sample" not in unet.outputs or set(step.outputs) != set(STEP_OUTPUTS) or "unet_out" not in step.inputs:
        return "the UNet's and step graph's inputs and outputs are not the ones the composition joins"
    return None


def make_step_loop(backend: OrtBackend, unet: Engine, step: Engine,
                   controlnets: Sequence[Engine | None] = ()) -> StepLoop:
    """The fused loop where it applies and composes; otherwise the plain one with the reason. With
    ControlNets the engines run step by step (the composition covers the UNet and the step graph only)."""
    if controlnets:
        plain = PlainStepLoop(backend, unet, step, controlnets)
        forced = backend.fused_step or (backend.io_binding and backend.cuda_graph)
        plain.reason = "the composed loop covers UNet + step, not ControlNets" if forced else ""
        return plain
    reason = fused_step_reason(backend, unet, step)
    held = [e for e in list(backend._engines) if e.name == FUSED_NAME and not e.closed]
    if reason is None and len(held) >= backend.max_composed_sessions:
        reason = (f"{len(held)} composed UNet + step session(s) already hold a copy of the UNet's weights each "
                  f"(max_composed_sessions={backend.max_composed_sessions}); this step-graph variant runs the "
                  "engines one after the other")
    if reason is None:
        assert isinstance(unet, OrtEngine) and isinstance(step, OrtEngine)
        try:
            return FusedStepLoop(backend, unet, step, _load_fused(backend, unet, step))
        except SdrtError as e:  # a composition or session that fails: the engines still run, step by step
            reason = f"UNet + step graph could not run as one session: {e}"
    plain = PlainStepLoop(backend, unet, step)
    plain.reason = reason
    return plain


def _load_fused(backend: OrtBackend, unet: OrtEngine, step: OrtEngine) -> OrtEngine:
    import onnx

    from .optimum import Graph
    from .ort_compose import compose_step_model

    src = unet.source
    folder = os.path.dirname(os.path.abspath(src)) if isinstance(src, str) else str(getattr(src, "base_dir", ""))
    step_src = step.source
    step_model = onnx.load(step_src, load_external_data=False) if isinstance(step_src, str) \
        else onnx.load_from_string(bytes(step_src))
    data = compose_step_model(src, folder, step_model)
    # bytes whose external weights resolve in the UNet's folder: nothing is written anywhere
    return OrtEngine(backend, Graph(data, base_dir=folder), FUSED_NAME, captured=bool(backend.cuda_graph))


class _Slot:
    """One shape's fixed buffers and its two bindings (parity 0 reads state 0, writes state 1; 1 reverse)."""

    def __init__(self, loop: FusedStepLoop, graph: int, shapes: Mapping[str, tuple[Any, tuple[int, ...]]]) -> None:
        ort, be = _ort(), loop.backend
        self.buf: dict[str, Any] = {}

        def new(key: str, dtype: Any, shape: tuple[int, ...]) -> Any:
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, be.memory, be.device_id)
            self.buf[key] = v
            return v

        for k in ("lat", "x0", "uin"):
            dtype, shape = shapes[k]
            for p in (0, 1):
                new(f"{k}{p}", dtype, shape)
        fixed = {k: new(k, *v) for k, v in shapes.items() if k not in ("lat", "x0", "uin")}
        self.bindings, self.run_options = [], []
        names = loop.fused.inputs
        for p in (0, 1):
            b = loop.fused.session.io_binding()
            feeds = {"unet/sample": self.buf[f"uin{p}"], "step/latents": self.buf[f"lat{p}"],
                     "step/x0_prev": self.buf[f"x0{p}"], **fixed}
            if set(feeds) != set(names):
                raise InputError(f"the composed step takes {sorted(names)}; the loop binds {sorted(feeds)}")
            for name, v in feeds.items():
                b.bind_ortvalue_input(name, v)
            for out, k in (("step/latents_next", "lat"), ("step/x0", "x0"), ("step/unet_in_next", "uin")):
                b.bind_ortvalue_output(out, self.buf[f"{k}{1 - p}"])
            self.bindings.append(b)
            self.run_options.append(_run_options(2 * graph + p if be.cuda_graph else -1))


class FusedStepLoop(StepLoop):
    """UNet + sampler step as one ORT session over fixed buffers, double-buffered, one run per step."""

    def __init__(self, backend: OrtBackend, unet: OrtEngine, step: OrtEngine, fused: OrtEngine) -> None:
        self.backend, self.unet, self.step_engine, self.fused = backend, unet, step, fused
        self.slots: dict[tuple[Any, ...], _Slot] = {}
        self._plain = PlainStepLoop(backend, unet, step)
        self._slot: _Slot | None = None
        self._per_step: list[tuple[Any, Any, Any | None]] = []
        self._done = 0
        self.reason = "not started"

    def describe(self) -> str:
        if self._slot is None:
            return self._plain.describe()
        if self.captured:
            return "captured CUDA graph: UNet + sampler step as one ONNX Runtime session"
        return f"UNet + sampler step as one ONNX Runtime session, not captured ({self.reason})"

    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None, control: ControlFeeds | None = None) -> None:
        if control is not None:  # make_step_loop gives ControlNets the plain loop
            raise InputError("the composed UNet + step loop takes no ControlNet feeds")
        be = self.backend
        if self.fused.closed:
            raise InputError(f"this step loop is closed: {be.name} backend was closed; load it again")
        ts, cf = np.asarray(timesteps), np.asarray(coeffs, dtype=np.float32)
        n = len(ts)
        dtype, shape = be.meta(latents)
        if n < 1 or cf.ndim != 2 or cf.shape[0] != n:
            raise InputError(f"coeffs must be [steps, columns] with one row per timestep ({n}), got {list(cf.shape)}")
        if noise is not None and np.shape(noise) != (n, *shape):
            raise InputError(f"noise must be [steps, *latents.shape] = {[n, *shape]}, got {list(np.shape(noise))}")
        want = set(self.unet.inputs) - {"sample", "timestep"}
        if set(cond) != want:
            raise InputError(f"unet takes {sorted(self.unet.inputs)}; cond must hold all but sample and timestep, "
                             f"got {sorted(cond)}")
        u_dtype, u_shape = be.meta(unet_in)
        t_shape: tuple[int, ...] = (u_shape[0],) if len(self.unet.inputs["timestep"].shape) == 1 else ()
        shapes: dict[str, tuple[Any, tuple[int, ...]]] = {
            "lat": (dtype, shape), "x0": (dtype, shape), "uin": (u_dtype, u_shape),
            "unet/timestep": (np.dtype(np.float32), t_shape), "step/coeffs": (np.dtype(np.float32), (cf.shape[1],)),
            "step/noise": (dtype, shape),
            **{f"unet/{k}": be.meta(v) for k, v in cond.items()},
            **{f"step/{k}": be.meta(v) for k, v in (step_inputs or {}).items()},
            **({} if guidance is None else {"step/guidance": be.meta(guidance)}),
        }
        key = tuple(sorted((k, np.dtype(d).str, tuple(s)) for k, (d, s) in shapes.items()))
        slot = self.slots.get(key)
        if slot is None and len(self.slots) >= be.max_cuda_graphs:
            self._slot, self.captured = None, False
            self._plain.reason = (f"the composed step already holds {len(self.slots)} shapes "
                                  f"(max_cuda_graphs={be.max_cuda_graphs}); this one runs engine by engine")
            self._plain.start(latents=latents, unet_in=unet_in, cond=cond, timesteps=timesteps, coeffs=coeffs,
                              guidance=guidance, x0_prev=x0_prev, noise=noise, step_inputs=step_inputs)
            return
        if slot is None:
            slot = self.slots[key] = _Slot(self, len(self.slots), shapes)
        b = slot.buf
        _copy_into(b["lat0"], latents)
        _copy_into(b["uin0"], unet_in)
        _copy_into(b["x00"], np.zeros(shape, dtype) if x0_prev is None else x0_prev)
        for k, v in cond.items():
            _copy_into(b[f"unet/{k}"], v)
        for k, v in (step_inputs or {}).items():
            _copy_into(b[f"step/{k}"], v)
        if guidance is not None:
            _copy_into(b["step/guidance"], guidance)
        t_dev = [be.to_device(np.full(t_shape, t, np.float32)) for t in ts]
        c_dev = [be.to_device(np.ascontiguousarray(cf[i])) for i in range(n)]
        n_dev = [be.to_device(np.ascontiguousarray(z, dtype=dtype)) for z in noise] if noise is not None else [None] * n
        if noise is None:
            _copy_into(b["step/noise"], np.zeros(shape, dtype))
        self._per_step = list(zip(t_dev, c_dev, n_dev))
        self._slot, self._done = slot, 0
        self.captured = bool(be.cuda_graph)
        self.reason = "" if self.captured else "CUDA graphs are off; the composed step runs uncaptured"

    def step(self, i: int) -> None:
        if self._slot is None:
            self._plain.step(i)
            return
        if i != self._done or not 0 <= i < len(self._per_step):
            raise InputError(f"step {i} is outside the {len(self._per_step)} steps of the last start() "
                             f"(or out of order: the next is {self._done})")
        slot, (t, c, z) = self._slot, self._per_step[i]
        _copy_into(slot.buf["unet/timestep"], t)
        _copy_into(slot.buf["step/coeffs"], c)
        if z is not None:
            _copy_into(slot.buf["step/noise"], z)
        p = self._done % 2
        try:
            self.fused.session.run_with_iobinding(slot.bindings[p], slot.run_options[p])
        except Exception as e:  # onnxruntime raises its own untyped errors
            if isinstance(e, MemoryError) or any(s in str(e) for s in _ALLOCATION_FAILED):
                raise DeviceMemoryError(f"{FUSED_NAME}: {self.backend.name} could not allocate memory "
                                        f"({_allocation_detail(e)}); lower the image size or batch") from e
            raise CompatibilityError(f"{FUSED_NAME}: the composed UNet + step run failed ({e}); load the "
                                     "backend with cuda_graph=False to run the engines one by one") from e
        self._done += 1

    def _state(self, k: str) -> Any:
        if self._slot is None:
            return getattr(self._plain, "latents" if k == "lat" else "x0")
        return self._slot.buf[f"{k}{self._done % 2}"]

    @property
    def latents(self) -> Array:
        return self._state("lat")

    @property
    def x0(self) -> Array:
        return self._state("x0")

    def close(self) -> None:
        self.slots, self._slot, self._per_step = {}, None, []
        self._plain.close()
        self.fused.close()

