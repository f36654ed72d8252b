"""One lookup over the shipped preset tables: ``presets.PRESETS`` (UNet models) and
``sd3_presets.SD3_PRESETS`` (SD 3 / 3.5's MMDiT models), so that a caller naming a preset (``sdrt bench
--preset``) loads and exports it without knowing which table holds it. The tables stay apart (their presets
describe different parts); which one holds a name decides the loader and the exporter, never the family's
name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError


def _tables() -> tuple[dict[str, Any], dict[str, Any]]:
    from .presets import PRESETS
    from .sd3_presets import SD3_PRESETS

    return PRESETS, SD3_PRESETS


def preset_names() -> list[str]:
    """Every shipped preset's name, the UNet table's first."""
    unet, sd3 = _tables()
    return [*unet, *sd3]


def is_sd3_preset(name: str) -> bool:
    """``name`` is in the SD3 table (an MMDiT model loaded by ``sd3_export.load_sd3``)."""
    return name in _tables()[1]


def get_any_preset(name: str) -> Any:
    """The preset named ``name`` from whichever table holds it (a ``Preset`` or an ``Sd3Preset``); an unknown
    name is an InputError listing every preset."""
    for table in _tables():
        if name in table:
            return table[name]
    raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


def load_random(name: str, seed: int = 0) -> Any:
    """The preset's model with seeded synthetic weights: a ``LoadedModel`` or a ``LoadedSd3``."""
    get_any_preset(name)
    if is_sd3_preset(name):
        from .sd3_export import load_sd3

        return load_sd3(random_preset=name, seed=seed)
    from .loading import load_model

    return load_model(random_preset=name, seed=seed)


def export_loaded(model: Any, out: str | Path, *, fp16: bool, controlnets: list[Any] | None = None,
                  deepcache: bool = False, progress: Callable[[str], None] = lambda msg: None) -> Any:
    """Export a model ``load_random`` (or a loader) returned with its own exporter; returns the manifest. An
    SD3 model takes no ControlNet (sdrt has none for the family yet); ``deepcache`` (``sdrt export
    --feature-cache``) adds the family's feature-caching step (DeepCache's shallow path for a UNet, the first-block
    cached step for SD3)."""
    from .sd3_export import LoadedSd3, export_sd3

    if isinstance(model, LoadedSd3):
        if controlnets:
            raise InputError(f"{model.preset.name} is an SD 3 / 3.5 model: sdrt has no ControlNet for it yet; "
                             "export it without one")
        return export_sd3(model, out, fp16=fp16, block_cache=deepcache, progress=progress)
    from .exporter import export_model

    return export_model(model, out, fp16=fp16, progress=progress, controlnets=controlnets or [], deepcache=deepcache)
