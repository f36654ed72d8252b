"""The registry of model families: the manifest's ``family`` (and ``refiner``) -> the family object.

Adding a family: a module here that makes its ``Family``, one line in ``_FAMILIES`` below (or in
``_REFINERS`` for an expert that only continues another family's latents), and its presets in
``export/presets.py``. See docs/families.md. A family the runtime cannot serve yet goes in ``_PREVIEWS``:
``family_named`` finds it (export-side work can ask it), but it is not a manifest's ``family`` value (none is
there now).
"""

from __future__ import annotations

from typing import Protocol

from ..errors import ArtifactError
from .base import Family, check_score
from .flux import FLUX
from .sd import SD1, SD2
from .sd3 import SD3
from .sdxl import SDXL
from .sdxl_refiner import AESTHETIC_DEFAULTS, SDXL_REFINER

_FAMILIES: dict[str, Family] = {f.key: f for f in (SD1, SD2, SDXL, SD3, FLUX)}
_REFINERS: dict[str, Family] = {SDXL_REFINER.key: SDXL_REFINER}
_PREVIEWS: dict[str, Family] = {}

FAMILY_KEYS = tuple(_FAMILIES)  # the values a manifest's "family" may take


class HasFamily(Protocol):
    @property
    def family(self) -> str: ...
    @property
    def refiner(self) -> bool: ...


def family_named(key: str, refiner: bool = False) -> Family:
    """The family of a manifest's ``family`` value (its refiner variant where ``refiner``)."""
    table = _REFINERS if refiner else {**_FAMILIES, **_PREVIEWS}
    if key not in table:
        what = "refiner family" if refiner else "family"
        expected = tuple(_REFINERS) if refiner else FAMILY_KEYS  # previews are no manifest's value yet
        raise ArtifactError(f"unknown model {what} {key!r}; expected one of {expected}")
    return table[key]


def has_refiner(key: str) -> bool:
    """The family has a refiner variant (an expert that continues its latents)."""
    return key in _REFINERS


def family_of(thing: HasFamily) -> Family:
    """The family of a manifest or preset (anything with ``family`` and ``refiner``)."""
    return family_named(thing.family, thing.refiner)


__all__ = ["AESTHETIC_DEFAULTS", "FAMILY_KEYS", "Family", "check_score", "family_named", "family_of", "has_refiner"]
