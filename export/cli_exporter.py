"""The interface of one ``sdrt export`` exporter: which sources it claims, which family-specific flags it takes,
and how it runs an export from the parsed arguments (the table of them: export/exporters.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.manifest import ExportManifest

Say = Callable[[str], None]  # a line for the user (the command prints it)


@dataclass(frozen=True)
class FlagUse:
    """A family-specific ``sdrt export`` flag an exporter takes, and what for (``for its VAE as a separate
    file``, ``to leave out the T5-XXL text encoder``: the end of "FLAG goes with MODEL ...")."""

    flag: str
    what: str


# the transformer families' separate single-file parts (SD 3 / 3.5 and FLUX.1 both take them)
CLIP_L_FILE = FlagUse("--clip-l", "for its CLIP-L text encoder as a separate file (clip_l.safetensors)")
T5_FILE = FlagUse("--t5", "for its T5-XXL text encoder as a separate file (t5xxl_fp16.safetensors)")
TOKENIZERS = FlagUse("--tokenizers", "for the tokenizers of a diffusers folder of its family, needed for T5 of a "
                                     "full-size model")


@dataclass(frozen=True)
class Exporter:
    """One kind of model ``sdrt export`` writes.

    ``name``: the model in messages (``FLUX.1``); ``single_file``: its single file in messages (``a FLUX.1
    single file``), ``layout`` how to know one; ``takes``: the family-specific flags it takes (any other
    exporter's are refused for its sources); ``file_only``: the flags that go with a single file only, refused
    with ``--random``; ``claims(model, random_preset)``: the source (``--model`` path or ``--random`` preset) is
    this exporter's; ``run(args, say, progress)``: the export, checked options first, -> its manifest."""

    name: str
    single_file: str
    layout: str
    takes: tuple[FlagUse, ...]
    file_only: frozenset[str]
    claims: Callable[[str | Path | None, str | None], bool]
    run: Callable[[argparse.Namespace, Say, Say], ExportManifest]

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(u.flag for u in self.takes)

    def where(self, flag: str) -> str:
        """What ``flag`` goes with, for this exporter: its single file, or any of its models."""
        return f"{self.single_file} ({self.layout})" if flag in self.file_only else self.name
