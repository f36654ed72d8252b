"""New weights for a built graph: a checkpoint of the same architecture, stacked LoRAs, or the base.

Weights are matched to the graph by name through ``refit_map.json`` (ONNX initializer -> diffusers
parameter, transposed for the exporter's folded Linear weights). The result is one array per ONNX
initializer, which goes either

- into a TensorRT engine through ``trt.Refitter`` (``refit_engine``; the engine must have been built
  with ``--refittable``), or
- into a copy of the ONNX graph with new initializer values (``write_refit_onnx``): the same graph,
  runnable by ONNX Runtime, which is how the refit path is checked on CPU.

The exporter's map misses GroupNorm weights, which the exporter reshapes to (C, 1, 1) before folding;
``complete_refit_map`` recovers them from the ONNX node names (``/unet/<module path>/Mul`` reads the
scale, ``.../Add`` the shift).

A component may hold a part of another's weights (``WEIGHTS_OF``: DeepCache's ``unet_shallow`` is the UNet's
time embedding, ``conv_in`` and last layer): it has its own map and is refitted with that component, from its
LoRA modules and checkpoint weights; what those leave untouched is reported for that component alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdrt.runtime.atomic import atomic_dir, check_output_dir, give_default_mode
from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError
from sdrt.runtime.families import family_of
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.layer_skip import SKIP_UNET
from sdrt.runtime.lora_files import LoraFile, LoraSpec, MergeReport, lora_deltas, read_lora
from sdrt.runtime.manifest import EXPORT_FOLDER, MANIFEST_NAME, ExportManifest, export_entries

if TYPE_CHECKING:
    import onnx
    import tensorrt as trt  # for annotations; the module in use is passed as ``trt`` (from load_tensorrt)

REFIT_MAP_NAME = "refit_map.json"
# components that hold a part of another's weights (refit with it, from its LoRA modules and checkpoint
# weights): DeepCache's shallow path is the UNet's time embedding, conv_in and last layer
WEIGHTS_OF = {SHALLOW_UNET: "unet"}
# what `sdrt refit` takes as its target
REFIT_TARGET = ("an engine folder written by `sdrt build --refittable` (refitted in place), or an ONNX export "
                "written by `sdrt export` with --out DIR for a refitted copy")


@dataclass(frozen=True)
class RefitEntry:
    param: str  # diffusers parameter name
    transpose: bool = False  # the initializer holds param.T (folded Linear weights)
    inferred: bool = False  # found from node names, not by content at export


@dataclass(frozen=True)
class RefitMap:
    entries: Mapping[str, RefitEntry]  # initializer name -> parameter
    ambiguous: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def read(cls, component_dir: str | Path) -> RefitMap:
        path = Path(component_dir) / REFIT_MAP_NAME
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: this component was not exported refittable; re-export the "
                                "model with `sdrt export` to refit it")
        try:
            d = json.loads(path.read_text())
            entries = {k: RefitEntry(v["param"], bool(v.get("transpose", False))) for k, v in d["initializers"].items()}
            ambiguous = {k: tuple(v) for k, v in d.get("ambiguous", {}).items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path} is unreadable ({e!r}); re-export the model") from e
        return cls(entries, ambiguous)

    def params(self) -> set[str]:
        return {e.param for e in self.entries.values()}


def complete_refit_map(model: onnx.ModelProto, refit_map: RefitMap) -> RefitMap:
    """Add the (C, 1, 1) GroupNorm scale/shift initializers the content match missed, by node name."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    entries = dict(refit_map.entries)
    for init in model.graph.initializer:
        dims = tuple(init.dims)
        if init.name in entries or len(dims) != 3 or dims[1:] != (1, 1) or dims[0] < 2:
            continue
        users = consumers.get(init.name, [])
        if len(users) != 1 or users[0].op_type not in ("Mul", "Add"):
            continue
        scope = users[0].name.strip("/").split("/")  # ["unet", "down_blocks.0", "resnets.0", "norm1", "Mul"]
        if len(scope) < 3 or not scope[-1].startswith(users[0].op_type):
            continue
        module = ".".join(scope[1:-1])
        suffix = "weight" if users[0].op_type == "Mul" else "bias"
        entries[init.name] = RefitEntry(f"{module}.{suffix}", transpose=False, inferred=True)
    return RefitMap(entries, refit_map.ambiguous)


