"""LoRAs merged into a loaded model's PyTorch weights before export (``sdrt export --lora FILE[:SCALE]``).

The arithmetic is ``lora.lora_deltas``, the same the TensorRT refit path applies to built engines, so a
LoRA baked in at export and one refitted later give the same weights (LCM-LoRA, style LoRAs, stacks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.lora_files import LoraSpec, MergeReport, lora_deltas, read_lora

from .loading import LoadedModel


def merge_loras(model: LoadedModel, specs: Sequence[LoraSpec]) -> dict[str, MergeReport]:
    """Add every LoRA's delta (at its strength) to ``model``'s weights in place; returns what matched per
    component and records the files in ``model.source["loras"]``. A file that adapts no weight of the model
    is an error (the wrong family, or not a LoRA)."""
    loras = [(read_lora(s.path), float(s.scale)) for s in specs]
    # by component name: a refiner's one encoder is text_encoder_2, as LoRAs for it name it
    modules = {"unet": model.unet, **dict(zip(model.preset.encoder_names, model.text_encoders, strict=True))}
    reports: dict[str, MergeReport] = {}
    matched_any = {lf.path: False for lf, _ in loras}
    with torch.no_grad():
        for component, module in modules.items():
            params = dict(module.named_parameters())
            deltas, report = lora_deltas(loras, component, {k: tuple(p.shape) for k, p in params.items()})
            for name, delta in deltas.items():
                params[name].add_(torch.from_numpy(delta).to(params[name].dtype))
            reports[component] = report
            for lf, _ in loras:
                if any(m.component == component for m in lf.modules) and report.matched:
                    matched_any[lf.path] = True
    for path, ok in matched_any.items():
        if not ok:
            raise InputError(f"the LoRA {path} adapts no weight of this {model.preset.family} model: it was "
                             "trained for another model family; pass a LoRA made for this one",
                             cli=f"--lora {path} adapts no weight of this {model.preset.family} model: it was "
                                 "trained for another model family; pass a LoRA made for this one")
    model.source["loras"] = [{"path": str(s.path), "scale": float(s.scale), "sha256": lf.sha256}
                             for s, (lf, _) in zip(specs, loras)]
    return reports
