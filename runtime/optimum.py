"""Reading Hugging Face Optimum's ONNX exports (``optimum-cli export onnx --task text-to-image``) as they are.

Optimum's graphs keep diffusers' module contracts; sdrt's runtime expects its own (``export/wrappers.py``).
Each difference is adapted once, at load, by a few nodes edited into the graph's own proto, so the runtime
runs one engine per component exactly as for an sdrt export and the denoising loop pays nothing per step:

- text encoders: int32 ``input_ids`` (cast to Optimum's int64 inside the graph); the conditioning output
  renamed ``hidden_states`` (SD 1.x / 2.x: ``last_hidden_state``; SDXL: the penultimate layer,
  ``hidden_states.{L-1}``, as diffusers' SDXL pipeline takes it); SDXL's ``text_embeds`` kept.
- UNet: Optimum's scalar ``timestep`` is fed as it is (the step loop follows the engine's declared shape);
  a timestep of another dtype (fp16 graphs, old int64 ones) gets a float32 input and an in-graph cast.
- VAE decoder: the latent scaling, diffusers' postprocessing and the uint8 NHWC ``images`` + ``finite``
  outputs that sdrt's own decoder has.
- VAE encoder: uint8 NHWC ``image`` in; ``latent`` out, the scaled mean of Optimum's ``latent_parameters``.

Only the graph structure is rewritten: the weights stay in the user's files (external data is read from the
component's folder), nothing is written into the folder, and the sdrt manifest is synthesized in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, CompatibilityError
from .manifest import MANIFEST_NAME, Component, ExportManifest, TensorSpec

INDEX = "model_index.json"
# diffusers pipeline classes (as Optimum's model_index.json names them, with or without its ORT prefix)
SUPPORTED = {
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
}
REQUIRED = ("text_encoder", "unet", "vae_decoder")
_FIX_EXPORT = "re-export it with `optimum-cli export onnx --model MODEL --task text-to-image OUT`"
_ADAPT = "sdrt_adapt/"  # the prefix of every name an adapter adds


class Graph(bytes):
    """A serialized ONNX graph whose external weights live in ``base_dir`` (the user's component folder)."""

    base_dir: str

    def __new__(cls, data: bytes, base_dir: str) -> Graph:  # noqa: PYI034 (bytes subclasses are not generic)
        g = super().__new__(cls, data)
        g.base_dir = base_dir
        return g


@dataclass
class OptimumExport:
    folder: Path
    manifest: ExportManifest
    graphs: dict[str, Graph]  # component -> the adapted graph, sdrt's contract
    scheduler_config: dict[str, Any] = field(default_factory=dict)


def is_optimum_folder(folder: str | Path) -> bool:
    """An Optimum (or any diffusers-style) ONNX folder: model_index.json and ONNX components, no sdrt.json."""
    f = Path(folder)
    return ((f / INDEX).is_file() and not (f / MANIFEST_NAME).is_file()
            and any((f / c / "model.onnx").is_file() for c in ("unet", "text_encoder", "vae_decoder")))


def _json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{folder}: {path.relative_to(folder)} is missing; Optimum writes one per component, "
                            f"so the export is incomplete: {_FIX_EXPORT}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}); {_FIX_EXPORT}") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; {_FIX_EXPORT}")
    return data