# -- reading base values ---------------------------------------------------------------------------------

def load_graph(onnx_path: str | Path, with_data: bool = True) -> onnx.ModelProto:
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; pass the ONNX folder the engines were built from (--onnx DIR)")
    return onnx.load(str(path), load_external_data=with_data)


def initializers(model: onnx.ModelProto, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    wanted = None if names is None else set(names)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if wanted is None or t.name in wanted}


def _as_param(value: np.ndarray, entry: RefitEntry) -> np.ndarray:
    return value.T if entry.transpose else value


def param_shapes(refit_map: RefitMap, base: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Each mapped parameter's PyTorch shape, from the initializer that holds it."""
    out: dict[str, tuple[int, ...]] = {}
    for init, entry in refit_map.entries.items():
        if init in base and not entry.inferred:
            out[entry.param] = tuple(_as_param(base[init], entry).shape)
    return out


# -- new values ---------------------------------------------------------------------------------------

def lora_weights(
    refit_map: RefitMap,
    base: Mapping[str, np.ndarray],
    loras: Sequence[tuple[LoraFile, float]],
    component: str,
) -> tuple[dict[str, np.ndarray], MergeReport]:
    """Initializers changed by stacking ``loras`` onto the base weights: {initializer: new value}."""
    deltas, report = lora_deltas(loras, component, param_shapes(refit_map, base))
    out: dict[str, np.ndarray] = {}
    for init, entry in refit_map.entries.items():
        if entry.param not in deltas:
            continue
        _check_unambiguous(refit_map, init, deltas)
        old = base[init]
        merged = _as_param(old, entry).astype(np.float32) + deltas[entry.param]
        out[init] = np.ascontiguousarray(_as_param(merged, entry)).astype(old.dtype)
    return out, report


def _check_unambiguous(refit_map: RefitMap, init: str, deltas: Mapping[str, np.ndarray]) -> None:
    group = refit_map.ambiguous.get(init, ())
    if len(group) < 2:
        return
    first = deltas.get(group[0])
    if any(p not in deltas or first is None or not np.array_equal(deltas[p], first) for p in group):
        raise CompatibilityError(
            f"initializer {init} holds {', '.join(group)} at once (they were equal at export), but the new weights "
            "differ between them; this graph cannot take them by refit: re-export from the new weights"
        )


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without its trailing unit axes: GroupNorm's (C,) parameters are folded as (C, 1, 1)."""
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def checkpoint_weights(
    refit_map: RefitMap,
    base: Mapping[str, np.ndarray],
    state_dict: Mapping[str, np.ndarray],
    component: str,
) -> dict[str, np.ndarray]:
    """Every mapped initializer, taken from ``state_dict`` (parameter name -> array) of the same architecture."""
    missing = sorted(refit_map.params() - set(state_dict))
    if missing:
        raise CompatibilityError(
            f"{component}: the checkpoint lacks {len(missing)} weights the engine holds (e.g. {', '.join(missing[:3])}); "
            "it is not the architecture the engine was built from"
        )
    out: dict[str, np.ndarray] = {}
    for init, entry in refit_map.entries.items():
        old = base[init]
        new = _as_param(np.asarray(state_dict[entry.param]), entry)
        if new.size != old.size or (not entry.inferred and _squeeze(new.shape) != _squeeze(old.shape)):
            raise CompatibilityError(
                f"{component}: {entry.param} is {tuple(np.shape(state_dict[entry.param]))} in the checkpoint but "
                f"{tuple(_as_param(old, entry).shape)} in the engine: not the same architecture"
            )
        out[init] = np.ascontiguousarray(new.reshape(old.shape)).astype(old.dtype)
    return out


def uncovered_params(refit_map: RefitMap, state_dict: Mapping[str, np.ndarray], model: onnx.ModelProto) -> list[str]:
    """Checkpoint parameters no initializer takes although the graph holds an unmapped tensor of their size:
    a refit would leave those at the export's values."""
    mapped = set(refit_map.entries)
    sizes = {int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in mapped and len(t.dims) > 0}
    covered = refit_map.params()
    return sorted(k for k, v in state_dict.items() if k not in covered and np.size(v) > 1 and np.size(v) in sizes)


# -- writing a refit ONNX graph ---------------------------------------------------------------------------

def replace_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> None:
    """Set new values of existing initializers in place (same names, dtypes and shapes)."""
    from onnx import numpy_helper

    todo = dict(values)
    for i, t in enumerate(model.graph.initializer):
        if t.name not in todo:
            continue
        new = todo.pop(t.name)
        if tuple(new.shape) != tuple(t.dims):
            raise InputError(f"initializer {t.name}: new value is {new.shape}, the graph holds {tuple(t.dims)}")
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new.astype(numpy_helper.to_array(t).dtype), t.name))
    if todo:
        raise InputError(f"the graph has no initializers named {sorted(todo)[:5]}")


