"""ControlNet single files in the original ``control_model.*`` layout (A1111's), converted offline.

The architecture is read from the file's tensor shapes: each candidate configuration (the shipped
ControlNet presets, and one copying the encoder of the UNet it is exported with, when given) has its
conditioning-embedding widths taken from the file, the file's keys are renamed by diffusers' own
converter for that configuration (and its name table for SDXL's addition embedding, which the converter
leaves out), and the first whose names and shapes are exactly those of a
ControlNetModel built on the meta device (no memory) is the architecture. diffusers'
``ControlNetModel.from_single_file`` then loads the weights with that configuration written to a
temporary folder, so nothing is fetched.

Shuffle ControlNets mean-pool their residuals (``global_pool_conditions``), which no weight records: A1111
reads it from the ``.yaml`` beside the model (``global_average_pooling: True``), and so does sdrt.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .controlnet_loading import CONTROLNET_CLASS, LoadedControlNet
from .controlnet_presets import CONTROLNET_PRESETS, controlnet_config_from_unet
from .loading import PICKLE_SUFFIXES, sha256_file

log = logging.getLogger(__name__)

PREFIX = "control_model."
_HINT = "input_hint_block."
_WHOLE_MODEL = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def _read(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path.name} is a pickled checkpoint: loading it runs arbitrary code from the file. Prefer a "
                ".safetensors version of it; if you trust its origin, pass --allow-pickle.")
        from .single_file import unpickle_checkpoint

        return unpickle_checkpoint(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path.name}: unknown ControlNet format; expected a .safetensors file (or a diffusers "
                         "ControlNet folder)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path.name} is not a readable .safetensors file ({e}); it may be truncated") from e


def is_controlnet_keys(keys: Mapping[str, Any]) -> bool:
    """A ControlNet in the original layout: its conditioning-image ("hint") embedding, prefixed or bare."""
    return PREFIX + _HINT + "0.weight" in keys or _HINT + "0.weight" in keys


def controlnet_tensors(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The ControlNet's own tensors, without the ``control_model.`` prefix (files hold it or not; a
    training checkpoint also holds the whole base model, which is dropped)."""
    if PREFIX + _HINT + "0.weight" in sd:
        return {k.removeprefix(PREFIX): v for k, v in sd.items() if k.startswith(PREFIX)}
    if _HINT + "0.weight" in sd:
        return {k: v for k, v in sd.items() if not k.startswith(_WHOLE_MODEL)}
    if any(k.startswith(_WHOLE_MODEL) for k in sd):
        raise InputError(
            f"{name} is a whole model (it holds model.diffusion_model.*), not a ControlNet; pass it as --model, "
            "and as --controlnet a ControlNet file (control_model.* keys) or folder")
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        raise InputError(
            f"{name} holds a ControlNet in diffusers' layout without its config.json; pass the folder that holds "
            "both (config.json + diffusion_pytorch_model.safetensors)")
    raise ArtifactError(f"{name} is not a ControlNet: it has no {PREFIX}{_HINT}* (conditioning image "
                        "embedding) tensors; pass an A1111 ControlNet .safetensors or a diffusers ControlNet folder")


def _cond_widths(cn: Mapping[str, torch.Tensor]) -> list[int]:
    """conditioning_embedding_out_channels: LDM's hint block alternates conv, SiLU; each width is first the
    output of a stride-1 conv (indices 0, 4, 8, 12 of the 15 layers)."""
    return [int(cn[f"{_HINT}{i}.weight"].shape[0]) for i in range(0, 13, 4) if f"{_HINT}{i}.weight" in cn]


def _global_pool(path: Path) -> bool:
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        try:
            text = yaml.read_text(errors="replace")
        except OSError:
            return False
        return bool(re.search(r"global_average_pooling\s*:\s*true", text, re.IGNORECASE))
    if "shuffle" in path.name.lower():
        log.warning("%s looks like a shuffle ControlNet, which mean-pools its residuals, but there is no %s beside "
                    "it saying so (global_average_pooling: True); exporting it without pooling", path.name, yaml.name)
    return False


