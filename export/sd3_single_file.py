"""SD 3 / 3.5 single files in Stability's layout (sd3_medium.safetensors, sd3.5_medium.safetensors,
sd3.5_large.safetensors, ...) -> a ``LoadedSd3``, through diffusers' own single-file converters.

The layout: ``model.diffusion_model.*`` (the MMDiT: ``joint_blocks``, fused qkv), ``first_stage_model.*`` (the
VAE, LDM's) and, when bundled, ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*``
and ``text_encoders.t5xxl.transformer.*`` (transformers' own layouts under a prefix). Stability's separate
text-encoder files (text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors) hold the
same keys without the prefix; they replace or complete what the file bundles.

Three steps, the first two on key names and shapes alone, so every refusal comes before any weight is read:

1. ``detect_sd3_preset``: the shipped preset from tensor shapes (joint blocks, width, position grid,
   dual-attention blocks, q/k norms), or ``arch`` checked against them;
2. each text encoder's source and the tokenizers are settled (a missing one is an ``InputError`` naming the
   flag to pass);
3. diffusers' converters (``SD3Transformer2DModel.from_single_file``, ``AutoencoderKL.from_single_file``,
   ``create_diffusers_clip_model_from_ldm``, ``create_diffusers_t5_model_from_checkpoint``) build the modules,
   fed with the preset's configurations written to a temporary folder, so nothing is fetched.

The MMDiT and T5 follow the ``stream`` rule of a diffusers folder (``sd3_model.to_stream``: by default, parts
over a billion parameters: 3.5 Large's and 3.5 Medium's MMDiT, SD3 Medium's, T5-XXL): they are not loaded but
streamed at export, the same converters (``convert_sd3_transformer_checkpoint_to_diffusers``,
``convert_sd3_t5_checkpoint_to_diffusers``) recorded on lazy tensors and replayed one weight at a time as the
ONNX external data is written (export/lazy_convert.py); the converted names and shapes are checked against the
architecture before any weight is read. The CLIP encoders and the VAE load whole.

CLIP-L's projection: SD3 pools CLIP-L unprojected; diffusers' converter (as Stability's reference code) sets
its ``text_projection`` to the identity, whatever the file holds, and so does this loader.
Tensors of any float type (fp16, bf16, the fp8 T5 of ``*_t5xxlfp8`` files) load as float32 (a streamed part's,
tensor by tensor). Only ``.safetensors`` is read: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError, InputError

from .checkpoint_files import (
    TextEncoderFile,
    bundled_names,
    load_encoder,
    pick_preset,
    read_tensors,
    safetensors_shapes,
    separate_encoder,
    streamed_t5,
    tokenizer_dirs,
)
from .lazy_convert import lazy_tensors, streamed_part
from .loading import sha256_file
from .sd3_model import LoadedSd3, Streamed, to_stream, weight_shapes
from .sd3_presets import SD3_PRESETS, Sd3Modules, Sd3Preset, get_sd3_preset
from .single_file import require_loaded

log = logging.getLogger(__name__)

MMDIT = "model.diffusion_model."
VAE = "first_stage_model."
MARK = MMDIT + "joint_blocks.0.x_block.attn.qkv.weight"  # what says "an SD3 single file"


ENCODERS = (
    TextEncoderFile("clip_l", "--clip-l", "CLIP-L", "text_encoder", "Stability's text_encoders/clip_l.safetensors"),
    TextEncoderFile("clip_g", "--clip-g", "CLIP-G", "text_encoder_2", "Stability's text_encoders/clip_g.safetensors"),
    TextEncoderFile("t5xxl", "--t5", "T5-XXL", "text_encoder_3", "Stability's text_encoders/t5xxl_fp16.safetensors"),
)
_WHY = "SD 3 / 3.5 files are read from .safetensors only (Stability publishes them so)"


# --- reading ---------------------------------------------------------------------------------------


def file_shapes(path: Path, what: str = "") -> dict[str, tuple[int, ...]]:
    """A .safetensors file's key names and shapes (its header only); a pickle is refused unread."""
    return safetensors_shapes(path, what, _WHY)


