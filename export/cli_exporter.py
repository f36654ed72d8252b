"""The interface of one ``sdrt export`` exporter: which sources it claims, which family-specific flags it takes
(each declared whole: its argparse registration and what it is for), and how it runs an export from the parsed
arguments (the table of them: export/exporters.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.runtime.manifest import ExportManifest

Say = Callable[[str], None]  # a line for the user (the command prints it)
_ARGPARSE_DEFAULT: Any = object()  # a FlagUse whose default argparse picks


@dataclass(frozen=True)
class FlagUse:
    """A family-specific ``sdrt export`` flag an exporter takes: what for (``for its VAE as a separate file``,
    ``to leave out the T5-XXL text encoder``: the end of "FLAG goes with MODEL ..."), and its registration
    (``help``, and argparse's ``metavar``, ``type``, ``action``, ``default`` where given). A flag several
    exporters take is one FlagUse they share."""

    flag: str
    what: str
    help: str
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    action: str | None = None  # "store_true": an on/off flag
    default: Any = _ARGPARSE_DEFAULT  # unless given, argparse's own (None; False for an on/off flag)

    def register(self, p: argparse.ArgumentParser) -> None:
        """Add the flag to ``p`` (the command's parser)."""
        given: dict[str, Any] = {"metavar": self.metavar, "type": self.type, "action": self.action}
        options = {k: v for k, v in given.items() if v is not None}
        if self.default is not _ARGPARSE_DEFAULT:
            options["default"] = self.default
        p.add_argument(self.flag, help=self.help, **options)


# the transformer families' separate single-file parts (SD 3 / 3.5 and FLUX.1 both take them)
CLIP_L_FILE = FlagUse("--clip-l", "for its CLIP-L text encoder as a separate file (clip_l.safetensors)",
                      "SD 3 / 3.5 or FLUX.1 single file: its CLIP-L text encoder as a separate file (Stability's "
                      "text_encoders/clip_l.safetensors; for FLUX.1, clip_l.safetensors), for a file that does "
                      "not bundle it", metavar="FILE")
T5_FILE = FlagUse("--t5", "for its T5-XXL text encoder as a separate file (t5xxl_fp16.safetensors)",
                  "SD 3 / 3.5 or FLUX.1 single file: its T5-XXL text encoder (t5xxl_fp16.safetensors)",
                  metavar="FILE")
BF16 = FlagUse("--bf16", "to export its text encoders and transformer in bf16",
               "SD 3 / 3.5 and FLUX.1: export the text encoders (T5 too) and the transformer's graphs in bf16, the "
               "VAE in fp32: half the size of fp32, fp32's range (FLUX.1 overflows fp16, and so does T5); runs on "
               "openvino, ort-cuda and tensorrt, not ort-cpu (no bf16 kernels)", action="store_true")
TOKENIZERS = FlagUse("--tokenizers", "for the tokenizers of a diffusers folder of its family, needed for T5 of a "
                                     "full-size model",
                     "SD 3 / 3.5 or FLUX.1 single file: a folder with the tokenizers of a diffusers folder of "
                     "the family (tokenizer/, tokenizer_2/, and tokenizer_3/ for SD 3); needed for T5 of a "
                     "full-size model", metavar="DIR")


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
