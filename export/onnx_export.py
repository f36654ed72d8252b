"""Export one component to ONNX and gate it on parity with its PyTorch module.

Every graph is exported with the TorchScript exporter (``dynamo=False``: on these models it handles
non-square dynamic spatial axes correctly and exports in seconds, where the dynamo exporter did not),
cleaned, saved (weights in ``model.onnx_data`` when large), then run with ONNX Runtime CPU on fresh
random inputs against the float32 PyTorch module. The artifact is refused when they disagree.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from sdrt.runtime.atomic import give_default_mode
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
    precision = "fp32" if spec.force_fp32 else precision
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / ".raw"
    scratch.mkdir()
    gen = torch.Generator().manual_seed(1234)
    # Traced at a latent size the UNet's upsampling factor does not divide: diffusers then sizes each
    # upsampling to its skip connection, and the trace records that general branch, so the graph
    # serves every multiple of 8 pixels (a divisible trace would bake in a factor-of-2 upsampling).
    example = _cast_inputs(spec.example(gen, 1, *TRACE_LATENT), spec, precision)
    # fp16 graphs are traced from a half copy: the parity reference stays the original fp32 module
    module = copy.deepcopy(spec.module).half() if precision == "fp16" else spec.module
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
    model = onnx.load(str(scratch / "model.onnx"))
    _cleanup(model)
    if spec.refittable:  # before saving: saving with external data rewrites the tensors in place
        wdtype = torch.float16 if precision == "fp16" else torch.float32
        refit = build_refit_map(model, spec.weights, wdtype)
        (folder / "refit_map.json").write_text(json.dumps(refit, indent=1, sort_keys=True))
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = spec.name in ("unet", "unet_control") or size > EXTERNAL_DATA_BYTES
    path = folder / "model.onnx"
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=1024)
        give_default_mode(folder / "model.onnx_data")  # onnx writes the weights file 0600
    else:
        onnx.save_model(model, str(path))
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    onnx.checker.check_model(str(path))
    del model, module
    progress(f"exported {spec.name} in {time.perf_counter() - t0:.1f} s; checking parity with PyTorch")
    parity = check_parity(spec, precision, path, parity_shape)
    progress(f"{spec.name}: {parity_line(parity, precision)}")
    return Component(
        path=f"{folder.name}/model.onnx",
        precision=precision,
        inputs=tuple(TensorSpec(n, _np_dtype(k, precision), s) for n, k, s in spec.inputs),
        outputs=tuple(TensorSpec(n, _np_dtype(k, precision), s) for n, k, s in spec.outputs),
        parity=parity,
        size_bytes=sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")),
    )


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


def check_parity(spec: ComponentSpec, precision: str, path: Path, shape: tuple[int, int, int]) -> Parity:
    """Run the ONNX graph (ORT CPU) and the float32 torch module on the same fresh inputs."""
    import onnxruntime as ort

    feed, ref = _parity_case(spec, precision, shape)
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
