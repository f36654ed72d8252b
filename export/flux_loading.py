"""Loading a FLUX.1 model for export: a diffusers folder (safetensors only), a single file in Black Forest Labs' layout
(export/flux_single_file.py) or a preset's seeded weights, LoRAs merged into it, and recognizing its sources."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.families import family_named
from sdrt.runtime.lora_files import LoraSpec, MergeReport

from .diffusers_config import class_name
from .flux_presets import (
    CONTROL_PIPELINE,
    FLUX_PRESETS,
    KONTEXT_PIPELINE,
    FluxModules,
    FluxPreset,
    build_modules,
    get_flux_preset,
)
from .flux_specs import T5_NAME, streamed_t5, streamed_transformer_spec
from .sd3_loading import component_config
from .sd3_model import Streamed, streamed_parts, synthetic_parts
from .streamed import checkpoint_weights, fake_shapes, materialize

PIPELINE_CLASS = "FluxPipeline"
# [schnell] / [dev], Fill, Kontext, Depth / Canny
PIPELINE_CLASSES = (PIPELINE_CLASS, "FluxFillPipeline", KONTEXT_PIPELINE, CONTROL_PIPELINE)


@dataclass
class LoadedFlux:
    """A FLUX.1 model: its preset, float32 modules for what is held in memory, ``streamed`` for what is not,
    each tokenizer's source folder (None: the tiny presets' shipped ones), the scheduler config."""

    preset: FluxPreset
    modules: FluxModules
    scheduler_config: dict[str, Any]
    tokenizer_dirs: tuple[Path | None, Path | None] = (None, None)
    source: dict[str, Any] = field(default_factory=dict)
    streamed: dict[str, Streamed] = field(default_factory=dict)

    def held(self) -> FluxModules:
        """The modules with the streamed ones built in memory from their weights (``streamed.materialize``; the
        full transformer is 44 GiB in fp32), for a reference that needs them all."""
        tr, t5 = self.streamed.get("transformer"), self.streamed.get(T5_NAME)
        return replace(
            self.modules,
            transformer=self.modules.transformer if tr is None else materialize(
                streamed_transformer_spec(tr.config, self.preset.t5_tokens), tr.weights),
            t5=self.modules.t5 if t5 is None else materialize(streamed_t5(t5.config, self.preset.t5_tokens),
                                                               t5.weights))


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a diffusers folder's model_index.json (None: no readable one)."""
    return class_name(path / "model_index.json")


def is_flux_folder(path: Path) -> bool:
    """A diffusers folder of ``FluxPipeline``, ``FluxFillPipeline``, ``FluxKontextPipeline`` or
    ``FluxControlPipeline`` (its model_index.json says so)."""
    return pipeline_class(path) in PIPELINE_CLASSES


def is_flux_source(model: str | Path | None, random_preset: str | None) -> bool:
    """``sdrt export``'s source is a FLUX.1 model: a FLUX preset's name, a diffusers FluxPipeline folder, or a
    single .safetensors file in Black Forest Labs' layout (export/flux_single_file.py)."""
    from .flux_single_file import is_flux_file

    if random_preset is not None:
        return random_preset in FLUX_PRESETS
    return model is not None and (is_flux_folder(Path(model)) or is_flux_file(model))


