"""Feature caching (DeepCache): which denoising steps run the full UNet and which reuse its deep feature.

Consecutive steps compute nearly the same deep features. DeepCache (Ma et al., 2023; ``horseee/DeepCache``)
runs the full UNet on some steps and, on the others, only its shallow path: ``conv_in``, the time embedding
and the last layer of the last up block, over the feature that layer read at the last full step (the deep
feature) and the fresh ``conv_in`` output. An export made with ``sdrt export --deepcache`` has the shallow
path as its own graph (``unet_shallow``) and a UNet that also returns the deep feature.

Which steps are full is fixed before the loop starts (so a device loop needs no host decision per step and
each kind of step can be captured once): a :class:`CachePolicy` gives a boolean per step. Two schedules, as
DeepCache's own pipelines:

- ``uniform``: every ``interval``-th step is full (0, N, 2N, ...), DeepCache's ``DeepCacheSDHelper``;
- ``nonuniform``: ``ceil(steps / interval)`` full steps, denser around step ``center`` (DeepCache's
  ``sample_from_quad_center`` with ``pow`` and ``center``, its defaults 1.4 and 15).

The first step of every loop is full (there is no feature to reuse before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

CACHE_KINDS = ("deepcache",)
SCHEDULES = ("uniform", "nonuniform")
INTERVAL_MAX = 50  # past this every step after the first is shallow in any plan worth running
DEFAULT_INTERVAL = 3  # DeepCache's usual setting for SD 1.5 (2.3x on 50 PLMS steps in its paper)
SHALLOW_UNET = "unet_shallow"  # the export's component of the shallow path
DEEP_FEATURE = "deep_feature"  # the UNet's extra output, and the shallow graph's extra input
EXPORT_HINT = "re-export the model with `sdrt export ... --deepcache`"


@dataclass(frozen=True)
class CachePolicy:
    """A feature-caching policy: ``kind`` (``deepcache``), ``interval`` (1 = every step full, caching off in
    effect), ``schedule`` (``uniform`` or ``nonuniform``) and the non-uniform schedule's ``pow`` and
    ``center``."""

    kind: str = "deepcache"
    interval: int = DEFAULT_INTERVAL
    schedule: str = "uniform"
    pow: float = 1.4
    center: int = 15

    def full_steps(self, steps: int) -> np.ndarray:
        """A boolean per step of a loop of ``steps`` steps: True where the full UNet runs."""
        full = np.zeros(steps, bool)
        if self.interval == 1:
            full[:] = True
        elif self.schedule == "uniform":
            full[:: self.interval] = True
        else:
            full[nonuniform_steps(steps, math.ceil(steps / self.interval), self.center, self.pow)] = True
        full[0] = True
        return full

    def describe(self, full: np.ndarray) -> str:
        """How the loop ran, for ``Result.loop``."""
        how = f"every {self.interval}" if self.schedule == "uniform" else f"{self.schedule}, interval {self.interval}"
        return (f"feature cache {self.kind} ({how}): {int(np.sum(full))} of {len(full)} steps ran the full UNet, "
                "the others its shallow path")


def nonuniform_steps(steps: int, count: int, center: int, pow: float) -> list[int]:
    """DeepCache's non-uniform full steps (``sample_from_quad_center``): ``count`` indices from 0, spaced as
    ``x ** pow`` over a line through ``center``, lowering ``pow`` by 0.02 until the indices are distinct.
    DeepCache evaluates the negative side in complex arithmetic and keeps the real part; so does this."""
    p = float(pow)
    while p > 1:
        x = np.linspace(complex(-center) ** (1 / p), complex(steps - center) ** (1 / p), count + 1)
        picked = np.unique(np.real(x ** p).astype(np.int32))[1:-1]
        indices = [0] + [int(v) + center for v in picked]
        if len(indices) == count:
            return [i for i in indices if 0 <= i < steps]
        p -= 0.02
    raise InputError(f"DeepCache's non-uniform schedule has no {count} distinct full steps in {steps} steps around "
                     f"step {center}: use cache_schedule='uniform', or a larger cache_interval")


def cache_policy(cache: Any, interval: Any = DEFAULT_INTERVAL, schedule: Any = "uniform") -> CachePolicy | None:
    """The request's policy (None: caching off), checked: ``cache`` None or one of CACHE_KINDS, ``interval`` an
    integer 1..INTERVAL_MAX, ``schedule`` one of SCHEDULES."""
    if isinstance(cache, CachePolicy):
        return cache
    if cache is None:
        return None
    if cache not in CACHE_KINDS:
        raise InputError(f"cache {cache!r} is not one of {', '.join(CACHE_KINDS)} (or None: no caching)",
                         cli=f"--cache {cache!r} is not one of {', '.join(CACHE_KINDS)}")
    if not isinstance(interval, (int, np.integer)) or isinstance(interval, bool) or not 1 <= interval <= INTERVAL_MAX:
        raise InputError(f"cache_interval must be an integer from 1 to {INTERVAL_MAX} (DeepCache's usual: 3 to 5), "
                         f"got {interval!r}",
                         cli=f"--cache-interval must be an integer from 1 to {INTERVAL_MAX}, got {interval!r}")
    if schedule not in SCHEDULES:
        raise InputError(f"cache_schedule {schedule!r} is not one of {', '.join(SCHEDULES)}",
                         cli=f"--cache-schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    return CachePolicy(str(cache), int(interval), str(schedule))
