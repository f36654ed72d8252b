"""One lookup over the shipped preset tables: ``presets.PRESETS`` (UNet models),
``sd3_presets.SD3_PRESETS`` (SD 3 / 3.5's MMDiT models) and ``flux_presets.FLUX_PRESETS`` (FLUX.1), so that a caller naming a preset (``sdrt bench
--preset``) loads and exports it without knowing which table holds it. The tables stay apart (their presets
describe different parts); which one holds a name decides the loader and the exporter, never the family's
name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError


def _tables() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from .flux_presets import FLUX_PRESETS
    from .presets import PRESETS
    from .sd3_presets import SD3_PRESETS

    return PRESETS, SD3_PRESETS, FLUX_PRESETS


def preset_names() -> list[str]:
    """Every shipped preset's name, the UNet table's first."""
    unet, sd3, flux = _tables()
    return [*unet, *sd3, *flux]


def is_sd3_preset(name: str) -> bool:
    """``name`` is in the SD3 table (an MMDiT model loaded by ``sd3_loading.load_sd3``)."""
    return name in _tables()[1]


def is_flux_preset(name: str) -> bool:
    """``name`` is in the FLUX.1 table (loaded by ``flux_loading.load_flux``)."""
    return name in _tables()[2]


def is_transformer_preset(name: str) -> bool:
    """``name``'s denoiser is a transformer (SD3's or FLUX.1's table), not a UNet: no ControlNet, inpainting
    UNet or ONNX Runtime UNet fusion applies to it."""
    return is_sd3_preset(name) or is_flux_preset(name)


def get_any_preset(name: str) -> Any:
    """The preset named ``name`` from whichever table holds it (a ``Preset`` or an ``Sd3Preset``); an unknown
    name is an InputError listing every preset."""
    for table in _tables():
        if name in table:
            return table[name]
    raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


def load_random(name: str, seed: int = 0) -> Any:
    """The preset's model with seeded synthetic weights: a ``LoadedModel``, ``LoadedSd3`` or ``LoadedFlux``."""
    get_any_preset(name)
    if is_flux_preset(name):
        from .flux_loading import load_flux

        return load_flux(random_preset=name, seed=seed)
    if is_sd3_preset(name):
        from .sd3_loading import load_sd3

        return load_sd3(random_preset=name, seed=seed)
    from .loading import load_model

    return load_model(random_preset=name, seed=seed)


def export_loaded(model: Any, out: str | Path, *, fp16: bool, controlnets: list[Any] | None = None,
                  deepcache: bool = False, without_t5: bool = False,
                  progress: Callable[[str], None] = lambda msg: None) -> Any:
    """Export a model ``load_random`` (or a loader) returned with its own exporter; returns the manifest. An
    SD3 model takes no ControlNet (sdrt has none for the family yet); ``deepcache`` (``sdrt export
    --feature-cache``) adds the family's feature-caching step (DeepCache's shallow path for a UNet, the first-block
    cached step for SD3 and FLUX.1); ``without_t5`` leaves SD 3 / 3.5's optional T5 out. A FLUX.1 model is
    exported in fp32 whatever ``fp16`` says (it overflows fp16; ``flux_export``), and takes no ControlNet yet."""
    from .flux_export import export_flux
    from .flux_loading import LoadedFlux
    from .sd3_export import export_sd3
    from .sd3_model import LoadedSd3

    if without_t5 and not isinstance(model, LoadedSd3):
        raise InputError(f"leaving T5 out (--without-t5) is for SD 3 / 3.5, whose T5 is optional; "
                         f"{model.preset.name} has no optional T5: leave the option out")
    if isinstance(model, LoadedFlux):
        if controlnets:
            raise InputError(f"{model.preset.name} is a FLUX.1 model: sdrt has no ControlNet for it yet; export it "
                             "without one")
        return export_flux(model, out, fp16=False, block_cache=deepcache, progress=progress)

    if isinstance(model, LoadedSd3):
        if controlnets:
            raise InputError(f"{model.preset.name} is an SD 3 / 3.5 model: sdrt has no ControlNet for it yet; "
                             "export it without one")
        return export_sd3(model, out, fp16=fp16, without_t5=without_t5, block_cache=deepcache, progress=progress)
    from .exporter import export_model

    return export_model(model, out, fp16=fp16, progress=progress, controlnets=controlnets or [], deepcache=deepcache)
