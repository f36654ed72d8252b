"""The per-step sampler update as a tiny ONNX graph, so latents stay on the device between UNet calls.

One graph serves every sampler and every step: the step's coefficients arrive as the ``coeffs`` input
(a float32 row of ``SamplerPlan.table``, columns ``samplers.COLUMNS``), so nothing is rebuilt per step.
The loop is UNet -> step graph -> UNet: ``unet_in_next`` is already scaled and, when guided,
duplicated to the UNet's 2B rows.

    inputs   latents [B,C,H,W]; unet_out [2B or B,C,H,W] (guided: B uncond rows, then B cond rows);
             guidance [] float32 (guided only; the rescale variant: [2] = scale, guidance_rescale);
             coeffs [8] float32; x0_prev [B,C,H,W]; noise [B,C,H,W]
    outputs  latents_next [B,C,H,W]; x0 [B,C,H,W]; unet_in_next [2B or B,C,H,W]

(names: ``step_loop.STEP_INPUTS`` and ``STEP_OUTPUTS``, the contract every loop feeds and reads)

Float16 graphs compute in float32 and round once on output. The numpy reference is
``samplers.step_reference`` (after ``samplers.guide``).

The first step's UNet input, ``s_0 x`` (duplicated when guided; with the inpainting "concat" variant's
``unet_extra`` appended), comes from a smaller graph of the same family, ``build_input_graph``, so a call
uploads one scale instead of a latent-sized tensor and never reads device latents back to compute it:

    inputs   latents [B,C,H,W]; scale [1] float32 (the plan row's ``s``); unet_extra (the "concat" variant)
    outputs  unet_in [2B or B,C (+E),H,W]

and an fp16 UNet's final latents reach an fp32 VAE (SDXL) through ``cast_graph_bytes``, img2img's encoded
image is noised to the first step by ``noise_graph_bytes`` and a 9-channel inpainting UNet's extra channels
are assembled by ``extra_graph_bytes``, all on the device too.

Inpainting variants (``inpaint=``, see ``runtime/inpaint.py``) add the per-step mask work on the device:

    "concat"  a 9-channel UNet: extra input unet_extra [2B or B,E,H,W] (the latent-size mask and the
              masked image's latents), appended to unet_in_next along channels
    "blend"   a 4-channel UNet: extra inputs mask [B,1,H,W], image_latents and init_noise [B,C,H,W];
              coeffs gains BLEND_COLUMNS, and x_next = (1 - mask) (ka image_latents + kn init_noise)
              + mask x_next, the unmasked region put back at the next step's noise level
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import InputError
from .samplers import COLUMNS
from .step_loop import STEP_INPUTS, STEP_OUTPUTS

OPSET = 17
IR_VERSION = 8  # the IR of opset 17 (ONNX 1.12): readable by every runtime and TensorRT we target
_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
_LATENT = ["B", "C", "H", "W"]
# names of the step graphs that ``sdrt build`` prebuilds into an engine folder (the TensorRT backend finds
# them by the digest of ``step_graph_bytes``; a folder without them is refused with its rebuild command)
STEP_ENGINES = {False: "sampler_step", True: "sampler_step_cfg"}
INPAINT_MODES = ("concat", "blend")
BLEND_COLUMNS = ("blend_image", "blend_noise")  # the "blend" graph's coeffs: COLUMNS + these
# the guided graph with guidance rescale, a variant of its own so the plain guided graph stays as it was
RESCALE_STEP_ENGINE = "sampler_step_cfg_rescale"
INPUT_ENGINES = {False: "sampler_input", True: "sampler_input_cfg"}  # the first UNet input's graphs


def step_engine_name(batch_guided: bool, inpaint: str | None = None, rescale: bool = False) -> str:
    """The engine name ``sdrt build`` gives a step graph variant (and the TensorRT backend loads)."""
    if batch_guided and rescale:
        return RESCALE_STEP_ENGINE
    return STEP_ENGINES[batch_guided] + ("" if inpaint is None else f"_{inpaint}")


def input_engine_name(batch_guided: bool, concat: bool = False) -> str:
    """The engine name ``sdrt build`` gives a first-input graph variant (and the TensorRT backend loads)."""
    return INPUT_ENGINES[batch_guided] + ("_concat" if concat else "")


def input_graph_bytes(batch_guided: bool, dtype: Any = np.float16, concat: bool = False) -> bytes:
    """The serialized first-input graph (deterministic, like ``step_graph_bytes``)."""
    return build_input_graph(batch_guided, dtype, concat).SerializeToString()


def build_input_graph(batch_guided: bool, dtype: Any = np.float16, concat: bool = False) -> onnx.ModelProto:
    """``unet_in = s x`` for the loop's first UNet call, as ``unet_in_next`` is made for the others: the
    same float32 arithmetic, rows duplicated when guided, ``unet_extra`` appended along channels for a
    9-channel inpainting UNet (``concat``)."""
    elem = _elem(dtype)
    nodes: list[onnx.NodeProto] = []
    unet_in = _mul(nodes, "scale", _input(nodes, "latents", elem))
    if batch_guided:
        unet_in = _node(nodes, "Concat", [unet_in, unet_in], "unet_in_f", axis=0)
    if concat:
        unet_in = _node(nodes, "Concat", [unet_in, _input(nodes, "unet_extra", elem)], "unet_in_extra", axis=1)
    _output(nodes, unet_in, "unet_in", elem)
    rows = ["2B", *_LATENT[1:]] if batch_guided else _LATENT
    inputs = [helper.make_tensor_value_info("latents", elem, _LATENT),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
              *([helper.make_tensor_value_info("unet_extra", elem, [rows[0], "E", *rows[2:]])] if concat else [])]
    outputs = [helper.make_tensor_value_info("unet_in", elem, [rows[0], "C_unet" if concat else "C", *rows[2:]])]
    graph = helper.make_graph(nodes, "sdrt_sampler_input", inputs, outputs)
    graph.doc_string = "unet_in = s x (rows doubled when guided; unet_extra appended for a 9-channel UNet)"
    model = finish_graph(graph)
    return model


def noise_engine_name(src: Any, dst: Any) -> str:
    """The engine name of img2img's noising graph, from the VAE encoder's ``src`` to the UNet's ``dst``."""
    return f"image_noise_{np.dtype(src).name}_to_{np.dtype(dst).name}"