def read_optimum(folder: str | Path) -> OptimumExport:
    """The adapted graphs, synthesized manifest and scheduler config of an Optimum export (nothing written)."""
    import onnx

    root = Path(folder)
    index = _json(root / INDEX, root)
    cls_name = str(index.get("_class_name", "")).removeprefix("ORT")
    if cls_name not in SUPPORTED:
        raise CompatibilityError(
            f"{root}: {INDEX} names the pipeline {index.get('_class_name')!r}, which sdrt does not run (it runs "
            "Stable Diffusion 1.x, 2.x and SDXL text-to-image and img2img). Use Optimum's ORTDiffusionPipeline "
            "for this model, or export an SD 1.x / 2.x / XL model")
    xl = "XL" in cls_name
    need = [*REQUIRED, *(["text_encoder_2"] if xl else [])]
    missing = [c for c in need if not (root / c / "model.onnx").is_file()]
    if missing:
        raise ArtifactError(
            f"{root}: {', '.join(f'{c}/model.onnx' for c in missing)} missing, which a "
            f"{'SDXL' if xl else 'Stable Diffusion'} model needs; the export is incomplete: {_FIX_EXPORT}")
    cfg = {c: _json(root / c / "config.json", root) for c in [*need, "vae_encoder"] if (root / c).is_dir()}
    sched = _json(root / "scheduler" / "scheduler_config.json", root)
    unet_cfg, vae_cfg = cfg["unet"], cfg["vae_decoder"]
    if int(unet_cfg.get("in_channels", 4)) != int(vae_cfg.get("latent_channels", 4)):
        raise CompatibilityError(
            f"{root}: unet/config.json takes {unet_cfg.get('in_channels')} input channels (an inpainting or "
            "other conditioned UNet), which sdrt's text-to-image pipeline does not run; use a text-to-image export")
    if unet_cfg.get("time_cond_proj_dim") is not None:
        raise CompatibilityError(f"{root}: unet/config.json has time_cond_proj_dim (an LCM-distilled UNet with "
                                 "a guidance embedding input), which sdrt does not run; use a standard SD export")
    family = "sdxl" if xl else "sd2" if int(cfg["text_encoder"].get("hidden_size", 768)) == 1024 else "sd1"
    latent_c = int(vae_cfg.get("latent_channels", 4))
    factor = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    scale = float(vae_cfg.get("scaling_factor", 0.18215))

    models = {c: _load(root, c, onnx) for c in [*need, "vae_encoder"] if (root / c / "model.onnx").is_file()}
    precision = "fp16" if _dtype(models["unet"], "sample", True) == "float16" else "fp32"
    vae_dtype = _dtype(models["vae_decoder"], "latent_sample", True)
    if xl and vae_dtype == "float16" and vae_cfg.get("force_upcast", True):
        raise CompatibilityError(
            f"{root}: vae_decoder/model.onnx is fp16, and the SDXL VAE overflows in fp16 (NaN images; its "
            "vae_decoder/config.json says force_upcast). Re-export the VAE in fp32 (optimum-cli export onnx "
            "--dtype fp32), use an fp16-safe VAE (config force_upcast false), or export with `sdrt export`, "
            "which keeps the SDXL VAE in fp32")

    comps: dict[str, Component] = {}
    graphs: dict[str, Graph] = {}
    for name, model in models.items():
        spec: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None
        if name.startswith("text_encoder"):
            spec = _adapt_text(root, name, model, penultimate=xl, pooled=xl and name == "text_encoder_2")
        elif name == "unet":
            spec = _adapt_unet(root, model, xl)
        elif name == "vae_decoder":
            spec = _adapt_decoder(root, model, scale, latent_c)
        else:
            spec = _adapt_encoder(root, model, scale, latent_c)
            if spec is None:  # an old export whose encoder samples the latent: txt2img still runs
                continue
        inputs, outputs = spec
        prec = "fp16" if _dtype(model, model.graph.output[0].name, False) == "float16" else "fp32"
        size = sum(p.stat().st_size for p in (root / name).iterdir() if p.is_file())
        comps[name] = Component(f"{name}/model.onnx", prec, inputs, outputs, size_bytes=size)
        graphs[name] = Graph(model.SerializeToString(), str((root / name).resolve()))
    manifest = ExportManifest(
        family=family, preset=f"optimum-{family}", prediction_type=str(sched.get("prediction_type", "epsilon")),
        components=comps, latent_channels=latent_c, vae_scale_factor=factor,
        default_size=int(unet_cfg.get("sample_size", 64)) * factor, text_max_length=77,
        source={"kind": "optimum", "path": str(root.resolve()), "pipeline": cls_name, "precision": precision})
    return OptimumExport(root, manifest, graphs, sched)


