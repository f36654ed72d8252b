"""One small engine interface: named inputs and outputs living on a device.

A ``Backend`` owns the device (host memory, a CUDA device) and moves arrays to and from it; an
``Engine`` is one loaded graph that checks every input's name, dtype and shape against its own
description before running. The pipeline talks only to these two; each backend implements them once.

What a backend hands the pipeline besides engines is declared here too: a :class:`StepLoop` (the
denoising steps over a UNet and a sampler step graph, with the argument checks every loop shares) and a
:class:`Clock` (the host clock; a GPU backend returns one of its own). The loops themselves live above
this module (``runtime/step_loop.py`` and each backend's own), so nothing here imports them.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .manifest import Component

if TYPE_CHECKING:
    from .engine_manifest import ProfileShapes

CLOSED = "the pipeline/backend was closed; load it again"  # what using anything after close() says
Array = Any  # a backend's device array: numpy on the host, an OrtValue or device buffer on a GPU


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | str | None, ...]  # ints are fixed; strings/None are dynamic axes

    def describe(self) -> str:
        dims = ", ".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


class Backend(abc.ABC):
    """A device and the means to load engines onto it.

    Lifecycle: ``close()`` releases every engine, buffer, stream and captured graph
    the backend holds; a closed backend refuses further work. What the pipeline needs besides engines and
    arrays is declared here: ``step_loop`` (the denoising loop over a UNet and a step-graph engine; each
    backend chooses its loop) and, with a base implementation, ``check_request`` and ``check_t5_tokens`` (can
    the loaded engines serve this batch and size, this T5 length?), ``clock`` (how stages and steps are timed),
    ``make_current`` (bind the device to the calling thread), ``settle`` (wait for background work) and ``clone`` / ``shares_memory_with`` (hand device
    arrays between stages and backends without the host).
    """

    name: str
    # its loop can read a number back on the host between the graphs of a step (a feature cache's threshold
    # rule); False where the loop is captured whole (TensorRT)
    per_step_reads: bool = True
    # it loads each engine alone, so the pipeline may load a component on the first call that runs it (the UNet of
    # the kind of call a process makes: an export with ControlNets has two); False where the load plans device memory
    # over every engine at once (TensorRT's shared scratch block): everything loads with the model
    loads_on_demand: bool = True

    @abc.abstractmethod
    def load(self, path: str | bytes, name: str, *, exact: bool = False) -> Engine:
        """Load an engine from a file, or from serialized bytes. ``exact``: compute at the graph's own precision,
        never lower (a backend that lowers precision by itself, openvino's bf16 inference hint, does not for this
        graph); the loader asks it for the text encoders (runtime/loading.py ``exact``)."""

    def refuses(self, component: Component) -> str | None:
        """Why this backend cannot run ``component`` (its precision, say), or None. Checked for every component
        before any loads. Base: it runs every precision an export writes."""
        return None

    def graph_for(self, component: Component) -> str:
        """The file of ``component`` (relative to its folder) this backend loads: the variant recorded
        under this backend's name (e.g. a graph with fused CUDA operators for ``ort-cuda``), else the
        portable one."""
        return component.variants.get(self.name, component.path)

    @abc.abstractmethod
    def to_device(self, a: np.ndarray) -> Array: ...

    @abc.abstractmethod
    def to_host(self, a: Array) -> np.ndarray: ...

    @abc.abstractmethod
    def meta(self, a: Array) -> tuple[np.dtype[Any], tuple[int, ...]]:
        """dtype and shape of a device array, without moving it."""

    def shares_memory_with(self, other: Backend) -> bool:
        """Whether ``other``'s device arrays are this backend's to read (``clone``) without the host. Base:
        only its own."""
        return other is self

    def clone(self, a: Array) -> Array:
        """A device array of the caller's own, equal to ``a`` (which a loop may overwrite later). Base:
        through the host; a GPU backend copies on the device."""
        return self.to_device(np.array(self.to_host(a)))

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the host)."""

    def check_request(self, batch: int, height: int, width: int, guided: bool) -> None:
        """Raise InputError when the loaded engines cannot serve ``batch`` images of ``height`` x ``width``
        (TensorRT: outside the build profile). ONNX graphs take any size the export supports."""

    def check_t5_tokens(self, tokens: int, default: int) -> None:
        """Raise InputError when the loaded engines cannot take ``tokens`` T5 tokens per prompt (a call's
        ``max_sequence_length``; ``default``: the family's, which engines recording no range were built for).
        TensorRT: outside the build profile's T5 range; ONNX graphs take any length."""

    @property
    def profile(self) -> ProfileShapes | None:
        """The request range the loaded engines were built for (TensorRT: the engine folder's build profile),
        or None where they take any request the export supports (ONNX graphs)."""
        return None

    @abc.abstractmethod
    def step_loop(self, unet: Engine, step: Engine, controlnets: Sequence[Engine | None] = (),
                  shallow: Engine | None = None, shallow_nets: Sequence[Engine | None] = ()) -> StepLoop:
        """The denoising loop over ``unet`` and the sampler ``step`` graph; with ``controlnets`` (one entry
        per exported net, None where it does not run) each step runs them first and ``unet`` is the
        export's ``unet_control`` (with ``shallow`` too: the nets run on every step and the shallow path reads
        the residuals of its skips: ``shallow_nets``, one entry per net, gives the small graph of the residual it reads
        that a cheap step runs in the whole net's place, None where a net has none); with ``shallow`` (DeepCache's ``unet_shallow``, runtime/feature_cache.py)
        the steps ``start(full=...)`` marks False run it over what the last full step returned beside its
        prediction (its inputs that are denoiser outputs: the deep feature; first-block caching's residuals). A backend
        without a loop of its own returns ``step_loop.PlainStepLoop(self, unet, step, controlnets, shallow,
        shallow_nets)``
        (step by step)."""

    def clock(self) -> Clock:
        """A clock for stage and step times. Base: the host clock, synchronizing at each mark."""
        return Clock(self)

    def make_current(self) -> None:
        """Make this backend's device current in the calling thread (a no-op on the host)."""

    def settle(self) -> float:
        """Wait until the backend's background work is done (openvino: the model cache's blob writes that
        follow a first load); the seconds waited. Base: none. A benchmark calls it after the cold image, so
        that the timed runs do not share the machine with it."""
        return 0.0

    def close(self) -> None:
        """Release what the backend holds on its device (idempotent). Engines loaded from it are unusable
        afterwards."""