def save_graph(model: onnx.ModelProto, path: Path, external: bool) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
        give_default_mode(path.with_name(path.name + "_data"))  # onnx writes the weights file 0600
    else:
        onnx.save_model(model, str(path))


def write_refit_export(
    onnx_dir: str | Path,
    out_dir: str | Path,
    new_values: Mapping[str, Mapping[str, np.ndarray]],
    weights_note: str,
    *,
    overwrite: bool = False,
) -> None:
    """A copy of an ONNX export whose components take ``new_values`` ({component: {initializer: array}}).

    Untouched files are copied as they are; the copy's ``sdrt.json`` records what was applied.
    """
    import dataclasses

    src = Path(onnx_dir)
    manifest = ExportManifest.read(src, wanted=EXPORT_FOLDER)
    with atomic_dir(out_dir, marker=MANIFEST_NAME, overwrite=overwrite, what="an sdrt export",
                    owned=export_entries) as tmp:
        for item in src.iterdir():
            if item.name in new_values and item.is_dir():
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for comp, values in new_values.items():
            rel = manifest.components[comp].path
            model = load_graph(src / rel)
            replace_initializers(model, values)
            external = (src / rel).with_name("model.onnx_data").exists()
            save_graph(model, tmp / rel, external)
            for extra in (src / rel).parent.iterdir():
                if not extra.name.startswith("model.onnx"):
                    shutil.copy2(extra, tmp / rel.rsplit("/", 1)[0] / extra.name)
        source = dict(manifest.source, weights=weights_note)
        dataclasses.replace(manifest, source=source).write(tmp)


# -- applying to a TensorRT engine -------------------------------------------------------------------------

def refit_engine(engine_bytes: bytes, weights: Mapping[str, np.ndarray], *, module: str | None = None) -> bytes:
    """Deserialize a refittable engine, set every weight it exposes from ``weights`` (ONNX initializer
    name -> array: the full set, base values included), refit, and return the serialized engine."""
    from sdrt.runtime.trt_modules import make_logger

    from .trt_build import load_tensorrt

    trt = load_tensorrt(module)
    messages: list[str] = []
    logger = make_logger(trt, messages)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise CompatibilityError("TensorRT could not deserialize the engine (built by another TensorRT version or for "
                                 "another GPU?); rebuild it with `sdrt build`")
    refitter = trt.Refitter(engine, logger)
    names = list(refitter.get_all_weights())
    if not names:
        raise CompatibilityError("the engine exposes no refittable weights: rebuild it with `sdrt build --refittable`")
    keep_alive = _set_weights(trt, refitter, names, weights)
    missing = list(refitter.get_missing_weights())
    if missing:
        raise CompatibilityError(f"the refit still needs {len(missing)} weights the ONNX graph does not name "
                                 f"(e.g. {', '.join(missing[:3])}); rebuild the engine with `sdrt build --refittable`")
    if not refitter.refit_cuda_engine():
        raise CompatibilityError(f"TensorRT rejected the new weights ({' | '.join(messages[-3:]) or 'no message'}); "
                                 "rebuild the engine")
    del keep_alive
    return bytes(engine.serialize())


