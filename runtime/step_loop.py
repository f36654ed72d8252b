"""The denoising loop over engines (UNet, then the sampler step graph), and the step graph's contract.

``Backend.step_loop(unet, step)`` returns a :class:`StepLoop`; the pipeline drives every backend through
it the same way::

    loop = backend.step_loop(unet, step)
    loop.start(latents=x, unet_in=u, cond=cond, timesteps=plan.timesteps, coeffs=plan.table,
               guidance=g, x0_prev=None, noise=step_noise)
    for i in range(len(plan.timesteps)):
        loop.step(i)
    x = loop.latents

With ControlNets (``backend.step_loop(unet_control, step, controlnets=[net_0, None, ...])`` and
``start(..., control=ControlFeeds(images, scales))``) each step runs every active ControlNet on the UNet's
own inputs, then the UNet over their residuals (a net left out feeds zeros): the same step, with more
engines in it. The scale table's rows are uploaded in ``start`` like the timesteps. With a ``shallow`` path as
well (an export made with ControlNets and ``--feature-cache``), the nets run on cheap steps too and the shallow
path takes, by name, the residuals of the skips it reads (``residual_inputs``); run without ControlNets, it is
fed zeros for them.

The interface (:class:`StepLoop`, with the argument checks every loop shares, :class:`ControlFeeds` and the
host :class:`Clock`) is declared in ``runtime/engine.py`` beside ``Backend``, which returns them; they are
importable from here too. This module owns the step graph's contract, the names every loop feeds and reads
(``STEP_INPUTS``, ``STEP_OUTPUTS``, ``UNET_OUTPUT``; ``runtime/step_graph.py`` builds the graph to them),
and :class:`PlainStepLoop`, the loop of a backend without a better one: every per-step input is put on the
device in ``start``, so ``step`` does no host work, and each step runs the two engines one after the other.
A backend that can do better (TensorRT: both engines captured as CUDA graphs over fixed buffers) returns
its own loop from ``Backend.step_loop``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .engine import Array, Backend, Clock, ControlFeeds, Engine, StepLoop, check_control, check_full
from .errors import InputError
from .feature_cache import CHANGE, DEEP_FEATURE

__all__ = ["DEEP_FEATURE", "RESIDUAL_PREFIX", "STEP_INPUTS", "STEP_OUTPUTS", "STEP_UNET_INPUT", "UNET_OUTPUT", "Clock",
           "ControlFeeds", "PlainStepLoop", "StepLoop", "cheap_nets", "cheap_note", "check_control", "check_full", "check_shallow_control",
           "check_threshold", "control_feeds", "kept_outputs", "residual_inputs", "residual_name", "residual_zeros",
           "shallow_feeds"]

# The step graph's contract. Inputs, in the graph's order: "guidance" only in the guided variants, and an
# inpainting variant's own inputs after these (a loop's ``step_inputs``). Outputs: the next step's
# ``latents``, ``x0_prev`` and UNet ``sample``. ``unet_out`` is the UNet's UNET_OUTPUT.
STEP_INPUTS = ("latents", "unet_out", "guidance", "coeffs", "x0_prev", "noise")
STEP_OUTPUTS = ("latents_next", "x0", "unet_in_next")
STEP_UNET_INPUT = "unet_out"
UNET_OUTPUT = "out_sample"
RESIDUAL_PREFIX = "controlnet_"  # the denoiser's ControlNet residual inputs: controlnet_{j}_{output of net j}


def control_feeds(net: Engine, unet_feeds: Mapping[str, Array], image: Array, scale: Array,
                  fixed: Mapping[str, Array] | None = None) -> dict[str, Array]:
    """A ControlNet's inputs: the UNet's own (sample, timestep, text conditioning) by name, its image, this step's
    scales, and its ``fixed`` inputs of the run (a Union net's mode)."""
    feeds = {k: unet_feeds[k] for k in net.inputs if k in unet_feeds}
    # (a net's small graph of its first residual, run on DeepCache's cheap steps, takes no mode)
    feeds.update(controlnet_cond=image, conditioning_scale=scale, **{k: v for k, v in (fixed or {}).items()
                                                                     if k in net.inputs})
    return feeds


def residual_name(net: int, output: str) -> str:
    """The denoiser's input of ControlNet ``net``'s residual ``output`` (``unet_control``'s; a ControlNet export's
    shallow path takes those of the skips it reads under the same names)."""
    return f"{RESIDUAL_PREFIX}{net}_{output}"


def residual_inputs(engine: Engine) -> tuple[str, ...]:
    """An engine's ControlNet residual inputs (DeepCache's shallow path of an export made with ControlNets: the
    residuals of the skips it reads)."""
    return tuple(k for k in engine.inputs if k.startswith(RESIDUAL_PREFIX))


def residual_zeros(engine: Engine, sample_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Zeros for ``engine``'s ControlNet residual inputs, for a step without ControlNets (a residual of zeros adds
    nothing): each fixed axis as declared, each dynamic one (batch, latent height and width: the residuals of the
    skips the shallow path reads are at the latents' size) as the sample's."""
    out = {}
    for k in residual_inputs(engine):
        spec = engine.inputs[k]
        shape = tuple(d if isinstance(d, int) and d > 0 else int(sample_shape[i]) for i, d in enumerate(spec.shape))
        out[k] = np.zeros(shape, spec.dtype)
    return out


def cheap_nets(controlnets: Sequence[Engine | None], shallow_nets: Sequence[Engine | None]) -> list[Engine | None]:
    """The engine each net runs on a cheap step: its small graph of the first residual where ``shallow_nets`` has
    one (an export made with ControlNets and ``--feature-cache``: ``controlnet_j_shallow``), else the whole net (an
    older export); None where the net does not run."""
    if shallow_nets and len(shallow_nets) != len(controlnets):
        raise InputError(f"shallow_nets has {len(shallow_nets)} entries for {len(controlnets)} ControlNets: one per "
                         "net (None where it has no small graph)")
    return [None if net is None else (shallow_nets[j] if shallow_nets and shallow_nets[j] is not None else net)
            for j, net in enumerate(controlnets)]


def cheap_note(controlnets: Sequence[Engine | None], cheap: Sequence[Engine | None], ran_full: Sequence[bool]) -> str:
    """What the nets ran on the cheap steps of the last call, for ``Result.loop`` ("" without cheap steps or nets)."""
    if all(ran_full) or not any(n is not None for n in controlnets):
        return ""
    small = [c.name for n, c in zip(controlnets, cheap) if n is not None and c is not n and c is not None]
    whole = [n.name for n, c in zip(controlnets, cheap) if n is not None and c is n]
    parts = ([f"cheap steps ran {', '.join(small)} (each net's first residual alone)"] if small else []) + (
        [f"cheap steps ran the whole {', '.join(whole)} (an export without their small graphs)"] if whole else [])
    return "; " + "; ".join(parts)


def check_shallow_control(shallow: Engine | None, controlnets: Sequence[object | None]) -> None:
    """Refuse a cheap step beside ControlNets that takes none of their residuals (first-block caching's cached
    step; DeepCache's of an export made without ControlNets): it would drop the control on its steps."""
    if shallow is not None and controlnets and not residual_inputs(shallow):
        raise InputError(f"feature caching's cheap step ({shallow.name}) takes no ControlNet residuals: run "
                         "ControlNets uncached, or re-export the model with both `--controlnet` and `--feature-cache` "
                         "(DeepCache's shallow path of such an export takes them)")


def shallow_feeds(shallow: Engine, unet_feeds: Mapping[str, Array], kept: Mapping[str, Array]) -> dict[str, Array]:
    """The cheap step's inputs (DeepCache's shallow path, first-block caching's cached step): the denoiser's own
    (sample, timestep, conditioning) by name, and what the last full step returned beside its prediction
    (``kept``: the deep feature, the first block's residual) by name."""
    feeds = {k: unet_feeds[k] for k in shallow.inputs if k in unet_feeds}
    feeds.update({k: kept[k] for k in shallow.inputs if k in kept})
    return feeds


def kept_outputs(unet: Engine, shallow: Engine) -> tuple[str, ...]:
    """The denoiser's outputs that the cheap step reads (its inputs that are no denoiser input), after refusing a
    pair where one is neither."""
    if DEEP_FEATURE not in unet.outputs:
        raise InputError(f"{unet.name} does not return {DEEP_FEATURE}, which its cheap step reuses")
    res = residual_inputs(shallow)
    kept = tuple(k for k in shallow.inputs if k not in unet.inputs and k not in res)
    missing = [k for k in kept if k not in unet.outputs]
    if missing:
        raise InputError(f"{shallow.name} reads {missing}, which {unet.name} neither takes nor returns: export them "
                         "together (`sdrt export ... --feature-cache`)")
    return kept


def check_threshold(threshold: float | None, shallow: Engine | None) -> float | None:
    """A loop's per-step decision threshold, after refusing one without a cheap step that reports ``change``."""
    if threshold is None:
        return None
    if shallow is None or CHANGE not in shallow.outputs:
        raise InputError(f"a cache threshold needs a cached step that returns {CHANGE} (first-block caching's): this "
                         "loop has none; use a schedule (cache_interval)")
    return float(threshold)


class PlainStepLoop(StepLoop):
    """(ControlNets,) UNet, then step graph, step after step, through the engines' own calls.

    ``controlnets``: one entry per exported net, the engine or None (left out: its residuals are zeros);
    ``unet`` is then the export's ``unet_control``. ``shallow``: DeepCache's shallow path, run on the steps
    ``start(full=...)`` marks False over the deep feature the UNet returned at the last full step. A backend
    changes how engines run (into fixed buffers, say) by overriding ``_run_unet``, ``_run_shallow``,
    ``_run_control`` and ``_run_step``, never the step itself."""

    def __init__(self, backend: Backend, unet: Engine, step: Engine,
                 controlnets: Sequence[Engine | None] = (), shallow: Engine | None = None,
                 shallow_nets: Sequence[Engine | None] = ()) -> None:
        self._kept_names = () if shallow is None else kept_outputs(unet, shallow)
        check_shallow_control(shallow, controlnets)
        self.backend = backend
        self.unet = unet
        self.step_engine = step
        self.controlnets = tuple(controlnets)
        # what each net runs on a cheap step: its first residual's small graph where the export has one
        self.cheap_controlnets = tuple(cheap_nets(controlnets, shallow_nets if shallow is not None else ()))
        self.shallow = shallow
        self._full: list[bool] = []
        self._ran: list[bool] = []
        self._threshold: float | None = None
        self._kept: dict[str, Array] | None = None
        self._shallow_zeros: dict[str, Array] = {}
        self._state: dict[str, Array] = {}
        self._per_step: list[tuple[Array, Array, Array]] = []
        self._fixed: dict[str, Array] = {}
        self._control: tuple[list[Array | None], list[list[Array | None]], list[Mapping[str, Array]]] | None = None
        self._zeros: dict[str, Array] | None = None
        self._cond_steps: dict[int, Mapping[str, Array]] = {}

    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None, control: ControlFeeds | None = None,
              full: Sequence[bool] | np.ndarray | None = None, threshold: float | None = None,
              cond_steps: Sequence[tuple[int, Mapping[str, Array]]] | None = None) -> None:
        be = self.backend
        dtype, shape = be.meta(latents)
        n = self._check_start(timesteps, coeffs, shape, noise, control, self.controlnets, full, self.shallow)
        self._cond_steps = self._check_cond_steps(cond, cond_steps, n, be.meta)
        self._threshold = check_threshold(threshold, self.shallow)
        self._full, self._kept, self._ran = check_full(full, n, self.shallow is not None), None, []
        ts, cf = np.asarray(timesteps), np.asarray(coeffs, dtype=np.float32)
        rows = be.meta(unet_in)[1][0]
        zeros = be.to_device(np.zeros(shape, dtype))
        t_spec = self.unet.inputs["timestep"].shape
        t_dev = [be.to_device(np.full((rows,), t, np.float32) if len(t_spec) == 1 else np.array(t, np.float32))
                 for t in ts]
        c_dev = [be.to_device(np.ascontiguousarray(cf[i])) for i in range(n)]
        n_dev = [be.to_device(np.ascontiguousarray(z, dtype=dtype)) for z in noise] if noise is not None else [zeros] * n
        self._per_step = list(zip(t_dev, c_dev, n_dev))
        self._control, self._zeros = None, None
        # a ControlNet export's shallow path run without ControlNets: its residual inputs are zeros
        self._shallow_zeros = {} if self.shallow is None or self.controlnets else {
            k: be.to_device(v) for k, v in residual_zeros(self.shallow, be.meta(unet_in)[1]).items()}
        if control is not None and self.controlnets:
            sc = np.asarray(control.scales, np.float32)
            per = [[None if net is None else be.to_device(np.ascontiguousarray(sc[i, j]))
                    for j, net in enumerate(self.controlnets)] for i in range(n)]
            fixed = list(control.inputs) or [{} for _ in self.controlnets]
            self._control = (list(control.images), per, fixed)
        self._fixed = {"cond": dict(cond), "guide": {**({} if guidance is None else {"guidance": guidance}),
                                                     **(step_inputs or {})}}
        self._state = {"latents": latents, "x0": zeros if x0_prev is None else x0_prev, "unet_in": unet_in}

    def step(self, i: int) -> None:
        if not 0 <= i < len(self._per_step):
            raise InputError(f"step {i} is outside the {len(self._per_step)} steps of the last start()")
        t, c, z = self._per_step[i]
        s = self._state
        if i in self._cond_steps:  # prompt editing: the next segment's conditioning, already on the device
            self._fixed["cond"] = dict(self._cond_steps[i])
        feeds = {"sample": s["unet_in"], "timestep": t, **self._fixed["cond"]}
        full = self._full[i]
        if self._control is not None:
            feeds.update(self._residuals(i, feeds, cheap=not full))
        if not full:
            assert self.shallow is not None and self._kept is not None  # check_full: step 0 is full
            # (with ControlNets, ``feeds`` holds every residual of this step: the shallow path takes its skips')
            out, change = self._run_shallow(shallow_feeds(self.shallow, {**feeds, **self._shallow_zeros}, self._kept))
            if self._threshold is not None:  # diffusers' rule: run the whole model again past the threshold
                assert change is not None  # check_threshold
                full = float(np.asarray(self.backend.to_host(change)).reshape(-1)[0]) > self._threshold
                if full and self._control is not None:  # the whole nets' residuals for the full step after all
                    feeds.update(self._residuals(i, feeds))
        if full and self.shallow is not None:
            out, self._kept = self._run_unet_feature(feeds)
        elif full:
            out = self._run_unet(feeds)
        self._ran.append(full)
        res = self._run_step({"latents": s["latents"], STEP_UNET_INPUT: out, **self._fixed["guide"],
                              "coeffs": c, "x0_prev": s["x0"], "noise": z}, i)
        s.update(zip(("latents", "x0", "unet_in"), (res[k] for k in STEP_OUTPUTS)))

    def _residuals(self, i: int, unet_feeds: Mapping[str, Array], cheap: bool = False) -> dict[str, Array]:
        """Every net's residuals as ``unet_control``'s inputs: the active nets run, the others give zeros. ``cheap``:
        a cheap step's, each net's small graph where it has one (its first residual, all the shallow path reads)."""
        assert self._control is not None
        images, scales, fixed = self._control
        outs: dict[int, Mapping[str, Array]] = {}
        for j, net in enumerate(self.cheap_controlnets if cheap else self.controlnets):
            if net is not None:
                outs[j] = self._run_control(j, net, control_feeds(net, unet_feeds, images[j], scales[i][j], fixed[j]))
        feeds: dict[str, Array] = {}
        for j, net in enumerate(self.controlnets):
            if net is None:
                if self._zeros is None:  # shaped like an active net's residuals at this size, made once per start
                    be = self.backend
                    ref = next(iter(outs.values()))
                    self._zeros = {k: be.to_device(np.zeros(be.meta(v)[1], be.meta(v)[0])) for k, v in ref.items()}
                res: Mapping[str, Array] = self._zeros
            else:
                res = outs[j]
            feeds.update({residual_name(j, k): v for k, v in res.items()})
        return feeds

    def _run_unet(self, feeds: Mapping[str, Array]) -> Array:
        return self.unet(feeds)[UNET_OUTPUT]

    def _run_unet_feature(self, feeds: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        """A full step of a caching loop: the denoiser's prediction and what the next cheap steps reuse (the deep
        feature; the first block's residual), by name."""
        out = self.unet(feeds)
        return out[UNET_OUTPUT], {k: out[k] for k in self._kept_names}

    def _run_shallow(self, feeds: Mapping[str, Array]) -> tuple[Array, Array | None]:
        """A cheap step: its prediction, and its ``change`` where it reports one (first-block caching)."""
        assert self.shallow is not None
        out = self.shallow(feeds)
        return out[UNET_OUTPUT], out.get(CHANGE)

    def _run_control(self, j: int, net: Engine, feeds: Mapping[str, Array]) -> Mapping[str, Array]:
        return net(feeds)

    def _run_step(self, feeds: Mapping[str, Array], i: int) -> Mapping[str, Array]:
        return self.step_engine(feeds)

    @property
    def ran_full(self) -> list[bool]:
        """Which of the steps run since ``start`` ran the full denoiser."""
        return list(self._ran)

    def cheap_note(self) -> str:
        return cheap_note(self.controlnets, self.cheap_controlnets, self._ran)

    @property
    def latents(self) -> Array:
        if not self._state:
            raise InputError("start() the loop first")
        return self._state["latents"]

    @property
    def x0(self) -> Array:
        if not self._state:
            raise InputError("start() the loop first")
        return self._state["x0"]

    def close(self) -> None:
        self._state, self._per_step, self._fixed, self._control, self._zeros = {}, [], {}, None, None
        self._shallow_zeros = {}
        self._cond_steps = {}
        self._full, self._kept, self._ran = [], None, []