class Engine(abc.ABC):
    """One graph on a backend. Call it with named device arrays; get named device arrays back."""

    name: str
    backend: Backend
    inputs: dict[str, IOSpec]
    outputs: dict[str, IOSpec]

    def __call__(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        self.check(feeds)
        return self.run(feeds)

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]: ...

    def check(self, feeds: Mapping[str, Array]) -> None:
        """Raise InputError naming exactly which input is wrong and what the engine expects."""
        missing = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs]
        if missing or extra:
            raise InputError(
                f"{self.name}: missing inputs {missing}, unexpected inputs {extra}; "
                f"the engine takes {', '.join(s.describe() for s in self.inputs.values())}"
            )
        for name, spec in self.inputs.items():
            dtype, shape = self.backend.meta(feeds[name])
            if dtype != spec.dtype:
                raise InputError(f"{self.name}: input {name!r} is {dtype.name}, expected {spec.describe()}")
            if len(shape) != len(spec.shape) or any(
                isinstance(want, int) and got != want for got, want in zip(shape, spec.shape)
            ):
                raise InputError(f"{self.name}: input {name!r} has shape {tuple(shape)}, expected {spec.describe()}")


@dataclass(frozen=True)
class ControlFeeds:
    """One run's ControlNet inputs, one entry per exported net (None where the net does not run).

    ``images``: ``controlnet_cond`` on the device, uint8 [rows, H, W, 3]; ``scales``: [steps, nets, rows, R]
    float32, each step's ``conditioning_scale`` rows (runtime/controlnet.py)."""

    images: Sequence[Array | None]
    scales: np.ndarray
    inputs: Sequence[Mapping[str, Array]] = ()  # per net: fixed inputs beside the image (a Union net's mode)


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
    """One call's denoising steps over a UNet engine and a sampler step-graph engine (``runtime/step_loop.py``
    says how the pipeline drives one). Every implementation's ``start`` begins with :meth:`_check_start`
    (and, where it reads ``cond`` itself rather than through the UNet's own check, :meth:`_check_cond`), so
    every backend refuses the same arguments with the same message."""

    captured: bool = False  # replayed as captured device graphs
    reason: str = ""  # why not, when a backend could capture but did not

    @abc.abstractmethod
    def start(self, *, latents: Array, unet_in: Array, cond: Mapping[str, Array],
              timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray, guidance: Array | None = None,
              x0_prev: Array | None = None, noise: np.ndarray | None = None,
              step_inputs: Mapping[str, Array] | None = None, control: ControlFeeds | None = None,
              full: Sequence[bool] | np.ndarray | None = None, threshold: float | None = None,
              cond_steps: Sequence[tuple[int, Mapping[str, Array]]] | None = None) -> None:
        """Set up a run of ``len(timesteps)`` steps. ``coeffs`` is the sampler table [steps, columns];
        ``noise`` the fresh noise of every step [steps, *latents.shape] (ancestral samplers) or None;
        ``step_inputs`` the step graph's further inputs, the same every step (an inpainting variant's);
        ``control`` the ControlNets' images and scale table (a loop made with ``controlnets``); ``full`` a
        boolean per step, False where the cheap step runs (a loop made with ``shallow``; None: every step
        full); ``threshold`` (first-block caching): a step marked False runs the full denoiser after all where
        the cheap step's ``change`` exceeds it (a loop that cannot read it per step refuses one); ``cond_steps``
        (A1111's prompt editing): (k, conditioning) pairs, k increasing in 1..steps-1: from step k on the denoiser
        reads that conditioning, on the device (tensors of ``cond``'s names, shapes and dtypes; no host work)."""

    @staticmethod
    def _check_start(timesteps: Sequence[float] | np.ndarray, coeffs: np.ndarray,
                     latents_shape: Sequence[int], noise: np.ndarray | None, control: ControlFeeds | None,
                     controlnets: Sequence[object | None] = (), full: Sequence[bool] | np.ndarray | None = None,
                     shallow: object | None = None) -> int:
        """The number of steps, after refusing a ``coeffs`` table without one row per timestep, ``noise`` not
        shaped [steps, *latents.shape], ``control`` that does not match the loop's ``controlnets`` and a ``full``
        plan the loop cannot run."""
        n, cf_shape = len(timesteps), np.shape(coeffs)
        if n < 1 or len(cf_shape) != 2 or cf_shape[0] != n:
            raise InputError(f"coeffs must be [steps, columns] with one row per timestep ({n}), "
                             f"got {list(cf_shape)}")
        if noise is not None and np.shape(noise) != (n, *latents_shape):
            raise InputError(f"noise must be [steps, *latents.shape] = {[n, *latents_shape]}, "
                             f"got {list(np.shape(noise))}")
        check_control(controlnets, control, n)
        check_full(full, n, shallow is not None)
        return n

    @staticmethod
    def _check_cond_steps(cond: Mapping[str, Array], cond_steps: Sequence[tuple[int, Mapping[str, Array]]] | None,
                          n: int, meta: Callable[[Array], tuple[np.dtype[Any], tuple[int, ...]]]
                          ) -> dict[int, Mapping[str, Array]]:
        """``cond_steps`` as {step: conditioning}, after refusing steps outside 1..n-1 or not increasing, and a
        conditioning whose names, dtypes or shapes are not ``cond``'s."""
        out: dict[int, Mapping[str, Array]] = {}
        last = 0
        for k, c in cond_steps or ():
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not last < k < n:
                raise InputError(f"cond_steps' steps must increase within 1..{n - 1}, got {k!r} after {last}")
            if set(c) != set(cond):
                raise InputError(f"the conditioning from step {k} holds {sorted(c)}, not {sorted(cond)}")
            for name, v in c.items():
                if meta(v) != meta(cond[name]):
                    raise InputError(f"the conditioning from step {k}: {name} is {meta(v)}, not {meta(cond[name])} "
                                     "(every segment is encoded alike: as many chunks, the same dtype)")
            out[int(k)] = c
            last = int(k)
        return out

    @staticmethod
    def _check_cond(unet_inputs: Mapping[str, object], cond: Mapping[str, object]) -> None:
        """Refuse ``cond`` unless it holds every UNet input but ``sample``, ``timestep`` and the ControlNet
        residuals (the loop feeds those)."""
        takes = {n for n in unet_inputs if not n.startswith("controlnet_")}
        if set(cond) != takes - {"sample", "timestep"}:
            raise InputError(f"unet takes {sorted(takes)}; cond must hold all but sample and timestep, "
                             f"got {sorted(cond)}")

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

    @property
    def ran_full(self) -> list[bool]:
        """Which of the steps run since ``start`` ran the full denoiser (rather than a feature cache's cheap
        step)."""
        raise NotImplementedError(f"{type(self).__name__} does not say which steps ran the full denoiser")

    def cheap_note(self) -> str:
        """With ControlNets and cheap steps: what the nets ran on them in the last call (``"; ..."``), else ""."""
        return ""

    def describe(self) -> str:
        """How the loop ran, for ``Result.loop``."""
        if self.captured:
            return "captured CUDA graphs"
        return f"engines run directly ({self.reason})" if self.reason else "engines run step by step"

    def close(self) -> None:
        """Release the loop's device buffers and captured graphs (idempotent)."""


def check_full(full: Sequence[bool] | np.ndarray | None, steps: int, shallow: bool) -> list[bool]:
    """A loop's per-step plan (True: the full UNet runs) as a list, after refusing one without a boolean per step,
    one whose first step is not full (nothing to reuse yet) and shallow steps in a loop made without ``shallow``."""
    if full is None:
        return [True] * steps
    plan = np.asarray(full)
    if plan.shape != (steps,) or plan.dtype != np.bool_:
        raise InputError(f"full must hold one boolean per step ({steps}), got {plan.dtype} {list(plan.shape)}")
    if not plan[0]:
        raise InputError("the first step must run the full UNet: a shallow step reuses the deep feature of an "
                         "earlier full step")
    if not shallow and not plan.all():
        raise InputError("this loop was made without a shallow engine: its steps all run the full UNet "
                         "(make it with step_loop(..., shallow=engine))")
    return [bool(v) for v in plan]


class Clock:
    """Marks on the host clock (``time.perf_counter``), the device synchronized at each mark (exact for CPU
    backends). With ``others``, theirs too (two models on two devices, timed as one call). A GPU backend's
    clock may record device events on its stream instead and synchronize once, when the times are read
    (``kind`` says which clock a figure came from)."""

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
