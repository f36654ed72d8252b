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

A run of the composed session that fails (ORT's capture or replay, or the run itself; not an allocation
failure, which is the request's size) is not fatal: the call goes on from the state that run read, with the
engines one after the other, and so do later calls at that shape; ``describe()`` says at which step and
why. ``captured`` is set only once ORT can have captured both of a shape's graphs: the session runs on the
CUDA EP with CUDA graphs on, and each graph id has run :data:`CAPTURE_RUNS` times (ORT runs a graph id
uncaptured once or twice first, depending on its version, and captures on the next run). On any other
execution provider (the tests' CPU EP) nothing is captured, and ``describe()`` says so.

Memory: the composed session holds its own copy of the UNet's weights on the device (ORT does not share
initializers between sessions), beside the UNet engine's, one per step-graph variant in use (guided,
unguided, inpainting, rescale). ``OrtBackend(max_composed_sessions=2)`` bounds them: a variant beyond the
limit gets the plain loop, saying why, and closing a loop (the pipeline's ``close()``) frees its session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .engine import Array, Engine
from .errors import DeviceMemoryError, InputError, SdrtError
from .optimum import Graph
from .ort_engine import (
    OrtBackendBase,
    OrtEngine,
    allocation_detail,
    copy_into,
    host_copy_note,
    is_allocation_failure,
    log,
    ort_module,
    run_failure,
    run_options,
)
from .step_loop import (
    STEP_OUTPUTS,
    STEP_UNET_INPUT,
    UNET_OUTPUT,
    ControlFeeds,
    PlainStepLoop,
    StepLoop,
    check_threshold,
)

FUSED_NAME = "unet_step"
# runs of one graph id after which ORT has captured it (1 or 2 uncaptured runs first, then the capture)
CAPTURE_RUNS = 3


class OrtPlainStepLoop(PlainStepLoop):
    """The engines step by step; ``describe()`` adds what ort-cuda did not do as asked (an engine's CUDA graph
    whose run failed, copies through the host)."""

    def describe(self) -> str:
        engines = [self.unet, self.step_engine, *(n for n in self.controlnets if n is not None),
                   *(n for n in self.cheap_controlnets if n is not None and n not in self.controlnets)]
        failed = [f"{e.name}: {why}" for e in engines if (why := getattr(e, "capture_failure", None))]
        text = super().describe()
        if failed:
            text += f"; runs under a CUDA graph failed, those shapes run uncaptured ({'; '.join(failed)})"
        return text + host_copy_note()


def fused_step_reason(backend: OrtBackendBase, unet: Engine, step: Engine) -> str | None:
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
    if (UNET_OUTPUT not in unet.outputs or set(step.outputs) != set(STEP_OUTPUTS)
            or STEP_UNET_INPUT not in step.inputs):
        return "the UNet's and step graph's inputs and outputs are not the ones the composition joins"
    return None


def make_step_loop(backend: OrtBackendBase, unet: Engine, step: Engine,
                   controlnets: Sequence[Engine | None] = (), shallow: Engine | None = None,
                   shallow_nets: Sequence[Engine | None] = ()) -> StepLoop:
    """The fused loop where it applies and composes; otherwise the plain one with the reason. With
    ControlNets, or a feature cache's cheap step, the engines run step by step (the composition covers the UNet and
    the step graph only; each engine still replays its own CUDA graph where ``cuda_graph`` is on)."""
    if controlnets or shallow is not None:
        plain = OrtPlainStepLoop(backend, unet, step, controlnets, shallow, shallow_nets)
        forced = backend.fused_step or (backend.io_binding and backend.cuda_graph)
        what = "ControlNets" if controlnets else "a feature cache's cheap steps"
        plain.reason = f"the composed loop covers UNet + step, not {what}" if forced else ""
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
    plain = OrtPlainStepLoop(backend, unet, step)
    plain.reason = reason
    return plain


def _load_fused(backend: OrtBackendBase, unet: OrtEngine, step: OrtEngine) -> OrtEngine:
    import onnx

    from .ort_compose import compose_step_model  # (imports onnx: only where a loop is composed)

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
        ort, be = ort_module(), loop.backend
        self.buf: dict[str, Any] = {}
        self.runs = [0, 0]  # successful runs per parity (graph id)
        self.failed: str | None = None  # why a run failed: this shape runs the engines one by one from then on

        def new(key: str, dtype: Any, shape: tuple[int, ...]) -> Any:
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, be.memory, be.device_id)
            self.buf[key] = v
            return v

        for k in ("lat", "x0", "uin"):
            dtype, shape = shapes[k]
            for p in (0, 1):
                new(f"{k}{p}", dtype, shape)
        # the first x0 and the noise of a sampler without any: copied from here on the device, uploaded once
        self.zeros = ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes["lat"][1], shapes["lat"][0]), be.memory,
                                                      be.device_id)
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
            for out, k in zip(STEP_OUTPUTS, ("lat", "x0", "uin")):
                b.bind_ortvalue_output(f"step/{out}", self.buf[f"{k}{1 - p}"])
            self.bindings.append(b)
            self.run_options.append(run_options(2 * graph + p if be.cuda_graph else -1))


