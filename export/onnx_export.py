"""Export one component to ONNX and gate it on parity with its PyTorch module.

Every graph is exported with the TorchScript exporter (``dynamo=False``: on these models it handles
non-square dynamic spatial axes correctly and exports in seconds, where the dynamo exporter did not),
cleaned, saved (weights in ``model.onnx_data`` when large), then run with ONNX Runtime CPU on fresh
random inputs against the float32 PyTorch module. The artifact is refused when they disagree.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from sdrt.runtime.errors import ParityError
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.manifest import Component, Parity, TensorSpec

from .refit_map import build_refit_map

log = logging.getLogger(__name__)

# Relative error bounds: max |onnx - torch| / max |torch| over each float output, torch in float32.
# fp32 graphs differ from torch only by operator order; fp16 graphs carry fp16 rounding through the net.
# bf16 (a bf16 graph, or an fp32 graph run by OpenVINO in bf16: 8 bits of mantissa against fp16's 11) keeps
# fp32's range but rounds 8 times coarser than fp16.
PARITY_BOUND = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# A bf16 graph's own bound (``bf16_bounds``) never passes this: past it bf16 has lost the output, not rounded it.
BF16_BOUND_CEILING = 0.25
# For uint8 images: the largest difference in levels (fp32: a rounding flip at most).
IMAGE_LEVELS = {"fp32": 1, "fp16": 8, "bf16": 16}
EXTERNAL_DATA_BYTES = 1 << 30
EXTERNAL_DATA = "model.onnx_data"
TRACE_LATENT = (10, 14)  # components above 1 GiB keep their weights in model.onnx_data


@dataclass
class ComponentSpec:
    """What to export: a wrapper module and its I/O contract.

    Input dtypes: "float" follows the export precision, "float32", "int32" and "uint8" are fixed.
    ``example`` makes float32/int inputs for a given (batch, latent height, latent width).
    """

    name: str
    module: torch.nn.Module  # float32 wrapper; weights of interest under .<attr>
    weights: torch.nn.Module  # the diffusers/transformers module (names for the refit map)
    inputs: list[tuple[str, str, tuple[int | str, ...]]]
    outputs: list[tuple[str, str, tuple[int | str, ...]]]
    example: Callable[[torch.Generator, int, int, int], tuple[torch.Tensor, ...]]
    fp16_overflows: bool = False  # float32 in an fp16 export (bf16 has fp32's range: a bf16 export keeps it)
    refittable: bool = False


# The dtype each precision's graph computes in. A bf16 graph keeps float32 inputs and outputs (numpy, and so
# every runtime's host side, has no bf16): it casts them at its edges (``fp32_interface``).
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# A bf16 export keeps the VAE in float32: it is small, and the image's last step (the peers keep FLUX.1's out of
# half precision too).
VAE_COMPONENTS = ("vae_decoder", "vae_encoder", MASKED_ENCODER)


def component_precision(name: str, precision: str) -> str:
    """The precision component ``name`` is exported in, in an export of ``precision``."""
    return "fp32" if precision == "bf16" and name in VAE_COMPONENTS else precision


def _np_dtype(kind: str, precision: str) -> str:
    if kind == "float":
        return "float16" if precision == "fp16" else "float32"
    return kind


def component_entry(folder: Path, precision: str, inputs: Sequence[tuple[str, str, tuple[int | str, ...]]],
                    outputs: Sequence[tuple[str, str, tuple[int | str, ...]]], parity: Parity | None) -> Component:
    """The manifest's entry for the graph exported into ``folder`` (its ``model.onnx``, in memory or streamed):
    I/O as a spec gives it ("float" follows ``precision``), its size the sum of the model.onnx* files."""
    return Component(
        path=f"{folder.name}/model.onnx",
        precision=precision,
        inputs=tuple(TensorSpec(n, _np_dtype(k, precision), s) for n, k, s in inputs),
        outputs=tuple(TensorSpec(n, _np_dtype(k, precision), s) for n, k, s in outputs),
        parity=parity,
        size_bytes=sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")),
    )


def _cast_inputs(args: tuple[torch.Tensor, ...], spec: ComponentSpec, precision: str, *,
                 trace: bool = False) -> tuple[torch.Tensor, ...]:
    """The "float" inputs as the graph takes them (fp16: half; bf16: float32, the graph casting them), or with
    ``trace`` as the module traced into it takes them (bf16 too)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16 if trace and precision == "bf16" else None
    return tuple(a.to(dtype) if kind == "float" and dtype is not None else a
                 for a, (_, kind, _) in zip(args, spec.inputs))


