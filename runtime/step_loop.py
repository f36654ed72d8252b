"""The denoising loop's step over engines (UNet, then the sampler step graph), and the clock that times it.

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
engines in it. The scale table's rows are uploaded in ``start`` like the timesteps.

:class:`PlainStepLoop` is the base implementation: every per-step input is put on the device in
``start``, so ``step`` does no host work, and each step runs the two engines one after the other. A
backend that can do better (TensorRT: both engines captured as CUDA graphs over fixed buffers)
overrides ``Backend.step_loop``.

:class:`Clock` times stages and steps. The host clock synchronizes the device at each mark and reads
``time.perf_counter``; a GPU backend may return a clock that records device events on its stream and
synchronizes once, when the times are read (``kind`` says which clock a figure came from).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .engine import Array, Backend, Engine


@dataclass(frozen=True)
class ControlFeeds:
    """One run's ControlNet inputs, one entry per exported net (None where the net does not run).

    ``images``: ``controlnet_cond`` on the device, uint8 [rows, H, W, 3]; ``scales``: [steps, nets, rows, R]
    float32, each step's ``conditioning_scale`` rows (runtime/controlnet.py)."""

    images: Sequence[Array | None]
    scales: np.ndarray


def control_feeds(net: Engine, unet_feeds: Mapping[str, Array], image: Array, scale: Array) -> dict[str, Array]:
    """A ControlNet's inputs: the UNet's own (sample, timestep, text conditioning) by name, its image and
    this step's scales."""
    feeds = {k: unet_feeds[k] for k in net.inputs if k in unet_feeds}
    feeds.update(controlnet_cond=image, conditioning_scale=scale)
    return feeds


def check_control(nets: Sequence[object | None], control: ControlFeeds | None, steps: int) -> None:
    if not nets and control is None:
        return
    if control is None or len(control.images) != len(nets):
        raise InputError(f"this loop runs {len(nets)} ControlNet(s): start() needs control=ControlFeeds with one "
                         "image per net")
    sc = np.shape(control.scales)
    if len(sc) != 4 or sc[0] != steps or sc[1] != len(nets):
        raise InputError(f"control scales must be [steps, nets, rows, R] = [{steps}, {len(nets)}, ...], got {list(sc)}")
    for j, (net, im) in enumerate(zip(nets, control.images)):
        if (net is None) != (im is None):
            raise InputError(f"ControlNet {j}: the loop {'runs' if net is not None else 'leaves out'} this net but "
                             f"start() {'gave no' if im is None else 'gave an'} image for it")


class StepLoop(abc.ABC):
    """One call's denoising steps over a UNet engine and a sampler step-graph engine."""

    captured: bool = False  # replayed as captured device graphs
    reason: str = ""  # why not, when a backend could capture but did not

    @abc.abstractmethod
    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None, control: ControlFeeds | None = None) -> None:
        """Set up a run of ``len(timesteps)`` steps. ``coeffs`` is the sampler table [steps, columns];
        ``noise`` the fresh noise of every step [steps, *latents.shape] (ancestral samplers) or None;
        ``step_inputs`` the step graph's further inputs, the same every step (an inpainting variant's);
        ``control`` the ControlNets' images and scale table (a loop made with ``controlnets``)."""

    @abc.abstractmethod
    def step(self, i: int) -> None:
        """Queue step ``i`` (in order, 0 .. steps-1, after ``start``)."""

    @property
    @abc.abstractmethod
    def latents(self) -> Array:
        """The latents after the steps run so far (valid until the next ``start``)."""

    @property
    @abc.abstractmethod
    def x0(self) -> Array:
        """The sampler's last x0 prediction (a multistep sampler's history; valid until the next ``start``)."""

    def describe(self) -> str:
        """How the loop ran, for ``Result.loop``."""
        if self.captured:
            return "captured CUDA graphs"
        return f"engines run directly ({self.reason})" if self.reason else "engines run step by step"

    def close(self) -> None:
        """Release the loop's device buffers and captured graphs (idempotent)."""