def noise_graph_bytes(src: Any, dst: Any) -> bytes:
    """img2img's start, ``ka image_latents + kn noise`` (the scheduler's ``add_noise`` at the first step,
    ``coeffs`` = [ka, kn] float32), the one encoded image broadcast over the batch's rows, in float32,
    rounded once to the UNet's dtype: the encoder's latents never go through the host.

    inputs   image_latents [1,C,H,W] (src); noise [B,C,H,W] float32; coeffs [2] float32
    outputs  latents [B,C,H,W] (dst)"""
    nodes: list[onnx.NodeProto] = []
    a, b = _elem(src), _elem(dst)
    img = _input(nodes, "image_latents", a)
    nodes.append(helper.make_node("Split", ["coeffs"], ["coef_ka", "coef_kn"], axis=0))
    x = _add(nodes, "noised", _mul(nodes, "coef_ka", img), _mul(nodes, "coef_kn", "noise"))
    _output(nodes, x, "latents", b)
    graph = helper.make_graph(
        nodes, "sdrt_image_noise",
        [helper.make_tensor_value_info("image_latents", a, [1, *_LATENT[1:]]),
         helper.make_tensor_value_info("noise", TensorProto.FLOAT, _LATENT),
         helper.make_tensor_value_info("coeffs", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("latents", b, _LATENT)])
    model = finish_graph(graph)
    return model.SerializeToString()


def extra_engine_name(batch_guided: bool, src: Any, dst: Any, mask_channels: int = 1) -> str:
    """The engine name of an inpainting denoiser's extra-channels graph (masked latents from ``src``; a mask of
    ``mask_channels``, named where not 1)."""
    mask = f"_mask{mask_channels}" if mask_channels != 1 else ""
    return f"unet_extra{'_cfg' if batch_guided else ''}{mask}_{np.dtype(src).name}_to_{np.dtype(dst).name}"


def extra_graph_bytes(batch_guided: bool, src: Any, dst: Any, mask_channels: int = 1) -> bytes:
    """An inpainting denoiser's fixed extra channels (a 9-channel UNet's, FLUX.1 Fill's), ``[mask, masked image
    latents]``, assembled on the device: the masked-image encoder's one row cast to the UNet's dtype and
    broadcast over the batch, joined to the latent-size mask along channels, rows doubled when guided (the
    "concat" step and first-input graphs' ``unet_extra``), so the encoder's latents never go through the host.

    inputs   mask [B,M,H,W] (dst; M = ``mask_channels``: 1, FLUX.1 Fill's 64); masked_latents [1,C,H,W] (src)
    outputs  unet_extra [2B or B,M+C,H,W] (dst)"""
    nodes: list[onnx.NodeProto] = []
    a, b = _elem(src), _elem(dst)
    masked = "masked_latents" if a == b else _node(nodes, "Cast", ["masked_latents"], "masked_cast", to=b)
    _node(nodes, "Shape", ["mask"], "batch_rows", start=0, end=1)
    nodes.append(helper.make_node("Constant", [], ["ones3"], value=helper.make_tensor("ones3_v", TensorProto.INT64,
                                                                                      [3], [1, 1, 1])))
    _node(nodes, "Concat", ["batch_rows", "ones3"], "rows_shape", axis=0)
    rows = _node(nodes, "Expand", [masked, "rows_shape"], "masked_rows")
    extra = _node(nodes, "Concat", ["mask", rows], "mask_and_masked", axis=1)
    if batch_guided:
        extra = _node(nodes, "Concat", [extra, extra], "extra_cfg", axis=0)
    _node(nodes, "Identity", [extra], "unet_extra")
    graph = helper.make_graph(
        nodes, "sdrt_unet_extra",
        [helper.make_tensor_value_info("mask", b, ["B", mask_channels, *_LATENT[2:]]),
         helper.make_tensor_value_info("masked_latents", a, [1, *_LATENT[1:]])],
        [helper.make_tensor_value_info("unet_extra", b, ["2B" if batch_guided else "B", "E", *_LATENT[2:]])])
    model = finish_graph(graph)
    return model.SerializeToString()


def cast_engine_name(src: Any, dst: Any) -> str:
    """The engine name of the latents' cast from ``src`` to ``dst`` (float16/float32)."""
    return f"latents_{np.dtype(src).name}_to_{np.dtype(dst).name}"


def cast_graph_bytes(src: Any, dst: Any) -> bytes:
    """Latents [B,C,H,W] cast from ``src`` to ``dst``: an fp16 UNet's latents into an fp32 VAE (SDXL)
    on the device, not through the host."""
    nodes: list[onnx.NodeProto] = []
    a, b = _elem(src), _elem(dst)
    _node(nodes, "Cast", ["latents"], "latents_cast", to=b)
    graph = helper.make_graph(nodes, "sdrt_latents_cast", [helper.make_tensor_value_info("latents", a, _LATENT)],
                              [helper.make_tensor_value_info("latents_cast", b, _LATENT)])
    model = finish_graph(graph)
    return model.SerializeToString()


def finish_graph(graph: onnx.GraphProto) -> onnx.ModelProto:
    """The model around a runtime-built graph: opset 17 at IR 8 (readable by every runtime and TensorRT we
    target), producer sdrt, checked in full."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sdrt")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _elem(dtype: Any) -> int:
    try:
        return _TYPES[np.dtype(dtype)]
    except (KeyError, TypeError) as e:
        raise InputError(f"step graph dtype must be float16 or float32, got {dtype!r}") from e


def step_graph_bytes(batch_guided: bool, dtype: Any = np.float16, inpaint: str | None = None,
                     rescale: bool = False) -> bytes:
    """The serialized step graph: the same bytes in every process (engine folders key on their digest)."""
    return build_step_graph(batch_guided, dtype, inpaint, rescale).SerializeToString()


def build_step_graph(batch_guided: bool, dtype: Any = np.float16, inpaint: str | None = None,
                     rescale: bool = False) -> onnx.ModelProto:
    """The step graph for latents of ``dtype`` (float16 or float32); guided means CFG on 2B UNet rows;
    ``inpaint`` one of INPAINT_MODES or None; ``rescale`` (guided, not inpainting) adds diffusers'
    ``guidance_rescale``, read from ``guidance[1]``."""
    elem = _elem(dtype)
    if inpaint is not None and inpaint not in INPAINT_MODES:
        raise InputError(f"inpaint must be one of {', '.join(INPAINT_MODES)} or None, got {inpaint!r}")
    if rescale and (not batch_guided or inpaint is not None):
        raise InputError("guidance rescale needs the guided step graph (guidance_scale > 1) and no inpainting")
    nodes: list[onnx.NodeProto] = []
    x, out, x0_prev, noise = (_input(nodes, name, elem) for name in ("latents", "unet_out", "x0_prev", "noise"))
    m = (_rescaled(nodes, out) if rescale else _guided(nodes, out)) if batch_guided else out
    _, p, q, a, b, c, d, s_next, *blend = _columns(nodes, BLEND_COLUMNS if inpaint == "blend" else ())
    x0 = _add(nodes, "x0_f", _mul(nodes, p, x), _mul(nodes, q, m))  # x0 = p x + q m
    x_next = _add(nodes, "update", _mul(nodes, a, x), _mul(nodes, b, x0))
    x_next = _add(nodes, "x_next_f", x_next,
                  _add(nodes, "history_noise", _mul(nodes, c, x0_prev), _mul(nodes, d, noise)))
    if inpaint == "blend":
        x_next = _blend(nodes, x_next, blend, elem)
    unet_in = _mul(nodes, s_next, x_next)
    if batch_guided:
        unet_in = _node(nodes, "Concat", [unet_in, unet_in], "unet_in_f", axis=0)
    if inpaint == "concat":
        unet_in = _node(nodes, "Concat", [unet_in, _input(nodes, "unet_extra", elem)], "unet_in_extra", axis=1)
    for value, name in zip((x_next, x0, unet_in), STEP_OUTPUTS):
        _output(nodes, value, name, elem)
    return _model(nodes, batch_guided, elem, inpaint, rescale)


def _blend(nodes: list[onnx.NodeProto], x_next: str, blend: list[str], elem: int) -> str:
    """diffusers' 4-channel inpainting: (1 - mask) * image latents noised to the next step + mask * x_next."""
    ka, kn = blend
    mask, img, init_noise = (_input(nodes, n, elem) for n in ("mask", "image_latents", "init_noise"))
    proper = _add(nodes, "image_noised", _mul(nodes, ka, img), _mul(nodes, kn, init_noise))
    nodes.append(helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one_v", TensorProto.FLOAT,
                                                                                    [1], [1.0])))
    keep = _node(nodes, "Sub", ["one", mask], "keep")
    return _add(nodes, "x_next_blended", _mul(nodes, keep, proper), _mul(nodes, mask, x_next))