def _convert(cn: Mapping[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' converter, plus SDXL's addition embedding (``label_emb``), which it leaves out, by
    diffusers' own LDM name table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    out = convert_controlnet_checkpoint(dict(cn), cfg)
    if cfg.get("addition_embed_type"):
        for new, old in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            if old in cn:
                out[new] = cn[old]
    return {k: v for k, v in out.items() if v is not None}


def _mismatch(cfg: dict[str, Any], cn: Mapping[str, torch.Tensor]) -> list[str]:
    """How the file differs from a ControlNetModel of ``cfg`` (names and shapes); empty when it fits."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in ControlNetModel(**cfg).state_dict().items()}
    try:
        have = {k: tuple(v.shape) for k, v in _convert(cn, cfg).items()}
    except (KeyError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        return [f"diffusers' converter failed ({e})"]
    diffs = [f"{k} missing" for k in want if k not in have]
    diffs += [f"{k} {list(have[k])} in the file, {list(s)} expected" for k, s in want.items()
              if k in have and have[k] != s]
    diffs += [f"{k} unexpected" for k in have if k not in want]
    return diffs


def choose_architecture(cn: Mapping[str, torch.Tensor], name: str, unet_config: Mapping[str, Any] | None = None,
                        *, global_pool: bool = False) -> tuple[str, dict[str, Any]]:
    """(where the architecture came from, its ControlNetModel config) for original-layout tensors ``cn``
    (``control_model.`` stripped); shapes only, so meta tensors do. ArtifactError if nothing fits."""
    widths = _cond_widths(cn)
    hint_in = int(cn[_HINT + "0.weight"].shape[1])
    candidates: list[tuple[str, dict[str, Any]]] = []
    if unet_config is not None:
        candidates.append(("the model's UNet", controlnet_config_from_unet(dict(unet_config))))
    candidates += [(p.name, p.config()) for p in CONTROLNET_PRESETS.values()]
    best: tuple[str, list[str]] | None = None
    for label, cfg in candidates:
        cfg.update(conditioning_embedding_out_channels=widths, conditioning_channels=hint_in,
                   global_pool_conditions=global_pool)
        diffs = _mismatch(cfg, cn)
        if not diffs:
            return label, cfg
        if best is None or len(diffs) < len(best[1]):
            best = (label, diffs)
    assert best is not None
    raise ArtifactError(
        f"{name} is a ControlNet of an architecture sdrt does not know (closest: {best[0]}, "
        f"{len(best[1])} differences, e.g. {'; '.join(best[1][:3])}); convert it to a diffusers ControlNet "
        "folder and pass that")


def load_controlnet_single_file(path: str | Path, *, allow_pickle: bool = False,
                                unet_config: Mapping[str, Any] | None = None) -> LoadedControlNet:
    """Convert an original-layout ControlNet file to a diffusers ControlNetModel (float32, eval).

    ``unet_config``: the UNet it is exported with; a ControlNet copying its encoder is tried first, so
    architectures beyond the shipped presets convert too."""
    from diffusers import ControlNetModel

    path = Path(path)
    cn = controlnet_tensors(_read(path, allow_pickle), path.name)
    label, cfg = choose_architecture(cn, path.name, unet_config, global_pool=_global_pool(path))
    log.info("%s: ControlNet, architecture of %s", path.name, label)
    with tempfile.TemporaryDirectory(prefix="sdrt-controlnet-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": CONTROLNET_CLASS, **cfg}, indent=2))
        try:
            # already in diffusers' names (the converter passes such a state dict through as is)
            net = ControlNetModel.from_single_file(_convert(cn, cfg), config=tmp, local_files_only=True,
                                                   low_cpu_mem_usage=True)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise ArtifactError(f"cannot convert {path.name} as a ControlNet of {label} ({e})") from e
    missing = [n for n, t in net.state_dict().items() if t.is_meta]
    if missing:
        raise ArtifactError(f"{path.name}: the ControlNet lacks {len(missing)} tensors (e.g. {', '.join(missing[:3])})"
                            "; the file is incomplete")
    return LoadedControlNet(net.float().eval(), {"kind": "single_file", "path": str(path),
                                                 "sha256": sha256_file(path)}, path.name)