def is_sd3_file(path: str | Path) -> bool:
    """A .safetensors file in Stability's SD3 layout (an MMDiT under
    ``model.diffusion_model.joint_blocks``)."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return False
    try:
        return MARK in file_shapes(p)
    except (ArtifactError, InputError):
        return False


# --- detection -------------------------------------------------------------------------------------

_BLOCK = re.compile(re.escape(MMDIT) + r"joint_blocks\.(\d+)\.")
_DUAL = re.compile(re.escape(MMDIT) + r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight$")


def _observed(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The architecture figures a file's shapes reveal, named as in error messages."""

    def dim(key: str, axis: int) -> int | None:
        s = shapes.get(key)
        return int(s[axis]) if s is not None and len(s) > axis else None

    grid = dim(MMDIT + "pos_embed", 1)
    vae_levels = len(
        {m.group(1) for k in shapes if (m := re.match(re.escape(VAE) + r"encoder\.down\.(\d+)\.", k))}
    )
    conv_out = dim(VAE + "encoder.conv_out.weight", 0)
    return {
        "joint blocks": len({m.group(1) for k in shapes if (m := _BLOCK.match(k))}),
        "width": dim(MMDIT + "x_embedder.proj.weight", 0),
        "latent channels in": dim(MMDIT + "x_embedder.proj.weight", 1),
        "patch": dim(MMDIT + "x_embedder.proj.weight", 2),
        "position grid": round(grid**0.5) if grid else None,
        "text width": dim(MMDIT + "context_embedder.weight", 1),
        "pooled width": dim(MMDIT + "y_embedder.mlp.0.weight", 1),
        "dual-attention blocks": tuple(sorted(int(m.group(1)) for k in shapes if (m := _DUAL.match(k)))),
        "q/k norms": any(k.startswith(MMDIT) and ".ln_q." in k for k in shapes),
        "VAE block channels": tuple(
            dim(VAE + f"encoder.down.{i}.block.0.conv1.weight", 0) for i in range(vae_levels)
        ),
        "VAE latent channels": conv_out // 2 if conv_out else None,
    }


def _expected(p: Sd3Preset) -> dict[str, Any]:
    t = p.transformer
    return {
        "joint blocks": t["num_layers"],
        "width": t["num_attention_heads"] * t["attention_head_dim"],
        "latent channels in": t["in_channels"],
        "patch": t["patch_size"],
        "position grid": t["pos_embed_max_size"],
        "text width": t["joint_attention_dim"],
        "pooled width": t["pooled_projection_dim"],
        "dual-attention blocks": tuple(t["dual_attention_layers"]),
        "q/k norms": t["qk_norm"] is not None,
        "VAE block channels": tuple(p.vae["block_out_channels"]),
        "VAE latent channels": p.vae["latent_channels"],
    }


def detect_sd3_preset(
    shapes: Mapping[str, Sequence[int]], *, arch: str | None = None, name: str = "the file"
) -> Sd3Preset:
    """The shipped SD3 preset of a single file, from its key names and tensor shapes only. ``arch`` (a preset
    name: e.g. ``sd35-large-turbo``, which shapes cannot tell from Large) must agree with the file."""
    dims = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
    if MARK not in dims:
        raise ArtifactError(
            f"{name} is not an SD 3 / 3.5 single file: it has no {MARK} (Stability's files hold "
            "the MMDiT under model.diffusion_model.joint_blocks.*)"
        )
    if not any(k.startswith(VAE) for k in dims):
        raise ArtifactError(
            f"{name} holds an SD 3 / 3.5 MMDiT but no VAE ({VAE}*); sdrt needs a file with both "
            "(Stability's sd3.5_*.safetensors files have them)"
        )
    candidates = [p for p in SD3_PRESETS.values() if p.by_shape]
    return pick_preset(
        _observed(dims),
        candidates,
        _expected,
        arch=get_sd3_preset(arch) if arch is not None else None,
        name=name,
        family="an SD 3 / 3.5",
    )


# --- the text encoders' sources --------------------------------------------------------------------


