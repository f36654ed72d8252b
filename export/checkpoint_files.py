"""What the transformer families' single files share (SD 3 / 3.5: ``sd3_single_file.py``, FLUX.1:
``flux_single_file.py``): reading a .safetensors header and its tensors, the separate text-encoder files
(transformers' layouts, also under the bundled ``text_encoders.<name>.transformer.`` prefix that Stability's and
ComfyUI's all-in-one files use), their conversion through diffusers' creators, the ``--tokenizers`` folder, and
choosing a shipped preset from the figures a file's shapes reveal, with a report of what differs, and T5 as a
streamed export's weights (``streamed_t5``).

Every function here reads key names and shapes only, unless its name says it reads tensors; nothing is
unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from sdrt.runtime.errors import ArtifactError, InputError, UnsafeCheckpointError

from .lazy_convert import lazy_tensors, streamed_part
from .loading import PICKLE_SUFFIXES
from .streamed import WeightSource

log = logging.getLogger(__name__)


# --- reading ---------------------------------------------------------------------------------------


def refuse_pickle(path: Path, what: str, why: str) -> None:
    """A pickled file is refused unread; ``why``: the family's reason to read .safetensors only."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{what + ' ' if what else ''}{path.name} is a pickled file: loading it runs arbitrary code from "
            f"the file, and {why}; pass the .safetensors version"
        )


def safetensors_shapes(path: Path, what: str, why: str) -> dict[str, tuple[int, ...]]:
    """A .safetensors file's key names and shapes (its header only); a pickle is refused unread."""
    from safetensors import SafetensorError, safe_open

    refuse_pickle(path, what, why)
    if not path.is_file():
        raise InputError(f"{what + ' ' if what else ''}{path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ArtifactError(
            f"{path.name} is not a readable .safetensors file ({e}); it may be truncated or of another format"
        ) from e