def _load(root: Path, name: str, onnx: Any) -> Any:
    path = root / name / "model.onnx"
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise ArtifactError(f"{path} is not a readable ONNX graph ({e}); {_FIX_EXPORT}") from e


_NP = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 2: "uint8", 9: "bool"}


def _find(model: Any, name: str, is_input: bool) -> Any:
    for v in (model.graph.input if is_input else model.graph.output):
        if v.name == name:
            return v
    return None


def _dtype(model: Any, name: str, is_input: bool) -> str:
    v = _find(model, name, is_input)
    return "" if v is None else _NP.get(v.type.tensor_type.elem_type, "")


def _require(root: Path, comp: str, model: Any, names: list[str], is_input: bool) -> None:
    have = [v.name for v in (model.graph.input if is_input else model.graph.output)]
    lost = [n for n in names if n not in have]
    if lost:
        raise ArtifactError(
            f"{root / comp / 'model.onnx'} has no {'input' if is_input else 'output'} {', '.join(lost)} (it has "
            f"{', '.join(have)}): not Optimum's {comp} contract; {_FIX_EXPORT}")


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _replace_input(model: Any, name: str, new_input: Any, nodes: list[Any]) -> None:
    """Feed the graph's input ``name`` from ``nodes`` (which read ``new_input``): the old input becomes an
    internal value."""
    from onnx import helper

    inner = _ADAPT + name
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x == name:
                node.input[i] = inner
    for out in model.graph.output:  # an input passed straight through (never the case here, but be exact)
        if out.name == name:
            model.graph.node.append(helper.make_node("Identity", [inner], [name]))
    kept = [v for v in model.graph.input if v.name != name]
    del model.graph.input[:]
    model.graph.input.extend([new_input, *kept])
    nodes[-1].output[0] = inner
    for n in reversed(nodes):
        model.graph.node.insert(0, n)


def _set_outputs(model: Any, outputs: list[Any], nodes: list[Any]) -> None:
    import copy

    outputs = [copy.deepcopy(v) for v in outputs]  # detached: some may be the graph's own, removed next
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def _spec(name: str, dtype: str, shape: tuple[int | str, ...]) -> TensorSpec:
    return TensorSpec(name, dtype, shape)


def _vi(spec: TensorSpec) -> Any:
    from onnx import TensorProto, helper

    types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32,
             "int64": TensorProto.INT64, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}
    return helper.make_tensor_value_info(spec.name, types[spec.dtype], list(spec.shape))


def _const(name: str, value: Any, dtype: str) -> Any:
    import numpy as np
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [_ADAPT + name], value=numpy_helper.from_array(
        np.asarray(value, dtype=dtype), _ADAPT + name + "_value"))


def _width(model: Any, name: str, cfg_default: int) -> int:
    v = _find(model, name, False)
    dims = v.type.tensor_type.shape.dim if v is not None else []
    return int(dims[-1].dim_value) if dims and dims[-1].dim_value else cfg_default


