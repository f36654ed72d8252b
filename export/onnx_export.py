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
from sdrt.runtime.manifest import Component, Parity, TensorSpec

from .refit_map import build_refit_map

log = logging.getLogger(__name__)

# Relative error bounds: max |onnx - torch| / max |torch| over each float output, torch in float32.
# fp32 graphs differ from torch only by operator order; fp16 graphs carry fp16 rounding through the net.
# bf16 (an fp32 graph run by OpenVINO in bf16, 8 bits of mantissa against fp16's 11) keeps fp32's range
# but rounds 8 times coarser than fp16.
PARITY_BOUND = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
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
    force_fp32: bool = False
    refittable: bool = False


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


def _cast_inputs(args: tuple[torch.Tensor, ...], spec: ComponentSpec, precision: str) -> tuple[torch.Tensor, ...]:
    out = []
    for a, (_, kind, _) in zip(args, spec.inputs):
        out.append(a.half() if kind == "float" and precision == "fp16" else a)
    return tuple(out)


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
    precisions = ["fp32" if spec.force_fp32 else precision for spec, _ in items]
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


def _half_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(module).half()`` without a float32 copy on the way: each float parameter is copied
    straight to half (the deep copy takes those from its memo, sharing stays as it was)."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach().half(), p.requires_grad)
                            for p in module.parameters() if p.is_floating_point()}
    return copy.deepcopy(module, memo).half()


def _trace_example(spec: ComponentSpec, precision: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1234)
    # Traced at a latent size the UNet's upsampling factor does not divide: diffusers then sizes each
    # upsampling to its skip connection, and the trace records that general branch, so the graph
    # serves every multiple of 8 pixels (a divisible trace would bake in a factor-of-2 upsampling).
    return _cast_inputs(spec.example(gen, 1, *TRACE_LATENT), spec, precision)