def _set_weights(trt: Any, refitter: trt.Refitter, names: Sequence[str], weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Hand each named weight to the refitter, cast to the dtype the engine was built with. Returns the arrays,
    which must outlive the refit (trt.Weights does not copy)."""
    alive: list[np.ndarray] = []
    unknown = [n for n in names if n not in weights]
    if unknown:
        raise CompatibilityError(f"the engine holds weights the ONNX graph does not name (e.g. {unknown[:3]}); it was "
                                 "built from another export: rebuild it")
    for name in names:
        proto = refitter.get_weights_prototype(name)
        if proto.dtype == getattr(trt.DataType, "BF16", None):  # numpy (and trt.nptype) has no bf16
            raise CompatibilityError(f"weight {name} is bf16 in the engine; sdrt does not refit bf16 engines yet: "
                                     "rebuild the engine from an export with the new weights merged")
        arr = np.ascontiguousarray(weights[name], dtype=trt.nptype(proto.dtype))
        if arr.size != proto.size:
            raise CompatibilityError(f"weight {name} has {arr.size} values, the engine expects {proto.size}")
        alive.append(arr)
        if not refitter.set_named_weights(name, trt.Weights(arr)):
            raise CompatibilityError(f"TensorRT refused the new value of {name}")
    return alive


def require_refittable(flags_refittable: bool, component: str, build_command: str) -> None:
    if not flags_refittable:
        raise CompatibilityError(
            f"the {component} engine was not built refittable; rebuild it with --refittable:\n  {build_command} --refittable"
        )



# -- the whole folder: sdrt refit -------------------------------------------------------------------------

@dataclass(frozen=True)
class RefitRequest:
    """Exactly one of: LoRAs (stacked on the base weights), a checkpoint, or the base weights."""

    loras: tuple[LoraSpec, ...] = ()
    checkpoint: str | None = None
    base: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if sum((bool(self.loras), self.checkpoint is not None, self.base)) != 1:
            raise InputError("give exactly one of --lora FILE[:SCALE] (repeatable), --checkpoint PATH or --base")


@dataclass(frozen=True)
class RefitResult:
    folder: str
    weights: str  # what the components now hold
    components: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def refittable_components(export: ExportManifest, onnx_dir: Path) -> list[str]:
    return [n for n, c in export.components.items() if (onnx_dir / c.path).parent.joinpath(REFIT_MAP_NAME).is_file()]


def weights_source(component: str) -> str:
    """The model component whose weights ``component``'s graph holds (itself, but for ``WEIGHTS_OF``)."""
    return WEIGHTS_OF.get(component, component)


def _checkpoint_state_dicts(path: str, allow_pickle: bool) -> dict[str, dict[str, np.ndarray]]:
    from .loading import load_model

    model = load_model(path, allow_pickle=allow_pickle)
    modules = {"unet": model.unet}
    for name, enc in zip(model.preset.encoder_names, model.text_encoders, strict=True):  # a refiner: text_encoder_2
        modules[name] = enc
    return {name: {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items()}
            for name, m in modules.items()}


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def new_weights(
    onnx_dir: Path,
    export: ExportManifest,
    request: RefitRequest,
    components: Sequence[str],
    progress: Callable[[str], None] = lambda msg: None,
) -> tuple[dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]], str, list[str]]:
    """{component: (base initializers, changed initializers)}, a description of the weights, warnings."""
    warnings: list[str] = []
    loras = _read_loras(export, request)
    states = _checkpoint_state_dicts(request.checkpoint, request.allow_pickle) if request.checkpoint else {}
    matched_any = {lf.path: False for lf, _ in loras}
    out: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for comp in components:
        path = onnx_dir / export.components[comp].path
        progress(f"{comp}: reading {export.components[comp].path}")
        model = load_graph(path)
        rmap = complete_refit_map(model, RefitMap.read(path.parent))
        base = initializers(model)
        changed: dict[str, np.ndarray] = {}
        src = weights_source(comp)  # a part of another component's weights: that one's engine says what is left
        if loras:
            changed, report = lora_weights(rmap, base, loras, src)
            if src == comp:
                warnings += [f"{u} adapts no weight of the {comp} engine (ignored)" for u in report.unmatched]
            for lf, _ in loras:
                matched_any[lf.path] |= any(m.component == src for m in lf.modules) and bool(report.matched)
        elif request.checkpoint:
            if src not in states:
                raise CompatibilityError(f"the checkpoint has no {src}; it is not a {export.family} model")
            left = uncovered_params(rmap, states[src], model) if src == comp else []
            if left:
                raise CompatibilityError(
                    f"{comp}: {len(left)} checkpoint weights have no known place in the graph (e.g. {', '.join(left[:3])}); "
                    "a refit would keep the export's values for them. Re-export from the checkpoint instead"
                )
            changed = checkpoint_weights(rmap, base, states[src], comp)
        out[comp] = (base, changed)
    unused = [Path(p).name for p, hit in matched_any.items() if not hit]
    if unused:
        raise InputError(f"{', '.join(unused)}: no module matches a weight of this model; is it a LoRA for "
                         f"{export.family} ({export.preset})?")
    if loras:
        note = "lora " + " + ".join(s.describe(lf.sha256) for s, (lf, _) in zip(request.loras, loras))
    elif request.checkpoint:
        cp = Path(request.checkpoint)
        note = f"checkpoint {cp.name}" + (f" (sha256 {_sha256(cp)[:12]})" if cp.is_file() else "")
    else:
        note = "base"
    return out, note, warnings