def export_component(
    spec: ComponentSpec,
    precision: str,
    folder: Path,
    *,
    opset: int,
    parity_shape: tuple[int, int, int],
    progress: Callable[[str], None] = lambda msg: None,
) -> Component:
    """Export ``spec`` into ``folder/model.onnx`` and return its manifest entry. Raises ParityError."""
    return export_group([(spec, folder)], precision, opset=opset, parity_shape=parity_shape,
                        progress=progress)[spec.name]


def share_groups(specs: Sequence[ComponentSpec]) -> list[list[ComponentSpec]]:
    """``specs`` in runs that end where no later spec shares a parameter or buffer with the run (the UNet's
    graphs, say, with the ControlNets between them): after its run, a module is needed no more."""
    held = [{id(t) for t in (*s.module.parameters(), *s.module.buffers())} for s in specs]
    groups: list[list[ComponentSpec]] = []
    run: list[ComponentSpec] = []
    run_held: set[int] = set()
    for i, spec in enumerate(specs):
        run.append(spec)
        run_held |= held[i]
        if not any(run_held & later for later in held[i + 1:]):
            groups.append(run)
            run, run_held = [], set()
    return groups


def export_group(
    items: Sequence[tuple[ComponentSpec, Path]],
    precision: str,
    *,
    opset: int,
    parity_shape: tuple[int, int, int],
    progress: Callable[[str], None] = lambda msg: None,
    release: bool = False,
) -> dict[str, Component]:
    """Export each ``(spec, folder)`` and gate it on parity; the manifest entries by name. Raises ParityError.

    Every graph and the float32 module's outputs on the parity inputs first, then every parity check, so that
    an ONNX Runtime session need not share memory with PyTorch modules no longer needed. ``release``: the specs'
    modules are needed by no spec after these (``share_groups``) and the caller gives them up: an all-fp16 group
    is traced from its modules cast in place once the references are taken (no half copy), and every parameter
    and buffer goes to the meta device (its memory freed) before the checks; the modules are unusable after.
    """
    precisions = ["fp32" if spec.fp16_overflows and precision == "fp16" else precision for spec, _ in items]
    in_place = release and all(prec == "fp16" for prec in precisions)
    cases, examples = {}, {}
    if in_place:  # what the float32 modules compute (an example may run another module: ControlNet residuals)
        for (spec, _), prec in zip(items, precisions):
            cases[spec.name] = _parity_case(spec, prec, parity_shape)
            examples[spec.name] = _trace_example(spec, prec)
        for spec, _ in items:
            spec.module.half()
        release_memory()
    for (spec, folder), prec in zip(items, precisions):
        _export_graph(spec, prec, folder, opset=opset, progress=progress, example=examples.pop(spec.name, None),
                      release=release)
        if spec.name not in cases:  # after the trace, as it always was
            cases[spec.name] = _parity_case(spec, prec, parity_shape)
    if release:
        for spec, _ in items:
            spec.module.to("meta")
        release_memory()
    done = {}
    for (spec, folder), prec in zip(items, precisions):
        progress(f"checking {spec.name}'s parity with PyTorch")
        parity = check_parity(spec, prec, folder / "model.onnx", parity_shape, case=cases.pop(spec.name))
        if release:
            release_memory()
        progress(f"{spec.name}: {parity_line(parity, prec)}")
        done[spec.name] = component_entry(folder, prec, spec.inputs, spec.outputs, parity)
    return done


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise). Only where the
    export gives its modules up (``release``): a full collection costs about 0.2 s, more in a large process, and a
    small model's export has nothing worth handing back."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``copy.deepcopy(module).to(dtype)`` without a float32 copy on the way: each float parameter is copied
    straight to ``dtype`` (the deep copy takes those from its memo, sharing stays as it was)."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach().to(dtype), p.requires_grad)
                            for p in module.parameters() if p.is_floating_point()}
    return copy.deepcopy(module, memo).to(dtype)