def _sources(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    preset: Sd3Preset,
    given: Sequence[Path | None],
    without_t5: bool,
) -> list[tuple[Path, dict[str, str]] | None]:
    """Per encoder: (file, {file key: bundled key}), or None for T5 left out. Refusals name the flag to
    pass."""
    out: list[tuple[Path, dict[str, str]] | None] = []
    missing = []
    for i, (enc, file) in enumerate(zip(ENCODERS, given, strict=True)):
        bundled = bundled_names(enc, shapes)
        if enc.is_t5 and without_t5:
            out.append(None)
            continue
        if file is not None:
            width = preset.t5["d_model"] if enc.is_t5 else preset.clip[i]["hidden_size"]
            file, names = separate_encoder(enc, Path(file), width, preset.name, _WHY)
            if bundled:
                log.info(
                    "%s: using %s from %s rather than the one %s bundles",
                    path.name,
                    enc.what,
                    file,
                    path.name,
                )
            out.append((file, names))
        elif bundled:
            out.append((path, bundled))
        else:
            missing.append(enc)
            out.append(None)
    if any(not e.is_t5 for e in missing):
        what = " and ".join(e.what for e in missing)
        raise InputError(
            f"{path.name} does not bundle its {what} text encoder{'s' if len(missing) > 1 else ''}; pass "
            f"{'them' if len(missing) > 1 else 'it'} as separate files: "
            f"{' '.join(f'{e.flag} FILE' for e in missing)} "
            "(Stability's text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors)"
            + ("; or --without-t5 to leave T5 out" if any(e.is_t5 for e in missing) else "")
        )
    if missing:
        raise InputError(
            f"{path.name} does not bundle the T5-XXL text encoder; pass it as --t5 FILE (Stability's "
            "text_encoders/t5xxl_fp16.safetensors), or pass --without-t5 to export without it (lighter, "
            "weaker prompt following and text rendering)"
        )
    return out


def _tokenizer_dirs(
    preset: Sd3Preset, tokenizers: Path | None, t5: bool, name: str
) -> tuple[Path | None, Path | None, Path | None]:
    """The tokenizer folders: ``tokenizers``' tokenizer/, tokenizer_2/, tokenizer_3/ (a diffusers SD3
    folder's), else the shipped ones: CLIP's BPE fits every SD3 model; the shipped T5 tokenizer only the tiny
    presets."""
    dirs = tokenizer_dirs(
        tokenizers,
        ("tokenizer", "tokenizer_2", "tokenizer_3"),
        t5="tokenizer_3",
        needs_t5=t5,
        t5_shipped=preset.test_scale,
        name=name,
        family="SD 3 / 3.5",
        example="stabilityai/stable-diffusion-3.5-medium",
        alternative="--without-t5",
    )
    return dirs[0], dirs[1], dirs[2]


# --- loading ---------------------------------------------------------------------------------------