def _model(nodes: list[onnx.NodeProto], batch_guided: bool, elem: int, inpaint: str | None = None,
           rescale: bool = False) -> onnx.ModelProto:
    rows = ["2B", *_LATENT[1:]] if batch_guided else _LATENT
    g_shape = [2] if rescale else []
    out_rows = [rows[0], "C_unet", *rows[2:]] if inpaint == "concat" else rows
    extra = {
        None: [],
        "concat": [helper.make_tensor_value_info("unet_extra", elem, [rows[0], "E", *rows[2:]])],
        "blend": [helper.make_tensor_value_info("mask", elem, ["B", 1, *_LATENT[2:]]),
                  helper.make_tensor_value_info("image_latents", elem, _LATENT),
                  helper.make_tensor_value_info("init_noise", elem, _LATENT)],
    }[inpaint]
    columns = len(COLUMNS) + (len(BLEND_COLUMNS) if inpaint == "blend" else 0)
    # the contract's names and order (runtime/step_loop.py): latents, unet_out, guidance, coeffs, x0_prev, noise
    types: dict[str, tuple[int, list[Any]]] = {
        "latents": (elem, _LATENT), "unet_out": (elem, rows), "guidance": (TensorProto.FLOAT, g_shape),
        "coeffs": (TensorProto.FLOAT, [columns]), "x0_prev": (elem, _LATENT), "noise": (elem, _LATENT)}
    names = [n for n in STEP_INPUTS if batch_guided or n != "guidance"]
    inputs = [*(helper.make_tensor_value_info(n, *types[n]) for n in names), *extra]
    outputs = [helper.make_tensor_value_info(n, elem, shape)
               for n, shape in zip(STEP_OUTPUTS, (_LATENT, _LATENT, out_rows))]
    graph = helper.make_graph(nodes, "sdrt_sampler_step", inputs, outputs)
    graph.doc_string = "x0 = p x + q m; x_next = a x + b x0 + c x0_prev + d noise; unet_in = s_next x_next"
    model = finish_graph(graph)
    return model