def _adapt_text(root: Path, comp: str, model: Any, penultimate: bool,
                pooled: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from onnx import TensorProto, helper

    _require(root, comp, model, ["input_ids"], True)
    if penultimate:
        layers = [int(v.name.split(".")[1]) for v in model.graph.output
                  if v.name.startswith("hidden_states.") and v.name.split(".")[1].isdigit()]
        if not layers:
            raise ArtifactError(
                f"{root / comp / 'model.onnx'} has no per-layer hidden_states.N outputs, and SDXL conditions on "
                f"the penultimate layer; {_FIX_EXPORT} (Optimum adds them for SDXL)")
        source = f"hidden_states.{max(layers) - 1}"
    else:
        source = "last_hidden_state"
    _require(root, comp, model, [source, *(["text_embeds"] if pooled else [])], False)
    dt = _dtype(model, source, False)
    ids = _spec("input_ids", "int32", ("batch", 77))
    if _dtype(model, "input_ids", True) != "int32":
        _replace_input(model, "input_ids", _vi(ids),
                       [helper.make_node("Cast", ["input_ids"], ["_"], to=TensorProto.INT64)])
    hidden = _spec("hidden_states", dt, ("batch", 77, _width(model, source, 0)))
    outs = [hidden]
    keep = [_vi(hidden)]
    if pooled:
        outs.append(_spec("text_embeds", _dtype(model, "text_embeds", False),
                          ("batch", _width(model, "text_embeds", 0))))
        keep.append(_find(model, "text_embeds", False))  # already Optimum's name and meaning
    _set_outputs(model, keep, [helper.make_node("Identity", [source], ["hidden_states"])])
    return (ids,), tuple(outs)


def _adapt_unet(root: Path, model: Any, xl: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from onnx import helper

    names = ["sample", "timestep", "encoder_hidden_states", *(["text_embeds", "time_ids"] if xl else [])]
    _require(root, "unet", model, names, True)
    _require(root, "unet", model, ["out_sample"], False)
    dt = _dtype(model, "sample", True)
    t = _find(model, "timestep", True)
    t_shape: tuple[int | str, ...] = tuple("batch" for _ in t.type.tensor_type.shape.dim)
    if len(t_shape) > 1:
        raise ArtifactError(f"{root / 'unet' / 'model.onnx'}: timestep has {len(t_shape)} dimensions; "
                            f"expected a scalar or [batch]; {_FIX_EXPORT}")
    t_spec = _spec("timestep", "float32", t_shape)
    if _dtype(model, "timestep", True) != "float32":
        _replace_input(model, "timestep", _vi(t_spec), [helper.make_node(
            "Cast", ["timestep"], ["_"], to=t.type.tensor_type.elem_type)])
    cross = _find(model, "encoder_hidden_states", True).type.tensor_type.shape.dim
    ins = [_spec("sample", dt, ("batch", _channels(model, "sample"), "height", "width")), t_spec,
           _spec("encoder_hidden_states", dt, ("batch", "sequence", int(cross[-1].dim_value or 0)))]
    if xl:
        emb = _find(model, "text_embeds", True).type.tensor_type.shape.dim
        ins += [_spec("text_embeds", _dtype(model, "text_embeds", True), ("batch", int(emb[-1].dim_value or 0))),
                _spec("time_ids", _dtype(model, "time_ids", True), ("batch", 6))]
    out = _spec("out_sample", _dtype(model, "out_sample", False),
                ("batch", _channels(model, "out_sample", False), "height", "width"))
    return tuple(ins), (out,)


def _channels(model: Any, name: str, is_input: bool = True) -> int:
    dims = _find(model, name, is_input).type.tensor_type.shape.dim
    return int(dims[1].dim_value) if len(dims) > 1 and dims[1].dim_value else 4


def _adapt_decoder(root: Path, model: Any, scale: float,
                   latent_c: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """latent_sample / scale -> Optimum's decoder -> float32, NaN -> 0, (x / 2 + 0.5).clip(0, 1) * 255,
    rounded, NHWC uint8; ``finite``: no NaN / inf in the image (sdrt's VaeDecoder contract)."""
    from onnx import TensorProto, helper

    _require(root, "vae_decoder", model, ["latent_sample"], True)
    _require(root, "vae_decoder", model, ["sample"], False)
    dt = _dtype(model, "latent_sample", True)
    lat = _spec("latent_sample", dt, ("batch", latent_c, "height", "width"))
    a = _ADAPT
    _replace_input(model, "latent_sample", _vi(lat),
                   [_const("scale", scale, dt), helper.make_node("Div", ["latent_sample", a + "scale"], ["_"])])
    op = _opset(model)
    reduce = (helper.make_node("ReduceMin", [a + "ok_flat", a + "axis1"], [a + "ok_min"], keepdims=0) if op >= 18
              else helper.make_node("ReduceMin", [a + "ok_flat"], [a + "ok_min"], axes=[1], keepdims=0))
    nodes = [
        helper.make_node("Cast", ["sample"], [a + "x"], to=TensorProto.FLOAT),
        helper.make_node("IsNaN", [a + "x"], [a + "nan"]),
        helper.make_node("IsInf", [a + "x"], [a + "inf"]),
        helper.make_node("Or", [a + "nan", a + "inf"], [a + "bad"]),
        helper.make_node("Not", [a + "bad"], [a + "ok"]),
        helper.make_node("Cast", [a + "ok"], [a + "ok_i"], to=TensorProto.INT32),
        _const("flat", [0, -1], "int64"),
        helper.make_node("Reshape", [a + "ok_i", a + "flat"], [a + "ok_flat"]),
        _const("axis1", [1], "int64"),
        reduce,
        helper.make_node("Cast", [a + "ok_min"], ["finite"], to=TensorProto.BOOL),
        _const("zero", 0.0, "float32"), _const("half", 0.5, "float32"), _const("one", 1.0, "float32"),
        _const("v255", 255.0, "float32"),
        helper.make_node("Where", [a + "nan", a + "zero", a + "x"], [a + "x0"]),
        helper.make_node("Mul", [a + "x0", a + "half"], [a + "x1"]),
        helper.make_node("Add", [a + "x1", a + "half"], [a + "x2"]),
        helper.make_node("Clip", [a + "x2", a + "zero", a + "one"], [a + "x3"]),
        helper.make_node("Mul", [a + "x3", a + "v255"], [a + "x4"]),
        helper.make_node("Round", [a + "x4"], [a + "x5"]),
        helper.make_node("Transpose", [a + "x5"], [a + "x6"], perm=[0, 2, 3, 1]),
        helper.make_node("Cast", [a + "x6"], ["images"], to=TensorProto.UINT8),
    ]
    outs = (_spec("images", "uint8", ("batch", "image_height", "image_width", 3)), _spec("finite", "bool", ("batch",)))
    _set_outputs(model, [_vi(s) for s in outs], nodes)
    return (lat,), outs


def _adapt_encoder(root: Path, model: Any, scale: float,
                   latent_c: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None:
    """uint8 NHWC image -> [-1, 1] NCHW -> Optimum's encoder -> the mean half of ``latent_parameters`` * scale.
    None for an encoder without ``latent_parameters`` (older exports sample the latent inside the graph)."""
    from onnx import TensorProto, helper

    if _find(model, "latent_parameters", False) is None or _find(model, "sample", True) is None:
        return None
    a = _ADAPT
    image = _spec("image", "uint8", ("batch", "image_height", "image_width", 3))
    elem = _find(model, "sample", True).type.tensor_type.elem_type
    _replace_input(model, "sample", _vi(image), [
        helper.make_node("Cast", ["image"], [a + "i0"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", [a + "i0"], [a + "i1"], perm=[0, 3, 1, 2]),
        _const("v255", 255.0, "float32"), _const("two", 2.0, "float32"), _const("o", 1.0, "float32"),
        helper.make_node("Div", [a + "i1", a + "v255"], [a + "i2"]),
        helper.make_node("Mul", [a + "i2", a + "two"], [a + "i2b"]),
        helper.make_node("Sub", [a + "i2b", a + "o"], [a + "i3"]),
        helper.make_node("Cast", [a + "i3"], ["_"], to=elem),
    ])
    out_dt = _dtype(model, "latent_parameters", False)
    nodes = [
        _const("starts", [0], "int64"), _const("ends", [latent_c], "int64"), _const("axes", [1], "int64"),
        helper.make_node("Slice", ["latent_parameters", a + "starts", a + "ends", a + "axes"], [a + "mean"]),
        _const("scale", scale, out_dt),
        helper.make_node("Mul", [a + "mean", a + "scale"], ["latent"]),
    ]
    out = _spec("latent", out_dt, ("batch", latent_c, "height", "width"))
    _set_outputs(model, [_vi(out)], nodes)
    return (image,), (out,)
