"""Seeded noise: one generator per batch or per image, so image k of a batch equals its seed generated alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np

from .errors import InputError
from .request import is_int


def seeds(seed: int | Sequence[int] | None) -> int | list[int] | None:
    """The seed(s) as recorded in Latents and Result: an int, a list of ints, or None."""
    if seed is None:
        return None
    return int(cast(int, seed)) if is_int(seed) else [int(s) for s in cast(Sequence[int], seed)]


def generators(seed: int | Sequence[int] | None, b: int) -> list[np.random.Generator]:
    """One generator for the batch (an int or no seed), or one per image (a list of seeds)."""
    if seed is None or is_int(seed):
        return [np.random.default_rng(None if seed is None else int(seed))]  # type: ignore[arg-type]
    seeds_ = list(seed)  # type: ignore[arg-type]
    if len(seeds_) != b:
        raise InputError(f"{len(seeds_)} seeds for {b} images; give one seed, or one per image")
    return [np.random.default_rng(int(s)) for s in seeds_]


def draw(gens: list[np.random.Generator], shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """Standard normal noise of ``shape``; with one generator per image, image k's slice along ``axis``
    is what its generator alone would draw for a batch of one."""
    if len(gens) == 1:
        return gens[0].standard_normal(shape, dtype=np.float32)
    one = (*shape[:axis], 1, *shape[axis + 1:])
    return np.concatenate([g.standard_normal(one, dtype=np.float32) for g in gens], axis=axis)