def _read_loras(export: ExportManifest, request: RefitRequest) -> list[tuple[LoraFile, float]]:
    """The request's LoRA files, their denoiser modules under the export's names (the family's ``lora_file``:
    SD 3's and FLUX.1's original layouts mapped to diffusers')."""
    fam = family_of(export)
    return [(fam.lora_file(read_lora(s.path)), s.scale) for s in request.loras]


def _lora_components(export: ExportManifest, request: RefitRequest, comps: Sequence[str]) -> set[str]:
    """The components the request's LoRAs adapt. Refused: one the export holds without a refit map (a streamed
    transformer), which the refit would leave as it is; a T5 encoder's layers, which sdrt does not adapt, are
    left out with the reason."""
    fam = family_of(export)
    adapted = {m.component for s in request.loras for m in read_lora(s.path).modules}
    t5 = {c for c in adapted if c in fam.encoders and fam.tokenizer_kind(c) == "t5"}
    stuck = sorted(c for c in adapted - t5 if c in export.components and c not in comps)
    if stuck:
        raise CompatibilityError(f"the LoRA adapts {', '.join(stuck)}, which this export holds without a refit map "
                                 "(a component streamed at export, too large to map in memory): a refit would leave "
                                 "it as it is. Merge the LoRA at export instead (`sdrt export ... --lora FILE:SCALE`) "
                                 "or export with --lora-slots")
    return adapted - t5


def refit_folder(
    target: str | Path,
    request: RefitRequest,
    *,
    onnx_dir: str | Path | None = None,
    out: str | Path | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    overwrite: bool = False,
) -> RefitResult:
    """Refit an engine folder in place (atomically), or write a refitted copy of an ONNX export to ``out``.

    ``out`` may be new, empty or a previous sdrt export; any other folder is refused unless ``overwrite``.
    """
    from sdrt.runtime.engine_manifest import ENGINE_MANIFEST_NAME

    folder = Path(target)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ArtifactError(f"{folder} {what}; pass {REFIT_TARGET}")
    if (folder / ENGINE_MANIFEST_NAME).is_file():
        # replaced whole when done: refuse the current folder before the weights load
        check_output_dir(folder, marker=ENGINE_MANIFEST_NAME, what="an sdrt engine folder")
        return _refit_engines(folder, request, onnx_dir, progress)
    export = ExportManifest.read(folder, wanted=REFIT_TARGET)
    if out is None:
        raise InputError(f"{folder} is an ONNX export: give --out DIR for the refitted copy (exports are not "
                         "changed in place)")
    check_output_dir(out, marker=MANIFEST_NAME, overwrite=overwrite, what="an sdrt export", owned=export_entries)
    comps = refittable_components(export, folder)
    loras_comps = _lora_components(export, request, comps)
    todo = [c for c in comps if not request.loras or weights_source(c) in loras_comps]
    _refuse_stale_control_unet(export, todo)
    _refuse_shared_skip(export, todo)
    values, note, warnings = new_weights(folder, export, request, todo, progress)
    write_refit_export(folder, out, {c: changed for c, (_, changed) in values.items() if changed}, note,
                       overwrite=overwrite)
    return RefitResult(str(out), note, tuple(todo), tuple(warnings))


def _refuse_shared_skip(export: ExportManifest, todo: Sequence[str]) -> None:
    """Skip-layer guidance's pass (``unet_skip``) reads the transformer's weights file (export/shared_weights.py),
    which a refit of the transformer rewrites: refused before any weight is read, rather than leaving a pass over
    stale offsets."""
    if SKIP_UNET in export.components and ("unet" in todo or SKIP_UNET in todo):
        raise CompatibilityError(
            "this export has skip-layer guidance's pass (unet_skip), which reads the transformer's weights file, and "
            "refit cannot yet rewrite it with them. Export the model with the weights or LoRAs merged instead "
            "(`sdrt export ... --lora FILE[:SCALE]`, or the other checkpoint as --model), with its --skip-layers")


