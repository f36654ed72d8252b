"""The denoising step as a CUDA graph: TensorRT's ``StepLoop``.

``backend.step_loop(unet, step)`` returns a ``CapturedStepLoop``: UNet then step graph, captured as two CUDA
graphs over fixed device buffers (even steps read state A and write state B, odd steps the reverse, so
no engine writes what it reads). What changes per step (the timestep, the coefficient row, the noise)
is uploaded once per call as a table and copied row by row into fixed buffers before each launch.
The pipeline drives it as every backend's ``StepLoop`` (``runtime/step_loop.py``)::

    loop = backend.step_loop(unet, step)
    loop.start(latents=x_dev, unet_in=unet_in, x0_prev=zeros, cond=cond, guidance=g,
               timesteps=plan.timesteps, coeffs=plan.table, noise=step_noise)
    for i in range(n):
        loop.step(i)                   # 3 small device copies + 1 graph launch
        backend.synchronize()          # only for per-step timings / the callback
    x_dev = loop.latents               # valid until the next start()

With ControlNets (``backend.step_loop(unet_control, step, controlnets=[...])``) the captured step is every
active ControlNet, then ``unet_control`` over their residual buffers (a net left out: zero buffers), then
the step graph; each net's ``conditioning_scale`` row is copied in per step like the timestep.

With DeepCache's shallow path (``backend.step_loop(unet, step, shallow=unet_shallow)`` and
``start(..., full=plan)``, runtime/feature_cache.py) a full step's UNet also writes the deep feature into a
fixed buffer, and a shallow step runs ``unet_shallow`` over that buffer instead of the UNet, writing the same
output buffer the step graph reads. Each kind of step is captured as its own pair of graphs (full and
shallow, even and odd: four), and ``step(i)`` launches the one the ``full`` plan given to ``start`` names. A
UNet with outputs beyond its prediction (an export made with ``--deepcache``, run without caching) has each
extra output bound to a fixed buffer of its own: TensorRT runs an engine only with every output bound. With
ControlNets too (an export made with both), every step, full or shallow, runs the active nets first, and the
shallow path binds the residual buffers of the skip it reads (``controlnet_{j}_down_0``); on the cheap steps a net
with a small graph of that residual (``controlnet_{j}_shallow``) runs it in its place, writing the same buffer;
without ControlNets that shallow path reads zero buffers of its own.

``start`` captures on first use and whenever shapes change (after one warm-up run of each engine: TensorRT
finishes shape-dependent setup outside the capture); a capture that fails with any error (TensorRT's or
CUDA's, raised or returned), or ``TrtBackend(cuda_graph=False)``, leaves ``loop.captured`` False with
``loop.reason`` and runs the same bindings directly, so results do not depend on whether capture worked.
The loop's buffers are its own: the caller's arrays are copied in at ``start`` and may be dropped
afterwards.

Lifecycle: the backend keeps its loops; a loop holds the backend and its engines only weakly, so no
reference cycle keeps device memory alive once the pipeline is dropped. ``close()`` (the backend's
``close()`` calls it) frees the loop's buffers and graphs now.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .cuda import CLOSED, DeviceArray, Graph
from .engine import Array
from .errors import InputError
from .feature_cache import EXPORT_HINT
from .step_loop import (
    DEEP_FEATURE,
    STEP_OUTPUTS,
    STEP_UNET_INPUT,
    UNET_OUTPUT,
    ControlFeeds,
    StepLoop,
    cheap_nets,
    cheap_note,
    check_full,
    check_shallow_control,
    kept_outputs,
    residual_name,
    residual_zeros,
    shallow_feeds,
)
from .trt_engines import TrtBackendBase, TrtEngine


class CapturedStepLoop(StepLoop):
    """UNet then sampler step graph, over fixed device buffers, as two CUDA graphs (even and odd steps).

    Even steps read state A (latents, x0, UNet input) and write state B; odd steps the reverse. The
    timestep, coefficient row and noise of step i are copied from per-call tables into fixed buffers
    before each launch. With ``shallow`` (DeepCache's ``unet_shallow``) the steps ``start(full=...)`` marks
    False run it over the deep feature the last full step wrote, as two more graphs. Without a capture
    (disabled or failed: ``captured``/``reason``) the same bindings run directly.
    """

    def __init__(self, backend: TrtBackendBase, unet: TrtEngine, step: TrtEngine,
                 controlnets: Sequence[TrtEngine | None] = (), shallow: TrtEngine | None = None,
                 shallow_nets: Sequence[TrtEngine | None] = ()) -> None:
        if shallow is not None and DEEP_FEATURE not in unet.outputs:
            raise InputError(f"{unet.name} does not return {DEEP_FEATURE}, which its cheap step reuses: {EXPORT_HINT}")
        if shallow is not None:
            kept_outputs(unet, shallow)
        check_shallow_control(shallow, controlnets)
        self._backend = weakref.ref(backend)
        self._unet = weakref.ref(unet)
        self._step = weakref.ref(step)
        self._nets = tuple(None if n is None else weakref.ref(n) for n in controlnets)
        self._shallow = None if shallow is None else weakref.ref(shallow)
        # each net's engine on a cheap step: its first residual's small graph where the export has one
        self._small = tuple(None if n is None else weakref.ref(n)
                            for n in cheap_nets(controlnets, shallow_nets if shallow is not None else ()))
        self.closed = False
        self.captured = False
        self.reason = "not started"
        self._key: tuple[Any, ...] | None = None
        self._generation = -1
        self._graphs: dict[tuple[bool, int], Graph] = {}  # (full step?, parity) -> its captured graph
        self._full: list[bool] = []
        self._done = 0
        self._steps = 0
        self._tables: dict[str, DeviceArray] = {}
        self._switch: dict[int, dict[str, DeviceArray]] = {}
        self.buf: dict[str, Any] = {}

    @property
    def backend(self) -> TrtBackendBase:
        be = self._backend()
        if be is None or self.closed:
            raise InputError(f"this step loop is closed: {CLOSED}")
        return be

    @property
    def unet(self) -> TrtEngine:
        return self._engine(self._unet, "unet")

    @property
    def step_engine(self) -> TrtEngine:
        return self._engine(self._step, "step graph")

    @property
    def shallow(self) -> TrtEngine | None:
        """DeepCache's shallow path (None: every step runs the full UNet)."""
        return None if self._shallow is None else self._engine(self._shallow, "shallow UNet")

    @property
    def _unet_e(self) -> TrtEngine:
        return self.unet

    @property
    def _step_e(self) -> TrtEngine:
        return self.step_engine

    @property
    def controlnets(self) -> list[TrtEngine | None]:
        return [None if r is None else self._engine(r, f"ControlNet {j}") for j, r in enumerate(self._nets)]

    @property
    def cheap_controlnets(self) -> list[TrtEngine | None]:
        """What each net runs on a cheap step (its small graph of the first residual, or the whole net)."""
        return [None if r is None else self._engine(r, f"ControlNet {j}'s cheap step") for j, r in enumerate(self._small)]

    def cheap_note(self) -> str:
        return cheap_note(self.controlnets, self.cheap_controlnets, self.ran_full)

    def _engine(self, ref: Any, what: str) -> Any:
        e = ref()
        if e is None or self.closed:
            raise InputError(f"the {what} engine of this step loop is gone: {CLOSED}")
        return e

    def _require_open(self) -> None:
        if not self.alive():
            raise InputError(f"this step loop is closed: {CLOSED}")

    def alive(self) -> bool:
        """Whether the backend and the engines still exist (a loop over dropped engines is useless)."""
        nets = [r() for r in (*self._nets, *self._small, self._shallow) if r is not None]
        return not self.closed and None not in (self._backend(), self._unet(), self._step(), *nets)

    def close(self) -> None:
        """Destroy the captured graphs and free the loop's buffers now (idempotent)."""
        graphs, self._graphs = self._graphs, {}
        for g in graphs.values():
            g.close()
        buffers: list[Any] = [v for k, v in self.buf.items() if v is not None and k != "cfixed"]
        buffers += [*self._tables.values(), *self.buf.get("cfixed", {}).values()]  # per net: a dict of buffers
        self.buf, self._tables, self._key, self.captured, self.closed = {}, {}, None, False, True
        self._full = []
        for item in buffers:
            for arr in item if isinstance(item, list) else item.values() if isinstance(item, dict) else [item]:
                arr.free()

    # -- the public calls -----------------------------------------------------------------------------
    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array], timesteps: Sequence[float] | np.ndarray,
              coeffs: np.ndarray, guidance: Array | None = None, x0_prev: Array | None = None,
              noise: np.ndarray | None = None, step_inputs: Mapping[str, Array] | None = None,
              control: ControlFeeds | None = None, full: Sequence[bool] | np.ndarray | None = None,
              threshold: float | None = None,
              cond_steps: Sequence[tuple[int, Mapping[str, Array]]] | None = None) -> None:
        """Set up a run of ``len(timesteps)`` steps: copy the starting state and conditioning in, upload
        the per-step tables, keep the ``full`` plan (which graph each step launches), and (re)capture when
        the shapes changed. A cache ``threshold`` is refused: deciding per step needs a read on the host between
        the graphs of one step, which a captured loop does not do; a schedule (``full``) runs captured."""
        self._require_open()
        if threshold is not None:
            raise InputError("the TensorRT loop runs feature caching on a fixed schedule (each kind of step a "
                             "captured graph), not by a threshold read every step: use cache_interval instead of "
                             "cache_threshold, or the onnxruntime or openvino backend",
                             cli="the tensorrt backend runs feature caching on a fixed schedule: use "
                                 "--cache-interval instead of --cache-threshold")
        be = self.backend
        x, u = be.as_device(latents), be.as_device(unet_in)
        conds = {k: be.as_device(v) for k, v in cond.items()}
        extra = {k: be.as_device(v) for k, v in (step_inputs or {}).items()}
        g = None if guidance is None else be.as_device(guidance)
        n = self._check_start(timesteps, coeffs, x.shape, noise, control, self._nets, full, self._shallow)
        plan = check_full(full, n, self._shallow is not None)
        switches = self._check_cond_steps(conds, cond_steps, n, be.meta)
        ts, cf = np.asarray(timesteps), np.asarray(coeffs)
        images = {j: be.as_device(im) for j, im in enumerate(control.images) if im is not None} if control else {}
        fixed = {j: {k: be.as_device(v) for k, v in ins.items()} for j, ins in enumerate(control.inputs)
                 if j in images} if control else {}
        scales = np.asarray(control.scales, np.float32) if control is not None else None
        key = (x.shape, x.dtype, u.shape, u.dtype, g is None, cf.shape[1],
               tuple(sorted((k, v.shape, v.dtype.str) for k, v in conds.items())),
               tuple(sorted((k, v.shape, v.dtype.str) for k, v in extra.items())),
               tuple(sorted((j, v.shape, v.dtype.str) for j, v in images.items())),
               tuple(sorted((j, k, v.shape, v.dtype.str) for j, ins in fixed.items() for k, v in ins.items())),
               None if scales is None else scales.shape[1:])
        if key != self._key or (self.captured and self._generation != be.scratch.generation):
            self._setup(x, u, conds, g, cf.shape[1], extra, images, None if scales is None else scales.shape[2:],
                        fixed)
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
        for k, v in extra.items():
            be.copy(b["extra"][k], v)
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
        for j, ins in fixed.items():
            for k, v in ins.items():
                be.copy(b["cfixed"][j][k], v)
        for j, im in images.items():
            be.copy(b["cimg"][j], im)
            assert scales is not None
            self._tables[f"cs{j}"] = be.as_device(np.ascontiguousarray(scales[:, j], dtype=b["cscale"][j].dtype))
        # prompt editing: each segment's conditioning on the device, copied into the bound buffers at its step
        self._switch = {k: {name: be.as_device(v) for name, v in c.items()} for k, c in switches.items()}
        self._done, self._steps, self._full = 0, n, plan

    def step(self, i: int) -> None:
        """Queue step ``i`` (call in order, 0 .. steps-1, after ``start``)."""
        self._require_open()
        if self._key is None or not 0 <= i < self._steps:
            raise InputError(f"step {i} is outside the {self._steps} steps of the last start()")
        be, b = self.backend, self.buf
        for k, v in self._switch.get(i, {}).items():  # outside the captured graphs, in stream order
            be.copy(b["cond"][k], v)
        be.copy(b["t"], self._tables["t"].row(i))
        be.copy(b["c"], self._tables["c"].row(i))
        if "noise" in self._tables:
            be.copy(b["noise"], self._tables["noise"].row(i))
        for j in b["cscale"]:
            be.copy(b["cscale"][j], self._tables[f"cs{j}"].row(i))
        parity, full = self._done % 2, self._full[i]
        if self.captured and self._generation != be.scratch.generation:
            self._recapture(parity)
        if self.captured:
            self._graphs[full, parity].launch()
        else:
            self._enqueue(parity, full)
        self._done += 1

    @property
    def ran_full(self) -> list[bool]:
        return list(self._full[: self._done])

    @property
    def latents(self) -> DeviceArray:
        """The latents after the steps run so far (a view: valid until the next ``start``)."""
        self._require_open()
        if self._key is None:
            raise InputError("start() the loop first")
        lat: DeviceArray = self.buf["lat"][self._done % 2]
        return lat.view()

    @property
    def x0(self) -> DeviceArray:
        """The last x0 prediction (zeros before the first step; a view: valid until the next ``start``)."""
        self._require_open()
        if self._key is None:
            raise InputError("start() the loop first")
        x0: DeviceArray = self.buf["x0"][self._done % 2]
        return x0.view()

    # -- internals ------------------------------------------------------------------------------------
    def _setup(self, x: DeviceArray, u: DeviceArray, conds: Mapping[str, DeviceArray], g: DeviceArray | None,
               columns: int, extra: Mapping[str, DeviceArray] | None = None,
               images: Mapping[int, DeviceArray] | None = None, scale_shape: tuple[int, ...] | None = None,
               fixed: Mapping[int, Mapping[str, DeviceArray]] | None = None) -> None:
        be = self.backend
        self._key, self._graphs, self.captured = None, {}, False
        self._check_cond(self.unet.inputs, conds)
        t_spec = self.unet.inputs["timestep"]
        b: dict[str, Any] = {
            "lat": [be.empty(x.shape, x.dtype) for _ in range(2)],
            "x0": [be.empty(x.shape, x.dtype) for _ in range(2)],
            "uin": [be.empty(u.shape, u.dtype) for _ in range(2)],
            "t": be.empty((u.shape[0],) if len(t_spec.shape) == 1 else (), t_spec.dtype),
            "cond": {k: be.empty(v.shape, v.dtype) for k, v in conds.items()},
            "extra": {k: be.empty(v.shape, v.dtype) for k, v in (extra or {}).items()},
        }
        self.buf = b
        self._setup_control(images or {}, scale_shape, fixed or {})
        unet_feeds = self._unet_feeds(0)
        self.unet.check(unet_feeds)
        unet_e = self.unet
        unet_e.bind_inputs(unet_feeds)
        out_name = UNET_OUTPUT if UNET_OUTPUT in unet_e.outputs else next(iter(unet_e.outputs))
        b["out"] = be.empty(unet_e.output_shape(out_name), unet_e.outputs[out_name].dtype)
        b["side"] = self._side_buffers(unet_e, out_name)
        self._setup_shallow()
        st = self.step_engine.inputs
        b["c"] = be.empty((columns,), st["coeffs"].dtype)
        b["noise"] = be.empty(x.shape, st["noise"].dtype)
        b["g"] = None if g is None else be.empty(g.shape, g.dtype)
        self.buf = b
        step_feeds = self._step_feeds(0)
        self.step_engine.check(step_feeds)
        if set(self.step_engine.outputs) != set(STEP_OUTPUTS):
            raise InputError(f"{self.step_engine.name} must have outputs {STEP_OUTPUTS}, has {sorted(self.step_engine.outputs)}")
        self._out_name = out_name
        self._capture()

    def _side_buffers(self, engine: TrtEngine, main: str) -> dict[str, DeviceArray]:
        """Zeroed fixed buffers for an engine's outputs other than ``main`` (its inputs bound): TensorRT runs an
        engine only with every output bound. The UNet's deep feature of a ``--deepcache`` export is one."""
        be, side = self.backend, {}
        for o, spec in engine.outputs.items():
            if o != main:
                a = side[o] = be.empty(engine.output_shape(o), spec.dtype)
                be.device.zero(a.ptr, a.nbytes)
        return side

    def _setup_shallow(self) -> None:
        """DeepCache's shallow path: its inputs (the UNet's, and the deep-feature buffer the UNet writes), its
        prediction into the UNet's output buffer (the same shape, which its bind checks)."""
        shallow, b = self.shallow, self.buf
        b["shallow_side"], b["shallow_zeros"] = {}, {}
        if shallow is None:
            return
        if not self.controlnets:  # a ControlNet export's shallow path run without ControlNets: zero residuals
            b["shallow_zeros"] = {k: self.backend.as_device(v)
                                  for k, v in residual_zeros(shallow, b["uin"][0].shape).items()}
        if UNET_OUTPUT not in shallow.outputs:
            raise InputError(f"{shallow.name} must return {UNET_OUTPUT}, has {sorted(shallow.outputs)}: {EXPORT_HINT}")
        feeds = self._shallow_feeds(0)
        shallow.check(feeds)
        shallow.bind_inputs(feeds)
        b["shallow_side"] = self._side_buffers(shallow, UNET_OUTPUT)

    def _setup_control(self, images: Mapping[int, DeviceArray], scale_shape: tuple[int, ...] | None,
                       fixed: Mapping[int, Mapping[str, DeviceArray]]) -> None:
        """Fixed buffers of the ControlNets: each active net's image, fixed inputs (a Union net's mode), scale row
        and residual outputs; zero residuals for the nets left out (shaped like an active net's)."""
        be, b = self.backend, self.buf
        b["cimg"], b["cscale"], b["res"] = {}, {}, {}
        b["cfixed"] = {j: {k: be.empty(v.shape, v.dtype) for k, v in ins.items()} for j, ins in fixed.items()}
        nets = self.controlnets
        if not nets:
            return
        assert scale_shape is not None
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
        for j, net in enumerate(nets):
            if net is None:
                continue
            b["cimg"][j] = be.empty(images[j].shape, images[j].dtype)
            b["cscale"][j] = be.empty(scale_shape, net.inputs["conditioning_scale"].dtype)
            feeds = self._control_feeds(j, net, 0)
            net.check(feeds)
            net.bind_inputs(feeds)
            for o, spec in net.outputs.items():
                shapes[o] = (net.output_shape(o), spec.dtype)
                b["res"][residual_name(j, o)] = be.empty(shapes[o][0], spec.dtype)
        for j, small in enumerate(self.cheap_controlnets):  # a small graph writes its residual into the net's buffer
            whole = nets[j]
            if small is not None and whole is not None and small is not whole:
                feeds = self._control_feeds(j, small, 0)
                small.check(feeds)
                small.bind_inputs(feeds)
                for o in small.outputs:
                    want = b["res"].get(residual_name(j, o))
                    if want is None or tuple(small.output_shape(o)) != tuple(want.shape):
                        raise InputError(f"{small.name} returns {o} {tuple(small.output_shape(o))}, where "
                                         f"{whole.name} (whose residual it computes) returns "
                                         f"{None if want is None else tuple(want.shape)}: re-export the model")
        for j, net in enumerate(nets):
            if net is None:
                for o, (shape, dtype) in shapes.items():
                    z = b["res"][residual_name(j, o)] = be.empty(shape, dtype)
                    be.device.zero(z.ptr, z.nbytes)

    def _control_feeds(self, j: int, net: TrtEngine, p: int) -> dict[str, DeviceArray]:
        b = self.buf
        unet_side = {"sample": b["uin"][p], "timestep": b["t"], **b["cond"]}
        feeds = {k: unet_side[k] for k in net.inputs if k in unet_side}
        feeds.update(controlnet_cond=b["cimg"][j], conditioning_scale=b["cscale"][j],
                     **{k: v for k, v in b["cfixed"].get(j, {}).items() if k in net.inputs})
        return feeds

    def _unet_feeds(self, p: int) -> dict[str, DeviceArray]:
        b = self.buf
        return {"sample": b["uin"][p], "timestep": b["t"], **b["cond"], **b.get("res", {})}

    def _shallow_feeds(self, p: int) -> dict[str, DeviceArray]:
        shallow = self.shallow
        assert shallow is not None
        # with ControlNets the UNet's feeds hold every net's residual buffers: the shallow path binds its skips'
        feeds: dict[str, DeviceArray] = shallow_feeds(shallow, {**self._unet_feeds(p), **self.buf["shallow_zeros"]},
                                                      self.buf["side"])
        return feeds

    def _step_feeds(self, p: int) -> dict[str, DeviceArray]:
        b = self.buf
        feeds = {"latents": b["lat"][p], STEP_UNET_INPUT: b["out"], "coeffs": b["c"], "x0_prev": b["x0"][p],
                 "noise": b["noise"]}
        if b["g"] is not None:
            feeds["guidance"] = b["g"]
        feeds.update(b["extra"])
        return feeds

    def _enqueue(self, p: int, full: bool = True) -> None:
        """Bind step parity ``p`` (read state p, write state 1 - p) and queue UNet (``full``; otherwise the
        shallow path over the deep-feature buffer), then step graph."""
        b = self.buf
        # a cheap step runs each net's small graph of the one residual the shallow path reads, where there is one
        for j, net in enumerate(self.controlnets if full else self.cheap_controlnets):
            if net is not None:
                net.bind_inputs(self._control_feeds(j, net, p))
                net.bind_outputs({o: b["res"][residual_name(j, o)] for o in net.outputs})
                net.enqueue()
        if full:
            self._unet_e.bind_inputs(self._unet_feeds(p))
            self._unet_e.bind_outputs({self._out_name: b["out"], **b["side"]})
            self._unet_e.enqueue()
        else:
            shallow = self.shallow
            assert shallow is not None  # check_full: no shallow steps in a loop made without one
            shallow.bind_inputs(self._shallow_feeds(p))
            shallow.bind_outputs({UNET_OUTPUT: b["out"], **b["shallow_side"]})
            shallow.enqueue()
        self._step_e.bind_inputs(self._step_feeds(p))
        self._step_e.bind_outputs(dict(zip(STEP_OUTPUTS, (b["lat"][1 - p], b["x0"][1 - p], b["uin"][1 - p]))))
        self._step_e.enqueue()

    def _capture(self) -> None:
        be = self.backend
        self._graphs, self.captured = {}, False
        if not be.cuda_graph:
            self.reason = "CUDA graphs are off (TrtBackend(cuda_graph=False))"
            return
        graphs: dict[tuple[bool, int], Graph] = {}
        nets = [n for n in self.controlnets if n is not None]
        nets += [n for n in self.cheap_controlnets if n is not None and n not in nets]
        shallow = self.shallow
        engines = (*nets, self._unet_e, *([] if shallow is None else [shallow]), self._step_e)
        try:
            refuse = [e.name for e in engines if hasattr(e.context, "is_stream_capturable")
                      and not e.context.is_stream_capturable(be.device.handle)]
            if refuse:  # TensorRT for RTX says so up front (data-dependent shapes, on-device control flow)
                self.reason = f"TensorRT cannot stream-capture {', '.join(refuse)} here"
                return
            for full in (True, False) if shallow is not None else (True,):  # full first: it writes the feature
                for p in (0, 1):
                    self._enqueue(p, full)  # warm-up: TensorRT's shape-dependent setup happens outside the capture
                    graphs[full, p] = be.device.capture(functools.partial(self._enqueue, p, full))
            be.synchronize()
        except Exception as e:  # noqa: BLE001 - any TensorRT/CUDA failure: the direct path runs the same bindings
            for g in graphs.values():
                g.close()
            self.reason = f"CUDA graph capture failed: {type(e).__name__}: {e}"
            return
        self._graphs, self.captured, self.reason = graphs, True, ""
        self._generation = be.scratch.generation

    def _recapture(self, parity: int) -> None:
        """Capture again (the scratch block moved) without losing the state the next step reads: the warm-up
        runs write both states, and the full steps' the deep feature a shallow step reads next."""
        be, b = self.backend, self.buf
        saved = []
        for buf in [b[k][parity] for k in ("lat", "x0", "uin")] + [*b["side"].values()]:
            keep = be.empty(buf.shape, buf.dtype)
            be.copy(keep, buf)
            saved.append((buf, keep))
        self._capture()
        for buf, keep in saved:
            be.copy(buf, keep)
            keep.free()
