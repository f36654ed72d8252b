"""diffusers' single-file converters run on lazy tensors: a component of a single .safetensors file is streamed
(export/streamed.py) with diffusers' own key and tensor mapping, reading one source tensor at a time.

The converters (``convert_flux_transformer_checkpoint_to_diffusers``, ``convert_sd3_transformer_checkpoint_to_
diffusers``, ``convert_sd3_t5_checkpoint_to_diffusers``) take a dict of tensors and return diffusers' state dict,
renaming keys and cutting or joining tensors (fused qkv chunked, a modulation's halves swapped). Here they run
once on ``_Lazy`` tensors: meta tensors (a shape, no data) that record each torch operation applied to them, so
each output comes out with its shape and a ``Recipe``: the source keys it reads and the operations that make it.
A weight is then made, when the streamed writer asks for it, by replaying its recipe on the real tensors, each
read alone from the file and made float32 (bf16, fp16, fp8 sources) as it is read. The converter stays the
single source of truth for the mapping; no key table is copied here.

Only operations that are pure functions of their inputs' values and shapes are recorded (``_OPS``: chunk, split,
cat, slicing, clone, ...); metadata queries (shape, dtype, ...) pass through; any other operation on a lazy
tensor (an in-place write, arithmetic, ...) is an ArtifactError naming it, never a silently wrong weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ArtifactError

from .streamed import WeightSource

_OPS = frozenset({
    torch.chunk, torch.Tensor.chunk, torch.split, torch.Tensor.split, torch.cat, torch.concat,
    torch.concatenate, torch.Tensor.__getitem__, torch.clone, torch.Tensor.clone, torch.Tensor.contiguous,
    torch.narrow, torch.Tensor.narrow, torch.Tensor.new_zeros,
})
_METADATA = frozenset({"shape", "dtype", "device", "ndim", "is_meta", "layout", "requires_grad", "size", "dim",
                       "numel", "__len__", "is_floating_point", "element_size", "is_contiguous"})
_NOT_FLOAT = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class Read:
    """A source tensor: ``key`` of the .safetensors file ``path``."""

    path: Path
    key: str


@dataclass(frozen=True)
class Call:
    """``func(*args, **kwargs)`` (its ``index``-th output where it gives several), the lazy tensors among the
    arguments as their recipes."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    index: int | None


Recipe = Read | Call


class _Lazy(torch.Tensor):
    """A meta tensor that records the operations applied to it (see the module docstring); ``meta`` is the plain
    meta tensor the operations run on, for shapes."""

    recipe: Recipe
    meta: torch.Tensor

    @staticmethod
    def make(meta: torch.Tensor, recipe: Recipe) -> _Lazy:
        t = meta.as_subclass(_Lazy)
        t.recipe, t.meta = recipe, meta
        return t

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name == "__get__":  # a property (shape, dtype, ...): named by its descriptor
            name = getattr(func.__self__, "__name__", name)
        out = func(*_plain(args), **_plain(kwargs))  # on the plain meta tensors: shapes only
        if func not in _OPS:
            if name in _METADATA:
                return out
            raise ArtifactError(f"the converter applied {name} to a lazy tensor, which sdrt cannot replay one "
                                "tensor at a time; this part cannot be streamed from a single file (convert the "
                                "file to a diffusers folder first)")
        call = (func, _recipes(args), tuple((k, _recipes(v)) for k, v in kwargs.items()))
        if isinstance(out, torch.Tensor):
            return _Lazy.make(out, Call(*call, None))
        return type(out)(_Lazy.make(o, Call(*call, i)) for i, o in enumerate(out))


def _plain(value: Any) -> Any:
    """``value`` with each lazy tensor in it as its plain meta tensor."""
    if isinstance(value, _Lazy):
        return value.meta
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _recipes(value: Any) -> Any:
    """``value`` with each lazy tensor in it as its recipe (a plain tensor is kept: a constant)."""
    if isinstance(value, _Lazy):
        return value.recipe
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise ArtifactError("the converter mixed a meta tensor of its own into a lazy one; it cannot be replayed")
    if isinstance(value, (list, tuple)):
        return type(value)(_recipes(v) for v in value)
    return value


