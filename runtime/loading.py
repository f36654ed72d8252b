"""What a pipeline is loaded from: an sdrt export, an engine folder or an Optimum export, read and checked
(components, encoder widths, tokenizers, scheduler configuration) before any engine is made."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import backends
from .control_stage import CONTROL_UNET
from .engine import Array, Backend, Engine, IOSpec
from .engine_manifest import EngineManifest
from .errors import ArtifactError, CompatibilityError, InputError
from .families import Family
from .layer_skip import SKIP_UNET
from .manifest import Component, ExportManifest, tokenizer_of
from .optimum import is_optimum_folder, read_optimum
from .tokenizer import ClipTokenizer, PromptTokenizer

# components the pipeline loads when a call first runs them, not with the model: skip-layer guidance's pass holds a
# second copy of most of the transformer's weights, which calls without it never need
ON_DEMAND = (SKIP_UNET,)
# components of which a call runs one, each loaded on the first call that runs it where the backend loads engines one by
# one: an export with ControlNets has the plain UNet and the UNet taking the nets' residuals, full copies of the weights
# both, and a process that runs one kind of call never needs the other's
ALTERNATIVES = (("unet", CONTROL_UNET),)


class Deferred(Engine):
    """A component the pipeline loads on the first call that runs it, described by the export's manifest (its inputs
    and outputs as recorded at export), so that what reads them (the latents' dtype, which inputs the denoiser takes,
    its LoRA slots) loads nothing. It runs nothing: the pipeline loads the engine in its place first."""

    def __init__(self, backend: Backend, name: str, component: Component) -> None:
        self.name, self.backend = name, backend
        self.inputs = {t.name: IOSpec(t.name, np.dtype(t.dtype), t.shape) for t in component.inputs}
        self.outputs = {t.name: IOSpec(t.name, np.dtype(t.dtype), t.shape) for t in component.outputs}

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        raise RuntimeError(f"{self.name} is not loaded: the pipeline loads it before the first call that runs it")


def exact(manifest: ExportManifest, name: str) -> bool:
    """Whether component ``name`` loads ``exact`` (at its graph's own precision, never lowered by the backend): the
    text encoders, which run once per prompt (a small share of a call) and whose float32 softmax and norms a lowered
    precision degrades (T5 on openvino's bf16 mode: 61.5% off PyTorch's fp32)."""
    return name in manifest.model_family.encoders


def deferred(manifest: ExportManifest, backend: Backend, in_memory: Collection[str] = ()) -> tuple[str, ...]:
    """The components of ``manifest`` that load on the first call that runs them on ``backend`` (``in_memory``: graphs
    adapted in memory, which load with the model)."""
    names = [n for n in ON_DEMAND if n in manifest.components]
    if backend.loads_on_demand:
        names += [n for group in ALTERNATIVES if all(c in manifest.components for c in group) for n in group]
    return tuple(n for n in names if n not in in_memory)


@dataclass
class OpenedModel:
    """A folder's manifest, its engines on a backend, tokenizers and scheduler configuration. ``given``: the
    backend was the caller's (``release`` leaves it open)."""

    manifest: ExportManifest
    backend: Backend
    engines: dict[str, Engine]
    tokenizers: list[PromptTokenizer]
    scheduler_config: dict[str, Any]
    given: bool
    # the components loaded on the first call that runs them (``deferred``), as the manifest describes them
    pending: dict[str, Engine] = field(default_factory=dict)
    # where the load went, in ms: "backend" (reading the manifest and making the backend), each engine by its
    # component name (reading and compiling or deserializing it), "tokenizers" (with the width checks)
    load_ms: dict[str, float] = field(default_factory=dict)

    def release(self) -> None:
        if not self.given:
            self.backend.close()


def open_model(folder: Path, backend: str | Backend, *, threads: int | None, cuda_graph: bool | None,
               device_id: int, precision: str | None, share: Backend | None,
               static_shapes: bool = False) -> OpenedModel:
    """Everything ``Pipeline.load`` needs, checked in the order a user meets the problems: the backend's
    settings, the folder's kind against the backend, the manifest and components, then the engines. A
    backend made here is closed again when a later step fails; a given one stays the caller's."""
    given = backend if isinstance(backend, Backend) else None
    kind = backend.name if isinstance(backend, Backend) else backend
    engine_folder = (folder / "sdrt-engines.json").is_file()
    if given is not None:
        extra = [k for k, v in (("threads", threads), ("cuda_graph", cuda_graph), ("precision", precision),
                                ("share_with", share)) if v is not None] + (["device_id"] if device_id else []) + (
            ["static_shapes"] if static_shapes else [])
        if extra:
            raise InputError(f"{', '.join(extra)} configure the backend load() makes; the {given.name} backend "
                             "given is configured already: pass them to its constructor, or give the backend's "
                             "name instead")
        if engine_folder != (given.name == "tensorrt"):
            raise backends.engine_folder_error(folder, given.name) if given.name != "tensorrt" else \
                CompatibilityError(f"{folder} is an ONNX export; the tensorrt backend runs engine folders: build one "
                                   f"with `sdrt build {folder} --out ENGINES`")
    if kind in ("ort-cpu", "ort-cuda") and engine_folder:
        raise backends.engine_folder_error(folder, kind)  # before reading anything made for TensorRT
    t0 = time.perf_counter()
    if engine_folder:  # its engine manifest first: a folder built by an older sdrt is refused before any work
        EngineManifest.read(folder)
    manifest, graphs = read_model(folder, kind)
    if share is not None:
        if kind not in ("auto", share.name):
            raise InputError(f"share_with runs on {share.name}; load this model on the same "
                             f"backend (backend={share.name!r}), not {kind!r}")
        kind = share.name
    be = given if given is not None else backends.make_backend(kind, folder, threads, cuda_graph, device_id,
                                                               precision, share=share,
                                                               static_shapes=static_shapes)
    took = {"backend": (time.perf_counter() - t0) * 1e3}
    try:
        refused = {n: why for n, c in manifest.components.items() if (why := be.refuses(c)) is not None}
        if refused:
            names = ", ".join(refused)
            raise CompatibilityError(f"{folder}: the {be.name} backend cannot run {names}: {next(iter(refused.values()))}")
        engines: dict[str, Engine] = {}
        later = deferred(manifest, be, graphs)
        pending: dict[str, Engine] = {name: Deferred(be, name, manifest.components[name]) for name in later}
        for name in (n for n in later if n not in ON_DEMAND):  # a missing graph stays the load's error, as eager
            path = folder / be.graph_for(manifest.components[name])
            if not path.is_file():
                raise ArtifactError(f"{path} is missing; re-export the model with `sdrt export`")
        for name, comp in manifest.components.items():
            if name in later:  # loaded by the pipeline on the first call that runs it
                continue
            t0 = time.perf_counter()
            engines[name] = be.load(graphs[name] if name in graphs else str(folder / be.graph_for(comp)), name,
                                    exact=exact(manifest, name))
            took[name] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        toks = tokenizers(manifest, folder)
        check_widths({**pending, **engines}, folder, manifest.model_family)
        took["tokenizers"] = (time.perf_counter() - t0) * 1e3
        return OpenedModel(manifest, be, engines, toks, scheduler_config(folder), given is not None, pending, took)
    except BaseException:
        if given is None:  # a given backend stays the caller's, with what was loaded onto it
            be.close()
        raise


def read_model(folder: Path, backend_kind: str) -> tuple[ExportManifest, dict[str, bytes]]:
    """The folder's manifest, and the graphs adapted in memory (an Optimum export), checked for the components
    its family needs."""
    graphs: dict[str, bytes] = {}
    if is_optimum_folder(folder):  # Optimum's export, adapted to sdrt's contracts in memory
        if backend_kind == "tensorrt":
            raise CompatibilityError(
                f"{folder} is an Optimum ONNX export; TensorRT runs engines: build them with `sdrt build "
                f"{folder} --out ENGINES` and load that folder, or use backend=\"ort-cpu\" / \"ort-cuda\"",
                cli=f"{folder} is an Optimum ONNX export; TensorRT runs engines: build them with `sdrt build "
                    f"{folder} --out ENGINES` and pass that folder, or use --backend ort-cpu / ort-cuda")
        optimum = read_optimum(folder)
        manifest, graphs = optimum.manifest, dict(optimum.graphs)
    else:
        manifest = ExportManifest.read(folder)
    check_components(manifest, folder)
    return manifest, graphs


def tokenizers(manifest: ExportManifest, folder: Path) -> list[PromptTokenizer]:
    """Each text encoder's tokenizer, in the family's encoder order (CLIP's, or T5's where the family says)."""
    vocab_merges = manifest.source.get("kind") == "optimum"
    fam = manifest.model_family
    toks: list[PromptTokenizer] = []
    for name in manifest.encoder_names:
        if fam.tokenizer_kind(name) == "t5":
            from .t5_tokenizer import T5Tokenizer

            toks.append(T5Tokenizer.from_folder(folder / tokenizer_of(name), max_length=fam.text_tokens))
        else:
            toks.append(ClipTokenizer.from_folder(folder / tokenizer_of(name), vocab_merges=vocab_merges))
    return toks


def scheduler_config(folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-export the model with `sdrt export`")
    return dict(json.loads(path.read_text()))


def check_components(manifest: ExportManifest, folder: Path) -> None:
    need = [*manifest.encoder_names, "unet", "vae_decoder"]
    missing = [c for c in need if c not in manifest.components]
    if missing:
        raise ArtifactError(
            f"{folder} lacks {', '.join(missing)}, which a {manifest.family} model needs; it may hold another "
            "family's artifacts. Re-export the model with `sdrt export`."
        )


def check_widths(engines: Mapping[str, Engine], folder: Path, family: Family) -> None:
    """The UNet must consume what the text encoders produce: catches components of different families."""
    widths = {n: int(e.outputs["hidden_states"].shape[-1] or 0) for n, e in sorted(engines.items())
              if n.startswith("text_encoder")}
    wanted = engines["unet"].inputs["encoder_hidden_states"].shape[-1]
    problem = family.width_problem(widths, wanted) if isinstance(wanted, int) else None
    if problem:
        raise ArtifactError(f"{folder}: {problem}: the components come from different models or families. "
                            "Re-export the model with `sdrt export`.")