class PlainStepLoop(StepLoop):
    """(ControlNets,) UNet, then step graph, step after step, through the engines' own calls.

    ``controlnets``: one entry per exported net, the engine or None (left out: its residuals are zeros);
    ``unet`` is then the export's ``unet_control``. A backend changes how engines run (into fixed buffers,
    say) by overriding ``_run_unet``, ``_run_control`` and ``_run_step``, never the step itself."""

    def __init__(self, backend: Backend, unet: Engine, step: Engine,
                 controlnets: Sequence[Engine | None] = ()) -> None:
        self.backend = backend
        self.unet = unet
        self.step_engine = step
        self.controlnets = tuple(controlnets)
        self._state: dict[str, Array] = {}
        self._per_step: list[tuple[Array, Array, Array]] = []
        self._fixed: dict[str, Array] = {}
        self._control: tuple[list[Array | None], list[list[Array | None]]] | None = None
        self._zeros: dict[str, Array] | None = None

    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None, control: ControlFeeds | None = None) -> None:
        be = self.backend
        ts, cf = np.asarray(timesteps), np.asarray(coeffs, dtype=np.float32)
        n = len(ts)
        dtype, shape = be.meta(latents)
        rows = be.meta(unet_in)[1][0]
        if n < 1 or cf.ndim != 2 or cf.shape[0] != n:
            raise InputError(f"coeffs must be [steps, columns] with one row per timestep ({n}), got {list(cf.shape)}")
        if noise is not None and np.shape(noise) != (n, *shape):
            raise InputError(f"noise must be [steps, *latents.shape] = {[n, *shape]}, got {list(np.shape(noise))}")
        zeros = be.to_device(np.zeros(shape, dtype))
        t_spec = self.unet.inputs["timestep"].shape
        t_dev = [be.to_device(np.full((rows,), t, np.float32) if len(t_spec) == 1 else np.array(t, np.float32))
                 for t in ts]
        c_dev = [be.to_device(np.ascontiguousarray(cf[i])) for i in range(n)]
        n_dev = [be.to_device(np.ascontiguousarray(z, dtype=dtype)) for z in noise] if noise is not None else [zeros] * n
        self._per_step = list(zip(t_dev, c_dev, n_dev))
        check_control(self.controlnets, control, n)
        self._control, self._zeros = None, None
        if control is not None and self.controlnets:
            sc = np.asarray(control.scales, np.float32)
            per = [[None if net is None else be.to_device(np.ascontiguousarray(sc[i, j]))
                    for j, net in enumerate(self.controlnets)] for i in range(n)]
            self._control = (list(control.images), per)
        self._fixed = {"cond": dict(cond), "guide": {**({} if guidance is None else {"guidance": guidance}),
                                                     **(step_inputs or {})}}
        self._state = {"latents": latents, "x0": zeros if x0_prev is None else x0_prev, "unet_in": unet_in}

    def step(self, i: int) -> None:
        if not 0 <= i < len(self._per_step):
            raise InputError(f"step {i} is outside the {len(self._per_step)} steps of the last start()")
        t, c, z = self._per_step[i]
        s = self._state
        feeds = {"sample": s["unet_in"], "timestep": t, **self._fixed["cond"]}
        if self._control is not None:
            feeds.update(self._residuals(i, feeds))
        out = self._run_unet(feeds)
        res = self._run_step({"latents": s["latents"], "unet_out": out, **self._fixed["guide"], "coeffs": c,
                              "x0_prev": s["x0"], "noise": z}, i)
        s.update(latents=res["latents_next"], x0=res["x0"], unet_in=res["unet_in_next"])

    def _residuals(self, i: int, unet_feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Every net's residuals as ``unet_control``'s inputs: the active nets run, the others give zeros."""
        assert self._control is not None
        images, scales = self._control
        outs: dict[int, Mapping[str, Array]] = {}
        for j, net in enumerate(self.controlnets):
            if net is not None:
                outs[j] = self._run_control(j, net, control_feeds(net, unet_feeds, images[j], scales[i][j]))
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
            feeds.update({f"controlnet_{j}_{k}": v for k, v in res.items()})
        return feeds

    def _run_unet(self, feeds: Mapping[str, Array]) -> Array:
        return self.unet(feeds)["out_sample"]

    def _run_control(self, j: int, net: Engine, feeds: Mapping[str, Array]) -> Mapping[str, Array]:
        return net(feeds)

    def _run_step(self, feeds: Mapping[str, Array], i: int) -> Mapping[str, Array]:
        return self.step_engine(feeds)

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


class Clock:
    """Marks on the host clock, the device synchronized at each mark (exact for CPU backends). With ``others``,
    theirs too (two models on two devices, timed as one call)."""

    kind = "host"

    def __init__(self, backend: Backend, *others: Backend) -> None:
        self.backend = backend
        self.backends = (backend, *others)
        self._marks: list[float] = []

    def mark(self) -> None:
        for be in self.backends:
            be.synchronize()
        self._marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device first where marks are events)."""
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]

    def close(self) -> None:
        self._marks = []