def _trace_example(spec: ComponentSpec, precision: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1234)
    # Traced at a latent size the UNet's upsampling factor does not divide: diffusers then sizes each
    # upsampling to its skip connection, and the trace records that general branch, so the graph
    # serves every multiple of 8 pixels (a divisible trace would bake in a factor-of-2 upsampling).
    return _cast_inputs(spec.example(gen, 1, *TRACE_LATENT), spec, precision, trace=True)


def _export_graph(spec: ComponentSpec, precision: str, folder: Path, *, opset: int,
                  progress: Callable[[str], None], example: tuple[torch.Tensor, ...] | None = None,
                  release: bool = False) -> None:
    """Trace ``spec`` into ``folder/model.onnx`` (+ ``model.onnx_data``) and its refit map, and check the file.
    ``example``: the trace's inputs, taken before the module was cast to half in place (None: an fp16 or bf16
    graph is traced from a copy in that dtype, the module staying the float32 parity reference). ``release``: the
    heap handed back after the trace (``release_memory``). A bf16 graph's inputs and outputs are float32
    (``fp32_interface``)."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / ".raw"
    scratch.mkdir()
    cast = example is None and precision in ("fp16", "bf16")
    example = _trace_example(spec, precision) if example is None else example
    module = _cast_copy(spec.module, TORCH_DTYPE[precision]) if cast else spec.module
    dynamic_axes = {
        n: {i: d for i, d in enumerate(shape) if isinstance(d, str)} for n, _, shape in spec.inputs + spec.outputs
    }
    t0 = time.perf_counter()
    progress(f"exporting {spec.name} ({precision})")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on fixed contracts
        torch.onnx.export(
            module,
            example,
            str(scratch / "model.onnx"),
            input_names=[n for n, _, _ in spec.inputs],
            output_names=[n for n, _, _ in spec.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    del module
    if release:
        release_memory()
    path = folder / "model.onnx"
    repack(scratch / "model.onnx", path, external=spec.name in ("unet", "unet_control") or None,
           fp32_io=precision == "bf16")
    shutil.rmtree(scratch)
    onnx.checker.check_model(str(path))  # the path form: the weights stay on disk
    if spec.refittable:
        refit = build_refit_map(onnx.load(str(path), load_external_data=False), spec.weights, TORCH_DTYPE[precision],
                                base_dir=folder)
        (folder / "refit_map.json").write_text(json.dumps(refit, indent=1, sort_keys=True))
    progress(f"exported {spec.name} in {time.perf_counter() - t0:.1f} s")


def repack(raw: Path, path: Path, *, external: bool | None = None, fp32_io: bool = False) -> bool:
    """Clean the exporter's graph ``raw`` (``_cleanup``; ``fp32_io``: ``fp32_interface`` too) and save it as
    ``path``: with every initializer of 1 KiB or more in one ``model.onnx_data`` beside it when ``external``
    (None: when the initializers pass 1 GiB), else as one file. Returns whether it wrote external data.

    The result equals ``onnx.load`` + ``onnx.save_model(..., save_as_external_data=True,
    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)``, but the weights the
    exporter wrote as external files (it does past 2 GB) are copied one tensor at a time, never all in memory.
    """
    model = onnx.load(str(raw), load_external_data=False)
    _cleanup(model)
    if fp32_io:
        fp32_interface(model.graph)
    if external is None:
        external = sum(_data_length(t, raw.parent) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if not external:
        onnx.load_external_data_for_model(model, str(raw.parent))
        onnx.save_model(model, str(path))
        return False
    with open(path.parent / EXTERNAL_DATA, "wb") as data:  # a plain write's mode (onnx's is 0600)
        for t in _initializers(model.graph):
            if uses_external_data(t):
                held = onnx.TensorProto()
                held.CopyFrom(t)  # no bytes: the copy names the file and range
                load_external_data_for_tensor(held, str(raw.parent))
                blob = held.raw_data
            elif t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= 1024:  # onnx's own threshold test
                blob = t.raw_data
            else:
                continue
            offset = data.tell()
            data.write(blob)
            del blob
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", EXTERNAL_DATA), ("offset", offset), ("length", data.tell() - offset)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
    for t in _attribute_tensors(model.graph):  # onnx.load reads these in; save_model keeps them in the graph
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(raw.parent))
    onnx.save_model(model, str(path))
    return True


def fp32_interface(graph: onnx.GraphProto) -> None:
    """Give a graph traced in bf16 float32 inputs and outputs, in place: each bf16 input becomes float32, cast to
    bf16 where the graph reads it, and each bf16 output is cast from bf16 to float32 as the graph's last step.
    The runtimes feed and read numpy arrays, which have no bf16; the casts cost a pass over the latents."""
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    head: list[onnx.NodeProto] = []
    tail: list[onnx.NodeProto] = []
    renamed: dict[str, str] = {}
    for value in graph.input:
        if value.type.tensor_type.elem_type == bf16:
            inner = f"{value.name}/bf16"
            head.append(onnx.helper.make_node("Cast", [value.name], [inner], to=bf16, name=f"{value.name}/to_bf16"))
            renamed[value.name] = inner
            value.type.tensor_type.elem_type = f32
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    inputs = {v.name for v in graph.input}
    done: set[str] = set()
    for value in graph.output:
        if value.type.tensor_type.elem_type != bf16:
            continue
        if value.name in inputs or value.name in done:  # an input passed through, or an output listed twice
            value.type.tensor_type.elem_type = f32
        else:
            done.add(value.name)
            inner = f"{value.name}/bf16"
            for node in graph.node:  # its producer (and any node reading it) now names the bf16 value
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            tail.append(onnx.helper.make_node("Cast", [inner], [value.name], to=f32, name=f"{value.name}/to_fp32"))
            value.type.tensor_type.elem_type = f32
    for info in graph.value_info:  # what was recorded under a renamed name belongs to the bf16 value now
        info.name = renamed.get(info.name, f"{info.name}/bf16" if info.name in done else info.name)
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)


def _data_length(t: onnx.TensorProto, base_dir: Path) -> int:
    """The bytes of ``t``'s data, in the graph or in its external file."""
    if not uses_external_data(t):
        return len(t.raw_data)
    info = {e.key: e.value for e in t.external_data}
    if "length" in info:
        return int(info["length"])
    return (base_dir / info["location"]).stat().st_size - int(info.get("offset", 0))


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The graph's initializers, then its subgraphs', in onnx's order for external data."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            yield from (x for g in _subgraphs(a) for x in _initializers(g))