def _export_graph(spec: ComponentSpec, precision: str, folder: Path, *, opset: int,
                  progress: Callable[[str], None], example: tuple[torch.Tensor, ...] | None = None,
                  release: bool = False) -> None:
    """Trace ``spec`` into ``folder/model.onnx`` (+ ``model.onnx_data``) and its refit map, and check the file.
    ``example``: the trace's inputs, taken before the module was cast to half in place (None: an fp16 graph is
    traced from a half copy, the module staying the float32 parity reference). ``release``: the heap handed back
    after the trace (``release_memory``)."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / ".raw"
    scratch.mkdir()
    cast = example is None and precision == "fp16"
    example = _trace_example(spec, precision) if example is None else example
    module = _half_copy(spec.module) if cast else spec.module
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
    repack(scratch / "model.onnx", path, external=spec.name in ("unet", "unet_control") or None)
    shutil.rmtree(scratch)
    onnx.checker.check_model(str(path))  # the path form: the weights stay on disk
    if spec.refittable:
        wdtype = torch.float16 if precision == "fp16" else torch.float32
        refit = build_refit_map(onnx.load(str(path), load_external_data=False), spec.weights, wdtype, base_dir=folder)
        (folder / "refit_map.json").write_text(json.dumps(refit, indent=1, sort_keys=True))
    progress(f"exported {spec.name} in {time.perf_counter() - t0:.1f} s")


def repack(raw: Path, path: Path, *, external: bool | None = None) -> bool:
    """Clean the exporter's graph ``raw`` (``_cleanup``) and save it as ``path``: with every initializer of 1 KiB
    or more in one ``model.onnx_data`` beside it when ``external`` (None: when the initializers pass 1 GiB), else
    as one file. Returns whether it wrote external data.

    The result equals ``onnx.load`` + ``onnx.save_model(..., save_as_external_data=True,
    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)``, but the weights the
    exporter wrote as external files (it does past 2 GB) are copied one tensor at a time, never all in memory.
    """
    model = onnx.load(str(raw), load_external_data=False)
    _cleanup(model)
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


def parity_line(parity: Parity, precision: str) -> str:
    """The parity figures in words. An image output (uint8) is judged in levels of 255, so its bound,
    as a fraction of full scale, is (levels + 0.5) / 255, not the float bound."""
    if parity.bound != PARITY_BOUND[precision]:
        return (f"image parity {parity.max_abs_err:.0f} of 255 levels, bound {IMAGE_LEVELS[precision]} level"
                f"{'s' if IMAGE_LEVELS[precision] > 1 else ''} ({parity.rel_err:.1e} of full scale, bound "
                f"{parity.bound:.0e}; the {PARITY_BOUND[precision]:.0e} bound is for float outputs)")
    return f"parity rel err {parity.rel_err:.2e} (bound {parity.bound:.0e}), max abs {parity.max_abs_err:.2e}"


def _parity_case(spec: ComponentSpec, precision: str, shape: tuple[int, int, int]
                 ) -> tuple[dict[str, np.ndarray], tuple[torch.Tensor, ...]]:
    """Fresh inputs in the graph's precision, and the float32 torch module's outputs on the same values."""
    gen = torch.Generator().manual_seed(4321)
    b, h, w = shape
    args32 = spec.example(gen, b, h, w)
    args = _cast_inputs(args32, spec, precision)
    ref_args = tuple(a.float() if a.is_floating_point() else a for a in args)  # the same rounded values
    with torch.inference_mode():
        ref = spec.module.float()(*ref_args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {n: a.numpy() for (n, _, _), a in zip(spec.inputs, args)}, ref


def _compare(spec: ComponentSpec, outs: list[np.ndarray], ref: tuple[torch.Tensor, ...], precision: str,
             runtime: str) -> tuple[float, float, float]:
    """(worst relative error, its max abs error, its bound) over the outputs; ParityError past a bound."""
    worst_rel, worst_abs, bound = 0.0, 0.0, PARITY_BOUND[precision]
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
            rel, b_ = abs_err / max(float(np.abs(r64).max()), 1e-12), PARITY_BOUND[precision]
        if rel > b_:
            raise ParityError(
                f"{spec.name}.{name}: {runtime} differs from PyTorch by {rel:.3e} relative "
                f"(max abs {abs_err:.3e}), above the {precision} bound {b_:.0e}. The export was not written."
            )
        if rel / b_ >= worst_rel / bound:
            worst_rel, worst_abs, bound = rel, abs_err, b_
    return worst_rel, worst_abs, bound


def check_parity(spec: ComponentSpec, precision: str, path: Path, shape: tuple[int, int, int], *,
                 case: tuple[dict[str, np.ndarray], tuple[torch.Tensor, ...]] | None = None) -> Parity:
    """Run the ONNX graph (ORT CPU) and the float32 torch module on the same fresh inputs. ``case``: the
    inputs and the module's outputs already computed (``_parity_case``), so the module need not be held."""
    import onnxruntime as ort

    feed, ref = case if case is not None else _parity_case(spec, precision, shape)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, os.cpu_count() or 1)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = sess.run([n for n, _, _ in spec.outputs], feed)
    worst_rel, worst_abs, bound = _compare(spec, outs, ref, precision, "ONNX Runtime")
    return Parity(reference="torch fp32, onnxruntime CPU", max_abs_err=worst_abs, rel_err=worst_rel, bound=bound)


def check_parity_openvino(spec: ComponentSpec, path: Path, shape: tuple[int, int, int], *,
                          inference_precision: str = "bf16", threads: int | None = None) -> Parity:
    """Run the fp32 ONNX graph with OpenVINO at ``inference_precision`` (bf16: the ``bf16`` bounds; f32:
    the ``fp32`` bounds) against the float32 torch module on the same fresh inputs. The OpenVINO backend's
    gate; raises ParityError past the bound."""
    import openvino as ov

    gate = "bf16" if inference_precision == "bf16" else "fp32"
    feed, ref = _parity_case(spec, "fp32", shape)
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": inference_precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    req = compiled.create_infer_request()
    for name, a in feed.items():
        req.set_tensor(name, ov.Tensor(np.ascontiguousarray(a)))
    req.infer()
    outs = [np.array(req.get_tensor(name).data) for name, _, _ in spec.outputs]
    worst_rel, worst_abs, bound = _compare(spec, outs, ref, gate, f"OpenVINO ({inference_precision})")
    return Parity(reference=f"torch fp32, openvino CPU {inference_precision}", max_abs_err=worst_abs,
                  rel_err=worst_rel, bound=bound)
