"""Summary statistics of repeated timings, and ratios that tolerate missing figures.

Percentiles interpolate linearly between the two nearest ranks (numpy's default, Hyndman-Fan type 7),
so a p50 of an even count is the mean of the middle two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """p50, p90, min, max, mean and count of repeated measurements (milliseconds in, milliseconds out)."""
    xs = [float(v) for v in values]
    return {
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "min": min(xs),
        "max": max(xs),
        "mean": sum(xs) / len(xs),
        "n": len(xs),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)