def _attribute_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            yield from (x for g in _subgraphs(a) for x in _attribute_tensors(g))


def _subgraphs(a: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if a.type == onnx.AttributeProto.GRAPH:
        return [a.g]
    return list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []


def _cleanup(model: onnx.ModelProto) -> None:
    """Drop initializers nothing reads and doc strings; the exporter already folded constants."""
    used = {i for n in model.graph.node for i in n.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for n in model.graph.node:
        n.doc_string = ""
    model.producer_name = "sdrt"


def image_parity(parity: Parity, precision: str) -> bool:
    """Whether ``parity`` judged an image output (uint8, in levels of 255: its bound, as a fraction of full
    scale, is (levels + 0.5) / 255)."""
    return abs(parity.bound - (IMAGE_LEVELS[precision] + 0.5) / 255.0) < 1e-12


def bound_text(parity: Parity, precision: str) -> str:
    """A float output's bound: the precision's (``1e-04``), or a bf16 graph's own (``bf16_bounds``: ``1.9e-01``)."""
    return f"{parity.bound:.0e}" if parity.bound == PARITY_BOUND[precision] else f"{parity.bound:.1e}"


def parity_line(parity: Parity, precision: str) -> str:
    """The parity figures in words. An image output (uint8) is judged in levels of 255, so its bound,
    as a fraction of full scale, is (levels + 0.5) / 255, not the float bound."""
    if image_parity(parity, precision):
        return (f"image parity {parity.max_abs_err:.0f} of 255 levels, bound {IMAGE_LEVELS[precision]} level"
                f"{'s' if IMAGE_LEVELS[precision] > 1 else ''} ({parity.rel_err:.1e} of full scale, bound "
                f"{parity.bound:.0e}; the {PARITY_BOUND[precision]:.0e} bound is for float outputs)")
    return (f"parity rel err {parity.rel_err:.2e} (bound {bound_text(parity, precision)}), max abs "
            f"{parity.max_abs_err:.2e}")


Case = tuple[dict[str, np.ndarray], tuple[torch.Tensor, ...], dict[str, float]]


def _parity_case(spec: ComponentSpec, precision: str, shape: tuple[int, int, int]) -> Case:
    """Fresh inputs in the graph's precision, the float32 torch module's outputs on the same values, and each
    float output's bound where it is not ``PARITY_BOUND[precision]`` (``bf16_bounds``)."""
    gen = torch.Generator().manual_seed(4321)
    b, h, w = shape
    args32 = spec.example(gen, b, h, w)
    args = _cast_inputs(args32, spec, precision)
    ref_args = tuple(a.float() if a.is_floating_point() else a for a in args)  # the same rounded values
    with torch.inference_mode():
        ref = spec.module.float()(*ref_args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    bounds = bf16_bounds(spec, args, ref) if precision == "bf16" else {}
    return {n: a.numpy() for (n, _, _), a in zip(spec.inputs, args)}, ref, bounds


def bf16_bounds(spec: ComponentSpec, args: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]
                ) -> dict[str, float]:
    """A bf16 graph's bound per float output: twice what PyTorch's own bf16 module (a bf16 copy, on the same
    inputs cast as the graph casts them) is off its float32 outputs, and never below ``PARITY_BOUND["bf16"]``.
    bf16's own error depends on the weights (a tiny random FLUX.1 transformer: 0.9% with the tests' weights,
    9.3% with full-size scaled ones), so a fixed bound would refuse faithful graphs or pass broken ones; the
    graph is held to PyTorch's own bf16 result, with room for a different order of operations; never above
    ``BF16_BOUND_CEILING``, and an output PyTorch's bf16 module overflows is refused."""
    module = _cast_copy(spec.module, torch.bfloat16)
    with torch.inference_mode():
        own = module(*_cast_inputs(args, spec, "bf16", trace=True))
    del module
    own = own if isinstance(own, tuple) else (own,)
    bounds = {}
    for (name, kind, _), o, r in zip(spec.outputs, own, ref):
        if kind == "float":
            if not torch.isfinite(o).all():
                raise ParityError(f"{spec.name}.{name}: PyTorch's own bf16 module gives NaN or inf on the gate's "
                                  "inputs: this component does not run in bf16; export it in fp32")
            r64 = r.double()
            err = float((o.double() - r64).abs().max()) / max(float(r64.abs().max()), 1e-12)
            bounds[name] = min(max(PARITY_BOUND["bf16"], 2 * err), BF16_BOUND_CEILING)
    return bounds


def _compare(spec: ComponentSpec, outs: list[np.ndarray], ref: tuple[torch.Tensor, ...], precision: str,
             runtime: str, bounds: dict[str, float] | None = None) -> tuple[float, float, float]:
    """(worst relative error, its max abs error, its bound) over the outputs; ParityError past a bound
    (``bounds``: a float output's own, else the precision's)."""
    worst_rel, worst_abs, bound = 0.0, 0.0, PARITY_BOUND[precision]
    bounds = bounds or {}
    for (name, kind, _), o, r in zip(spec.outputs, outs, ref):
        r_np = r.numpy()
        if o.shape != r_np.shape:
            raise ParityError(f"{spec.name}.{name}: ONNX shape {o.shape} != PyTorch shape {r_np.shape}")
        if kind == "bool":
            if not np.array_equal(o, r_np):
                raise ParityError(f"{spec.name}.{name}: ONNX {o.tolist()} != PyTorch {r_np.tolist()}")
            continue
        if kind == "uint8":
            abs_err = float(np.abs(o.astype(np.int16) - r_np.astype(np.int16)).max())
            # reported as a fraction of full scale; the bound is a whole number of levels
            rel, b_ = abs_err / 255.0, (IMAGE_LEVELS[precision] + 0.5) / 255.0
        else:
            o64, r64 = o.astype(np.float64), r_np.astype(np.float64)
            if not np.isfinite(o64).all():
                raise ParityError(f"{spec.name}.{name}: the ONNX graph produced NaN or inf ({precision})")
            abs_err = float(np.abs(o64 - r64).max())
            rel, b_ = abs_err / max(float(np.abs(r64).max()), 1e-12), bounds.get(name, PARITY_BOUND[precision])
        if rel > b_:
            raise ParityError(
                f"{spec.name}.{name}: {runtime} differs from PyTorch by {rel:.3e} relative "
                f"(max abs {abs_err:.3e}), above the {precision} bound {b_:.1e}. The export was not written."
            )
        if rel / b_ >= worst_rel / bound:
            worst_rel, worst_abs, bound = rel, abs_err, b_
    return worst_rel, worst_abs, bound


def check_parity(spec: ComponentSpec, precision: str, path: Path, shape: tuple[int, int, int], *,
                 case: Case | None = None) -> Parity:
    """Run the ONNX graph (ORT CPU) and the float32 torch module on the same fresh inputs. ``case``: the
    inputs and the module's outputs already computed (``_parity_case``), so the module need not be held. A bf16
    graph runs as ``bf16_emulation`` rewrites it (ONNX Runtime's CPU provider has no bf16 kernels), against
    ``bf16_bounds``."""
    import onnxruntime as ort

    feed, ref, bounds = case if case is not None else _parity_case(spec, precision, shape)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, os.cpu_count() or 1)
    if precision == "bf16":  # no bf16 kernels on ONNX Runtime's CPU provider: the graph as bf16 hardware runs it
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every rounding
        # beside the graph (the export's own temporary folder), not in /tmp, which may be memory (tmpfs)
        with tempfile.TemporaryDirectory(prefix=".bf16-emulated-", dir=path.parent) as tmp:
            emulated = Path(tmp) / "model.onnx"
            onnx.save_model(bf16_emulation(onnx.load(str(path), load_external_data=False), path.parent),
                            str(emulated), save_as_external_data=True, location="model.onnx_data")
            sess = ort.InferenceSession(str(emulated), opts, providers=["CPUExecutionProvider"])
            outs = sess.run([n for n, _, _ in spec.outputs], feed)
        worst_rel, worst_abs, bound = _compare(spec, outs, ref, precision, "ONNX Runtime (bf16 emulated)", bounds)
        return Parity(reference="torch fp32, onnxruntime CPU emulating bf16", max_abs_err=worst_abs,
                      rel_err=worst_rel, bound=bound)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = sess.run([n for n, _, _ in spec.outputs], feed)
    worst_rel, worst_abs, bound = _compare(spec, outs, ref, precision, "ONNX Runtime")
    return Parity(reference="torch fp32, onnxruntime CPU", max_abs_err=worst_abs, rel_err=worst_rel, bound=bound)


def bf16_emulation(model: onnx.ModelProto, base_dir: Path | None = None) -> onnx.ModelProto:
    """A bf16 graph rewritten to compute what bf16 hardware computes, on any CPU: every operator in float32 (the
    precision GPUs accumulate bf16 products in) with its result rounded to bf16 (a Cast to bf16 and back, round to
    nearest even), the bf16 weights and constants widened to float32 (exactly). ONNX Runtime's CPU provider runs
    it; no bf16 kernel is needed. ``model`` may keep its weights in external data under ``base_dir``: the types are
    inferred without them, each weight read in as it is copied. Operators past the ONNX standard set, subgraphs
    and results whose type cannot be inferred (they could not be rounded) are refused."""
    from onnx import numpy_helper

    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    inferred = onnx.shape_inference.infer_shapes(model)  # reads no weight bytes
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    # a sequence (SplitToSequence's) only moves values; its tensors are rounded where they are read out
    sequences = {v.name for v in values if v.type.HasField("sequence_type")}
    unknown = [o for n in model.graph.node for o in n.output if o and not types.get(o) and o not in sequences]
    if unknown:
        raise ParityError(f"bf16 emulation: the type of {unknown[0]} ({len(unknown)} results in all) cannot be "
                          "inferred, so it could not be rounded as bf16 hardware rounds it")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for t in g.initializer:
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(base_dir or "."))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                     for a in node.attribute):
            raise ParityError(f"bf16 emulation: node {node.name} ({node.domain}:{node.op_type}) is outside what it "
                              "rewrites")
        for a in node.attribute:
            if (a.name == "dtype" and a.i == bf16) or a.type == onnx.AttributeProto.SPARSE_TENSOR:
                raise ParityError(f"bf16 emulation: node {node.name} ({node.op_type}) makes a tensor of its own "
                                  f"({a.name}), which it does not rewrite")
            if node.op_type == "Cast" and a.name == "to" and a.i == bf16:
                a.i = f32
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        rounded = [o for o in node.output if o and types.get(o) == bf16]
        for o in rounded:
            node.output[list(node.output).index(o)] = f"{o}/unrounded"
        nodes.append(node)
        for o in rounded:
            nodes.append(onnx.helper.make_node("Cast", [f"{o}/unrounded"], [f"{o}/bf16"], to=bf16))
            nodes.append(onnx.helper.make_node("Cast", [f"{o}/bf16"], [o], to=f32))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return out


