"""The prompt embeddings' join as a tiny ONNX graph, so the text encoders' outputs stay on the device.

Whenever the text encoders' outputs are not the UNet's input as they are (two encoders, prompts over 77
tokens, SDXL's pooled embedding, a dtype change, SDXL's zeroed negatives) the pipeline runs this graph
instead of joining on the host. One graph per variant (the encoders' dtypes, the pooled one's, the UNet's),
never per shape or per call: which rows are zeroed arrives as the ``keep`` input.

    inputs   hidden_0 .. hidden_{n-1} [N, 77, C_j]  each encoder's hidden_states (N = rows x chunks)
             text_embeds [N, P]                     the last pooled encoder's text_embeds (variants with one)
             keep [R] float32                       per row: 1 keeps it, 0 zeroes it (and its shape gives R)
    outputs  hidden [R, 77 k, sum C_j]              the chunks of each row along the sequence, the encoders
                                                    along the channels
             pooled [R, P]                          each row's first chunk, as the UIs take it

The result equals a numpy join bit for bit: numpy's concatenation dtype (``np.result_type`` of the
encoders'), zeroed rows of +0 (a select, not a product, so -0 and NaN cannot leak), then one cast.
``sdrt build`` prebuilds the variant ``join_variant`` derives from an export's manifest, which is the one
the pipeline loads; the TensorRT backend finds it by the sha256 of ``join_graph_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import InputError
from .manifest import ExportManifest
from .step_graph import finish_graph

JOIN_ENGINE = "text_join"
TOKENS = 77  # per chunk (the CLIP tokenizers' context)
_TYPES = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}
_CODES = {"float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class JoinVariant:
    """What selects the graph: each encoder's hidden_states dtype, the pooled output's (None: no pooled
    output) and the UNet's dtype, the output's."""

    hidden_dtypes: tuple[str, ...]
    pooled_dtype: str | None
    out_dtype: str

    @property
    def name(self) -> str:
        return join_engine_name(self.hidden_dtypes, self.pooled_dtype, self.out_dtype)

    def graph_bytes(self) -> bytes:
        return join_graph_bytes(self.hidden_dtypes, self.pooled_dtype, self.out_dtype)

    def needed(self, max_chunks: int) -> bool:
        """Whether a pipeline runs the graph for prompts of up to ``max_chunks`` chunks (with one encoder,
        one chunk, no pooled output and the UNet's dtype the encoder's output is used as it is)."""
        return (len(self.hidden_dtypes) > 1 or self.pooled_dtype is not None
                or self.hidden_dtypes[0] != self.out_dtype or max_chunks > 1)


def join_variant(manifest: ExportManifest) -> JoinVariant:
    """The variant an export's pipeline loads: from its text encoders' and UNet's recorded dtypes (the
    runtime and ``sdrt build`` both ask here, so both hash the same bytes)."""
    def spec_dtype(component: str, name: str, outputs: bool = True) -> str | None:
        comp = manifest.components.get(component)
        if comp is None:
            raise InputError(f"the export has no {component}, which the prompt embeddings' join needs; re-export "
                             "the model with `sdrt export`")
        return next((s.dtype for s in (comp.outputs if outputs else comp.inputs) if s.name == name), None)

    hidden = []
    for enc in manifest.encoder_names:
        dt = spec_dtype(enc, "hidden_states")
        if dt is None:
            raise InputError(f"{enc} has no hidden_states output in the export's manifest; re-export the model "
                             "with `sdrt export`")
        hidden.append(dt)
    pooled = None
    for enc in manifest.encoder_names:  # the last encoder with a pooled output, as the pipeline takes it
        pooled = spec_dtype(enc, "text_embeds") or pooled
    out = spec_dtype("unet", "sample", outputs=False)
    if out is None:
        raise InputError("the export's UNet has no sample input in its manifest; re-export the model with "
                         "`sdrt export`")
    return JoinVariant(tuple(hidden), pooled, out)


def join_engine_name(hidden_dtypes: tuple[str, ...], pooled_dtype: str | None, out_dtype: str) -> str:
    """The engine name of a variant (``sdrt build``'s file stem), e.g. ``text_join_fp16_fp16_pooled_fp16_to_fp16``."""
    _check(hidden_dtypes, pooled_dtype, out_dtype)
    parts = [_CODES[d] for d in hidden_dtypes]
    if pooled_dtype is not None:
        parts += ["pooled", _CODES[pooled_dtype]]
    return "_".join([JOIN_ENGINE, *parts, "to", _CODES[out_dtype]])


def join_graph_bytes(hidden_dtypes: tuple[str, ...], pooled_dtype: str | None, out_dtype: str) -> bytes:
    """The serialized join graph: the same bytes in every process (engine folders key on their digest)."""
    return build_join_graph(hidden_dtypes, pooled_dtype, out_dtype).SerializeToString()


def build_join_graph(hidden_dtypes: tuple[str, ...], pooled_dtype: str | None, out_dtype: str) -> onnx.ModelProto:
    _check(hidden_dtypes, pooled_dtype, out_dtype)
    nodes: list[onnx.NodeProto] = []
    cat = np.result_type(*hidden_dtypes).name  # numpy's concatenation dtype, as a numpy join
    _const(nodes, "keep_zero", TensorProto.FLOAT, 0.0)
    _node(nodes, "Equal", ["keep", "keep_zero"], "dropped")  # [R] bool
    _node(nodes, "Shape", ["keep"], "rows")  # [R]
    _int64s(nodes, "minus_one", [-1])

    parts = [_cast(nodes, f"hidden_{j}", d, cat) for j, d in enumerate(hidden_dtypes)]
    joined = _node(nodes, "Concat", parts, "hidden_joined", axis=2) if len(parts) > 1 else parts[0]
    _node(nodes, "Shape", [joined], "channels", start=2)
    _node(nodes, "Concat", ["rows", "minus_one", "channels"], "hidden_target", axis=0)
    rows = _node(nodes, "Reshape", [joined, "hidden_target"], "hidden_rows")  # [R, 77 k, C]: chunks in order
    hidden = _zeroed(nodes, rows, "hidden", cat, [-1, 1, 1])
    _output(nodes, hidden, "hidden", cat, out_dtype)

    outputs = [helper.make_tensor_value_info("hidden", _TYPES[out_dtype], ["R", "S", "C"])]
    inputs = [helper.make_tensor_value_info(f"hidden_{j}", _TYPES[d], ["N", TOKENS, f"C_{j}"])
              for j, d in enumerate(hidden_dtypes)]
    if pooled_dtype is not None:
        _node(nodes, "Shape", ["text_embeds"], "pooled_width", start=1)
        _node(nodes, "Concat", ["rows", "minus_one", "pooled_width"], "pooled_target", axis=0)
        chunks = _node(nodes, "Reshape", ["text_embeds", "pooled_target"], "pooled_chunks")  # [R, k, P]
        nodes.append(helper.make_node("Constant", [], ["first_chunk"],
                                      value=helper.make_tensor("first_chunk_v", TensorProto.INT64, [], [0])))
        first = _node(nodes, "Gather", [chunks, "first_chunk"], "pooled_first", axis=1)  # [R, P]
        _output(nodes, _zeroed(nodes, first, "pooled", pooled_dtype, [-1, 1]), "pooled", pooled_dtype, out_dtype)
        inputs.append(helper.make_tensor_value_info("text_embeds", _TYPES[pooled_dtype], ["N", "P"]))
        outputs.append(helper.make_tensor_value_info("pooled", _TYPES[out_dtype], ["R", "P"]))
    inputs.append(helper.make_tensor_value_info("keep", TensorProto.FLOAT, ["R"]))
    graph = helper.make_graph(nodes, "sdrt_text_join", inputs, outputs)
    graph.doc_string = "hidden = concat(hidden_j, -1) as [R, 77 k, C], kept rows; pooled = first chunk's, kept rows"
    model = finish_graph(graph)
    return model


def _check(hidden_dtypes: tuple[str, ...], pooled_dtype: str | None, out_dtype: str) -> None:
    dtypes = [*hidden_dtypes, out_dtype, *([] if pooled_dtype is None else [pooled_dtype])]
    bad = [d for d in dtypes if d not in _TYPES]
    if not hidden_dtypes or bad:
        raise InputError(f"the text join graph takes one or more encoders' dtypes among {', '.join(_TYPES)}; got "
                         f"hidden {hidden_dtypes!r}, pooled {pooled_dtype!r}, out {out_dtype!r}")


def _zeroed(nodes: list[onnx.NodeProto], value: str, label: str, dtype: str, mask_shape: list[int]) -> str:
    """``value`` with the dropped rows set to +0 (a select: a product would give -0 and keep NaN)."""
    _const(nodes, f"{label}_zero", _TYPES[dtype], 0.0)
    _int64s(nodes, f"{label}_mask_shape", mask_shape)
    mask = _node(nodes, "Reshape", ["dropped", f"{label}_mask_shape"], f"{label}_dropped")
    return _node(nodes, "Where", [mask, f"{label}_zero", value], f"{label}_kept")


def _cast(nodes: list[onnx.NodeProto], name: str, have: str, want: str) -> str:
    return name if have == want else _node(nodes, "Cast", [name], f"{name}_{want}", to=_TYPES[want])


def _output(nodes: list[onnx.NodeProto], value: str, name: str, have: str, want: str) -> None:
    if have == want:
        _node(nodes, "Identity", [value], name)
    else:
        _node(nodes, "Cast", [value], name, to=_TYPES[want])


def _const(nodes: list[onnx.NodeProto], name: str, elem: int, value: float) -> None:
    nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(f"{name}_v", elem, [], [value])))


def _int64s(nodes: list[onnx.NodeProto], name: str, values: list[int]) -> None:
    nodes.append(helper.make_node("Constant", [], [name],
                                  value=helper.make_tensor(f"{name}_v", TensorProto.INT64, [len(values)], values)))


def _node(nodes: list[onnx.NodeProto], op: str, inputs: list[str], out: str, **attrs: Any) -> str:
    nodes.append(helper.make_node(op, inputs, [out], **attrs))
    return out
