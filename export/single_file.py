"""Single-file checkpoints in the original LDM layout (``.safetensors``; pickles only on request).

Two steps, kept apart so the first can run on key names and shapes alone:

1. ``detect_preset`` tells the family (SD 1.x, SD 2.x, SDXL base, SDXL refiner) from the key layout and the shipped preset
   from tensor shapes (tiny presets included);
2. ``load_single_file`` converts with diffusers' own single-file code, fed with that preset's shipped
   configurations written to a temporary folder, so nothing is fetched.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .loading import PICKLE_SUFFIXES, LoadedModel, sha256_file
from .presets import PRESETS, Preset, get_preset, pooled_encoder

log = logging.getLogger(__name__)

# key layouts: the families, with the SDXL refiner apart (its one encoder is where the base's CLIP ViT-L is)
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner"}

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_CLIP = "cond_stage_model.transformer.text_model."  # HF CLIPTextModel layout
_OPENCLIP = "cond_stage_model.model."  # OpenCLIP layout
_XL_CLIP = "conditioner.embedders.0.transformer.text_model."
_XL_OPENCLIP = "conditioner.embedders.1.model."
_REFINER_OPENCLIP = "conditioner.embedders.0.model."  # the refiner's only encoder, OpenCLIP bigG

# Per key layout, each text encoder's key prefix and layout, in the order of LoadedModel.text_encoders:
# "clip" (HF CLIPTextModel), "openclip" (OpenCLIP; SD 2.x conditions on its penultimate layer, which files keep
# while diffusers drops the last resblock) or "openclip-proj" (OpenCLIP with its text projection: SDXL's pooled
# embedding).
_ENCODERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": ((_CLIP, "clip"),),
    "sd2": ((_OPENCLIP, "openclip"),),
    "sdxl": ((_XL_CLIP, "clip"), (_XL_OPENCLIP, "openclip-proj")),
    "sdxl-refiner": ((_REFINER_OPENCLIP, "openclip-proj"),),
}


def _layout(preset: Preset) -> str:
    return "sdxl-refiner" if preset.refiner else preset.family

# The HF CLIP text encoders' roots: transformers < 5.6 saved CLIPTextModel under ``text_model.``, later ones
# flattened it, and some converters write such a state dict under the LDM root as is. Read both (diffusers'
# own converter script, convert_from_ckpt.convert_ldm_clip_checkpoint, loads the flattened one too).
_CLIP_ROOTS = tuple(p.removesuffix("text_model.") for p in (_CLIP, _XL_CLIP))
_TEXT_MODEL = "text_model."
# what an LDM single file holds besides its components: prefixes of keys sdrt reads or knowingly ignores
_KNOWN_PREFIXES = (_UNET, _VAE, _CLIP, _OPENCLIP, _XL_CLIP, _XL_OPENCLIP, _REFINER_OPENCLIP, "model_ema.")

# The shapes of the SD 2.x 512 epsilon and 768 v-prediction models are the same.
_DEFAULT_WHEN_AMBIGUOUS = {"sd2": "sd21-768"}


# --- reading ---------------------------------------------------------------------------------------


class _Checkpoint:
    """Key names and shapes of a checkpoint file; tensors are read per component, on demand.

    Keys are the LDM layout's: a CLIP text encoder stored without ``text_model.`` is read under that prefix.
    """

    def __init__(self, path: Path, allow_pickle: bool) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{path.name} is a pickled checkpoint: loading it runs arbitrary code from the file. "
                    "Prefer a .safetensors version of it; if you trust its origin, pass --allow-pickle."
                )
            self._tensors = unpickle_checkpoint(path)
            file_shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            except (SafetensorError, OSError) as e:
                raise ArtifactError(
                    f"{path.name} is not a readable .safetensors file ({e}); it may be truncated or of "
                    "another format"
                ) from e
        self._file_key = ldm_key_names(file_shapes)  # LDM name -> the file's name
        self.shapes = {k: file_shapes[f] for k, f in self._file_key.items()}
        if any(k != f for k, f in self._file_key.items()):
            log.info("%s: its CLIP text encoder keys have no %r part; reading them as if they had",
                     path.name, _TEXT_MODEL)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose (LDM) keys start with ``prefix``."""
        wanted = {f: k for k, f in self._file_key.items() if k.startswith(prefix)}
        if self._tensors is not None:
            return {k: self._tensors[f] for f, k in wanted.items()}
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(name) for name, k in wanted.items()}
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"cannot read the tensors of {self.path.name}: {e}") from e


