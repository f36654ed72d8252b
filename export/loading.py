"""Load a Stable Diffusion model into PyTorch modules, from one of three sources.

1. a diffusers folder (``model_index.json`` and component subfolders);
2. a single-file checkpoint in the original LDM layout (``.safetensors``; pickles only on request);
3. synthetic weights of a preset architecture with a fixed seed (``--random PRESET``).

Nothing is ever downloaded: configurations come from the folder or from the shipped presets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError
from sdrt.runtime.families import has_refiner

from .presets import PRESETS, Preset, encoder_names, get_preset, pooled_encoder

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    """PyTorch modules of one model, in float32, eval mode."""

    preset: Preset
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    scheduler_config: dict[str, Any]
    tokenizer_dirs: list[Path | None] = field(default_factory=list)  # None: use the shipped CLIP vocabulary
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", self.preset.prediction_type))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def random_model(preset_name: str, seed: int = 0) -> LoadedModel:
    """Synthetic weights in a preset's architecture: same compute as the real model, nothing fetched."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**preset.config("unet"))
    vae = AutoencoderKL(**preset.config("vae"))
    encoders: list[torch.nn.Module] = []
    for name, cfg in zip(preset.encoder_names, preset.text_encoders, strict=True):
        cls = CLIPTextModelWithProjection if pooled_encoder(name) else CLIPTextModel
        encoders.append(cls(CLIPTextConfig(**cfg)))
    for module in (unet, vae, *encoders):
        randomize_norms(module, seed)
    return LoadedModel(
        preset=preset,
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoders=[e.eval() for e in encoders],
        scheduler_config=preset.config("scheduler"),
        tokenizer_dirs=[None] * len(encoders),
        source={"kind": "random", "preset": preset_name, "seed": seed},
    )


def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Give normalization layers distinct weights (1 + noise, noise) instead of the ones and zeros of a
    fresh init. Trained checkpoints look like this; identical tensors would be merged by the ONNX
    exporter into one initializer, which a later refit could not set separately."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.02 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None and not m.bias.any():
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=g))


def _family_of_folder(index: dict[str, Any], folder: Path) -> str:
    if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    cfg_path = folder / "text_encoder" / "config.json"
    if cfg_path.is_file():
        hidden = json.loads(cfg_path.read_text()).get("hidden_size", 768)
        if hidden == 1024:
            return "sd2"
    return "sd1"


def _has_component(index: dict[str, Any], folder: Path, name: str) -> bool:
    """diffusers writes an absent component as ``[null, null]`` in model_index.json (the refiner's
    text_encoder)."""
    entry = index.get(name)
    if isinstance(entry, list) and not any(entry):
        return False
    return name in index or (folder / name).is_dir()


def is_refiner_folder(index: dict[str, Any], folder: Path) -> bool:
    """An SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0's layout): the pipeline config asks for
    aesthetic scores, or only the second text encoder is there, or the UNet's added conditioning is five
    time ids wide (plus the pooled embedding) rather than six."""
    if index.get("requires_aesthetics_score"):
        return True
    if _has_component(index, folder, "text_encoder_2") and not _has_component(index, folder, "text_encoder"):
        return True
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
        time_dim, width = int(unet["addition_time_embed_dim"]), int(unet["projection_class_embeddings_input_dim"])
        return width == 5 * time_dim + int(te2["projection_dim"])
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _preset_for(family: str, prediction_type: str, sample_size: int, in_channels: int = 4,
                refiner: bool = False) -> Preset:
    """The shipped preset of a family that matches a model's UNet input (4 channels, or 9 for an
    inpainting model), prediction type and size."""
    candidates = [p for p in PRESETS.values()
                  if p.family == family and not p.name.endswith("-tiny") and p.by_shape and p.refiner == refiner]
    candidates = [p for p in candidates if p.unet["in_channels"] == in_channels] or candidates
    for p in candidates:
        if p.prediction_type == prediction_type and p.unet["sample_size"] == sample_size:
            return p
    for p in candidates:
        if p.prediction_type == prediction_type:
            return p
    return candidates[0]