def _run_openvino(path: Path, feed: dict[str, np.ndarray], outputs: list[str], inference_precision: str,
                  threads: int | None) -> list[np.ndarray]:
    """The graph's ``outputs`` on ``feed``, run by OpenVINO's CPU plugin at ``inference_precision``."""
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": inference_precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    req = compiled.create_infer_request()
    for name, a in feed.items():
        req.set_tensor(name, ov.Tensor(np.ascontiguousarray(a)))
    req.infer()
    return [np.array(req.get_tensor(name).data) for name in outputs]


def check_parity_openvino(spec: ComponentSpec, path: Path, shape: tuple[int, int, int], *,
                          inference_precision: str = "bf16", threads: int | None = None) -> Parity:
    """Run the fp32 ONNX graph with OpenVINO at ``inference_precision`` (bf16: the ``bf16`` bounds; f32:
    the ``fp32`` bounds) against the float32 torch module on the same fresh inputs. The OpenVINO backend's
    gate; raises ParityError past the bound."""
    gate = "bf16" if inference_precision == "bf16" else "fp32"
    feed, ref, _ = _parity_case(spec, "fp32", shape)
    outs = _run_openvino(path, feed, [n for n, _, _ in spec.outputs], inference_precision, threads)
    worst_rel, worst_abs, bound = _compare(spec, outs, ref, gate, f"OpenVINO ({inference_precision})")
    return Parity(reference=f"torch fp32, openvino CPU {inference_precision}", max_abs_err=worst_abs,
                  rel_err=worst_rel, bound=bound)
