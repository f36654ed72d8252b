"""ONNX Runtime's fused-operator graph of the UNet, for the ``ort-cuda`` backend.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers``, model_type "unet") rewrites an fp32
UNet into the operators its CUDA kernels fuse: MultiHeadAttention (flash / memory-efficient attention),
GroupNorm and SkipGroupNorm (channels-last), NhwcConv, BiasSplitGelu, BiasAdd, SkipLayerNormalization.
The fused fp32 graph is then converted to fp16. The result is a *variant* of the exported UNet with the
same I/O contract (names, dtypes, dynamic axes), recorded in the manifest under ``variants["ort-cuda"]``;
only the CUDA execution provider has kernels for most of these operators.

ORT's tools are used as they are, with these workarounds (ONNX Runtime 1.31.1, numpy 2.4):

* The fusions run on the fp32 graph (as ORT's own SD optimizer does); on an fp16 export they crash.
* ``fusion_attention_unet.FusionAttentionUnet.get_num_heads`` (fusion_attention_unet.py line 66,
  ``num_heads = int(num_heads)`` on the value of a shape-[1] constant) raises ``TypeError: only
  0-dimensional arrays can be converted to Python scalars`` under numpy >= 2, which ended the whole
  optimization on graphs from the TorchScript exporter (the PyTorch 2 attention pattern). While
  :func:`fuse_graph` runs, that one method is replaced by an equivalent that reads the element with
  ``reshape(-1)[0]``; the original is restored afterwards. ORT's tools import each other as top-level
  modules (``fusion_attention_unet``, after ``onnxruntime.transformers.optimizer`` put their folder on
  ``sys.path``), so the class patched is ``sys.modules["fusion_attention_unet"].FusionAttentionUnet``.
  (Likewise, while the tools run, ``onnx_model_unet.is_installed("tqdm")`` answers False: no progress
  bar on stderr from library code.)
* ``convert_float_to_float16`` makes every float graph input fp16, and its ``keep_io_types`` casts a
  kept input to fp16 right away. sdrt's contract keeps ``timestep`` float32 and computes the sinusoidal
  embeddings of ``timestep`` (and SDXL's ``time_ids``) in float32, as diffusers does: at t ~ 999 fp16
  has a spacing of 0.5, a phase error of up to a quarter radian in sin(t). Those nodes, and the
  Constant nodes holding their frequencies, are kept float32 (``node_block_list``), and ``timestep``
  is made a float32 input again afterwards.
* The converter inserts one identically named Cast per float32 consumer of an fp16 value (SDXL's
  ``time_ids`` has two): an invalid graph until the duplicates are dropped.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from sdrt.runtime.atomic import atomic_write_text, give_default_mode
from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError, ParityError
from sdrt.runtime.families import family_named
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.manifest import FAMILIES, MANIFEST_NAME, ExportManifest

log = logging.getLogger(__name__)

VARIANT = "ort-cuda"  # the backend name the variant is recorded under in the manifest
VARIANT_FILE = "model_ort_cuda.onnx"
EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to <file>_data (protobuf stops at 2 GiB)

# The fused operators ORT's UNet optimizer emits, and which of them only the CUDA EP implements
# (ORT 1.31: Attention, MultiHeadAttention with separate Q/K/V, SkipLayerNormalization and LayerNormalization
# also run on the CPU EP). Self-attention becomes MultiHeadAttention on packed QKV, or Attention (QKV
# projection inside the operator) when packing is off.
FUSED_OPS = ("MultiHeadAttention", "Attention", "LayerNormalization", "SkipLayerNormalization", "GroupNorm",
             "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd")
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd")
_CUDA_ONLY_OPTIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv",
                      "enable_bias_splitgelu", "enable_bias_add")

# Inputs whose downstream sinusoidal embedding stays float32 in fp16 graphs (Timesteps modules).
_EMBEDDED_INPUTS = ("timestep", "time_ids")
# sdrt's UNet contract: float inputs follow the precision, except these (see exporter.component_specs).
FLOAT32_INPUTS = ("timestep",)


def _ort_optimizer() -> Any:
    try:
        from onnxruntime.transformers import optimizer
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise CompatibilityError(f"onnxruntime's transformer optimizer cannot be imported ({e})") from e
    return optimizer


def fusion_options(*, cuda_kernels: bool = True, fp16_target: bool = True) -> Any:
    """ORT's FusionOptions for a UNet.

    ``cuda_kernels=False`` leaves out the fusions whose operators only the CUDA EP implements, and packs
    no Q/K/V (the CPU MultiHeadAttention kernel has no packed-input path), so the graph also runs on the
    CPU EP, for verification. Otherwise Q/K/V are packed for an fp16 target only: ORT's CUDA kernels for
    packed inputs are fp16 (as ORT's own SD optimizer does).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("unet")
    if not cuda_kernels:
        for name in _CUDA_ONLY_OPTIONS:
            setattr(opts, name, False)
    opts.enable_packed_qkv = opts.enable_packed_kv = cuda_kernels and fp16_target
    return opts


@contextlib.contextmanager
def _num_heads_fix() -> Iterator[None]:
    """Replace FusionAttentionUnet.get_num_heads by a numpy-2-safe equivalent while the block runs."""
    _ort_optimizer()  # puts ORT's transformers folder on sys.path and imports its modules top-level
    module = sys.modules.get("fusion_attention_unet")
    cls = getattr(module, "FusionAttentionUnet", None)
    original = getattr(cls, "get_num_heads", None)
    if cls is None or original is None or list(inspect.signature(original).parameters)[:3] != [
        "self", "reshape_q", "is_torch2"
    ]:
        # another ORT layout: nothing we know how to patch; fuse with ORT as it is
        yield
        return

    def get_num_heads(self: Any, reshape_q: Any, is_torch2: bool = False) -> int:
        if not is_torch2:
            return int(original(self, reshape_q, is_torch2))
        # PyTorch 2 pattern: Reshape(q, Concat(batch, seq, num_heads, head_size)); num_heads is a
        # constant of shape [1]
        concat = self.model.get_parent(reshape_q, 1)
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            return 0
        value = self.model.get_constant_value(concat.input[2])
        if not isinstance(value, np.ndarray) or value.size != 1:
            return 0
        heads = int(value.reshape(-1)[0])
        return max(0, heads)

    cls.get_num_heads = get_num_heads
    try:
        yield
    finally:
        cls.get_num_heads = original


def fuse_graph(fp32_onnx: Path, *, cuda_kernels: bool = True, fp16_target: bool = True) -> Any:
    """Run ORT's UNet fusions on an fp32 graph; returns ORT's ``OnnxModel`` (still fp32)."""
    optimizer = _ort_optimizer()
    opts = fusion_options(cuda_kernels=cuda_kernels, fp16_target=fp16_target)
    with _num_heads_fix(), _quiet_ort_tools():
        model = optimizer.optimize_model(
            str(fp32_onnx),
            model_type="unet",
            num_heads=0,  # read from the graph
            hidden_size=0,
            opt_level=0,  # ORT's own graph optimizations run at session creation
            use_gpu=True,
            optimization_options=opts,
        )
    return model


@contextlib.contextmanager
def _quiet_ort_tools() -> Iterator[None]:
    """ORT's tools log at WARNING level and draw a tqdm progress bar on stderr; hold both back.

    Only the CLI draws progress in sdrt. The UNet optimizer draws its bar when
    ``onnx_model_unet.is_installed("tqdm")``; that name is answered False while the block runs.
    """
    names = ["onnxruntime.transformers", "optimizer", "onnx_model", "onnx_model_unet", "onnx_model_bert",
             "fusion_base", "fusion_utils", "float16", "shape_infer_helper", "symbolic_shape_infer"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    unet_module = sys.modules.get("onnx_model_unet")
    is_installed = getattr(unet_module, "is_installed", None)
    if is_installed is not None:
        unet_module.is_installed = lambda name: name != "tqdm" and is_installed(name)  # type: ignore[union-attr]
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if is_installed is not None:
            unet_module.is_installed = is_installed  # type: ignore[union-attr]


def embedding_nodes(graph: onnx.GraphProto, inputs: Sequence[str] = _EMBEDDED_INPUTS) -> list[str]:
    """Names of the nodes between ``inputs`` and the first learned layer (MatMul / Gemm), and of the
    Constant nodes they read.

    These compute the sinusoidal embeddings of the timestep (and SDXL's time ids) and stay float32.
    The Constants matter as much as the arithmetic: the frequencies exp(-ln(10000) i / d) are Constant
    nodes, and rounded to fp16 (relative error up to 2^-11) they shift the phase of sin(t f) at t ~ 999
    by up to ~0.5 rad.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    seen: dict[str, onnx.NodeProto] = {}
    frontier = [i for i in inputs if any(g.name == i for g in graph.input)]
    while frontier:
        value = frontier.pop()
        for node in consumers.get(value, []):
            if node.op_type in ("MatMul", "Gemm", "FusedMatMul") or node.name in seen:
                continue
            seen[node.name] = node
            frontier.extend(node.output)
    constants = {p.name for n in seen.values() for i in n.input
                 if (p := producers.get(i)) is not None and p.op_type == "Constant"}
    return [*seen, *sorted(constants - set(seen))]


def _name_nodes(graph: onnx.GraphProto) -> None:
    """node_block_list matches nodes by name: give every node a unique one."""
    used: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_sdrt_{i}"
        used.add(node.name)


def _restore_float32_input(graph: onnx.GraphProto, name: str) -> None:
    """Make graph input ``name`` float32 again after an fp16 conversion.

    Casts to float32 that the converter put before blocked (float32) consumers are removed; consumers
    that compute in fp16 read it through one Cast.
    """
    gin = next((g for g in graph.input if g.name == name), None)
    if gin is None or gin.type.tensor_type.elem_type == TensorProto.FLOAT:
        return
    gin.type.tensor_type.elem_type = TensorProto.FLOAT
    half_readers = []
    drop = []
    for node in graph.node:
        if name not in node.input:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        if to == TensorProto.FLOAT:
            drop.append(node)
        else:
            half_readers.append(node)
    for cast in drop:
        for node in graph.node:
            for i, v in enumerate(node.input):
                if v == cast.output[0]:
                    node.input[i] = name
        for out in graph.output:
            if out.name == cast.output[0]:  # pragma: no cover - an input is never an output here
                raise ArtifactError(f"{name} flows straight to a graph output; cannot restore float32")
        graph.node.remove(cast)
    if half_readers:
        half = f"{name}_fp16"
        for node in half_readers:
            for i, v in enumerate(node.input):
                if v == name:
                    node.input[i] = half
        graph.node.insert(0, helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16,
                                              name=f"{name}_to_fp16_sdrt"))
    stale = [v for v in graph.value_info if v.name in {c.output[0] for c in drop}]
    for v in stale:
        graph.value_info.remove(v)


def _drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """ORT 1.31's converter inserts one Cast per float32 consumer of an fp16 value, all with the same
    name and output (e.g. SDXL's ``time_ids``, read by two blocked nodes): an invalid graph. Keep one."""
    seen: set[tuple[str, ...]] = set()
    for node in list(graph.node):
        if node.op_type != "Cast":
            continue
        key = (node.name, *node.input, *node.output)
        if key in seen:
            graph.node.remove(node)
        seen.add(key)


def to_fp16(model: Any, *, float32_inputs: Sequence[str] = FLOAT32_INPUTS) -> None:
    """Convert ORT's fused ``OnnxModel`` to fp16 in place, keeping the embeddings and ``float32_inputs``."""
    graph = model.model.graph
    _name_nodes(graph)
    keep = embedding_nodes(graph)
    with _quiet_ort_tools():
        model.convert_float_to_float16(keep_io_types=False, node_block_list=keep)
    _drop_duplicate_casts(model.model.graph)
    for name in float32_inputs:
        _restore_float32_input(model.model.graph, name)
    model.topological_sort()


def _finish(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft opset the fused operators live in, and name the producer."""
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model.producer_name = "sdrt"


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts.get(op, 0) for op in FUSED_OPS}


def save_graph(model: onnx.ModelProto, out: Path, *, external: bool | None = None) -> None:
    """Save ``model`` to ``out`` (weights beside it in ``<name>_data`` when large or ``external``).

    Written in a temporary folder beside ``out`` and moved into place data first, so ``out`` never
    points at missing weights.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if external is None:
        external = size > EXTERNAL_DATA_BYTES
    data_name = f"{out.name}_data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if external:
            onnx.save_model(model, str(tmp / out.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            give_default_mode(tmp / data_name)  # onnx writes the weights file 0600
            os.replace(tmp / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / out.name))
            with contextlib.suppress(FileNotFoundError):
                (out.parent / data_name).unlink()
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fuse_for_ort_cuda(
    fp32_onnx: Path,
    out: Path,
    *,
    fp16: bool = True,
    family: str,
    cuda_kernels: bool = True,
    external: bool | None = None,
    fp32_copy: Path | None = None,
) -> dict[str, int]:
    """Fuse the fp32 UNet graph ``fp32_onnx`` for ORT's CUDA EP and save it to ``out``.

    ``fp16`` converts the fused graph to fp16 with sdrt's contract (``timestep`` float32, every other
    float input and output fp16). ``cuda_kernels=False`` leaves out the CUDA-only fusions (a graph the
    CPU EP runs too). ``fp32_copy`` also saves the fused graph before its fp16 conversion (to verify the
    fusions apart from fp16 rounding). Returns the number of each fused operator in the saved graph.
    """
    if family not in FAMILIES:
        raise InputError(f"unknown family {family!r}; expected one of {FAMILIES}")
    fp32_onnx = Path(fp32_onnx)
    if not fp32_onnx.is_file():
        raise ArtifactError(f"{fp32_onnx} is missing; export the fp32 UNet first")
    src = onnx.load(str(fp32_onnx), load_external_data=False)
    half_inputs = [i.name for i in src.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT16]
    if half_inputs:
        raise InputError(
            f"{fp32_onnx} is an fp16 graph (inputs {half_inputs}); ORT's fusions match fp32 patterns: "
            "pass the fp32 UNet (export with --fp32, or let add_ort_cuda_variant export one)"
        )
    names = {i.name for i in src.graph.input}
    expected = {"sample", "timestep", "encoder_hidden_states"} | (
        {"text_embeds", "time_ids"} if family_named(family).time_ids else set())
    if names != expected:
        raise InputError(f"{fp32_onnx} takes inputs {sorted(names)}, not those of an sdrt {family} UNet "
                         f"{sorted(expected)}")
    del src
    fused = fuse_graph(fp32_onnx, cuda_kernels=cuda_kernels, fp16_target=fp16)
    fused.topological_sort()
    if fp32_copy is not None:
        copy = onnx.ModelProto()
        copy.CopyFrom(fused.model)
        _finish(copy)
        save_graph(copy, Path(fp32_copy), external=True)
        del copy
    if fp16:
        to_fp16(fused)
    model = fused.model
    _finish(model)
    counts = fused_op_counts(model)
    if counts["MultiHeadAttention"] + counts["Attention"] == 0:
        raise ArtifactError(
            f"ONNX Runtime's optimizer fused no attention in {fp32_onnx} (onnxruntime "
            f"{_ort_version()}); the graph would run unfused. Use the exported graph with ort-cuda instead."
        )
    save_graph(model, Path(out), external=external)
    return counts


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def add_ort_cuda_variant(
    export_dir: str | Path,
    loaded_model: Any,
    *,
    opset: int = 17,
    verify: bool | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Add the ``ort-cuda`` UNet variant to an sdrt export and record it in ``sdrt.json``.

    ``loaded_model`` is the ``LoadedModel`` the export was made from. An fp32 export's UNet is fused as
    it is; for an fp16 export an fp32 UNet is exported to a scratch folder first (and removed after).
    The variant has the UNet's precision and I/O contract. ``verify`` (default: when a CUDA EP is
    present) runs it on the CUDA EP against the float32 PyTorch UNet and refuses it beyond the parity
    bound of its precision. Returns the fused operator counts and, when verified, the parity figures.
    """
    from .exporter import component_specs
    from .onnx_export import PARITY_BOUND, export_component

    folder = Path(export_dir)
    manifest = ExportManifest.read(folder)
    preset = loaded_model.preset
    if (manifest.family, manifest.preset) != (preset.family, preset.name) or manifest.source != json.loads(
        json.dumps(loaded_model.source)
    ):
        raise CompatibilityError(
            f"{folder} was exported from {manifest.preset} weights {manifest.source}, but the loaded model "
            f"is {preset.name} from {loaded_model.source}; pass the model the export was made from"
        )
    comp = manifest.components["unet"]
    fp16 = comp.precision == "fp16"
    # the UNet as exported: with DeepCache's deep feature as its second output where the export has the shallow path
    spec = next(s for s in component_specs(loaded_model, deepcache=SHALLOW_UNET in manifest.components)
                if s.name == "unet")
    final = folder / Path(comp.path).parent / VARIANT_FILE
    scratch = Path(tempfile.mkdtemp(prefix=".ort-cuda-scratch-", dir=folder))
    try:
        if fp16:
            progress("exporting an fp32 UNet for ORT's fusions")
            export_component(spec, "fp32", scratch / "fp32", opset=opset, parity_shape=(1, 8, 8),
                             progress=progress)
            fp32_path = scratch / "fp32" / "model.onnx"
        else:
            fp32_path = folder / comp.path
        progress("fusing the UNet for ORT's CUDA EP")
        made = scratch / "variant" / VARIANT_FILE
        counts = fuse_for_ort_cuda(fp32_path, made, fp16=fp16, family=manifest.family, external=True)
        rel = final.relative_to(folder).as_posix()
        report: dict[str, Any] = {"path": rel, "fused": counts, "parity": None}
        if verify is None:
            verify = _has_cuda_ep()
        if verify:
            progress("checking the variant on the CUDA EP against PyTorch")
            report["parity"] = _cuda_parity(spec, made, comp.precision, PARITY_BOUND[comp.precision])
        # weights first: the graph file never names weights that are not there yet
        os.replace(made.parent / f"{VARIANT_FILE}_data", final.parent / f"{VARIANT_FILE}_data")
        os.replace(made, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # re-read: the manifest may have been rewritten meanwhile; the write itself is atomic
    manifest = ExportManifest.read(folder)
    comp = manifest.components["unet"]
    comp = replace(comp, variants={**comp.variants, VARIANT: report["path"]})
    manifest = replace(manifest, components={**manifest.components, "unet": comp})
    atomic_write_text(folder / MANIFEST_NAME, manifest.to_json())
    return report


def _has_cuda_ep() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _cuda_parity(spec: Any, path: Path, precision: str, bound: float,
                 shape: tuple[int, int, int] = (2, 16, 24)) -> dict[str, float]:
    """Run the variant on the CUDA EP and the float32 torch module on the same inputs."""
    import onnxruntime as ort
    import torch

    if not _has_cuda_ep():
        raise CompatibilityError("verifying the ort-cuda variant needs onnxruntime-gpu and a CUDA GPU")
    gen = torch.Generator().manual_seed(4321)
    feeds = {}
    for (name, kind, _), a in zip(spec.inputs, spec.example(gen, *shape)):
        feeds[name] = a.numpy().astype(np.float16) if kind == "float" and precision == "fp16" else a.numpy()
    # the reference sees the same (fp16-rounded) values, in float32
    ref_args = [torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v)
                for v in feeds.values()]
    with torch.inference_mode():
        ref = spec.module(*ref_args).numpy().astype(np.float64)
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    got = sess.run(None, feeds)[0].astype(np.float64)
    if not np.isfinite(got).all():
        raise ParityError(f"{path}: the ort-cuda variant produced NaN or inf")
    abs_err = float(np.abs(got - ref).max())
    rel = abs_err / max(float(np.abs(ref).max()), 1e-12)
    if rel > bound:
        raise ParityError(
            f"{path}: the ort-cuda variant differs from PyTorch by {rel:.3e} relative (max abs "
            f"{abs_err:.3e}) on the CUDA EP, above the {precision} bound {bound:.0e}; it was not recorded"
        )
    return {"rel_err": rel, "max_abs_err": abs_err, "bound": bound}
