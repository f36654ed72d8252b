"""The table of ``sdrt export``'s exporters (export/cli_exporter.py): which one claims a source, the
family-specific flags they declare (registered on the command from here), and the one refusal of a
family-specific flag that the claiming exporter does not take, built from the table."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path

from sdrt.runtime.errors import InputError

from .cli_exporter import Exporter
from .flux_cli import FLUX_EXPORTER
from .sd3_cli import SD3_EXPORTER
from .unet_cli import UNET_EXPORTER

EXPORTERS: tuple[Exporter, ...] = (SD3_EXPORTER, FLUX_EXPORTER, UNET_EXPORTER)  # asked in order; the last claims all


def claiming(model: str | Path | None, random_preset: str | None) -> Exporter:
    """The exporter whose source ``model`` (a path) or ``random_preset`` is."""
    return next(e for e in EXPORTERS if e.claims(model, random_preset))


def family_flags() -> tuple[str, ...]:
    """The family-specific flags: those some exporters take and others refuse, in the table's order."""
    return tuple(dict.fromkeys(f for e in EXPORTERS for f in e.flags))


def register_family_flags(p: argparse.ArgumentParser) -> None:
    """Add the exporters' family-specific flags to ``p``, each once, in the table's order (a flag two exporters
    declare differently: argparse's conflicting-option error)."""
    for use in dict.fromkeys(u for e in EXPORTERS for u in e.takes):
        use.register(p)


def option_flags() -> tuple[str, ...]:
    """The flags ``check_flags`` judges: the family-specific ones and those an exporter takes of a single file
    only (``--arch``, which every exporter takes)."""
    return tuple(dict.fromkeys((*family_flags(), *(f for e in EXPORTERS for f in sorted(e.file_only)))))


def check_flags(exporter: Exporter, given: Collection[str], random: bool) -> None:
    """Refuse, before anything loads, the ``given`` flags that ``exporter`` does not take (naming, for each,
    what it is for, which models take it and what this model is), and its single-file flags with ``--random``."""
    untaken = [f for f in family_flags() if f in given and f not in exporter.flags]
    if untaken:
        own = f", which takes {', '.join(exporter.flags)}" if exporter.flags else ""
        if len(untaken) == 1:
            raise InputError(f"{_goes_with(untaken[0])}; this model is not {_takers(untaken[0], 'name')} but "
                             f"{exporter.name}{own}")
        raise InputError("\n".join([*map(_goes_with, untaken), f"this model is none of those but {exporter.name}{own}"]))
    file_only = [f for f in option_flags() if f in given and f in exporter.file_only]
    if random and file_only:
        raise InputError(f"{', '.join(file_only)} go{'es' if len(file_only) == 1 else ''} with "
                         f"{exporter.single_file}, not --random (pick the architecture with --random PRESET)")


def _takers(flag: str, attr: str) -> str:
    """The exporters that take ``flag``: their names (``attr`` "name") or what it goes with of each ("where")."""
    return " or ".join(e.name if attr == "name" else e.where(flag) for e in EXPORTERS if flag in e.flags)


def _goes_with(flag: str) -> str:
    """``flag``, which models take it and what for."""
    what = next(u.what for e in EXPORTERS for u in e.takes if u.flag == flag)
    return f"{flag} goes with {_takers(flag, 'where')}, {what}"
