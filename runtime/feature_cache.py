"""Feature caching: which denoising steps run the full denoiser and which reuse what it computed at an earlier one.

Consecutive steps compute nearly the same deep features. DeepCache (Ma et al., 2023; ``horseee/DeepCache``)
runs the full UNet on some steps and, on the others, only its shallow path: ``conv_in``, the time embedding
and the last layer of the last up block, over the feature that layer read at the last full step (the deep
feature) and the fresh ``conv_in`` output. An export made with ``sdrt export --deepcache`` has the shallow
path as its own graph (``unet_shallow``) and a UNet that also returns the deep feature. With ControlNets in the
export too, ``unet_control`` also returns the deep feature and the shallow path takes each net's residual of the
skip it reads (``conv_in``'s, the nets' ``down_0``): the nets run on every step, cheap ones included.

Which steps are full is fixed before the loop starts (so a device loop needs no host decision per step and
each kind of step can be captured once): a :class:`CachePolicy` gives a boolean per step. Two schedules, as
DeepCache's own pipelines:

- ``uniform``: every ``interval``-th step is full (0, N, 2N, ...), DeepCache's ``DeepCacheSDHelper``;
- ``nonuniform``: ``ceil(steps / interval)`` full steps, denser around step ``center`` (DeepCache's
  ``sample_from_quad_center`` with ``pow`` and ``center``, its defaults 1.4 and 15).

The first step of every loop is full (there is no feature to reuse before it).

Transformers (SD 3 / 3.5, FLUX.1) have first-block caching (``first-block``; diffusers'
``apply_first_block_cache``, after ParaAttention's First Block Cache): an export made with ``sdrt export --feature-cache`` has a transformer
that also returns two residuals over the image tokens, what its first block added (``head_residual``) and what
the blocks after it added (``deep_feature``), and the cached step as its own graph (``unet_shallow``):
embeddings, the first block, then the output layers over the first block's tokens plus the stored
``deep_feature``. Which steps are full: a fixed schedule as above (``interval``, ``schedule``: the loop stays on
the device, each kind of step captured once), or, with ``threshold``, diffusers' rule: every step after the
first runs the cached graph, which also returns ``change`` (the mean absolute change of the first block's
residual from the last full step's, relative to that residual's mean magnitude); where ``change`` exceeds the
threshold the full transformer runs for that step instead. The rule reads one number per step on the host (see
``docs/feature-cache.md`` for why that rather than a decision on the device), so it runs in the step-by-step
loops, not in a captured one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

CACHE_KINDS = ("deepcache", "first-block")
SCHEDULES = ("uniform", "nonuniform")
INTERVAL_MAX = 50  # past this every step after the first is shallow in any plan worth running
DEFAULT_INTERVAL = 3  # DeepCache's usual setting for SD 1.5 (2.3x on 50 PLMS steps in its paper)
THRESHOLD_MAX = 1.0  # a relative change; diffusers' default is 0.05, ParaAttention suggests 0.08 to 0.12 for FLUX
SHALLOW_UNET = "unet_shallow"  # the export's component of the cheap step (DeepCache's shallow path, a cached step)
DEEP_FEATURE = "deep_feature"  # the denoiser's extra output that the cheap step reuses (one of its inputs)
HEAD_RESIDUAL = "head_residual"  # first-block caching: what the first block added at the last full step
# first-block caching of an editing model (FLUX.1 Kontext): what the first block added to the reference image's
# tokens, which the blocks see joined to the image's (on the reference's own patch grid)
HEAD_RESIDUAL_REFERENCE = "head_residual_reference"
CHANGE = "change"  # first-block caching: the cached step's relative change of the first block's residual
SHALLOW_NET_SUFFIX = "_shallow"  # controlnet_j_shallow: net j's first residual alone, run on DeepCache's cheap steps


def shallow_controlnet(net: str) -> str:
    """The component beside ControlNet ``net`` (``controlnet_j``) that computes only the residual DeepCache's shallow
    path reads (``down_0``: the stem and conditioning embedding, no timestep or text); an export made with
    ControlNets and ``--feature-cache`` has one per net, an older one none."""
    return net + SHALLOW_NET_SUFFIX


EXPORT_HINT = "re-export the model with `sdrt export ... --feature-cache`"
# what the full model and the cheap step of each kind are called in Result.loop
_WORDS = {"deepcache": ("UNet", "its shallow path"), "first-block": ("transformer", "its first block")}


@dataclass(frozen=True)
class CachePolicy:
    """A feature-caching policy: ``kind`` (``deepcache`` or ``first-block``), ``interval`` (1 = every step full,
    caching off in effect), ``schedule`` (``uniform`` or ``nonuniform``) and the non-uniform schedule's ``pow``
    and ``center``; ``threshold`` (``first-block`` only): decide per step by diffusers' rule instead of a
    schedule."""

    kind: str = "deepcache"
    interval: int = DEFAULT_INTERVAL
    schedule: str = "uniform"
    pow: float = 1.4
    center: int = 15
    threshold: float | None = None

    def full_steps(self, steps: int) -> np.ndarray:
        """A boolean per step of a loop of ``steps`` steps: True where the full model runs (with a ``threshold``:
        the first step; the loop decides each of the others)."""
        full = np.zeros(steps, bool)
        if self.threshold is not None:
            pass
        elif self.interval == 1:
            full[:] = True
        elif self.schedule == "uniform":
            full[:: self.interval] = True
        else:
            full[nonuniform_steps(steps, math.ceil(steps / self.interval), self.center, self.pow)] = True
        full[0] = True
        return full

    def describe(self, full: Sequence[bool] | np.ndarray) -> str:
        """How the loop ran (``full``: which steps ran the full model), for ``Result.loop``."""
        if self.threshold is not None:
            how = f"threshold {self.threshold:g}"
        else:
            how = f"every {self.interval}" if self.schedule == "uniform" else f"{self.schedule}, interval {self.interval}"
        model, cheap = _WORDS[self.kind]
        return (f"feature cache {self.kind} ({how}): {int(np.sum(full))} of {len(full)} steps ran the full {model}, "
                f"the others {cheap}")


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


def cache_policy(cache: Any, interval: Any = DEFAULT_INTERVAL, schedule: Any = "uniform",
                 threshold: Any = None) -> CachePolicy | None:
    """The request's policy (None: caching off), checked: ``cache`` None or one of CACHE_KINDS, ``interval`` an
    integer 1..INTERVAL_MAX, ``schedule`` one of SCHEDULES, ``threshold`` None or (``first-block`` only) a number
    in (0, THRESHOLD_MAX]."""
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
    if threshold is not None:
        if cache != "first-block":
            raise InputError(f"cache_threshold goes with cache='first-block' ({cache} caching follows a schedule: "
                             "cache_interval and cache_schedule)",
                             cli=f"--cache-threshold goes with --cache first-block ({cache} follows a schedule: "
                                 "--cache-interval)")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
                or not math.isfinite(threshold) or not 0 < threshold <= THRESHOLD_MAX:
            raise InputError(f"cache_threshold must be a number above 0 and at most {THRESHOLD_MAX:g} (diffusers' "
                             f"default 0.05), got {threshold!r}",
                             cli=f"--cache-threshold must be above 0 and at most {THRESHOLD_MAX:g} (diffusers' "
                                 f"default 0.05), got {threshold!r}")
        return CachePolicy(str(cache), int(interval), str(schedule), threshold=float(threshold))
    return CachePolicy(str(cache), int(interval), str(schedule))
