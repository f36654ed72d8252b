"""LoRA per request: adapters turned into the factors a slotted export's UNet takes as inputs.

An export made with ``sdrt export --lora-slots RANK[:TARGETS]`` (export/lora_slots.py) gives each targeted layer
two inputs, ``lora.<module>.down`` [rank, in] and ``lora.<module>.up`` [out, rank] (a convolution's, with
``attn-ff-conv``: [rank, in, kh, kw] and [out, rank, 1, 1], LoCon's shapes); the layer adds ``up (down x)``. A
request's adapters become those inputs here: each LoRA's factors (``down`` as the file holds it, ``up`` times the
request's scale and the file's ``alpha / rank``) placed side by side on the rank axis, the rest zeros, so the slot
computes ``sum_i scale_i (alpha_i / r_i) up_i down_i x``, what diffusers computes with the same adapters loaded.
No adapter: every factor zero (the plain UNet's output).

:class:`AdapterLibrary` finds adapters by name in a folder (``NAME.safetensors``) or by path, and keeps the
parsed files in an LRU bounded in bytes. Files are read as ``runtime/lora_files.py`` reads them (kohya / A1111
and diffusers / PEFT layouts, safetensors only).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InputError
from .lora_files import LoraFile, LoraModule, read_lora

LORA_PREFIX = "lora."  # the slotted UNet's factor inputs: lora.<module>.down / lora.<module>.up
SCALE_MAX = 10.0  # a strength past this is a typo, not a style (A1111's UIs offer up to 2)


_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder",
           "text_encoder_3": "third text encoder"}


def slot_input(module: str, kind: str) -> str:
    """The graph input of a slot's ``down`` or ``up`` factor."""
    return f"{LORA_PREFIX}{module}.{kind}"


@dataclass(frozen=True)
class Slot:
    """One slotted layer: its module name, the slot's rank, the layer's in and out features, and a convolution's
    kernel size (a linear layer: none)."""

    module: str
    rank: int
    features_in: int
    features_out: int
    kernel: tuple[int, ...] = ()

    @property
    def down_shape(self) -> tuple[int, ...]:
        return (self.rank, self.features_in, *self.kernel)

    @property
    def up_shape(self) -> tuple[int, ...]:
        return (self.features_out, self.rank, *(1 for _ in self.kernel))

    def describe(self) -> str:
        """``320 -> 640`` (a linear layer) or ``a 3x3 convolution 320 -> 640``."""
        io = f"{self.features_in} -> {self.features_out}"
        return f"a {'x'.join(map(str, self.kernel))} convolution {io}" if self.kernel else io


def slots_of(inputs: Mapping[str, Any]) -> dict[str, Slot]:
    """The slots of an engine, from its inputs (name -> IOSpec with a ``shape``); empty for a plain export."""
    slots: dict[str, Slot] = {}
    for name, spec in inputs.items():
        if name.startswith(LORA_PREFIX) and name.endswith(".down"):
            module = name[len(LORA_PREFIX): -len(".down")]
            up = inputs.get(slot_input(module, "up"))
            dims = tuple(spec.shape)
            if up is None or len(dims) < 2 or not all(isinstance(d, int) for d in dims):
                raise ArtifactError(f"the LoRA slot {module} is incomplete in this export; re-export it with "
                                    "`sdrt export ... --lora-slots RANK`")
            slots[module] = Slot(module, int(dims[0]), int(dims[1]), int(up.shape[0]), tuple(int(d) for d in dims[2:]))
    return slots


@dataclass(frozen=True)
class Adapter:
    """A LoRA as a request names it, read: its name, its parsed file, its size in bytes."""

    name: str
    file: LoraFile

    @property
    def nbytes(self) -> int:
        return sum(m.down.nbytes + m.up.nbytes for m in self.file.modules)