def read_tensors(path: Path, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """{new name: tensor} for the file's keys ``names`` maps from, as float32 where they are floats."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {new: f.get_tensor(old) for old, new in names.items()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"cannot read the tensors of {path.name}: {e}") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


# --- text encoders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderFile:
    """A text encoder as a single file holds it (``text_encoders.<name>.transformer.*``) or as a separate file
    (transformers' layout) given by ``flag``."""

    name: str  # the file's name for it: clip_l, clip_g, t5xxl
    flag: str  # the CLI flag that gives it as a separate file
    what: str  # CLIP-L, CLIP-G, T5-XXL
    config_dir: str  # the diffusers subfolder its config is written to
    hint: str  # the separate file people have, for messages

    @property
    def prefix(self) -> str:
        return f"text_encoders.{self.name}.transformer."

    @property
    def is_t5(self) -> bool:
        return self.name == "t5xxl"

    @property
    def marks(self) -> tuple[str, ...]:
        """Keys one of which the encoder holds (transformers' names)."""
        return T5_MARKS if self.is_t5 else (CLIP_MARK,)


CLIP_MARK = "text_model.embeddings.token_embedding.weight"
T5_MARKS = ("shared.weight", "encoder.embed_tokens.weight")


def bundled_names(enc: TextEncoderFile, shapes: Mapping[str, Any]) -> dict[str, str]:
    """{key: key} of the encoder a single file bundles (empty: none)."""
    return {k: k for k in shapes if k.startswith(enc.prefix)}


def encoder_names(enc: TextEncoderFile, keys: Sequence[str], path: Path) -> dict[str, str]:
    """{the file's key: the bundled key} for a separate encoder file: transformers' layout, also under the
    bundled prefix, or (CLIP) flattened without ``text_model.``."""
    if any(k.startswith(enc.prefix) for k in keys):
        bare = {k: k.removeprefix(enc.prefix) for k in keys if k.startswith(enc.prefix)}
    else:
        bare = {k: k for k in keys}
    if not enc.is_t5 and "embeddings.token_embedding.weight" in bare.values():  # a flattened CLIPTextModel
        bare = {
            k: v if v.startswith(("text_model.", "text_projection.")) else "text_model." + v
            for k, v in bare.items()
        }
    if not any(m in bare.values() for m in enc.marks):
        raise InputError(
            f"{enc.flag} {path}: not a {enc.what} text encoder in transformers' layout "
            f"(no {' or '.join(enc.marks)}); give {enc.hint} or the same weights in that layout"
        )
    return {k: enc.prefix + v for k, v in bare.items()}


def encoder_width(
    enc: TextEncoderFile, shapes: Mapping[str, tuple[int, ...]], names: Mapping[str, str]
) -> int | None:
    """The width of the encoder's token embedding, from a file's shapes (``names``: file key -> bundled key)."""
    wanted = {enc.prefix + m for m in enc.marks}
    file_key = next((k for k, v in names.items() if v in wanted), None)
    return shapes[file_key][1] if file_key is not None else None


def separate_encoder(
    enc: TextEncoderFile, file: Path, width: int, preset: str, why: str
) -> tuple[Path, dict[str, str]]:
    """A separate encoder file given by its flag, checked from its header: its layout and width."""
    fshapes = safetensors_shapes(file, enc.flag, why)
    names = encoder_names(enc, list(fshapes), file)
    got = encoder_width(enc, fshapes, names)
    if got is not None and got != width:
        raise InputError(
            f"{enc.flag} {file}: its width is {got}, {preset}'s {enc.what} has {width}; is it another "
            "encoder's file?"
        )
    return file, names


def load_encoder(
    enc: TextEncoderFile, source: tuple[Path, Mapping[str, str]], cls: type, kw: Mapping[str, Any]
) -> torch.nn.Module:
    """The encoder's module through diffusers' creators (``kw``: their ``config`` folder and options), from
    ``source``: (file, {file key: bundled key})."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )

    tensors = read_tensors(*source)
    if enc.is_t5:
        module = create_diffusers_t5_model_from_checkpoint(cls, _tied(enc, tensors), subfolder=enc.config_dir, **kw)
        module.tie_weights()
        return module
    return create_diffusers_clip_model_from_ldm(cls, tensors, subfolder=enc.config_dir, **kw)


def _tied(enc: TextEncoderFile, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5's encoder embeds with the shared table: one tensor, under ``shared.weight`` (a file may hold it as
    ``encoder.embed_tokens.weight`` only, or under both names)."""
    shared, embed = enc.prefix + T5_MARKS[0], enc.prefix + T5_MARKS[1]
    if embed in tensors:
        tensors.setdefault(shared, tensors[embed])
        del tensors[embed]
    return tensors


def streamed_t5(enc: TextEncoderFile, source: tuple[Path, Mapping[str, str]], expected: Mapping[str, tuple[int, ...]],
                ) -> WeightSource:
    """T5 of ``source`` ((file, {file key: bundled key})) as a streamed export's weights, one tensor read at a
    time: the conversion ``load_encoder`` makes (diffusers' ``convert_sd3_t5_checkpoint_to_diffusers``) recorded
    on lazy tensors (export/lazy_convert.py) and checked against ``expected``, T5's names and shapes, unread."""
    from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers

    tensors = _tied(enc, lazy_tensors(*source))
    return streamed_part(convert_sd3_t5_checkpoint_to_diffusers, tensors, expected, f"{enc.what} text encoder",
                         source[0].name)


# --- tokenizers ------------------------------------------------------------------------------------


def tokenizer_dirs(
    tokenizers: Path | None,
    subfolders: Sequence[str],
    *,
    t5: str,
    needs_t5: bool,
    t5_shipped: bool,
    name: str,
    family: str,
    example: str,
    alternative: str = "",
) -> tuple[Path | None, ...]:
    """Each of ``subfolders`` in ``tokenizers`` (a diffusers folder of the ``family``), else None: the shipped
    tokenizers, CLIP's BPE fitting every model and T5's (``t5``, the subfolder of its tokenizer) only the tiny
    presets (``t5_shipped``). ``needs_t5``: T5 is exported (else its tokenizer is None). ``alternative``:
    another way out, for messages (e.g. ``--without-t5``)."""
    listed = ", ".join(f"{s}/" for s in subfolders[:-1]) + f" and {subfolders[-1]}/"
    other = f", or {alternative}" if alternative else ""
    if tokenizers is None:
        if needs_t5 and not t5_shipped:
            raise InputError(
                f"{name} has no tokenizers and sdrt ships T5's only for its tiny test models: pass "
                f"--tokenizers DIR, a diffusers {family} folder (or any folder) holding {listed} "
                f"(e.g. {example}'s){other}"
            )
        return tuple(None for _ in subfolders)
    tokenizers = Path(tokenizers)
    if not tokenizers.is_dir():
        raise InputError(
            f"--tokenizers {tokenizers} is not a folder; give the folder that holds {listed} (a diffusers "
            f"{family} folder)"
        )
    if needs_t5 and not (tokenizers / t5).is_dir():
        raise InputError(
            f"--tokenizers {tokenizers} has no {t5}/ (T5's tokenizer); give a diffusers {family} folder's{other}"
        )
    return tuple(
        tokenizers / s if (tokenizers / s).is_dir() and (needs_t5 or s != t5) else None for s in subfolders
    )


# --- presets by shape ------------------------------------------------------------------------------


class _Named(Protocol):
    @property
    def name(self) -> str: ...


P = TypeVar("P", bound=_Named)


def show(v: Any) -> str:
    """A figure as messages show it: runs of consecutive indices as a range."""
    if isinstance(v, tuple):
        return f"{v[0]}-{v[-1]}" if len(v) > 3 and list(v) == list(range(v[0], v[-1] + 1)) else str(list(v))
    return str(v)


def differences(expected: Mapping[str, Any], observed: Mapping[str, Any], preset: str) -> list[str]:
    """``figure X in the file, Y in preset`` for each figure that differs."""
    return [
        f"{k} {show(observed.get(k))} in the file, {show(v)} in {preset}"
        for k, v in expected.items()
        if observed.get(k) != v
    ]


def pick_preset(
    observed: Mapping[str, Any],
    candidates: Sequence[P],
    expected: Callable[[P], Mapping[str, Any]],
    *,
    arch: P | None,
    name: str,
    family: str,
) -> P:
    """The first candidate whose expected figures are all observed, or ``arch`` checked against them.
    ``family`` with its article, for messages (``an SD 3 / 3.5``, ``a FLUX.1``)."""

    def diffs(p: P) -> list[str]:
        return differences(expected(p), observed, p.name)

    matches = [p for p in candidates if not diffs(p)]
    if arch is not None:
        if found := diffs(arch):
            fits = f" (it fits {', '.join(p.name for p in matches)})" if matches else ""
            raise InputError(
                f"--arch {arch.name} does not fit {name}{fits}: {'; '.join(found)}; drop --arch or pass "
                "one that fits"
            )
        return arch
    if not matches:
        closest = min(candidates, key=lambda p: len(diffs(p)))
        raise ArtifactError(
            f"{name} is {family} file of an architecture no shipped preset has; closest is "
            f"{closest.name}: {'; '.join(diffs(closest))}"
        )
    return matches[0]
