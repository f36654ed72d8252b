"""One small engine interface: named inputs and outputs living on a device.

A ``Backend`` owns the device (host memory, a CUDA device) and moves arrays to and from it; an
``Engine`` is one loaded graph that checks every input's name, dtype and shape against its own
description before running. The pipeline talks only to these two; each backend implements them once.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .manifest import Component

if TYPE_CHECKING:
    from .step_loop import Clock, StepLoop

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
    arrays is declared here with a base implementation: ``check_request`` (can the loaded engines serve
    this batch and size?), ``step_loop`` (the denoising loop over a UNet and a step-graph engine),
    ``clock`` (how stages and steps are timed), ``make_current`` (bind the device to the calling
    thread) and ``clone`` / ``shares_memory_with`` (hand device arrays between stages and backends
    without the host).
    """

    name: str

    @abc.abstractmethod
    def load(self, path: str | bytes, name: str) -> Engine:
        """Load an engine from a file, or from serialized bytes."""

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

    def step_loop(self, unet: Engine, step: Engine, controlnets: Sequence[Engine | None] = ()) -> StepLoop:
        """The denoising loop over ``unet`` and the sampler ``step`` graph; with ``controlnets`` (one entry
        per exported net, None where it does not run) each step runs them first and ``unet`` is the
        export's ``unet_control``. Base: step by step."""
        from .step_loop import PlainStepLoop

        return PlainStepLoop(self, unet, step, controlnets)

    def clock(self) -> Clock:
        """A clock for stage and step times. Base: the host clock, synchronizing at each mark."""
        from .step_loop import Clock

        return Clock(self)

    def make_current(self) -> None:
        """Make this backend's device current in the calling thread (a no-op on the host)."""

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