def ldm_key_names(keys: Mapping[str, Any]) -> dict[str, str]:
    """{LDM key: the file's key}: identity, except a CLIP root that holds a flattened CLIPTextModel state dict
    (its token embedding, and no key with ``text_model.``), whose keys get ``text_model.``. Anything else
    (a root mixing both layouts, another layout) is left as it is, for the error to name."""
    out = {k: k for k in keys}
    for root in _CLIP_ROOTS:
        under = [k for k in keys if k.startswith(root)]
        flat = root + "embeddings.token_embedding.weight" in keys
        if flat and not any(k.startswith(root + _TEXT_MODEL) for k in under):
            for k in under:
                del out[k]
                out[root + _TEXT_MODEL + k.removeprefix(root)] = k
    return out


def unpickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's tensors: tensors-only unpickling first, the full unpickler only if needed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Training checkpoints also pickle trainer objects (callbacks, hyperparameters).
        log.warning("%s holds more than tensors; unpickling it in full, as --allow-pickle permits", path.name)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # the file's own pickled code runs here and can raise anything
            raise ArtifactError(
                f"cannot unpickle {path.name} ({type(e).__name__}: {e}); convert it to .safetensors where "
                "its training code is installed"
            ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ArtifactError(f"{path.name} is not a readable PyTorch checkpoint ({e})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# --- detection -------------------------------------------------------------------------------------


def detect_family(keys: Mapping[str, Any], name: str = "the checkpoint") -> str:
    """``sd1``, ``sd2``, ``sdxl`` or ``sdxl-refiner`` from the text encoders' key layout; checks UNet and VAE
    are there."""
    if "control_model.input_hint_block.0.weight" in keys or "input_hint_block.0.weight" in keys:
        raise InputError(
            f"{name} is a ControlNet (it holds a conditioning-image embedding, input_hint_block), not a whole "
            "model; pass it as --controlnet, with the model it was trained for as --model")
    if _REFINER_OPENCLIP + "token_embedding.weight" in keys and _XL_OPENCLIP + "token_embedding.weight" not in keys:
        family = "sdxl-refiner"
    elif (
        _XL_CLIP + "embeddings.token_embedding.weight" in keys
        and _XL_OPENCLIP + "token_embedding.weight" in keys
    ):
        family = "sdxl"
    elif _OPENCLIP + "token_embedding.weight" in keys:
        family = "sd2"
    elif _CLIP + "embeddings.token_embedding.weight" in keys:
        family = "sd1"
    else:
        raise ArtifactError(_unknown_layout(keys, name))
    for prefix, part in ((_UNET, "UNet"), (_VAE, "VAE")):
        if not any(k.startswith(prefix) for k in keys):
            raise ArtifactError(
                f"{name} has {FAMILY_NAMES[family]} text encoder weights but no {part} ({prefix}*); sdrt "
                "needs a full checkpoint with UNet, VAE and text encoders in one file"
            )
    return family


def _unknown_layout(keys: Mapping[str, Any], name: str) -> str:
    supported = (
        "sdrt reads single-file checkpoints of SD 1.x (cond_stage_model.transformer.*), SD 2.x "
        "(cond_stage_model.model.*), SDXL base (conditioner.embedders.0/1.*) and the SDXL refiner "
        "(conditioner.embedders.0.model.*) in the original LDM layout"
    )
    if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return (
            f"{name} holds one diffusers component, not a whole model; pass the diffusers folder that holds "
            f"model_index.json instead ({supported})"
        )
    if not keys:
        return f"{name} holds no tensors at all; {supported}"
    return f"{name} has an unrecognised key layout: {_unexpected_key(keys)}; {supported}"


def _unexpected_key(keys: Mapping[str, Any]) -> str:
    """What sdrt cannot place: a key under a CLIP text encoder's root but outside its layout, else a key under
    no prefix sdrt knows (top-level noise-schedule buffers such as ``betas`` do not count), else the text
    encoder key that is missing."""
    ordered = sorted(keys)
    for root, layout in zip(_CLIP_ROOTS, (_CLIP, _XL_CLIP), strict=True):
        stray = next((k for k in ordered if k.startswith(root) and not k.startswith(layout)), None)
        if stray is not None:
            return f"{stray} (sdrt reads {layout}*)"
    stray = next((k for k in ordered if "." in k and not k.startswith(_KNOWN_PREFIXES)), None)
    if stray is not None:
        return stray
    wanted = (_CLIP + "embeddings.token_embedding.weight", _OPENCLIP + "token_embedding.weight")
    return f"no text encoder ({' or '.join(wanted)})"


_INPUT_RESNET = re.compile(re.escape(_UNET) + r"input_blocks\.(\d+)\.0\.out_layers\.3\.weight$")
_INPUT_TBLOCK = re.compile(re.escape(_UNET) + r"input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.")


def _count(keys: Sequence[str], pattern: str) -> int:
    """How many distinct indices the one group of ``pattern`` takes over ``keys``."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _observed(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict[str, Any]:
    """The architecture figures a checkpoint's shapes reveal, named as in error messages."""

    def dim(key: str, axis: int) -> int | None:
        shape = shapes.get(key)
        return int(shape[axis]) if shape is not None and len(shape) > axis else None

    keys = list(shapes)
    resnets = sorted(int(m.group(1)) for k in keys if (m := _INPUT_RESNET.match(k)))
    depth: dict[int, set[int]] = {}
    for k in keys:
        if m := _INPUT_TBLOCK.match(k):
            depth.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    to_k = next((k for k in keys if k.startswith(_UNET) and k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in keys if k.startswith(_UNET) and k.endswith("proj_in.weight")), None)
    vae_levels = _count(keys, re.escape(_VAE) + r"encoder\.down\.(\d+)\.")
    obs: dict[str, Any] = {
        "UNet in/out channels": (dim(_UNET + "input_blocks.0.0.weight", 1), dim(_UNET + "out.2.weight", 0)),
        "UNet block channels": tuple(
            dim(_UNET + f"input_blocks.{n}.0.out_layers.3.weight", 0) for n in resnets
        ),
        "UNet transformer depth": tuple(len(depth.get(n, ())) for n in resnets),
        "UNet cross-attention width": dim(to_k, 1) if to_k else None,
        "UNet linear projections": len(shapes[proj_in]) == 2 if proj_in else None,
        "UNet added conditioning width": dim(_UNET + "label_emb.0.0.weight", 1),
        "VAE block channels": tuple(
            dim(_VAE + f"encoder.down.{i}.block.0.conv1.weight", 0) for i in range(vae_levels)
        ),
        "VAE layers per block": _count(keys, re.escape(_VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        "VAE latent channels": dim(_VAE + "post_quant_conv.weight", 0),
    }
    for i, (prefix, layout) in enumerate(_ENCODERS[family], start=1):
        te = f"text encoder {i}"
        if layout == "clip":
            obs[f"{te} width"] = dim(prefix + "embeddings.token_embedding.weight", 1)
            obs[f"{te} layers"] = _count(keys, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
            obs[f"{te} MLP width"] = dim(prefix + "encoder.layers.0.mlp.fc1.weight", 0)
        else:
            obs[f"{te} width"] = dim(prefix + "token_embedding.weight", 1)
            obs[f"{te} layers"] = _count(keys, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
            obs[f"{te} MLP width"] = dim(prefix + "transformer.resblocks.0.mlp.c_fc.weight", 0)
            if layout == "openclip-proj":
                obs[f"{te} projection width"] = dim(prefix + "text_projection", 1)
    return obs


def _expected(preset: Preset) -> dict[str, list[Any]]:
    """The figures of ``_observed`` a preset implies; each maps to its acceptable values."""
    u, v = preset.unet, preset.vae
    levels = len(u["block_out_channels"])
    per_block = u["layers_per_block"]
    tlayers = u.get("transformer_layers_per_block", 1)
    tlayers = [tlayers] * levels if isinstance(tlayers, int) else list(tlayers)
    text_time = u.get("addition_embed_type") == "text_time"
    exp: dict[str, list[Any]] = {
        "UNet in/out channels": [(u["in_channels"], u["out_channels"])],
        "UNet block channels": [tuple(c for c in u["block_out_channels"] for _ in range(per_block))],
        "UNet transformer depth": [
            tuple(
                tlayers[level] if u["down_block_types"][level].startswith("CrossAttn") else 0
                for level in range(levels)
                for _ in range(per_block)
            )
        ],
        "UNet cross-attention width": [u["cross_attention_dim"]],
        "UNet linear projections": [bool(u.get("use_linear_projection", False))],
        "UNet added conditioning width": [u["projection_class_embeddings_input_dim"] if text_time else None],
        "VAE block channels": [tuple(v["block_out_channels"])],
        "VAE layers per block": [v["layers_per_block"]],
        "VAE latent channels": [v["latent_channels"]],
    }
    for i, ((_, layout), cfg) in enumerate(
        zip(_ENCODERS[_layout(preset)], preset.text_encoders, strict=True), start=1
    ):
        te = f"text encoder {i}"
        layers = cfg["num_hidden_layers"]
        exp[f"{te} width"] = [cfg["hidden_size"]]
        # SD 2.x conditions on OpenCLIP's penultimate layer: files keep the last resblock, diffusers drops it
        exp[f"{te} layers"] = [layers + 1, layers] if layout == "openclip" else [layers]
        exp[f"{te} MLP width"] = [cfg["intermediate_size"]]
        if layout == "openclip-proj":
            exp[f"{te} projection width"] = [cfg["projection_dim"]]
    return exp


def _differences(preset: Preset, observed: Mapping[str, Any]) -> list[str]:
    return [
        f"{name} {_show(observed.get(name))} in the file, {' or '.join(map(_show, ok))} in {preset.name}"
        for name, ok in _expected(preset).items()
        if observed.get(name) not in ok
    ]


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def detect_preset(
    shapes: Mapping[str, Sequence[int]], *, arch: str | None = None, name: str = "the checkpoint"
) -> Preset:
    """The shipped preset of a checkpoint, from its key names and tensor shapes only.

    ``arch`` (a preset name) settles what shapes cannot tell (SD 2.x 512 epsilon vs 768 v-prediction); one
    that contradicts the file raises ``InputError``.
    """
    dims = {k: tuple(int(d) for d in shapes[f]) for k, f in ldm_key_names(shapes).items()}
    family = detect_family(dims, name)
    observed = _observed(dims, family)
    candidates = [p for p in PRESETS.values() if _layout(p) == family and p.by_shape]  # turbo: --arch only
    matches = [p for p in candidates if not _differences(p, observed)]
    if arch is not None:
        preset = get_preset(arch)
        if _layout(preset) != family:
            raise InputError(
                f"--arch {arch} is an {FAMILY_NAMES[_layout(preset)]} preset, but {name} is an "
                f"{FAMILY_NAMES[family]} checkpoint{_matching(matches)}; drop --arch or pass one that fits"
            )
        if diffs := _differences(preset, observed):
            raise InputError(f"--arch {arch} does not fit {name}{_matching(matches)}: {'; '.join(diffs)}")
        return preset
    if not matches:
        closest = min(candidates, key=lambda p: len(_differences(p, observed)))
        raise ArtifactError(
            f"{name} is an {FAMILY_NAMES[family]} checkpoint of an architecture no shipped preset has; "
            f"closest is {closest.name}: {'; '.join(_differences(closest, observed))}"
        )
    if len(matches) == 1:
        return matches[0]
    default = _DEFAULT_WHEN_AMBIGUOUS.get(family, matches[0].name)
    chosen = next((p for p in matches if p.name == default), matches[0])
    others = [p for p in matches if p is not chosen]
    if len({p.prediction_type for p in matches}) > 1:  # SD 2.x: the 768 px v model and the 512 px base
        log.warning(
            "%s: an %s file does not record its prediction type; assuming %s (%s, %d px). For the 512 px "
            "epsilon base model (e.g. v2-1_512-ema-pruned) pass --arch %s.",
            name,
            FAMILY_NAMES[family],
            chosen.name,
            chosen.prediction_type,
            chosen.default_size,
            " or --arch ".join(p.name for p in others),
        )
    else:
        log.warning(
            "%s fits presets %s; assuming %s (pass --arch to choose)",
            name,
            ", ".join(p.name for p in matches),
            chosen.name,
        )
    return chosen


def _matching(matches: list[Preset]) -> str:
    return f" (it fits {', '.join(p.name for p in matches)})" if matches else ""


# --- conversion ------------------------------------------------------------------------------------


def load_single_file(path: Path, *, arch: str | None = None, allow_pickle: bool = False,
                     ema: bool = True) -> LoadedModel:
    """Load an LDM-layout single-file checkpoint as diffusers/transformers modules (float32, eval).

    A training checkpoint holding both the UNet's EMA weights (``model_ema.*``) and the raw ones loads the
    EMA weights (the better ones for inference) unless ``ema`` is False; the log says which loaded, and
    ``source["unet_weights"]`` ("EMA" / "non-EMA") records it."""
    path = Path(path)
    ckpt = _Checkpoint(path, allow_pickle)
    preset = detect_preset(ckpt.shapes, arch=arch, name=path.name)
    log.info("%s: %s checkpoint, preset %s", path.name, FAMILY_NAMES[_layout(preset)], preset.name)
    ema_unet, which = None, ""  # which UNet copy loaded, where the file holds two
    if any(k.startswith("model_ema.") for k in ckpt.shapes):
        ema_unet = _ema_unet(ckpt)
        if ema_unet is None:
            which = "non-EMA"
            log.warning("%s has model_ema.* keys but not an EMA copy of every UNet weight; using the non-EMA "
                        "UNet weights (model.diffusion_model.*)", path.name)
        elif ema:
            which = "EMA"
            log.warning("%s holds EMA and non-EMA UNet weights; using the EMA ones (model_ema.*), the better "
                        "for inference. Pass --no-ema (ema=False) for the non-EMA ones.", path.name)
        else:
            which, ema_unet = "non-EMA", None
            log.warning("%s holds EMA and non-EMA UNet weights; using the non-EMA ones (model.diffusion_model.*), "
                        "as asked (--no-ema)", path.name)
    unet, vae, encoders = _convert(ckpt, preset, ema_unet)
    return LoadedModel(
        preset=preset,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        scheduler_config=preset.config("scheduler"),
        tokenizer_dirs=[None] * len(encoders),
        source={"kind": "single_file", "path": str(path), "sha256": sha256_file(path),
                **({"unet_weights": which} if which else {})},
    )


def _ema_unet(ckpt: _Checkpoint) -> dict[str, torch.Tensor] | None:
    """The UNet's EMA weights under the UNet's own keys, or None unless every weight has its EMA copy.
    LDM's EMA names drop the dots after ``model.``: model.diffusion_model.a.0.w -> model_ema.diffusion_modela0w."""
    flat = {k: "model_ema." + "".join(k.split(".")[1:]) for k in ckpt.shapes if k.startswith(_UNET)}
    if not flat or any(ckpt.shapes.get(f) != ckpt.shapes[k] for k, f in flat.items()):
        return None
    ema = ckpt.tensors("model_ema.")
    return {k: ema[f] for k, f in flat.items()}


def _write_configs(preset: Preset, folder: Path) -> list[str]:
    """The preset's component configurations in diffusers layout; returns the text encoder subfolders."""
    from transformers import CLIPTextConfig

    for sub, cls, cfg in (
        ("unet", "UNet2DConditionModel", preset.unet),
        ("vae", "AutoencoderKL", preset.vae),
    ):
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text(json.dumps({"_class_name": cls, **cfg}, indent=2))
    subs = list(preset.encoder_names)
    for sub, cfg in zip(subs, preset.text_encoders, strict=True):
        CLIPTextConfig(**cfg).save_pretrained(folder / sub)
    return subs


def _convert(
    ckpt: _Checkpoint, preset: Preset, unet_tensors: dict[str, torch.Tensor] | None = None
) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Module]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        SingleFileComponentError,
        create_diffusers_clip_model_from_ldm,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    name = ckpt.path.name
    failures = (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError)
    with tempfile.TemporaryDirectory(prefix="sdrt-single-file-") as tmp:
        subs = _write_configs(preset, Path(tmp))
        # No torch_dtype: weights are cast to the fp32 modules diffusers builds, without its .to() warning.
        kw: dict[str, Any] = {"config": tmp, "local_files_only": True}
        try:
            unet = UNet2DConditionModel.from_single_file(
                unet_tensors or ckpt.tensors(_UNET), subfolder="unet", low_cpu_mem_usage=True, **kw
            )
            require_loaded(unet, "UNet", name, preset)
            vae = AutoencoderKL.from_single_file(
                ckpt.tensors(_VAE), subfolder="vae", low_cpu_mem_usage=True, **kw
            )
            require_loaded(vae, "VAE", name, preset)
            encoders: list[torch.nn.Module] = []
            for i, ((prefix, layout), sub, cfg) in enumerate(
                zip(_ENCODERS[_layout(preset)], subs, preset.text_encoders, strict=True)
            ):
                cls = CLIPTextModelWithProjection if pooled_encoder(sub) else CLIPTextModel
                # Only this encoder's keys: diffusers tells SDXL's two encoders apart by width, which tiny
                # presets share.
                tensors = ckpt.tensors(prefix.removesuffix("text_model."))
                if layout.startswith("openclip"):
                    tensors = _drop_unused_resblocks(tensors, cfg["num_hidden_layers"])
                encoder = create_diffusers_clip_model_from_ldm(cls, tensors, subfolder=sub, **kw)
                require_loaded(encoder, f"text encoder {i + 1}", name, preset)
                encoders.append(encoder)
        except failures as e:
            raise ArtifactError(
                f"cannot convert {name} as {preset.name} ({e}); the file is incomplete or of another "
                "architecture"
            ) from e
    return unet.float().eval(), vae.float().eval(), [e.float().eval() for e in encoders]


_RESBLOCK = re.compile(r".*transformer\.resblocks\.(\d+)\.")


def _drop_unused_resblocks(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD 2.x files keep OpenCLIP's last resblock, which the penultimate-layer encoder never runs."""
    return {k: v for k, v in tensors.items() if not ((m := _RESBLOCK.match(k)) and int(m.group(1)) >= layers)}


def require_loaded(module: torch.nn.Module, part: str, name: str, preset: Any) -> None:
    """diffusers leaves tensors it found no weights for on the meta device; refuse such a module."""
    missing = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if missing:
        raise ArtifactError(
            f"{name}: the {part} lacks {len(missing)} of the tensors preset {preset.name} needs "
            f"(e.g. {', '.join(missing[:3])}); the file is incomplete or of another architecture"
        )
