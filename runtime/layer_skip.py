"""Skip-layer guidance (SLG; SD 3.5 Medium's, diffusers' ``skip_guidance_layers``): a request's settings, its window
of steps, and the denoiser that runs it.

diffusers' ``StableDiffusion3Pipeline``, on the steps ``i`` (of ``num_inference_steps`` N) with
``N * start < i < N * stop``, runs the transformer a third time, on the conditional rows with some of its blocks
skipped (``skip_layers``), and adds ``(cond - skipped) * scale`` to the guided prediction
``uncond + g * (cond - uncond)``. An export made with ``sdrt export --skip-layers 7,8,9`` has that pass as its
own graph (``unet_skip``, beside the transformer's, reading the transformer's weights file): it takes the
transformer's inputs over the guided batch (negatives first) and the transformer's prediction on it, and returns
the prediction with the conditional rows moved by ``skip_scale * (cond - skipped)``, ``skip_scale`` = scale / g,
so that the step graph's guidance ``uncond + g * (cond' - uncond)`` adds diffusers' term and nothing else (the
step graph and the loops are the ones of a call without SLG).

:class:`SkipGuided` is that denoiser as one ``Engine``: the transformer, then on the window's steps the skip graph
over its inputs and prediction. The loop calls it once per step, as it calls the transformer (SLG is refused
beside feature caching, whose cheap steps would not call it); ``arm`` gives it each run's window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import Array, Engine
from .errors import InputError
from .step_loop import STEP_UNET_INPUT, UNET_OUTPUT

SKIP_UNET = "unet_skip"  # the export's component of the skip pass (in the transformer's folder)
SKIP_SCALE = "skip_scale"  # its input: the SLG scale over the guidance scale, float32 [1]
SKIP_PREDICTION = STEP_UNET_INPUT  # its input: the transformer's prediction over the guided batch
DEFAULT_START, DEFAULT_STOP = 0.01, 0.2  # diffusers' skip_layer_guidance_start / _stop
SCALE_MAX = 100.0  # as guidance_scale's: far above any useful value (diffusers' default is 2.8)
EXPORT_HINT = "re-export the model with `sdrt export ... --skip-layers 7,8,9` (SD 3.5 Medium's layers)"


@dataclass(frozen=True)
class SkipGuidance:
    """A call's skip-layer guidance: ``scale`` (diffusers' ``skip_layer_guidance_scale``), ``start`` and ``stop``
    (fractions of the steps: diffusers' ``skip_layer_guidance_start`` / ``_stop``)."""

    scale: float
    start: float = DEFAULT_START
    stop: float = DEFAULT_STOP

    def steps(self, total: int, lo: int, hi: int) -> list[bool]:
        """Which of the plan's rows ``lo..hi-1`` run the skip pass, of ``total`` steps: ``total * start < i <
        total * stop``, as diffusers compares (both ends excluded)."""
        return [total * self.start < i < total * self.stop for i in range(lo, hi)]

    def skip_scale(self, guidance_scale: float) -> np.ndarray:
        """The skip graph's ``skip_scale``: the SLG scale over the guidance scale (guided: above 1)."""
        return np.array([self.scale / guidance_scale], np.float32)


def skip_guidance(scale: Any, start: Any = None, stop: Any = None) -> SkipGuidance | None:
    """A request's SLG settings, checked (None: no SLG). ``start`` / ``stop`` default to diffusers' 0.01 / 0.2 and
    apply only with a ``scale``."""
    if scale is None:
        given = [n for n, v in (("skip_layer_guidance_start", start), ("skip_layer_guidance_stop", stop))
                 if v is not None]
        if given:
            raise InputError(f"{' and '.join(given)} set the window of skip-layer guidance, which runs with a "
                             "skip_layer_guidance_scale (2.8 is diffusers' default): give one, or leave them out",
                             cli="--slg-start and --slg-stop set the window of skip-layer guidance: give --slg-scale "
                                 "(2.8 is diffusers' default), or leave them out")
        return None
    if not _number(scale) or not math.isfinite(scale) or not 0.0 < scale <= SCALE_MAX:
        raise InputError(f"skip_layer_guidance_scale must be a number above 0 and at most {SCALE_MAX:g} (diffusers' "
                         f"default is 2.8), got {scale!r}; leave it out for no skip-layer guidance",
                         cli=f"--slg-scale must be a number above 0 and at most {SCALE_MAX:g} (2.8 is diffusers' "
                             f"default), got {scale!r}")
    lo = DEFAULT_START if start is None else start
    hi = DEFAULT_STOP if stop is None else stop
    for label, v in (("start", lo), ("stop", hi)):
        if not _number(v) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise InputError(f"skip_layer_guidance_{label} must be a fraction of the steps from 0 to 1 (diffusers' "
                             f"defaults: start 0.01, stop 0.2), got {v!r}",
                             cli=f"--slg-{label} must be a fraction of the steps from 0 to 1 (defaults: start 0.01, "
                                 f"stop 0.2), got {v!r}")
    if not lo < hi:
        raise InputError(f"skip_layer_guidance_start ({lo!r}) must be below skip_layer_guidance_stop ({hi!r}): the "
                         "window of steps that run the skip pass",
                         cli=f"--slg-start ({lo!r}) must be below --slg-stop ({hi!r})")
    return SkipGuidance(float(scale), float(lo), float(hi))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class SkipGuided(Engine):
    """The denoiser of a call with SLG: ``unet`` (the transformer), then, on the steps ``arm`` marks, ``skip`` (the
    export's ``unet_skip``) over the transformer's inputs and prediction. Its inputs and outputs are the
    transformer's, so any step-by-step loop runs it in the transformer's place."""

    def __init__(self, unet: Engine, skip: Engine) -> None:
        missing = [n for n in skip.inputs if n not in unet.inputs and n not in (SKIP_PREDICTION, SKIP_SCALE)]
        if missing or UNET_OUTPUT not in skip.outputs:
            raise InputError(f"{skip.name} takes {missing} besides the transformer's inputs, or returns no "
                             f"{UNET_OUTPUT}: it was exported for another transformer; {EXPORT_HINT}")
        self.name = f"{unet.name}+{skip.name}"
        self.backend = unet.backend
        self.inputs = unet.inputs
        self.outputs = unet.outputs
        self.unet, self.skip = unet, skip
        self._on: list[bool] = []
        self._scale: Array | None = None
        self._i = 0

    def arm(self, on: Sequence[bool], scale: Array) -> None:
        """The next run's steps: ``on[i]``, whether its ``i``-th denoiser call runs the skip pass; ``scale``: the
        device's ``skip_scale``."""
        self._on, self._scale, self._i = list(on), scale, 0

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        i = self._i
        if i >= len(self._on):
            raise InputError(f"{self.name} ran {i + 1} steps but was armed for {len(self._on)}: arm() it per run")
        self._i += 1
        out = self.unet.run(feeds)  # the feeds were checked against the transformer's inputs (Engine.__call__)
        if not self._on[i]:
            return out
        extra = {SKIP_PREDICTION: out[UNET_OUTPUT], SKIP_SCALE: self._scale}
        guided = self.skip({**{k: feeds[k] for k in self.skip.inputs if k in feeds}, **extra})
        return {**out, UNET_OUTPUT: guided[UNET_OUTPUT]}