def _guided(nodes: list[onnx.NodeProto], out: str, scale: str = "guidance") -> str:
    """Classifier-free guidance (Ho & Salimans 2022): m = u + g (c - u) over [uncond; cond] rows."""
    uncond, cond = (f"{n}_rows" for n in ("uncond", "cond"))
    nodes.append(helper.make_node("Split", [out], [uncond, cond], axis=0))
    delta = _node(nodes, "Sub", [cond, uncond], "cond_minus_uncond")
    return _add(nodes, "guided", uncond, _mul(nodes, scale, delta))


def _rescaled(nodes: list[onnx.NodeProto], out: str) -> str:
    """Guidance, then Lin et al. 2024 eq. 15-16 per image: m <- m (phi std(c) / std(m) + 1 - phi), as
    diffusers' ``rescale_noise_cfg``. The population variances' ratio equals the unbiased stds' squared."""
    nodes.append(helper.make_node("Split", ["guidance"], ["guidance_scale", "guidance_rescale"], axis=0))
    m = _guided(nodes, out, "guidance_scale")

    def var(v: str) -> str:
        mean = _node(nodes, "ReduceMean", [v], f"{v}_mean", axes=[1, 2, 3], keepdims=1)
        dev = _node(nodes, "Sub", [v, mean], f"{v}_dev")
        return _node(nodes, "ReduceMean", [_mul(nodes, dev, dev)], f"{v}_var", axes=[1, 2, 3], keepdims=1)

    ratio = _node(nodes, "Sqrt", [_node(nodes, "Div", [var("cond_rows"), var(m)], "var_ratio")], "std_ratio")
    nodes.append(helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT,
                                                                                       [1], [1.0])))
    keep = _node(nodes, "Sub", ["one", "guidance_rescale"], "one_minus_rescale")
    factor = _add(nodes, "rescale_factor", _mul(nodes, "guidance_rescale", ratio), keep)
    return _mul(nodes, factor, m)


