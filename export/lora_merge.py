"""LoRAs merged into a loaded model's PyTorch weights before export (``sdrt export --lora FILE[:SCALE]``).

The arithmetic is ``lora.lora_deltas``, the same the TensorRT refit path applies to built engines, so a
LoRA baked in at export and one refitted later give the same weights (LCM-LoRA, style LoRAs, stacks).

Every family's files are read through its ``Family.lora_file`` (SD 3's and FLUX.1's original layouts mapped to
diffusers' module names). A component held in memory gets the deltas added to its parameters; a streamed one
(export/streamed.py: too large to hold) gets a weight source that adds each weight's delta as that weight is read,
one at a time, so the export and its parity gate both see the merged weights within the memory of one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.families import Family
from sdrt.runtime.lora_files import (
    LoraFile,
    LoraModule,
    LoraSpec,
    MergeReport,
    ParamIndex,
    lora_deltas,
    read_lora,
)

from .loading import LoadedModel
from .streamed import WeightSource


def merge_loras(model: LoadedModel, specs: Sequence[LoraSpec]) -> dict[str, MergeReport]:
    """Add every LoRA's delta (at its strength) to ``model``'s weights in place; returns what matched per
    component and records the files in ``model.source["loras"]``. A file that adapts no weight of the model
    is an error (the wrong family, or not a LoRA)."""
    # by component name: a refiner's one encoder is text_encoder_2, as LoRAs for it name it
    modules = {"unet": model.unet, **dict(zip(model.preset.encoder_names, model.text_encoders, strict=True))}
    reports, _, record = merge_into(model.preset.model_family, model.preset.family, modules, {}, specs)
    model.source["loras"] = record
    return {c: r for c, r in reports.items() if c in modules}


def merge_into(family: Family, label: str, held: Mapping[str, torch.nn.Module | None],
               streamed: Mapping[str, tuple[WeightSource, Mapping[str, tuple[int, ...]]]],
               specs: Sequence[LoraSpec]) -> tuple[dict[str, MergeReport], dict[str, WeightSource], list[dict]]:
    """The LoRAs of ``specs`` merged: into ``held``'s parameters in place (by component: ``unet`` the denoiser,
    the text encoders by name), and over ``streamed``'s weight sources (component -> its source and its weights'
    shapes), which come back wrapped. Returns the reports per component (one for every component a file adapts;
    a component not given, such as T5, has its modules as unmatched), the wrapped sources and the files' record
    for the manifest. Refused before any weight changes: a file that adapts no weight of the model (``label``:
    the family's name in the message), factors of another architecture's widths."""
    loras = [(family.lora_file(read_lora(s.path)), float(s.scale)) for s in specs]
    matched = {lf.path: False for lf, _ in loras}
    lazy: dict[str, dict[str, list[tuple[LoraModule, float]]]] = {}
    reports: dict[str, MergeReport] = {}
    for comp, (_, shapes) in streamed.items():
        lazy[comp], reports[comp] = _plan(loras, comp, shapes, matched)
    params = {c: dict(m.named_parameters()) for c, m in held.items() if m is not None}
    for comp, p in params.items():
        _plan(loras, comp, {k: tuple(v.shape) for k, v in p.items()}, matched)  # the shapes checked first
    for path, ok in matched.items():
        if not ok:
            raise InputError(f"the LoRA {path} adapts no weight of this {label} model: it was trained for another "
                             "model family; pass a LoRA made for this one",
                             cli=f"--lora {path} adapts no weight of this {label} model: it was trained for another "
                                 "model family; pass a LoRA made for this one")
    with torch.no_grad():
        for comp, p in params.items():
            deltas, reports[comp] = lora_deltas(loras, comp, {k: tuple(v.shape) for k, v in p.items()})
            for name, delta in deltas.items():
                p[name].add_(torch.from_numpy(delta).to(p[name].dtype))
    for comp in sorted({m.component for lf, _ in loras for m in lf.modules} - set(reports)):
        reports[comp] = MergeReport((), tuple(f"{Path(lf.path).name}: {m.component}.{m.module}" for lf, _ in loras
                                              for m in lf.modules if m.component == comp))
    wrapped = {c: _merged_source(src, lazy[c]) for c, (src, _) in streamed.items()}
    record = [{"path": str(s.path), "scale": float(s.scale), "sha256": lf.sha256}
              for s, (lf, _) in zip(specs, loras, strict=True)]
    return reports, wrapped, record


def _plan(loras: Sequence[tuple[LoraFile, float]], component: str, shapes: Mapping[str, tuple[int, ...]],
          matched: dict[str, bool]) -> tuple[dict[str, list[tuple[LoraModule, float]]], MergeReport]:
    """Which LoRA modules add to which of ``component``'s weights (by name), each checked against the weight's
    shape without computing its delta; ``matched`` notes the files that adapt something."""
    index = ParamIndex(shapes)
    table: dict[str, list[tuple[LoraModule, float]]] = {}
    unmatched: list[str] = []
    for lora, scale in loras:
        for m in lora.modules:
            if m.component != component:
                continue
            param = index.find(m)
            if param is None:
                unmatched.append(f"{Path(lora.path).name}: {m.component}.{m.module}")
                continue
            size = int(m.up.shape[0]) * math.prod(int(d) for d in m.down.shape[1:])
            if size != math.prod(shapes[param]):
                raise InputError(f"LoRA module {m.component}.{m.module} makes a {int(m.up.shape[0])} x "
                                 f"{math.prod(int(d) for d in m.down.shape[1:])} delta, but the weight is "
                                 f"{tuple(shapes[param])}: the LoRA was trained for another architecture")
            table.setdefault(param, []).append((m, scale))
            matched[lora.path] = True
    return table, MergeReport(tuple(sorted(table)), tuple(unmatched))


def _merged_source(source: WeightSource, table: Mapping[str, list[tuple[LoraModule, float]]]) -> WeightSource:
    """``source`` with each adapted weight's delta added as it is read (float32 arithmetic, the weight's dtype)."""

    def get(name: str) -> torch.Tensor:
        w = source(name)
        if name not in table:
            return w
        delta = sum((m.delta(tuple(w.shape)) * np.float32(scale) for m, scale in table[name]),
                    np.zeros(tuple(w.shape), np.float32))
        return (w.float() + torch.from_numpy(delta)).to(w.dtype)

    return get