class FusedStepLoop(StepLoop):
    """UNet + sampler step as one ORT session over fixed buffers, double-buffered, one run per step."""

    def __init__(self, backend: OrtBackendBase, unet: OrtEngine, step: OrtEngine, fused: OrtEngine) -> None:
        self.backend, self.unet, self.step_engine, self.fused = backend, unet, step, fused
        self.slots: dict[tuple[Any, ...], _Slot] = {}
        self._plain = OrtPlainStepLoop(backend, unet, step)
        self._slot: _Slot | None = None
        self._per_step: list[tuple[Any, Any, Any | None]] = []
        self._cond_steps: dict[int, Mapping[str, Array]] = {}
        self._plan: dict[str, Any] = {}
        self._done = 0
        self._offset = 0  # the step at which this call went over to the plain loop
        self._parities: tuple[int, ...] = (0, 1)
        self.captured = False
        self.reason = "not started"
        self._no_graphs = self._graph_reason()

    def _graph_reason(self) -> str:
        """Why the composed session cannot capture CUDA graphs ("" where it can)."""
        if not self.backend.cuda_graph:
            return "CUDA graphs are off; the composed step runs uncaptured"
        opts = self.fused.session.get_provider_options()
        if opts.get("CUDAExecutionProvider", {}).get("enable_cuda_graph") != "1":
            ep = ", ".join(self.fused.session.get_providers())
            return f"the session runs on {ep}, which captures no CUDA graphs"
        return ""

    def describe(self) -> str:
        if self._slot is None:
            return self._plain.describe()
        if self.captured:
            text = "captured CUDA graphs: UNet + sampler step as one ONNX Runtime session"
        else:
            why = self._no_graphs or self._capture_pending(self._slot)
            text = f"UNet + sampler step as one ONNX Runtime session, not captured ({why})"
        return text + host_copy_note()

    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None, control: ControlFeeds | None = None,
              full: Sequence[bool] | np.ndarray | None = None, threshold: float | None = None,
              cond_steps: Sequence[tuple[int, Mapping[str, Array]]] | None = None) -> None:
        if control is not None:  # make_step_loop gives ControlNets the plain loop
            raise InputError("the composed UNet + step loop takes no ControlNet feeds")
        check_threshold(threshold, None)  # (made without a cheap step: refused)
        be = self.backend
        if self.fused.closed:
            raise InputError(f"this step loop is closed: {be.name} backend was closed; load it again")
        dtype, shape = be.meta(latents)
        n = self._check_start(timesteps, coeffs, shape, noise, control, full=full)  # (made without a shallow engine)
        self._check_cond(self.unet.inputs, cond)
        self._cond_steps = self._check_cond_steps(cond, cond_steps, n, be.meta)
        ts, cf = np.asarray(timesteps), np.asarray(coeffs, dtype=np.float32)
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
        self._offset, self.captured = 0, False
        plain_why = None
        if slot is None and len(self.slots) >= be.max_cuda_graphs:
            plain_why = (f"the composed step already holds {len(self.slots)} shapes "
                         f"(max_cuda_graphs={be.max_cuda_graphs}); this one runs engine by engine")
        elif slot is not None and slot.failed is not None:
            plain_why = (f"the composed UNet + step session failed at this shape ({slot.failed}); it runs the "
                         "engines one after the other")
        if plain_why is not None:
            self._slot, self._plain.reason = None, plain_why
            self._plain.start(latents=latents, unet_in=unet_in, cond=cond, timesteps=timesteps, coeffs=coeffs,
                              guidance=guidance, x0_prev=x0_prev, noise=noise, step_inputs=step_inputs,
                              cond_steps=cond_steps)
            return
        if slot is None:
            slot = self.slots[key] = _Slot(self, len(self.slots), shapes)
        b = slot.buf
        copy_into(b["lat0"], latents)
        copy_into(b["uin0"], unet_in)
        copy_into(b["x00"], slot.zeros if x0_prev is None else x0_prev)
        for k, v in cond.items():
            copy_into(b[f"unet/{k}"], v)
        for k, v in (step_inputs or {}).items():
            copy_into(b[f"step/{k}"], v)
        if guidance is not None:
            copy_into(b["step/guidance"], guidance)
        t_dev = [be.to_device(np.full(t_shape, t, np.float32)) for t in ts]
        c_dev = [be.to_device(np.ascontiguousarray(cf[i])) for i in range(n)]
        n_dev = [be.to_device(np.ascontiguousarray(z, dtype=dtype)) for z in noise] if noise is not None else [None] * n
        if noise is None:
            copy_into(b["step/noise"], slot.zeros)
        self._per_step = list(zip(t_dev, c_dev, n_dev))
        # what the plain loop needs to take over mid-call (the buffers above hold the rest)
        self._plan = {"timesteps": ts, "coeffs": cf, "noise": noise, "step_inputs": sorted(step_inputs or {}),
                      "guided": guidance is not None, "cond": sorted(cond)}
        self._parities = (0,) if n == 1 else (0, 1)
        self._slot, self._done = slot, 0
        self.reason = self._no_graphs  # while a capture is pending, describe() counts the runs

    def _capture_pending(self, slot: _Slot) -> str:
        runs = min(slot.runs[p] for p in self._parities)
        return (f"CUDA graphs requested: ONNX Runtime captures each after one or two uncaptured runs at a shape, "
                f"and this shape's have run {runs} of the {CAPTURE_RUNS} times that make sure")

    def step(self, i: int) -> None:
        if self._slot is None:
            self._plain.step(i - self._offset)
            return
        if i != self._done or not 0 <= i < len(self._per_step):
            raise InputError(f"step {i} is outside the {len(self._per_step)} steps of the last start() "
                             f"(or out of order: the next is {self._done})")
        slot, (t, c, z) = self._slot, self._per_step[i]
        for k, v in self._cond_steps.get(i, {}).items():  # prompt editing: a device-to-device copy, this step only
            copy_into(slot.buf[f"unet/{k}"], v)
        copy_into(slot.buf["unet/timestep"], t)
        copy_into(slot.buf["step/coeffs"], c)
        if z is not None:
            copy_into(slot.buf["step/noise"], z)
        p = self._done % 2
        try:
            self.fused.session.run_with_iobinding(slot.bindings[p], slot.run_options[p])
        except Exception as e:  # onnxruntime raises its own untyped errors
            if is_allocation_failure(e):
                raise DeviceMemoryError(f"{FUSED_NAME}: {self.backend.name} could not allocate memory "
                                        f"({allocation_detail(e)}); lower the image size or batch") from e
            self._fall_back(i, e)
            return
        slot.runs[p] += 1
        self._done += 1
        if not self._no_graphs and not self.captured:  # no text built per step: describe() says why
            self.captured = all(slot.runs[q] >= CAPTURE_RUNS for q in self._parities)

    def _fall_back(self, i: int, e: Exception) -> None:
        """Step ``i`` failed: this call goes on from the state that run read, with the engines one by one, and so
        does every later call at this shape. No run writes what it reads, so that state is intact."""
        slot, plan = self._slot, self._plan
        assert slot is not None
        slot.failed = run_failure(e)
        log.warning("%s: the composed UNet + step run failed at step %d (%s); this shape runs the engines one "
                    "after the other from now on", FUSED_NAME, i + 1, slot.failed)
        b, p = slot.buf, self._done % 2
        noise = plan["noise"]
        self._slot, self._offset, self.captured = None, i, False
        self._plain.reason = (f"the composed UNet + step session failed at step {i + 1} ({slot.failed}); this shape "
                              "runs the engines one after the other")
        self._plain.start(latents=b[f"lat{p}"], unet_in=b[f"uin{p}"], x0_prev=b[f"x0{p}"],
                          cond={k: b[f"unet/{k}"] for k in plan["cond"]}, timesteps=plan["timesteps"][i:],
                          coeffs=plan["coeffs"][i:], guidance=b["step/guidance"] if plan["guided"] else None,
                          noise=None if noise is None else noise[i:],
                          step_inputs={k: b[f"step/{k}"] for k in plan["step_inputs"]} or None,
                          cond_steps=[(k - i, c) for k, c in sorted(self._cond_steps.items()) if k > i] or None)
        self._plain.step(0)

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
        self.slots, self._slot, self._per_step, self._plan = {}, None, [], {}
        self._plain.close()
        self.fused.close()
