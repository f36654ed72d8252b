"""ControlNet single files in the original ``control_model.*`` layout (A1111's), converted offline."""

from __future__ import annotations

from pathlib import Path

from sdrt.runtime.errors import InputError

from .controlnet_loading import LoadedControlNet


def load_controlnet_single_file(path: Path, *, allow_pickle: bool = False) -> LoadedControlNet:
    raise InputError(f"{path.name}: ControlNet single files are not supported yet; pass a diffusers ControlNet folder")