class AdapterLibrary:
    """Adapters by name (``NAME.safetensors`` in ``folder``) or by path, parsed once and kept in an LRU of at most
    ``max_bytes`` (the least recently used dropped first; one adapter larger than the bound is still kept while
    in use). Thread-safe."""

    def __init__(self, folder: str | Path | None = None, max_bytes: int = 1 << 30) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and not self.folder.is_dir():
            raise ArtifactError(f"the LoRA folder {self.folder} does not exist; pass a folder of .safetensors LoRAs")
        self.max_bytes = int(max_bytes)
        self._cache: OrderedDict[tuple[Path, int, int], Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The adapters the folder holds, by name (no folder: none)."""
        if self.folder is None:
            return []
        return sorted(p.stem for p in self.folder.glob("*.safetensors") if p.is_file())

    def path_of(self, name: str | Path) -> Path:
        """A name in the folder, or a path to a .safetensors file; InputError naming the choices otherwise."""
        p = Path(name)
        if p.suffix.lower() == ".safetensors" and p.is_file():
            return p.resolve()
        if self.folder is not None and p.name == str(name) and (self.folder / f"{name}.safetensors").is_file():
            return (self.folder / f"{name}.safetensors").resolve()
        known = self.names()
        where = (f"one of the LoRAs in {self.folder}: {', '.join(known) or '(none)'}" if self.folder is not None
                 else "a path to a .safetensors LoRA (or load the pipeline with lora_dir=FOLDER to name them)")
        raise InputError(f"unknown LoRA {str(name)!r}: give {where}")

    def get(self, name: str | Path) -> Adapter:
        path = self.path_of(name)
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)  # a file replaced under the same name is read again
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        adapter = Adapter(Path(name).stem if Path(name).suffix else str(name), read_lora(path))
        with self._lock:
            for old in [k for k in self._cache if k[0] == path]:
                del self._cache[old]
            self._cache[key] = adapter
            while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.max_bytes:
                self._cache.popitem(last=False)
        return adapter

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._cache.values())


def check_loras(loras: Any) -> list[tuple[str | Path, float]]:
    """A request's ``loras``: None, or a sequence of (name or path, scale) pairs (a bare name: scale 1)."""
    if loras is None:
        return []
    if isinstance(loras, (str, Path)) or not isinstance(loras, Sequence):
        raise InputError(f"loras must be a list of (name, scale) pairs, e.g. [('style', 0.8)], got {loras!r}")
    out: list[tuple[str | Path, float]] = []
    for item in loras:
        name: Any
        scale: Any
        if isinstance(item, (str, Path)):
            name, scale = item, 1.0
        elif isinstance(item, Sequence) and len(item) == 2:
            name, scale = item
        else:
            raise InputError(f"a LoRA is a (name, scale) pair, got {item!r}")
        if not isinstance(name, (str, Path)) or not str(name):
            raise InputError(f"a LoRA is named by a string (its name, or a path), got {name!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
                or not math.isfinite(scale) or abs(float(scale)) > SCALE_MAX:
            raise InputError(f"LoRA {str(name)!r}: its scale must be a number from -{SCALE_MAX:g} to {SCALE_MAX:g}, "
                             f"got {scale!r}")
        out.append((name, float(scale)))
    return out


def _index(slots: Iterable[str]) -> dict[tuple[bool, str], str]:
    """A file's module spelling (dotted, or kohya's underscores; a text encoder's with or without ``text_model.``)
    -> the slot's module."""
    table: dict[tuple[bool, str], str] = {}
    for module in slots:
        # transformers 5's CLIPTextModel has no ``text_model`` level; the files name it (as transformers 4 did)
        for alias in (module, f"text_model.{module}"):
            table.setdefault((False, alias), module)
            table.setdefault((True, alias.replace(".", "_")), module)
    return table


def adapter_factors(slots: Mapping[str, Mapping[str, Slot]], adapters: Sequence[tuple[Adapter, float]],
                    dtype: np.dtype[Any] | type = np.float32,
                    inert: Mapping[str, Sequence[str]] | None = None,
                    labels: Mapping[str, str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every slot's two inputs for these adapters (all zero for none), per component (``slots``: component ->
    its slots: the UNet's and, in exports that have them, the text encoders'), checked: an adapter module with
    no slot here (another architecture, a layer outside the export's targets, a LoCon convolution on an export
    without convolution slots, a text encoder of an export without text-encoder slots) and ranks past a slot's
    are InputErrors naming them.
    ``inert``: per component, the targeted layers the export left without a slot because they do not reach its
    outputs (the manifest's ``lora_slots.inert``): an adapter's factors there change nothing and are skipped.
    ``labels``: what the components are called in messages, where not the UNet families' (``unet``: the family's
    ``denoiser_label``; a T5 encoder, which has no slots: says so)."""
    index = {c: _index(s) for c, s in slots.items()}
    skip = {c: set(_index(names)) for c, names in (inert or {}).items()}
    parts: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for adapter, scale in adapters:
        missing: list[str] = []
        for m in adapter.file.modules:
            module = index[m.component].get((m.flat, m.module)) if m.component in index else None
            if module is None and (m.flat, m.module) in skip.get(m.component, ()):
                continue
            if module is None:
                missing.append(f"{m.component}.{m.module}")
                continue
            parts.setdefault((m.component, module), []).append(
                _factors(adapter.name, m, slots[m.component][module], scale))
        if missing:
            names = {**_LABELS, **(labels or {})}
            where = "; ".join(f"the {names.get(c, c)}'s {_describe(s)}" for c, s in slots.items() if s)
            unslotted = sorted({m.split(".", 1)[0] for m in missing} - {c for c, s in slots.items() if s})
            none = "".join(f" The {names.get(c, c)} has no slots here." for c in unslotted)
            conv = "" if names["unet"] != "UNet" else (
                "`--lora-slots RANK:attn-ff-conv` if it adapts convolutions (LoCon), or either to add text-encoder "
                "slots to an export made before they existed; ")
            raise InputError(
                f"LoRA {adapter.name!r} adapts {len(missing)} layer(s) this export has no slot for "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): its slots are {where}.{none} "
                f"Re-export with `--lora-slots RANK:attn-ff` if it adapts feed-forward layers, {conv}or merge this "
                "LoRA at export (`sdrt export --lora`)")
    return {c: _component_feeds(s, {mod: p for (comp, mod), p in parts.items() if comp == c}, dtype)
            for c, s in slots.items()}


def _component_feeds(slots: Mapping[str, Slot], parts: Mapping[str, list[tuple[np.ndarray, np.ndarray]]],
                     dtype: np.dtype[Any] | type) -> dict[str, np.ndarray]:
    """One component's slot inputs: each slot's adapters side by side on the rank axis, the rest zeros."""
    feeds: dict[str, np.ndarray] = {}
    for module, slot in slots.items():
        down = np.zeros(slot.down_shape, np.float32)
        up = np.zeros(slot.up_shape, np.float32)
        r = 0
        for d, u in parts.get(module, []):
            if r + d.shape[0] > slot.rank:
                total = sum(p[0].shape[0] for p in parts[module])
                raise InputError(f"the LoRAs of this request add rank {total} at {module}, over this export's slot "
                                 f"rank {slot.rank}: use fewer or lower-rank LoRAs, or re-export with a larger "
                                 "--lora-slots RANK")
            down[r: r + d.shape[0]], up[:, r: r + d.shape[0]] = d, u
            r += d.shape[0]
        feeds[slot_input(module, "down")] = down.astype(dtype)
        feeds[slot_input(module, "up")] = up.astype(dtype)
    return feeds


def _trim(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape without its trailing 1s: a 1x1 convolution's factors [r, in, 1, 1] are a linear layer's [r, in]."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _factors(name: str, m: LoraModule, slot: Slot, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One LoRA module's (down [r, in(, kh, kw)], up [out, r(, 1, 1)] x scale x alpha / r), float32, in the slot's
    layout and checked against it: a LoCon convolution's ``down`` must have the layer's kernel size, ``up`` be
    1x1; a 1x1 convolution's factors fit a linear slot and the other way round."""
    down = np.asarray(m.down, np.float32)
    up = np.asarray(m.up, np.float32)
    r = down.shape[0] if down.ndim else 0
    want_down, want_up = (r, *slot.down_shape[1:]), (slot.features_out, r, *slot.up_shape[2:])
    if _trim(down.shape) != _trim(want_down) or _trim(up.shape) != _trim(want_up):
        raise InputError(f"LoRA {name!r}: {m.module} has factors {tuple(down.shape)} and {tuple(up.shape)}, but the "
                         f"layer is {slot.describe()} (factors {want_down} and {want_up}): the LoRA was trained for "
                         "another architecture")
    return down.reshape(want_down), up.reshape(want_up) * np.float32(scale * m.scaling)


def _describe(slots: Mapping[str, Slot]) -> str:
    """``128 to_k/to_out.0/to_q/to_v layers at rank 8``: the kinds of slotted layer (a module name's last part,
    ``to_out.0``'s last two)."""
    kinds = set()
    for m in slots:
        parts = m.split(".")
        kinds.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    rank = max((s.rank for s in slots.values()), default=0)
    return f"{len(slots)} {'/'.join(sorted(kinds))} layers at rank {rank}"