def _refuse_stale_skip_engine(manifest: Any, todo: Sequence[str]) -> None:
    """An engine folder with skip-layer guidance's pass holds the transformer's weights twice (``unet`` and the
    ``unet_skip`` engine), and only ``unet`` has a refit map: SLG calls would mix new and old weights. Refused
    before any weight is read."""
    if any(r.component == SKIP_UNET for r in manifest.engines) and ("unet" in todo or SKIP_UNET in todo):
        raise CompatibilityError(
            "these engines have skip-layer guidance's pass (unet_skip), an engine holding its own copy of the "
            "transformer's weights, which refit cannot yet update: skip-layer guidance calls would keep the old "
            "weights. Build the engines from an export with the weights or LoRAs merged (`sdrt export ... --lora "
            "FILE[:SCALE] --skip-layers ...`), or use LoRA slots (--lora-slots), which need no refit")


def _refuse_stale_control_unet(export: ExportManifest, todo: Sequence[str]) -> None:
    """An export with ControlNets holds the UNet twice (``unet`` and ``unet_control``, which takes the nets'
    residuals) and only ``unet`` has a refit map: new UNet weights would reach txt2img but not ControlNet
    calls. Refused before any weight is read, rather than leaving the two disagreeing."""
    if export.controlnets and "unet" in todo:
        raise CompatibilityError(
            "this export has ControlNets, and refit cannot yet update their UNet (unet_control): ControlNet "
            "calls would keep the old weights. Export the model with the weights or LoRAs merged instead "
            "(`sdrt export ... --lora FILE[:SCALE]`, or the other checkpoint as --model), with its --controlnet")


def _refit_engines(
    folder: Path, request: RefitRequest, onnx_dir: str | Path | None, progress: Callable[[str], None]
) -> RefitResult:
    import dataclasses
    import hashlib
    import os

    from sdrt.runtime.engine_manifest import ENGINE_MANIFEST_NAME, EngineManifest

    from .trt_build import onnx_digest

    manifest = EngineManifest.read(folder)
    src = Path(onnx_dir or manifest.onnx_dir)
    export = ExportManifest.read(src, wanted=f"the ONNX export the engines in {folder} were built from (--onnx DIR)")
    comps = [c for c in refittable_components(export, src) if any(r.component == c for r in manifest.engines)]
    loras_comps = _lora_components(export, request, refittable_components(export, src))
    # components holding earlier refits go back to base too, so the result is exactly what was asked
    todo = [c for c in comps if not request.loras or weights_source(c) in loras_comps
            or manifest.record(c).weights != "base"]
    _refuse_stale_control_unet(export, todo)
    _refuse_stale_skip_engine(manifest, todo)
    for c in todo:
        rec = manifest.record(c)
        require_refittable(rec.flags.refittable, c, manifest.build_command)
        digest = onnx_digest((src / export.components[c].path).parent)
        if digest != rec.onnx_sha256:
            raise CompatibilityError(f"{c}: {src} is not the export the engine was built from (its ONNX changed); "
                                     f"pass the right one with --onnx, or rebuild: {manifest.build_command}")
    values, note, warnings = new_weights(src, export, request, todo, progress)
    new_records = {r.component: r for r in manifest.engines}
    blobs: dict[str, bytes] = {}
    for c, (base, changed) in values.items():
        rec = manifest.record(c)
        progress(f"{c}: refitting {rec.file} ({len(changed)} weights changed)")
        blob = refit_engine((folder / rec.file).read_bytes(), {**base, **changed}, module=rec.env.backend)
        blobs[rec.file] = blob
        new_records[c] = dataclasses.replace(rec, weights=note,
                                             size_bytes=len(blob), engine_sha256=hashlib.sha256(blob).hexdigest())
    with atomic_dir(folder, marker=ENGINE_MANIFEST_NAME, what="an sdrt engine folder") as tmp:
        for item in folder.iterdir():
            if item.name in blobs:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                try:
                    os.link(item, tmp / item.name)
                except OSError:
                    shutil.copy2(item, tmp / item.name)
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        dataclasses.replace(manifest, engines=tuple(new_records[r.component] for r in manifest.engines)).write(tmp)
    return RefitResult(str(folder), note, tuple(values), tuple(warnings))