def _columns(nodes: list[onnx.NodeProto], extra: tuple[str, ...] = ()) -> list[str]:
    """The coeffs row split into one [1]-shaped tensor per COLUMN (broadcasts against latents)."""
    names = [f"coef_{c}" for c in (*COLUMNS, *extra)]
    nodes.append(helper.make_node("Split", ["coeffs"], names, axis=0))
    return names


def _input(nodes: list[onnx.NodeProto], name: str, elem: int) -> str:
    """A latent-shaped input, in float32 for the arithmetic."""
    return name if elem == TensorProto.FLOAT else _node(nodes, "Cast", [name], f"{name}_f32", to=TensorProto.FLOAT)


def _output(nodes: list[onnx.NodeProto], value: str, name: str, elem: int) -> None:
    if elem == TensorProto.FLOAT:
        _node(nodes, "Identity", [value], name)
    else:
        _node(nodes, "Cast", [value], name, to=elem)


def _node(nodes: list[onnx.NodeProto], op: str, inputs: list[str], out: str, **attrs: Any) -> str:
    nodes.append(helper.make_node(op, inputs, [out], **attrs))
    return out


def _mul(nodes: list[onnx.NodeProto], k: str, v: str) -> str:
    return _node(nodes, "Mul", [k, v], f"{k}_times_{v}")


def _add(nodes: list[onnx.NodeProto], out: str, u: str, v: str) -> str:
    return _node(nodes, "Add", [u, v], out)
