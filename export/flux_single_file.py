"""FLUX.1 single files in Black Forest Labs' layout (flux1-dev.safetensors, flux1-schnell.safetensors,
flux1-fill-dev.safetensors, flux1-depth-dev.safetensors, flux1-canny-dev.safetensors, and fine-tunes saved so) -> a ``LoadedFlux``, through diffusers' own single-file converters.

The layouts:

- BFL's transformer file: the transformer alone, as BFL's ``flux`` package names it (``double_blocks.N.img_attn.qkv``,
  ``single_blocks.N.linear1``, ``img_in``, ``txt_in``, ``time_in``, ``vector_in``; [dev] adds ``guidance_in``);
- BFL's ae.safetensors: the VAE in LDM's names (``encoder.down.N.block.M.*``, no quant convs), given as ``--vae``;
- the text encoders as separate files in transformers' layouts (``--clip-l clip_l.safetensors``, ``--t5
  t5xxl_fp16.safetensors``, as ComfyUI's flux_text_encoders ship them; BFL publishes none);
- ComfyUI's all-in-one checkpoints: the transformer under ``model.diffusion_model.``, the VAE under ``vae.``, the
  encoders under ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.``; a separate file
  given replaces the bundled part.

Three steps, the first two on key names and shapes alone, so every refusal comes before any weight is read:

1. ``detect_flux_preset``: the shipped preset from tensor shapes ([dev] has ``guidance_in``, [schnell] not; Fill
   takes 384 input channels, Depth and Canny 128 (one shape: Depth unless ``arch`` says Canny); the depths, widths
   and the VAE's channels), or ``arch`` checked against them; other models of the FLUX line with FLUX.1's blocks
   (Chroma, FLUX.2, ...) are refused by the name diffusers' own probe gives them;
2. each part's source (bundled, or the file its flag gives) and the tokenizers are settled (a missing part is an
   ``InputError`` naming every flag to pass);
3. diffusers' converters (``convert_flux_transformer_checkpoint_to_diffusers``, ``AutoencoderKL.from_single_file``,
   ``create_diffusers_clip_model_from_ldm``, ``create_diffusers_t5_model_from_checkpoint``) build the modules,
   fed with the preset's configurations written to a temporary folder, so nothing is fetched.

The transformer and T5 follow the ``stream`` rule of a diffusers folder (``sd3_model.to_stream``: by default,
parts over a billion parameters, so both of a full-size file): they are not loaded but streamed at export,
the same converters recorded on lazy tensors and replayed one weight at a time as the ONNX external data is
written (export/lazy_convert.py); the converted names and shapes are checked against the architecture before
any weight is read. CLIP and the VAE load whole.

Tensors of any float type (BFL's bf16, fp16, plain fp8) load as float32 (a streamed part's, tensor by tensor);
ComfyUI's *scaled* fp8 files (a ``scale_weight`` per tensor) are refused by name. Only ``.safetensors`` is
read: nothing is unpickled.
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
from .flux_loading import LoadedFlux, weight_shapes
from .flux_presets import FLUX_PRESETS, FluxModules, FluxPreset, get_flux_preset
from .flux_specs import T5_NAME
from .lazy_convert import lazy_tensors, streamed_part
from .loading import sha256_file
from .sd3_model import Streamed, to_stream
from .single_file import require_loaded

log = logging.getLogger(__name__)

MARK = "double_blocks.0.img_attn.norm.key_norm.scale"  # what says "a FLUX.1 transformer" (diffusers' probe too)
COMFY_ROOT = "model.diffusion_model."  # ComfyUI's all-in-one files hold the transformer under it
VAE_ROOTS = ("vae.", "first_stage_model.")  # a bundled VAE (ComfyUI: vae.)
VAE_MARK = "encoder.down.0.block.0.conv1.weight"  # LDM's names, as ae.safetensors has them
ENCODERS = (
    TextEncoderFile("clip_l", "--clip-l", "CLIP-L", "text_encoder", "clip_l.safetensors (ComfyUI's flux_text_encoders)"),
    TextEncoderFile("t5xxl", "--t5", "T5-XXL", "text_encoder_2",
                    "t5xxl_fp16.safetensors (ComfyUI's flux_text_encoders)"),
)
VAE_FLAG, VAE_HINT = "--vae", "Black Forest Labs' ae.safetensors"
FLUX_WIDTH = 3072  # diffusers' converter splits each single block's linear1 at FLUX.1's width (its inner_dim)
_WHY = "FLUX.1 files are read from .safetensors only (Black Forest Labs publishes them so)"
_SCALED = re.compile(r"(^|\.)(scale_weight|scaled_fp8)$")


# --- reading ---------------------------------------------------------------------------------------


def file_shapes(path: Path, what: str = "") -> dict[str, tuple[int, ...]]:
    """A .safetensors file's key names and shapes (its header only); a pickle or a scaled-fp8 file is refused
    unread."""
    shapes = safetensors_shapes(path, what, _WHY)
    if scaled := next((k for k in shapes if _SCALED.search(k)), None):
        raise InputError(
            f"{what + ' ' if what else ''}{path.name} is a scaled fp8 file ({scaled}: ComfyUI scales each "
            "tensor); sdrt reads plain tensors: give the fp16 or bf16 file"
        )
    return shapes


def transformer_root(shapes: Mapping[str, Any]) -> str | None:
    """Where a file holds a FLUX.1 transformer: ``""`` (BFL's files), ``model.diffusion_model.`` (ComfyUI's), or
    None (it holds none)."""
    return next((r for r in ("", COMFY_ROOT) if r + MARK in shapes), None)


def is_flux_file(path: str | Path) -> bool:
    """A .safetensors file holding a transformer of the FLUX.1 line in BFL's names (``double_blocks``); which
    model it is, and whether sdrt takes it, ``detect_flux_preset`` says."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return False
    try:
        return transformer_root(safetensors_shapes(p, "", _WHY)) is not None
    except (ArtifactError, InputError):
        return False


