"""The denoising loop's step over engines (UNet, then the sampler step graph), and the clock that times it.

``Backend.step_loop(unet, step)`` returns a :class:`StepLoop`; the pipeline drives every backend through
it the same way::

    loop = backend.step_loop(unet, step)
    loop.start(latents=x, unet_in=u, cond=cond, timesteps=plan.timesteps, coeffs=plan.table,
               guidance=g, x0_prev=None, noise=step_noise)
    for i in range(len(plan.timesteps)):
        loop.step(i)
    x = loop.latents

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
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .engine import Array, Backend, Engine


class StepLoop(abc.ABC):
    """One call's denoising steps over a UNet engine and a sampler step-graph engine."""

    captured: bool = False  # replayed as captured device graphs
    reason: str = ""  # why not, when a backend could capture but did not

    @abc.abstractmethod
    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None) -> None:
        """Set up a run of ``len(timesteps)`` steps. ``coeffs`` is the sampler table [steps, columns];
        ``noise`` the fresh noise of every step [steps, *latents.shape] (ancestral samplers) or None;
        ``step_inputs`` the step graph's further inputs, the same every step (an inpainting variant's)."""

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
    """UNet, then step graph, step after step, through the engines' own calls."""

    def __init__(self, backend: Backend, unet: Engine, step: Engine) -> None:
        self.backend = backend
        self.unet = unet
        self.step_engine = step
        self._state: dict[str, Array] = {}
        self._per_step: list[tuple[Array, Array, Array]] = []
        self._fixed: dict[str, Array] = {}

    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None) -> None:
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
        self._fixed = {"cond": dict(cond), "guide": {**({} if guidance is None else {"guidance": guidance}),
                                                     **(step_inputs or {})}}
        self._state = {"latents": latents, "x0": zeros if x0_prev is None else x0_prev, "unet_in": unet_in}

    def step(self, i: int) -> None:
        if not 0 <= i < len(self._per_step):
            raise InputError(f"step {i} is outside the {len(self._per_step)} steps of the last start()")
        t, c, z = self._per_step[i]
        s = self._state
        out = self.unet({"sample": s["unet_in"], "timestep": t, **self._fixed["cond"]})["out_sample"]
        res = self.step_engine({"latents": s["latents"], "unet_out": out, **self._fixed["guide"], "coeffs": c,
                                "x0_prev": s["x0"], "noise": z})
        s.update(latents=res["latents_next"], x0=res["x0"], unet_in=res["unet_in_next"])

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
        self._state, self._per_step, self._fixed = {}, [], {}


class Clock:
    """Marks on the host clock, the device synchronized at each mark (exact for CPU backends)."""

    kind = "host"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._marks: list[float] = []

    def mark(self) -> None:
        self.backend.synchronize()
        self._marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device first where marks are events)."""
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]

    def close(self) -> None:
        self._marks = []
