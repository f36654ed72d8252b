"""The UNet graph and the sampler step graph composed into one ONNX model, for one ORT session per step.

ONNX Runtime captures CUDA graphs per session, so ``ort-cuda`` can replay a whole denoising step as one
graph only when the UNet and the step graph are one session. :func:`compose_step_model` merges them with
``onnx.compose.merge_models``: the UNet's ``out_sample`` feeds the step graph's ``unet_out``, every other
input and output keeps its name under a prefix (``unet/``, ``step/``), so nothing clashes.

The UNet is read with ``load_external_data=False``: its weights stay where they are, and the composed
model's initializers keep their external-data references (``location``, offset, length). The composed
model (the graph and the small inline tensors only, about the size of the UNet's ``model.onnx``) stays in
memory: the session loads it from bytes with ``session.model_external_initializers_file_folder_path`` set
to the UNet's folder, so ORT reads the user's ``model.onnx_data`` where it is. Nothing is copied, and
nothing is written anywhere (not into the user's folder, not into a temporary one). A temporary folder
holding the composed ``.onnx`` and a symlink named as the original ``location`` does not work: ONNX
Runtime 1.32 resolves the link and refuses it ("External data path escapes model directory"), and
``onnx.checker`` refuses external data behind a symlink.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import compose, helper, version_converter

from .errors import CompatibilityError
from .step_loop import STEP_UNET_INPUT, UNET_OUTPUT

UNET_PREFIX = "unet/"
STEP_PREFIX = "step/"


def external_locations(model: onnx.ModelProto) -> set[str]:
    locs = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    locs.add(entry.value)
    return locs


def _align(unet: onnx.ModelProto, step: onnx.ModelProto) -> onnx.ModelProto:
    """The step graph at the UNet's default-domain opset and IR version (merge_models needs them equal)."""
    want = next((o.version for o in unet.opset_import if o.domain in ("", "ai.onnx")), None)
    have = next((o.version for o in step.opset_import if o.domain in ("", "ai.onnx")), None)
    if want is not None and have is not None and want != have:
        try:
            step = version_converter.convert_version(step, want)
        except Exception as e:
            raise CompatibilityError(f"the step graph cannot be converted to the UNet's opset {want}: {e}") from e
    step.ir_version = unet.ir_version
    return step


def compose_step_model(unet_src: str | bytes, unet_dir: str, step: onnx.ModelProto) -> bytes:
    """The serialized UNet + step model; its external data resolves relative to ``unet_dir`` (the folder
    to give ORT as ``session.model_external_initializers_file_folder_path``). Raises CompatibilityError
    when the graphs cannot be composed (no ``out_sample``, a weights file missing or outside ``unet_dir``,
    onnx's refusal)."""
    unet = (onnx.load(unet_src, load_external_data=False) if isinstance(unet_src, str)
            else onnx.load_from_string(bytes(unet_src)))  # graph bytes: external data is never read from them
    outs = [o.name for o in unet.graph.output]
    if UNET_OUTPUT not in outs:
        raise CompatibilityError(f"the UNet has outputs {outs}, not {UNET_OUTPUT!r}: the step graph cannot "
                                 "follow it")
    if STEP_UNET_INPUT not in [i.name for i in step.graph.input]:
        raise CompatibilityError(f"the step graph has no {STEP_UNET_INPUT!r} input")
    for loc in sorted(external_locations(unet)):
        rel = Path(loc)
        if rel.is_absolute() or ".." in rel.parts:
            raise CompatibilityError(f"the UNet's external data location {loc!r} is not inside its folder")
        if not Path(unet_dir, rel).is_file():
            raise CompatibilityError(f"the UNet's external data file {Path(unet_dir, rel)} is missing; re-export it")
    step = _align(unet, onnx.ModelProto.FromString(step.SerializeToString()))
    try:
        merged = _merge(unet, step)
    except Exception as e:
        raise CompatibilityError(f"onnx could not compose the UNet and the step graph: {e}") from e
    return merged.SerializeToString()


def _merge(unet: onnx.ModelProto, step: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.compose.merge_models`` without its final ``check_model`` on the proto, which resolves external
    data against the working directory."""
    a = compose.add_prefix(unet, UNET_PREFIX)
    b = compose.add_prefix(step, STEP_PREFIX)
    joined = [(UNET_PREFIX + UNET_OUTPUT, STEP_PREFIX + STEP_UNET_INPUT)]
    graph = compose.merge_graphs(a.graph, b.graph, joined, name="sdrt_unet_step")
    opsets: dict[str, int] = {}
    for o in (*a.opset_import, *b.opset_import):
        domain = "" if o.domain == "ai.onnx" else o.domain
        if opsets.setdefault(domain, o.version) != o.version:
            raise ValueError(f"the graphs import opset {domain or 'ai.onnx'} at versions {opsets[domain]} and "
                             f"{o.version}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=unet.ir_version, producer_name="sdrt")
    model.functions.MergeFrom(a.functions)
    model.functions.MergeFrom(b.functions)
    return model