def lazy_tensors(path: Path, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """{new name: lazy tensor} for the keys of the .safetensors file ``path`` that ``names`` maps (its header
    only: nothing is read). Float tensors are float32 to the converter, as they are when replayed."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for old, new in names.items():
            s = f.get_slice(old)
            meta = torch.empty(tuple(s.get_shape()), dtype=_NOT_FLOAT.get(s.get_dtype(), torch.float32),
                               device="meta")
            out[new] = _Lazy.make(meta, Read(path, old))
    return out


def record(convert: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
           tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], Recipe]]:
    """{converted name: (shape, recipe)}: ``convert`` (a diffusers converter) run once on ``tensors`` (from
    ``lazy_tensors``). An output that is no lazy tensor (a constant the converter made) is refused."""
    out = {}
    for name, t in convert(tensors).items():
        if not isinstance(t, _Lazy):
            raise ArtifactError(f"the converter made {name} from no tensor of the file; it cannot be streamed")
        out[name] = (tuple(int(d) for d in t.shape), t.recipe)
    return out


def check_shapes(recorded: Mapping[str, tuple[tuple[int, ...], Recipe]], expected: Mapping[str, tuple[int, ...]],
                 what: str, name: str) -> None:
    """Every name the architecture needs (``expected``) is converted, in its shape; else an ArtifactError naming
    what differs, before any weight is read. A converted name the architecture lacks is never asked for, so
    never read (diffusers' loader skips such names too)."""
    missing = sorted(set(expected) - set(recorded))
    wrong = sorted(k for k in set(expected) & set(recorded) if tuple(expected[k]) != recorded[k][0])
    if missing or wrong:
        found = ([f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []) + \
            [f"{k} is {list(recorded[k][0])}, not {list(expected[k])}" for k in wrong[:3]]
        raise ArtifactError(f"{name}: the {what} converts to weights that do not fit its architecture "
                            f"({'; '.join(found)}); the file is incomplete or of another architecture")


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a .safetensors file, float32 where it is a float (the only read a replay makes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"cannot read {key} of {path.name}: {e}") from e
    return t.float() if t.is_floating_point() else t


def replayed_weights(recorded: Mapping[str, tuple[tuple[int, ...], Recipe]]) -> WeightSource:
    """A ``WeightSource``: each weight made from its recipe on tensors read one at a time. The last tensor read
    is kept until another is (q, k and v of one fused tensor are asked for in turn), so at most two source
    tensors are held."""
    last: dict[Read, torch.Tensor] = {}

    def source(read: Read) -> torch.Tensor:
        if read not in last:
            last.clear()
            last[read] = read_tensor(read.path, read.key)
        return last[read]

    def replay(r: Any) -> Any:
        if isinstance(r, Read):
            return source(r)
        if isinstance(r, Call):
            out = r.func(*replay(r.args), **{k: replay(v) for k, v in r.kwargs})
            return out if r.index is None else out[r.index]
        if isinstance(r, (list, tuple)):
            return type(r)(replay(v) for v in r)
        return r

    def get(name: str) -> torch.Tensor:
        if name not in recorded:
            raise ArtifactError(f"the single file converts to no weight {name!r}; it is not this architecture")
        return replay(recorded[name][1])

    return get


def streamed_part(convert: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
                  tensors: dict[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
                  name: str) -> WeightSource:
    """A component of a single file as a streamed export's ``WeightSource``: ``convert`` recorded on ``tensors``
    (``lazy_tensors``), checked against ``expected`` (the architecture's names and shapes), replayed per weight."""
    try:
        recorded = record(convert, tensors)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:  # the converter's own: a key it needs is absent
        raise ArtifactError(f"cannot convert the {what} of {name} ({type(e).__name__}: {e}); the file is incomplete "
                            "or of another architecture") from e
    check_shapes(recorded, expected, what, name)
    return replayed_weights(recorded)