def load_sd3_single_file(
    path: str | Path,
    *,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
    without_t5: bool = False,
    tokenizers: str | Path | None = None,
    arch: str | None = None,
    stream: bool | None = None,
) -> LoadedSd3:
    """An SD 3 / 3.5 single file (with or without its text encoders) -> float32 modules in eval mode, and the
    MMDiT and T5 streamed where ``stream`` says (as a diffusers folder's: by default those over a billion
    parameters; see the module docstring).

    ``clip_l`` / ``clip_g`` / ``t5``: Stability's separate text-encoder files (they replace bundled ones);
    ``without_t5``: T5 is left out (not read). ``tokenizers``: a folder with tokenizer/, tokenizer_2/,
    tokenizer_3/ (needed for T5 of a full-size model). Every refusal comes before any tensor is read."""
    path = Path(path)
    if without_t5 and t5 is not None:
        raise InputError("--t5 and --without-t5 contradict each other; pass one of them")
    shapes = file_shapes(path)
    preset = detect_sd3_preset(shapes, arch=arch, name=path.name)
    log.info("%s: SD 3 / 3.5 single file, preset %s", path.name, preset.name)
    given = [Path(p) if p is not None else None for p in (clip_l, clip_g, t5)]
    sources = _sources(path, shapes, preset, given, without_t5)
    toks = _tokenizer_dirs(
        preset, Path(tokenizers) if tokenizers is not None else None, sources[2] is not None, path.name
    )
    shapes_of = weight_shapes(preset.config("transformer"), preset.config("t5") if sources[2] is not None else None)
    skip = to_stream(shapes_of, stream)
    streamed = {}
    if "transformer" in skip:
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

        mmdit = lazy_tensors(path, {k: k for k in shapes if k.startswith(MMDIT)})
        weights = streamed_part(convert_sd3_transformer_checkpoint_to_diffusers, mmdit, shapes_of["transformer"],
                                "MMDiT", path.name)
        streamed["transformer"] = Streamed(preset.config("transformer"), weights, "checkpoint")
    if "text_encoder_3" in skip:
        t5_source = sources[2]
        assert t5_source is not None
        streamed["text_encoder_3"] = Streamed(preset.config("t5"), streamed_t5(ENCODERS[2], t5_source,
                                                                               shapes_of["text_encoder_3"]),
                                              "checkpoint")
    modules = _convert(path, shapes, preset, sources, skip)
    return LoadedSd3(
        preset,
        modules,
        preset.config("scheduler"),
        toks,
        source={
            "kind": "single_file",
            "path": str(path),
            "sha256": sha256_file(path),
            **{
                e.name: str(s[0])
                for e, s in zip(ENCODERS, sources, strict=True)
                if s is not None and s[0] != path
            },
        },
        streamed=streamed,
    )


def _write_configs(preset: Sd3Preset, folder: Path) -> None:
    from transformers import CLIPTextConfig, T5Config

    for sub, cls, cfg in (
        ("transformer", "SD3Transformer2DModel", preset.config("transformer")),
        ("vae", "AutoencoderKL", preset.config("vae")),
    ):
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text(json.dumps({"_class_name": cls, **cfg}, indent=2))
    for enc, cfg in zip(ENCODERS[:2], preset.config("clip"), strict=True):
        CLIPTextConfig(**cfg).save_pretrained(folder / enc.config_dir)
    T5Config(**preset.config("t5")).save_pretrained(folder / ENCODERS[2].config_dir)


def _convert(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    preset: Sd3Preset,
    sources: Sequence[tuple[Path, dict[str, str]] | None],
    skip: Sequence[str] = (),
) -> Sd3Modules:
    """The modules of the parts not in ``skip`` (those streamed, and T5 left out: None)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    name = path.name
    failures = (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return read_tensors(path, {k: k for k in shapes if k.startswith(prefix)})

    with tempfile.TemporaryDirectory(prefix="sdrt-sd3-single-file-") as tmp:
        _write_configs(preset, Path(tmp))
        kw: dict[str, Any] = {"config": tmp, "local_files_only": True}
        what = "MMDiT"
        try:
            transformer = None
            if "transformer" not in skip:
                transformer = SD3Transformer2DModel.from_single_file(
                    part(MMDIT), subfolder="transformer", low_cpu_mem_usage=True, **kw
                )
                require_loaded(transformer, what, name, preset)
            what = "VAE"
            vae = AutoencoderKL.from_single_file(part(VAE), subfolder="vae", low_cpu_mem_usage=True, **kw)
            require_loaded(vae, what, name, preset)
            encoders: list[torch.nn.Module | None] = []
            for enc, src in zip(ENCODERS, sources, strict=True):
                if src is None or enc.config_dir in skip:
                    encoders.append(None)
                    continue
                what = f"{enc.what} text encoder"
                cls = T5EncoderModel if enc.is_t5 else CLIPTextModelWithProjection
                module = load_encoder(enc, src, cls, kw)
                require_loaded(module, what, src[0].name, preset)
                encoders.append(module)
        except failures as e:
            raise ArtifactError(
                f"cannot convert the {what} of {name} as {preset.name} ({e}); the file is incomplete "
                "or of another architecture"
            ) from e
    for m in (transformer, vae, *encoders):
        if m is not None:
            m.float().eval()
    return Sd3Modules(transformer, (encoders[0], encoders[1], encoders[2]), vae)  # type: ignore[arg-type]