def weight_shapes(transformer: dict[str, Any], t5: dict[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each streamable component's weight names and shapes, from one build in fake mode (nothing allocated)."""
    return {"transformer": fake_shapes(streamed_transformer_spec(transformer, 8).build, "transformer."),
            T5_NAME: fake_shapes(streamed_t5(t5, 8).build, "encoder.")}


def merge_flux_loras(model: LoadedFlux, specs: Sequence[LoraSpec]) -> dict[str, MergeReport]:
    """``sdrt export --lora``: the LoRAs merged into the transformer and CLIP (in memory; a streamed transformer's
    weights as they are read: export/lora_merge.py), recorded in ``model.source["loras"]``. T5 is not adapted (its
    modules are reported unmatched). Returns what matched per component."""
    from .lora_merge import merge_into

    st = model.streamed.get("transformer")
    streamed = {} if st is None else {
        "unet": (st.weights, fake_shapes(streamed_transformer_spec(st.config, 8).build, "transformer."))}
    fam = family_named(model.preset.family)
    reports, wrapped, record = merge_into(fam, fam.label, {"unet": model.modules.transformer,
                                                           "text_encoder": model.modules.clip}, streamed, specs)
    if st is not None:
        model.streamed["transformer"] = replace(st, weights=wrapped["unet"])
    model.source["loras"] = record
    return reports


def load_flux(path: str | Path | None = None, *, random_preset: str | None = None, seed: int = 0,
              stream: bool | None = None, **single_file: Any) -> LoadedFlux:
    """A diffusers FLUX.1 folder (safetensors only: nothing is unpickled), a single file in Black Forest Labs'
    layout (``single_file``: ``flux_single_file.load_flux_single_file``'s options: clip_l, t5, vae, tokenizers,
    arch) or ``random_preset``'s seeded weights. ``stream``: whether the transformer and T5 are streamed at
    export instead of loaded (default: those over a billion parameters; a streamed random preset's weights are
    seeded per tensor, a single file's converted as they are read)."""
    if (path is None) == (random_preset is None):
        raise InputError("give either a diffusers FLUX.1 folder or random_preset (one of them)")
    if path is not None and Path(path).is_file():
        from .flux_single_file import load_flux_single_file

        return load_flux_single_file(path, stream=stream, **single_file)
    if given := sorted("--" + k.replace("_", "-") for k, v in single_file.items() if v is not None):
        raise InputError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with a FLUX.1 single .safetensors "
                         "file only; a diffusers folder holds its parts and tokenizers, a preset its architecture")
    if random_preset is not None:
        preset = get_flux_preset(random_preset)
        shapes = weight_shapes(preset.config("transformer"), preset.config("t5"))
        skip, streamed = synthetic_parts(preset, shapes, seed, stream)
        return LoadedFlux(preset, build_modules(preset, seed, skip), dict(preset.scheduler),
                          source={"kind": "random", "preset": preset.name, "seed": seed}, streamed=streamed)
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    folder = Path(path)  # type: ignore[arg-type]
    if not is_flux_folder(folder):
        raise InputError(f"{folder} is not a diffusers FLUX.1 folder (its model_index.json must name "
                         f"{' or '.join(PIPELINE_CLASSES)})")
    missing = [n for n in ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler", "tokenizer",
                           "tokenizer_2") if not (folder / n).is_dir()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}: a FLUX.1 folder has each of them")
    kw: dict[str, Any] = {"torch_dtype": torch.float32, "use_safetensors": True}
    tr_cfg, t5_cfg = component_config(folder / "transformer"), component_config(folder / "text_encoder_2")
    skip, streamed = streamed_parts(weight_shapes(tr_cfg, t5_cfg), stream,
                                    lambda n: tr_cfg if n == "transformer" else t5_cfg,
                                    lambda n: checkpoint_weights(folder / n), "checkpoint")
    transformer = None if "transformer" in skip else \
        FluxTransformer2DModel.from_pretrained(folder / "transformer", **kw).eval()
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw).eval()
    t5 = None if T5_NAME in skip else T5EncoderModel.from_pretrained(folder / T5_NAME, **kw).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).eval()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    preset = _preset_for(tr_cfg, sched, vae, folder.name, pipeline_class(folder) or PIPELINE_CLASS)
    toks = tuple(folder / n if (folder / n).is_dir() else None for n in ("tokenizer", "tokenizer_2"))
    return LoadedFlux(preset, FluxModules(transformer, clip, t5, vae), sched, toks,  # type: ignore[arg-type]
                      {"kind": "diffusers", "path": str(folder)}, streamed)


def _preset_for(transformer: dict[str, Any], scheduler: dict[str, Any], vae: torch.nn.Module,
                name: str, cls: str = PIPELINE_CLASS) -> FluxPreset:
    """The shipped preset of this architecture, schedule and pipeline class ([schnell] and [dev] differ in both,
    Fill and Depth / Canny in their input channels), else one named after the folder (its default size: 1024 for a
    full-width model, 64 latents' worth otherwise). Presets of one shape (Depth and Canny: only their weights
    differ) give their values under the folder's name."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.items()}
    found = [p for p in FLUX_PRESETS.values()
             if all(cfg.get(k) == v for k, v in p.transformer.items()) and p.pipeline_class == cls
             and bool(scheduler.get("use_dynamic_shifting")) == bool(p.scheduler["use_dynamic_shifting"])]
    if found:
        return found[0] if len(found) == 1 else replace(found[0], name=name)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    base = next(p for p in FLUX_PRESETS.values() if p.guided == bool(cfg.get("guidance_embeds")))
    return replace(base, name=name, default_size=1024 if int(cfg["attention_head_dim"]) >= 64 else 8 * f,
                   transformer=cfg, test_scale=False, pipeline_class=cls)