def _part(shapes: Mapping[str, Any], root: str, others: Sequence[str] = ()) -> dict[str, str]:
    """{the file's key: the key without ``root``} for the keys under ``root`` and under none of ``others``."""
    return {k: k.removeprefix(root) for k in shapes if k.startswith(root) and not k.startswith(tuple(others))}


# --- detection -------------------------------------------------------------------------------------

_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.")
_VAE_LEVEL = re.compile(r"vae\.encoder\.down\.(\d+)\.")


def _observed(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The architecture figures of a transformer (BFL's names) and a VAE (``vae.`` + LDM's names)."""

    def dim(key: str, axis: int) -> int | None:
        s = shapes.get(key)
        return int(s[axis]) if s is not None and len(s) > axis else None

    width, linear1 = dim("img_in.weight", 0), dim("single_blocks.0.linear1.weight", 0)
    levels = len({m.group(1) for k in shapes if (m := _VAE_LEVEL.match(k))})
    conv_out = dim("vae.encoder.conv_out.weight", 0)
    return {
        "double blocks": len({m.group(1) for k in shapes if (m := _DOUBLE.match(k))}),
        "single blocks": len({m.group(1) for k in shapes if (m := _SINGLE.match(k))}),
        "width": width,
        "head width": dim("double_blocks.0.img_attn.norm.query_norm.scale", 0),
        "latent channels in": dim("img_in.weight", 1),
        "single block MLP width": linear1 - 3 * width if linear1 is not None and width is not None else None,
        "text width": dim("txt_in.weight", 1),
        "pooled width": dim("vector_in.in_layer.weight", 1),
        "guidance embedding": "guidance_in.in_layer.weight" in shapes,
        "VAE block channels": tuple(dim(f"vae.encoder.down.{i}.block.0.conv1.weight", 0) for i in range(levels)),
        "VAE latent channels": conv_out // 2 if conv_out else None,
    }


def _expected(p: FluxPreset) -> dict[str, Any]:
    t = p.transformer
    width = t["num_attention_heads"] * t["attention_head_dim"]
    return {
        "double blocks": t["num_layers"],
        "single blocks": t["num_single_layers"],
        "width": width,
        "head width": t["attention_head_dim"],
        "latent channels in": t["in_channels"],
        "single block MLP width": 4 * width,  # diffusers' FluxSingleTransformerBlock: mlp_ratio 4
        "text width": t["joint_attention_dim"],
        "pooled width": t["pooled_projection_dim"],
        "guidance embedding": bool(t["guidance_embeds"]),
        "VAE block channels": tuple(p.vae["block_out_channels"]),
        "VAE latent channels": p.vae["latent_channels"],
    }


# diffusers' probe's names of the models sdrt exports (its flux-depth: FLUX.1 Depth and Canny, one shape)
EXPORTED = ("flux-dev", "flux-schnell", "flux-fill", "flux-depth")


def _other_model(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """What diffusers' own single-file probe calls a file of the FLUX line that is not FLUX.1 [schnell], [dev],
    Fill, Depth or Canny (Chroma, FLUX.2, ...), from its shapes alone; None for those."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    meta = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    try:
        kind = infer_diffusers_model_type(meta)
    except (KeyError, IndexError, ValueError, RuntimeError, AttributeError):
        return None
    return None if kind in EXPORTED else str(kind)


def _not_flux(name: str) -> ArtifactError:
    return ArtifactError(
        f"{name} is not a FLUX.1 single file: it has no {MARK} (Black Forest Labs' flux1-dev and flux1-schnell "
        f"files hold the transformer as double_blocks.* and single_blocks.*, ComfyUI's under {COMFY_ROOT})"
    )


def detect_flux_preset(
    shapes: Mapping[str, Sequence[int]], *, arch: str | None = None, name: str = "the file"
) -> FluxPreset:
    """The shipped FLUX.1 preset of a transformer and VAE from their key names and tensor shapes only: the
    transformer in BFL's names (``double_blocks.*``, root-level) and the VAE under ``vae.`` in LDM's names.
    [schnell] and [dev] differ in ``guidance_in``, Fill in ``img_in``'s input width (384: the latents, the masked
    image's latents and the mask), Depth / Canny in theirs (128: the latents and a control image's latents; the
    two share every shape, so such a file is Depth unless ``arch`` names Canny). ``arch`` (a preset name) must
    agree with them."""
    dims = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
    if MARK not in dims:
        raise _not_flux(name)
    if (other := _other_model({k: s for k, s in dims.items() if not k.startswith("vae.")})) is not None:
        raise InputError(
            f"{name} is a {other} model (as diffusers' single-file probe names it), not FLUX.1 [schnell], [dev], "
            "Fill, Depth or Canny; sdrt exports those only"
        )
    return pick_preset(
        _observed(dims),
        list(FLUX_PRESETS.values()),
        _expected,
        arch=get_flux_preset(arch) if arch is not None else None,
        name=name,
        family="a FLUX.1",
    )


# --- the parts' sources ----------------------------------------------------------------------------


def _vae_source(path: Path, shapes: Mapping[str, Any], vae: Path | None) -> tuple[Path, dict[str, str]] | None:
    """(file, {the file's key: LDM's key}) of the VAE: the one ``--vae`` gives (ae.safetensors, or a file
    holding it under vae. or first_stage_model.), else the one ``path`` bundles, else None."""
    if vae is not None:
        vshapes = file_shapes(vae, VAE_FLAG)
        root = next((r for r in ("", *VAE_ROOTS) if r + VAE_MARK in vshapes), None)
        if root is None:
            raise InputError(
                f"{VAE_FLAG} {vae}: not a VAE in LDM's layout (no {VAE_MARK}); give {VAE_HINT} or the same "
                "weights in its layout"
            )
        if any(r + VAE_MARK in shapes for r in VAE_ROOTS):
            log.info("%s: using the VAE of %s rather than the one it bundles", path.name, vae)
        return vae, _part(vshapes, root)
    root = next((r for r in VAE_ROOTS if r + VAE_MARK in shapes), None)
    return (path, _part(shapes, root)) if root is not None else None


def _refuse_missing(path: Path, vae: bool, encoders: Sequence[bool]) -> None:
    """One refusal naming every flag to pass, for the parts neither the file nor a flag gives."""
    missing = ([] if vae else [(VAE_FLAG, "VAE", VAE_HINT)]) + [
        (e.flag, f"{e.what} text encoder", e.hint) for e, ok in zip(ENCODERS, encoders, strict=True) if not ok
    ]
    if missing:
        raise InputError(
            f"{path.name} holds no {' and no '.join(m[1] for m in missing)}; pass "
            f"{'them' if len(missing) > 1 else 'it'} as separate files: "
            f"{' '.join(f'{m[0]} FILE' for m in missing)} ({'; '.join(f'{m[0]}: {m[2]}' for m in missing)})"
        )


def _tokenizer_dirs(preset: FluxPreset, tokenizers: Path | None, name: str) -> tuple[Path | None, Path | None]:
    """tokenizer/ (CLIP) and tokenizer_2/ (T5) of ``tokenizers`` (a diffusers FLUX.1 folder's), else the shipped
    ones: CLIP's BPE fits every FLUX.1 model, the shipped T5 tokenizer only the tiny presets."""
    dirs = tokenizer_dirs(
        tokenizers,
        ("tokenizer", "tokenizer_2"),
        t5="tokenizer_2",
        needs_t5=True,
        t5_shipped=preset.test_scale,
        name=name,
        family="FLUX.1",
        example="black-forest-labs/FLUX.1-schnell",
    )
    return dirs[0], dirs[1]


# --- loading ---------------------------------------------------------------------------------------


def load_flux_single_file(
    path: str | Path,
    *,
    clip_l: str | Path | None = None,
    t5: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizers: str | Path | None = None,
    arch: str | None = None,
    stream: bool | None = None,
) -> LoadedFlux:
    """A FLUX.1 single file (BFL's transformer file, or ComfyUI's all-in-one) with the parts it lacks as separate
    files -> float32 modules in eval mode, and the transformer and T5 streamed where ``stream`` says (as a
    diffusers folder's: by default those over a billion parameters; see the module docstring).

    ``clip_l`` / ``t5``: text-encoder files in transformers' layout; ``vae``: BFL's ae.safetensors (each replaces
    a bundled part); ``tokenizers``: a folder with tokenizer/ and tokenizer_2/ (needed for a full-size model's
    T5); ``arch``: a preset name checked against the file. Every refusal comes before any tensor is read."""
    path = Path(path)
    shapes = file_shapes(path)
    root = transformer_root(shapes)
    if root is None:
        raise _not_flux(path.name)
    transformer = _part(shapes, root, (*VAE_ROOTS, "text_encoders."))
    vae_src = _vae_source(path, shapes, Path(vae) if vae is not None else None)
    given = [Path(p) if p is not None else None for p in (clip_l, t5)]
    _refuse_missing(path, vae_src is not None,
                    [f is not None or bool(bundled_names(e, shapes)) for e, f in zip(ENCODERS, given, strict=True)])
    assert vae_src is not None
    vae_shapes = file_shapes(vae_src[0]) if vae_src[0] != path else shapes
    view = {new: shapes[old] for old, new in transformer.items()}
    view.update({"vae." + new: vae_shapes[old] for old, new in vae_src[1].items()})
    preset = detect_flux_preset(view, arch=arch, name=path.name)
    log.info("%s: FLUX.1 single file, preset %s", path.name, preset.name)
    sources: list[tuple[Path, dict[str, str]]] = []
    for enc, file in zip(ENCODERS, given, strict=True):
        if file is None:
            sources.append((path, bundled_names(enc, shapes)))
            continue
        file_shapes(file, enc.flag)  # a scaled fp8 file is refused by name
        width = preset.t5["d_model"] if enc.is_t5 else preset.clip["hidden_size"]
        sources.append(separate_encoder(enc, file, width, preset.name, _WHY))
        if bundled_names(enc, shapes):
            log.info("%s: using %s from %s rather than the one it bundles", path.name, enc.what, file)
    toks = _tokenizer_dirs(preset, Path(tokenizers) if tokenizers is not None else None, path.name)
    shapes_of = weight_shapes(preset.config("transformer"), preset.config("t5"))
    skip = to_stream(shapes_of, stream)
    streamed = {}
    if "transformer" in skip:
        weights = streamed_part(to_diffusers, lazy_tensors(path, transformer), shapes_of["transformer"],
                                "transformer", path.name)
        streamed["transformer"] = Streamed(preset.config("transformer"), weights, "checkpoint")
    if T5_NAME in skip:
        streamed[T5_NAME] = Streamed(preset.config("t5"), streamed_t5(ENCODERS[1], sources[1], shapes_of[T5_NAME]),
                                     "checkpoint")
    modules = _convert(path, transformer, vae_src, preset, sources, skip)
    extra = {"vae": str(vae_src[0])} if vae_src[0] != path else {}
    extra.update({e.name: str(s[0]) for e, s in zip(ENCODERS, sources, strict=True) if s[0] != path})
    return LoadedFlux(
        preset,
        modules,
        preset.config("scheduler"),
        toks,
        source={"kind": "single_file", "path": str(path), "sha256": sha256_file(path), **extra},
        streamed=streamed,
    )


def to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer in BFL's names -> diffusers' names, by diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` (which consumes ``checkpoint``).

    That converter splits each single block's fused ``linear1`` (q, k, v, the MLP's input) at FLUX.1's width,
    3072, whatever the file's: a narrower transformer (the tests' tiny presets) has each ``linear1`` laid out at
    those offsets first, zero-filled between, and the parts are cut back to its width after. A FLUX.1 file
    (3072 wide) goes through the converter untouched. Works on meta and lazy tensors (export/lazy_convert.py)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    width = int(checkpoint["img_in.weight"].shape[0])
    if width == FLUX_WIDTH:
        return convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    if width > FLUX_WIDTH:
        raise ArtifactError(f"a transformer {width} wide is wider than FLUX.1's {FLUX_WIDTH}: not a FLUX.1 model")
    sizes = [width] * 3 + [4 * width]
    for k in [k for k in checkpoint if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
        t = checkpoint[k]
        laid: list[torch.Tensor] = []  # each part, zero-filled to FLUX.1's size of it
        for piece, size in zip(torch.split(t, sizes, dim=0), sizes, strict=True):
            laid += [piece, t.new_zeros((size // width * (FLUX_WIDTH - width), *t.shape[1:]))]
        checkpoint[k] = torch.cat(laid, dim=0)
    out = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for k, t in out.items():
        if re.fullmatch(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)\.(weight|bias)", k):
            out[k] = t[: 4 * width if ".proj_mlp." in k else width].clone()
    return out


def _write_configs(preset: FluxPreset, folder: Path) -> None:
    from transformers import CLIPTextConfig, T5Config

    for sub, cls, cfg in (
        ("transformer", "FluxTransformer2DModel", preset.config("transformer")),
        ("vae", "AutoencoderKL", preset.config("vae")),
    ):
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text(json.dumps({"_class_name": cls, **cfg}, indent=2))
    CLIPTextConfig(**preset.config("clip")).save_pretrained(folder / ENCODERS[0].config_dir)
    T5Config(**preset.config("t5")).save_pretrained(folder / ENCODERS[1].config_dir)


def _convert(
    path: Path,
    transformer_keys: Mapping[str, str],
    vae_src: tuple[Path, Mapping[str, str]],
    preset: FluxPreset,
    sources: Sequence[tuple[Path, Mapping[str, str]]],
    skip: Sequence[str] = (),
) -> FluxModules:
    """The modules of the parts not in ``skip`` (those streamed: None)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from transformers import CLIPTextModel, T5EncoderModel

    failures = (ValueError, KeyError, RuntimeError, OSError, SingleFileComponentError)
    with tempfile.TemporaryDirectory(prefix="sdrt-flux-single-file-") as tmp:
        _write_configs(preset, Path(tmp))
        kw: dict[str, Any] = {"config": tmp, "local_files_only": True}
        what, name = "transformer", path.name
        try:
            transformer = None
            if "transformer" not in skip:
                # converted here (diffusers' converter: see to_diffusers); from_single_file finds diffusers' names
                transformer = FluxTransformer2DModel.from_single_file(
                    to_diffusers(read_tensors(path, transformer_keys)), subfolder="transformer",
                    low_cpu_mem_usage=True, **kw
                )
                require_loaded(transformer, what, name, preset)
            what, name = "VAE", vae_src[0].name
            vae = AutoencoderKL.from_single_file(read_tensors(*vae_src), subfolder="vae", low_cpu_mem_usage=True,
                                                 **kw)
            require_loaded(vae, what, name, preset)
            encoders = []
            for enc, src, cls in zip(ENCODERS, sources, (CLIPTextModel, T5EncoderModel), strict=True):
                if enc.config_dir in skip:
                    encoders.append(None)
                    continue
                what, name = f"{enc.what} text encoder", src[0].name
                module = load_encoder(enc, src, cls, kw)
                require_loaded(module, what, name, preset)
                encoders.append(module)
        except failures as e:
            raise ArtifactError(
                f"cannot convert the {what} of {name} as {preset.name} ({e}); the file is incomplete or of "
                "another architecture"
            ) from e
    for m in (transformer, vae, *encoders):
        if m is not None:
            m.float().eval()
    return FluxModules(transformer=transformer, clip=encoders[0], t5=encoders[1], vae=vae)  # type: ignore[arg-type]