def diffusers_folder(path: Path) -> LoadedModel:
    """Load a diffusers-layout folder, strictly offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index_path = path / "model_index.json"
    index = json.loads(index_path.read_text())
    family = _family_of_folder(index, path)
    refiner = has_refiner(family) and is_refiner_folder(index, path)
    encoders_in = encoder_names(family, refiner)
    tokenizers_in = [n.replace("text_encoder", "tokenizer") for n in encoders_in]
    needed = ["unet", "vae", "scheduler", *encoders_in, *tokenizers_in]
    missing = [c for c in needed if not (path / c).is_dir()]
    if missing:
        raise ArtifactError(
            f"{path} is a diffusers folder without {', '.join(missing)}; a {family} model needs "
            f"{', '.join(needed)}. Copy the missing subfolders from the original model."
        )
    sched_files = list((path / "scheduler").glob("scheduler_config.json"))
    if not sched_files:
        raise ArtifactError(f"{path / 'scheduler'} has no scheduler_config.json; copy it from the original model")
    scheduler_config = json.loads(sched_files[0].read_text())
    # Hub configs often omit timestep_spacing; diffusers then uses the source class's default, and a
    # sampler swap (X.from_config(pipe.scheduler.config)) inherits it. Make it explicit.
    default_spacing = "linspace" if "Euler" in scheduler_config.get("_class_name", "") else "leading"
    scheduler_config.setdefault("timestep_spacing", default_spacing)
    kw: dict[str, Any] = {"local_files_only": True, "torch_dtype": torch.float32}
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
        encoders: list[torch.nn.Module] = [
            (CLIPTextModelWithProjection if pooled_encoder(n) else CLIPTextModel).from_pretrained(path / n, **kw)
            for n in encoders_in]
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot load the diffusers folder {path}: {e}") from e
    prediction = scheduler_config.get("prediction_type", "epsilon")
    base = _preset_for(family, prediction, int(unet.config.sample_size), int(unet.config.in_channels), refiner)
    preset = replace(
        base,
        name=base.name if _same_arch(base, unet) else f"{base.name}-custom",
        prediction_type=prediction,
        default_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        unet=dict(unet.config),
        vae=dict(vae.config),
        text_encoders=tuple(e.config.to_dict() for e in encoders),
        scheduler=scheduler_config,
    )
    tok_dirs: list[Path | None] = [path / t for t in tokenizers_in]
    return LoadedModel(
        preset=preset,
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoders=[e.eval() for e in encoders],
        scheduler_config=scheduler_config,
        tokenizer_dirs=tok_dirs,
        source={"kind": "diffusers", "path": str(path), "sha256": folder_digest(path)},
    )


def _same_arch(preset: Preset, unet: torch.nn.Module) -> bool:
    cfg = unet.config
    return (list(cfg.block_out_channels) == list(preset.unet["block_out_channels"])
            and int(cfg.cross_attention_dim) == int(preset.unet["cross_attention_dim"])
            and int(cfg.in_channels) == int(preset.unet["in_channels"]))


def folder_digest(path: Path) -> str:
    """A digest of a folder's weight and config files (names, sizes and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.suffix in (".json", ".txt", ".safetensors", ".bin"):
            h.update(str(f.relative_to(path)).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def load_model(
    path: str | Path | None = None,
    *,
    random_preset: str | None = None,
    seed: int = 0,
    arch: str | None = None,
    allow_pickle: bool = False,
    ema: bool = True,
) -> LoadedModel:
    """Load weights from ``path`` (diffusers folder or single file) or make synthetic ones. ``ema``: a single
    file with EMA and non-EMA UNet weights loads the EMA ones (False: the non-EMA ones)."""
    if (path is None) == (random_preset is None):
        raise InputError("give exactly one weight source: a model path (--model PATH) or --random PRESET")
    if random_preset is not None:
        return random_model(random_preset, seed)
    assert path is not None
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p} does not exist; pass a diffusers folder or a .safetensors checkpoint")
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            from .controlnet_loading import is_controlnet_folder

            if is_controlnet_folder(p):
                raise InputError(
                    f"{p} is a ControlNet (its config.json names ControlNetModel), not a whole model; pass it "
                    "as --controlnet, with the model it was trained for as --model",
                    cli=f"{p} is a ControlNet (its config.json names ControlNetModel), not a whole model: pass it "
                        f"as --controlnet {p}, with the model it was trained for as --model")
            raise ArtifactError(
                f"{p} has no model_index.json, so it is not a diffusers folder; pass the folder that holds "
                "model_index.json, or a single .safetensors checkpoint"
            )
        return diffusers_folder(p)
    if p.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{p.name} is a pickled checkpoint: loading it runs arbitrary code from the file. Prefer a "
            ".safetensors version of it; if you trust its origin, pass --allow-pickle."
        )
    if p.suffix.lower() not in (".safetensors",) + PICKLE_SUFFIXES:
        raise InputError(f"{p.name}: unknown checkpoint format; expected .safetensors (or .ckpt with --allow-pickle)")
    from .single_file import load_single_file

    return load_single_file(p, arch=arch, allow_pickle=allow_pickle, ema=ema)
