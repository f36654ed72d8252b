"""Loading an SD 3 / 3.5 model for export: a diffusers folder (safetensors only) or a tiny preset's seeded weights,
its transformer and T5 streamed past a size (a single file in Stability's layout: export/sd3_single_file.py), and
recognizing ``sdrt export``'s SD 3 sources."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import InputError

from .diffusers_config import class_name
from .sd3_model import LoadedSd3, streamed_parts, synthetic_parts, weight_shapes
from .sd3_presets import SD3_PRESETS, Sd3Modules, Sd3Preset, build_modules, get_sd3_preset
from .streamed import checkpoint_weights

PIPELINE_CLASS = "StableDiffusion3Pipeline"


def is_sd3_folder(path: Path) -> bool:
    """A diffusers folder of ``StableDiffusion3Pipeline`` (its model_index.json says so)."""
    return class_name(path / "model_index.json") == PIPELINE_CLASS


def is_sd3_source(model: str | Path | None, random_preset: str | None) -> bool:
    """``sdrt export``'s source is an SD3 model: an SD3 preset's name, a diffusers SD3 folder, or a single
    .safetensors file in Stability's SD3 layout."""
    from .sd3_single_file import is_sd3_file

    if random_preset is not None:
        return random_preset in SD3_PRESETS
    return model is not None and (is_sd3_folder(Path(model)) or is_sd3_file(model))


def load_sd3(path: str | Path | None = None, *, random_preset: str | None = None, seed: int = 0,
             stream: bool | None = None, **single_file: Any) -> LoadedSd3:
    """A diffusers SD3 / 3.5 folder (safetensors only: nothing is unpickled), a single file in Stability's
    layout (``single_file``: ``sd3_single_file.load_sd3_single_file``'s options: clip_l, clip_g, t5,
    without_t5, tokenizers, arch), or ``random_preset``'s seeded weights. A folder without
    ``text_encoder_3`` loads without T5. ``stream``: whether the transformer and T5 are streamed at export
    instead of loaded (default: those over a billion parameters; a streamed random preset's weights are seeded
    per tensor, not the in-memory modules' initialisation; a single file's are converted as they are read)."""
    if (path is None) == (random_preset is None):
        raise InputError("give either a diffusers SD3 folder or random_preset (one of them)")
    if path is not None and Path(path).is_file():
        from .sd3_single_file import load_sd3_single_file

        return load_sd3_single_file(path, stream=stream, **single_file)
    # without_t5 is the export's to apply for a folder; the rest only a single file takes
    given = sorted(k for k, v in single_file.items() if v is not None and k != "without_t5")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise InputError(f"{flags} go{'es' if len(given) == 1 else ''} with an SD 3 / 3.5 single "
                         ".safetensors file only; a diffusers folder holds its text encoders and tokenizers, "
                         "a preset its architecture")
    if random_preset is not None:
        preset = get_sd3_preset(random_preset)
        shapes = weight_shapes(preset.config("transformer"), preset.config("t5"))
        skip, streamed = synthetic_parts(preset, shapes, seed, stream)
        return LoadedSd3(preset, build_modules(preset, seed, skip), dict(preset.scheduler),
                         source={"kind": "random", "preset": preset.name, "seed": seed}, streamed=streamed)
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(path)  # type: ignore[arg-type]
    if not is_sd3_folder(folder):
        raise InputError(f"{folder} is not a diffusers SD3 folder (its model_index.json must name {PIPELINE_CLASS})")
    kw: dict[str, Any] = {"torch_dtype": torch.float32, "use_safetensors": True}
    missing = [n for n in ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler", "tokenizer",
                           "tokenizer_2") if not (folder / n).is_dir()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}: an SD3 folder has each of them (a single file "
                         "without its text encoders needs them given separately)")
    has_t5 = (folder / "text_encoder_3").is_dir()
    tr_cfg = component_config(folder / "transformer")
    t5_cfg = component_config(folder / "text_encoder_3") if has_t5 else None
    skip, streamed = streamed_parts(weight_shapes(tr_cfg, t5_cfg), stream,
                                    lambda n: tr_cfg if n == "transformer" else t5_cfg or {},
                                    lambda n: checkpoint_weights(folder / n), "checkpoint")
    transformer = None if "transformer" in skip else SD3Transformer2DModel.from_pretrained(folder / "transformer",
                                                                                          **kw).eval()
    clips = [CLIPTextModelWithProjection.from_pretrained(folder / n, **kw).eval()
             for n in ("text_encoder", "text_encoder_2")]
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3", **kw).eval() \
        if has_t5 and "text_encoder_3" not in skip else None
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).eval()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    preset = _preset_for(tr_cfg, vae, folder.name)
    toks = tuple(folder / n if (folder / n).is_dir() else None for n in ("tokenizer", "tokenizer_2", "tokenizer_3"))
    return LoadedSd3(preset, Sd3Modules(transformer, (clips[0], clips[1], t5), vae), sched,
                     toks, {"kind": "diffusers", "path": str(folder)}, streamed)  # type: ignore[arg-type]


def component_config(folder: Path) -> dict[str, Any]:
    """A component's config.json as constructor keywords (diffusers' and transformers' bookkeeping keys out)."""
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{path} is missing: the diffusers folder {folder.parent} is incomplete (its {folder.name} "
                         "component has no config.json); copy the whole folder again")
    cfg = json.loads(path.read_text())
    drop = {"architectures", "transformers_version", "torch_dtype", "dtype", "model_type"}
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in drop}


def _preset_for(transformer: dict[str, Any], vae: torch.nn.Module, name: str) -> Sd3Preset:
    """The shipped preset whose transformer config this is, else one named after the folder (its default size:
    the transformer's ``sample_size`` latents)."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.items()}
    for p in SD3_PRESETS.values():
        if p.by_shape and all(cfg.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in p.transformer.items()):
            return p
    any_preset = next(iter(SD3_PRESETS.values()))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return replace(any_preset, name=name, default_size=int(transformer["sample_size"]) * f)
