"""The ort-cuda UNet variant: ONNX Runtime's fused operators, checked against PyTorch and a hand count.

The variant is the graph shipped for the CUDA EP; most of its fused operators have no CPU kernel. On
the CPU those operators are rewritten into standard ONNX ops from their documented definitions
(``Lowering``), so the shipped graph itself, fp32 before conversion and fp16, is checked against
PyTorch. Its operator counts are checked against counts derived from the preset's block structure,
its I/O against sdrt's contract. Running it on ORT's CUDA kernels needs a GPU (skipped here).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from sdrt.export import ort_fusion
from sdrt.export.exporter import component_specs
from sdrt.export.loading import LoadedModel, random_model
from sdrt.export.onnx_export import export_component
from sdrt.export.presets import get_preset
from sdrt.runtime.errors import ArtifactError, BackendUnavailable, CompatibilityError, InputError
from sdrt.runtime.manifest import MANIFEST_NAME, Component, ExportManifest, TensorSpec
from sdrt.runtime.ort_backend import (
    OrtBackend,
    StaticBindings,
    cuda_available,
    cuda_provider_options,
)

PRESETS = ("sd15-tiny", "sdxl-tiny")
NEEDS_CUDA = pytest.mark.skipif(not cuda_available(), reason="needs onnxruntime-gpu and a CUDA GPU")


# -- the independent reference: fused operators counted from diffusers' block structure -------------
def hand_count(cfg: dict[str, Any]) -> dict[str, int]:
    """What ORT's UNet fusions should produce for a UNet2DConditionModel config.

    Per transformer block (BasicTransformerBlock): self + cross attention, three LayerNorms (the first
    block of each Transformer2DModel has a plain one, every other one follows a residual Add and
    becomes SkipLayerNorm), one GEGLU (BiasSplitGelu). Per Transformer2DModel: one GroupNorm and one
    proj_out bias + residual (BiasAdd), and two 1x1 convolutions unless it projects linearly. Per
    ResNet: two GroupNorms, two 3x3 convolutions and a 1x1 shortcut when its channels change.
    """
    ch = list(cfg["block_out_channels"])
    n, layers = len(ch), int(cfg["layers_per_block"])
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = [depth] * n if isinstance(depth, int) else list(depth)
    t2d = blocks = resnets = shortcuts = 0
    out = ch[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            shortcuts += (out if j == 0 else ch[i]) != ch[i]
        resnets += layers
        out = ch[i]
        if kind.startswith("CrossAttn"):
            t2d, blocks = t2d + layers, blocks + layers * depth[i]
    resnets, t2d, blocks = resnets + 2, t2d + 1, blocks + depth[-1]  # mid block
    for i, kind in enumerate(cfg["up_block_types"]):
        # every up ResNet reads a skip connection concatenated to its input: its channels always change
        resnets, shortcuts = resnets + layers + 1, shortcuts + layers + 1
        if kind.startswith("CrossAttn"):
            t2d, blocks = t2d + layers + 1, blocks + (layers + 1) * depth[n - 1 - i]
    resamplers = 2 * (n - 1)
    projections = 0 if cfg["use_linear_projection"] else 2 * t2d
    return {
        "attention": 2 * blocks,
        "blocks": blocks,
        "LayerNormalization": t2d,
        "SkipLayerNormalization": 3 * blocks - t2d,
        "BiasSplitGelu": blocks,
        "BiasAdd": t2d,
        "group_norms": 2 * resnets + t2d + 1,  # + conv_norm_out
        "NhwcConv": 2 + 2 * resnets + shortcuts + resamplers + projections,  # + conv_in, conv_out
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_hand_count_matches_the_pytorch_modules(preset: str) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    cfg = get_preset(preset).config("unet")
    want = hand_count(cfg)
    unet = UNet2DConditionModel(**cfg)
    kinds = [type(m) for m in unet.modules()]
    assert kinds.count(BasicTransformerBlock) == want["blocks"]
    assert kinds.count(torch.nn.GroupNorm) == want["group_norms"]
    assert kinds.count(torch.nn.Conv2d) == want["NhwcConv"]
    assert sum(k.__name__ == "Transformer2DModel" for k in kinds) == want["LayerNormalization"]


# -- a CPU reading of the CUDA-only operators ------------------------------------------------------------
class Lowering:
    """Rewrites ORT's CUDA-only contrib operators into standard ONNX ops, computed in float32.

    Each rewrite follows the operator's definition in ORT's ContribOperators.md (NhwcConv: Conv on
    NHWC tensors; GroupNorm / SkipGroupNorm: channels-last group normalization with optional SiLU, the
    latter of X + skip (+ bias); BiasSplitGelu: left * Gelu(right) of X + bias split in halves;
    BiasAdd: X + bias + skip; MultiHeadAttention on packed QKV [B,S,N,3,H] or packed KV [B,L,N,2,H]:
    softmax(Q K^T / sqrt(H)) V). The lowered graph runs on the CPU EP, so the shipped graph's wiring
    (weights, attributes, layouts) is checked against PyTorch without a GPU.
    """

    def __init__(self, model: onnx.ModelProto, elem: int) -> None:
        self.model, self.elem = model, elem
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix = ""

    def lower(self) -> onnx.ModelProto:
        g = self.model.graph
        for node in g.node:
            fn = getattr(self, f"_{node.op_type}", None) if node.domain == "com.microsoft" else None
            if fn is None:
                self.nodes.append(node)
                continue
            self.prefix = f"{node.name}/lowered"
            fn(node)
        del g.node[:]
        g.node.extend(self.nodes)
        g.initializer.extend(self.inits)
        del g.value_info[:]  # stale for the rewritten values
        return self.model

    # helpers: every value name is prefixed by the node being lowered
    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        name = f"{self.prefix}/{op}_{len(self.nodes)}"
        outs = [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        name = f"{self.prefix}/const_{len(self.inits)}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def f32(self, name: str) -> str:
        return self.op("Cast", [name], to=TensorProto.FLOAT)

    def out(self, value: str, name: str) -> None:
        cast = helper.make_node("Cast", [value], [name], to=self.elem, name=f"{self.prefix}/{name}")
        self.nodes.append(cast)

    def attr(self, node: onnx.NodeProto, name: str, default: Any) -> Any:
        a = next((a for a in node.attribute if a.name == name), None)
        return default if a is None else helper.get_attribute_value(a)

    # the operators
    def _NhwcConv(self, node: onnx.NodeProto) -> None:
        x = self.op("Transpose", [self.f32(node.input[0])], perm=[0, 3, 1, 2])
        w = self.op("Transpose", [self.f32(node.input[1])], perm=[0, 3, 1, 2])  # [M, kh, kw, C/g] -> OIHW
        ins = [x, w] + ([self.f32(node.input[2])] if len(node.input) > 2 and node.input[2] else [])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        y = self.op("Conv", ins, **attrs)
        self.out(self.op("Transpose", [y], perm=[0, 2, 3, 1]), node.output[0])

    def _group_norm(self, node: onnx.NodeProto, x: str) -> str:
        """x float32 NHWC (channels_last) -> normalized, scaled, activated, NHWC."""
        channels_last = self.attr(node, "channels_last", 1)
        if channels_last:
            x = self.op("Transpose", [x], perm=[0, 3, 1, 2])
        groups, eps = self.attr(node, "groups", 32), self.attr(node, "epsilon", 1e-5)
        grouped = self.op("Reshape", [x, self.const([0, groups, -1])])
        mean = self.op("ReduceMean", [grouped], axes=[2], keepdims=1)
        centered = self.op("Sub", [grouped, mean])
        var = self.op("ReduceMean", [self.op("Mul", [centered, centered])], axes=[2], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(eps, np.float32)])])
        normed = self.op("Reshape", [self.op("Div", [centered, std]), self.op("Shape", [x])])
        chw = self.const([-1, 1, 1])
        gamma = self.op("Reshape", [self.f32(node.input[1]), chw])
        beta = self.op("Reshape", [self.f32(node.input[2]), chw])
        y = self.op("Add", [self.op("Mul", [normed, gamma]), beta])
        if self.attr(node, "activation", 0) == 1:
            y = self.op("Mul", [y, self.op("Sigmoid", [y])])
        return self.op("Transpose", [y], perm=[0, 2, 3, 1]) if channels_last else y

    def _GroupNorm(self, node: onnx.NodeProto) -> None:
        self.out(self._group_norm(node, self.f32(node.input[0])), node.output[0])

    def _SkipGroupNorm(self, node: onnx.NodeProto) -> None:
        skip = self.f32(node.input[3])
        s = self.op("Add", [self.f32(node.input[0]), skip])  # skip [N,H,W,C] or [N,1,1,C] broadcasts
        if len(node.input) > 4 and node.input[4]:
            s = self.op("Add", [s, self.f32(node.input[4])])
        self.out(self._group_norm(node, s), node.output[0])
        if len(node.output) > 1 and node.output[1]:
            self.out(s, node.output[1])

    def _BiasSplitGelu(self, node: onnx.NodeProto) -> None:
        z = self.op("Add", [self.f32(node.input[0]), self.f32(node.input[1])])
        left, right = self.op("Split", [z], n_out=2, axis=-1)
        erf = self.op("Erf", [self.op("Div", [right, self.const(np.sqrt(2.0), np.float32)])])
        gelu = self.op("Mul", [self.op("Mul", [right, self.const(0.5, np.float32)]),
                               self.op("Add", [erf, self.const(1.0, np.float32)])])
        self.out(self.op("Mul", [left, gelu]), node.output[0])

    def _BiasAdd(self, node: onnx.NodeProto) -> None:
        y = self.op("Add", [self.op("Add", [self.f32(node.input[0]), self.f32(node.input[1])]),
                            self.f32(node.input[2])])
        self.out(y, node.output[0])

    def _heads(self, packed: str, n: int) -> list[str]:
        """[B, S, N, n, H] -> n tensors [B, N, S, H]."""
        parts = self.op("Split", [packed], n_out=n, axis=3)
        squeezed = [self.op("Squeeze", [p, self.const([3])]) for p in parts]
        return [self.op("Transpose", [p], perm=[0, 2, 1, 3]) for p in squeezed]

    def _MultiHeadAttention(self, node: onnx.NodeProto) -> None:
        heads = self.attr(node, "num_heads", 0)
        ins = [i for i in node.input if i]
        if len(ins) == 1:  # packed QKV
            q, k, v = self._heads(self.f32(ins[0]), 3)
        elif len(ins) == 2:  # query, packed KV
            q = self.op("Reshape", [self.f32(ins[0]), self.const([0, 0, heads, -1])])
            q = self.op("Transpose", [q], perm=[0, 2, 1, 3])
            k, v = self._heads(self.f32(ins[1]), 2)
        else:  # separate Q, K, V: the CPU kernel runs them; keep the node
            self.nodes.append(node)
            return
        head_size = self.op("Cast", [self.op("Shape", [q], start=-1)], to=TensorProto.FLOAT)
        scores = self.op("Div", [self.op("MatMul", [q, self.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                                 self.op("Sqrt", [head_size])])
        scale = self.attr(node, "scale", 0.0)
        assert scale == 0.0, "the fusion sets no scale: 1/sqrt(head size) is the definition's default"
        ctx = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])  # [B, N, S, H]
        ctx = self.op("Reshape", [self.op("Transpose", [ctx], perm=[0, 2, 1, 3]), self.const([0, 0, -1])])
        self.out(ctx, node.output[0])


def lower_for_cpu(path: Path, fp16: bool) -> bytes:
    model = onnx.load(str(path))
    lowered = Lowering(model, TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT).lower()
    left = {n.op_type for n in lowered.graph.node if n.op_type in ort_fusion.CUDA_ONLY_OPS}
    assert not left, left
    return lowered.SerializeToString()


# -- artifacts, made once per preset ------------------------------------------------------------------
def build_variant(preset: str, folder: str) -> tuple[Path, Path, Path, dict[str, int]]:
    """Export the fp32 UNet of ``preset`` as sdrt does and fuse it; a worker process runs this.

    Returns the fp32 export, the ort-cuda variant (fp16), the fused graph before its fp16 conversion,
    and the fused operator counts.
    """
    torch.set_num_threads(1)
    model = random_model(preset)
    spec = next(s for s in component_specs(model) if s.name == "unet")
    root = Path(folder)
    export_component(spec, "fp32", root / "unet", opset=17, parity_shape=(1, 8, 8))
    unet32 = root / "unet" / "model.onnx"
    variant, fused32 = root / "unet" / ort_fusion.VARIANT_FILE, root / "fused32" / "model.onnx"
    counts = ort_fusion.fuse_for_ort_cuda(unet32, variant, fp16=True, family=model.preset.family,
                                          external=True, fp32_copy=fused32)
    return unet32, variant, fused32, counts


@dataclasses.dataclass
class Work:
    preset: str
    unet32: Path  # the fp32 UNet as sdrt exports it (dynamic axes, TorchScript exporter)
    variant: Path  # the ort-cuda variant, fp16
    fused32: Path  # the same fused graph before its fp16 conversion
    counts: dict[str, int]

    @functools.cached_property
    def model(self) -> LoadedModel:
        return random_model(self.preset)  # the worker's weights: the same seed, rebuilt here

    @property
    def family(self) -> str:
        return self.model.preset.family

    def inputs(self) -> dict[str, np.ndarray]:
        """Batch 3, a non-square latent, two prompt chunks, fractional timesteps."""
        g = torch.Generator().manual_seed(7)
        cross = int(self.model.unet.config.cross_attention_dim)
        feeds = {
            "sample": torch.randn(3, 4, 16, 8, generator=g).numpy(),
            "timestep": np.array([1.0, 500.5, 999.25], np.float32),
            "encoder_hidden_states": torch.randn(3, 154, cross, generator=g).numpy(),
        }
        if self.family == "sdxl":
            feeds["text_embeds"] = torch.randn(3, 32, generator=g).numpy()
            feeds["time_ids"] = np.array([[64.0, 64, 0, 0, 64, 64]] * 3, np.float32)
        return feeds

    def torch_unet(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in feeds.items()}
        kw = {}
        if self.family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
        with torch.inference_mode():
            out = self.model.unet(t["sample"], t["timestep"], t["encoder_hidden_states"], **kw)
        return out.sample.numpy()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    """work(preset) -> Work. Both presets are built at once, one worker process each: ORT's optimizer is
    single-threaded Python, so on two cores this halves the wait."""
    root = tmp_path_factory.mktemp("ort-cuda-variant")
    cache: dict[str, Work] = {}
    with ProcessPoolExecutor(len(PRESETS), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {p: pool.submit(build_variant, p, str(root / p)) for p in PRESETS}

        def get(preset: str) -> Work:
            if preset not in cache:
                cache[preset] = Work(preset, *futures[preset].result())
            return cache[preset]

        yield get


def _cpu(model: Path | bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    src = str(model) if isinstance(model, Path) else model
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / np.abs(b).max())


def _dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}


def _half(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """sdrt's fp16 contract: every float input fp16, except timestep."""
    return {k: v if k == "timestep" else v.astype(np.float16) for k, v in feeds.items()}


# -- the ort-cuda variant: counts, contract, and numbers on the CPU ------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_ort_cuda_variant_matches_pytorch(work, preset: str) -> None:
    w = work(preset)
    want = hand_count(w.model.preset.config("unet"))
    path, path32, counts = w.variant, w.fused32, w.counts
    print(f"\n{preset} fused: {counts}")
    assert counts["MultiHeadAttention"] == want["attention"] and counts["Attention"] == 0  # packed QKV / KV
    for op in ("LayerNormalization", "SkipLayerNormalization", "BiasSplitGelu", "BiasAdd", "NhwcConv"):
        assert counts[op] == want[op], op
    assert counts["GroupNorm"] + counts["SkipGroupNorm"] == want["group_norms"]
    assert counts["GroupNorm"] > 0 and counts["SkipGroupNorm"] > 0

    # the numbers: fused fp32 and the fp16 variant, CUDA-only operators lowered, on the CPU EP
    feeds = w.inputs()
    ref = w.torch_unet(feeds)
    got32 = _cpu(lower_for_cpu(path32, fp16=False), feeds)
    half = _half(feeds)
    ref16 = w.torch_unet(half)  # torch fp32 on the same fp16-rounded inputs
    got16 = _cpu(lower_for_cpu(path, fp16=True), half)
    print(f"{preset} rel err vs torch: fused fp32 {_rel(got32, ref):.2e}, "
          f"fused fp16 {_rel(got16, ref16):.2e}")
    assert _rel(got32, ref) <= 1e-4
    assert got16.dtype == np.float16 and np.isfinite(got16).all()
    assert _rel(got16, ref16) <= 1e-2

    # ort-cpu refuses the variant with a message that says why
    with pytest.raises(CompatibilityError, match="onnxruntime-gpu"):
        OrtBackend("cpu").load(str(path), "unet")

    # the contract: names, dtypes (timestep float32, the rest fp16) and dynamic axes of the plain export
    assert (path.parent / f"{path.name}_data").is_file()
    model = onnx.load(str(path), load_external_data=False)
    plain_model = onnx.load(str(w.unet32), load_external_data=False)
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    assert _dims(model) == _dims(plain_model)
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    assert io == {name: f32 if name == "timestep" else f16 for name in io}

    # the sinusoidal embeddings are computed in float32, straight from the float32 timestep
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name: t.data_type for t in model.graph.initializer}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) == (4 if w.family == "sdxl" else 2)
    for node in trig:
        seen, stack = set(), [node.input[0]]
        while stack:
            v = stack.pop()
            if v in seen or v not in producers:
                assert consts.get(v) != f16, v
                continue
            seen.add(v)
            p = producers[v]
            to = next((a.i for a in p.attribute if a.name == "to"), None)
            assert not (p.op_type == "Cast" and to == f16), f"{node.name} reads an fp16 cast ({p.name})"
            if p.op_type == "Constant":  # the frequencies
                assert p.attribute[0].t.data_type != f16, f"{node.name} reads an fp16 constant ({p.name})"
            stack.extend(i for i in p.input if i)


@NEEDS_CUDA
@pytest.mark.parametrize("preset", PRESETS)
def test_ort_cuda_variant_runs_on_the_gpu(work, preset: str) -> None:
    w = work(preset)
    first = _half(w.inputs())
    second = {k: v if k in ("timestep", "time_ids") else (v * 0.5).astype(v.dtype) for k, v in first.items()}
    second["timestep"] = np.array([250.0, 20.5, 700.0], np.float32)
    refs = [w.torch_unet(first), w.torch_unet(second)]
    for cuda_graph in (False, True):
        be = OrtBackend("cuda", cuda_graph=cuda_graph)
        unet = be.load(str(w.variant), "unet")
        dev = [{k: be.to_device(v) for k, v in f.items()} for f in (first, second)]
        # with cuda_graph: uncaptured, captured, then replays, alternating inputs of one shape
        for i in (0, 1, 0, 1, 0):
            got = be.to_host(unet(dev[i])["out_sample"])
            assert got.dtype == np.float16 and _rel(got, refs[i]) <= 1e-2, (cuda_graph, i)


def test_cpu_only_fusion_options() -> None:
    full, cpu = ort_fusion.fusion_options(), ort_fusion.fusion_options(cuda_kernels=False)
    fp32 = ort_fusion.fusion_options(fp16_target=False)
    for name in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                 "enable_bias_add"):
        assert getattr(full, name) and not getattr(cpu, name)
    assert full.enable_packed_qkv and full.enable_packed_kv
    for opts in (cpu, fp32):
        assert not (opts.enable_packed_qkv or opts.enable_packed_kv)
    assert cpu.enable_attention and cpu.enable_skip_layer_norm and cpu.enable_shape_inference


# -- the pieces, on small graphs ----------------------------------------------------------------------
def _embedding_graph() -> onnx.ModelProto:
    """timestep -> sinusoidal embedding -> Gemm, plus sample * 2: the shape of a UNet's time path."""
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)[None].astype(np.float32)
    nodes = [
        # the frequencies as the TorchScript exporter leaves them: a Constant node
        helper.make_node("Constant", [], ["freqs"], value=onnx.numpy_helper.from_array(freqs), name="freqs"),
        helper.make_node("Unsqueeze", ["timestep", "axes"], ["t1"], name="unsq"),
        helper.make_node("Mul", ["t1", "freqs"], ["arg"], name="mul"),
        helper.make_node("Sin", ["arg"], ["s"], name="sin"),
        helper.make_node("Cos", ["arg"], ["c"], name="cos"),
        helper.make_node("Concat", ["s", "c"], ["emb"], axis=1, name="cat"),
        helper.make_node("Gemm", ["emb", "w"], ["temb"], name="linear"),
        helper.make_node("Mul", ["sample", "two"], ["s2"], name="scale"),
        helper.make_node("Add", ["s2", "temb"], ["out_sample"], name="add"),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        onnx.numpy_helper.from_array(np.eye(8, dtype=np.float32), "w"),
        onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    graph = helper.make_graph(
        nodes, "time", [helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
                        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fp16_keeps_the_timestep_embedding_float32() -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(_embedding_graph())
    blocked = sorted(ort_fusion.embedding_nodes(model.model.graph))
    assert blocked == ["cat", "cos", "freqs", "mul", "sin", "unsq"]
    ort_fusion.to_fp16(model)
    ins = {v.name: v.type.tensor_type.elem_type for v in model.model.graph.input}
    assert ins == {"timestep": TensorProto.FLOAT, "sample": TensorProto.FLOAT16}
    t = np.array([999.25, 0.5], np.float32)
    sess = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"timestep": t, "sample": np.zeros((2, 8), np.float16)})[0]
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4).astype(np.float32)  # as the graph holds them
    arg = t.astype(np.float64)[:, None] * freqs.astype(np.float64)
    want = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    # fp16 rounding of the embedding only (<5e-4); a timestep rounded to fp16 (999.0) moves sin(t) by 0.25,
    # frequencies rounded to fp16 by 0.02
    assert got.dtype == np.float16 and np.abs(got - want).max() < 2e-3


def test_num_heads_fix_reads_shape_1_constants_and_is_undone() -> None:
    ort_fusion._ort_optimizer()
    cls = sys.modules["fusion_attention_unet"].FusionAttentionUnet
    original = cls.get_num_heads

    class Graph:  # the two OnnxModel methods get_num_heads uses
        def get_parent(self, node: Any, i: int) -> Any:
            return helper.make_node("Concat", ["b", "s", "heads", "d"], ["shape"])

        def get_constant_value(self, name: str) -> Any:
            return np.array([8], np.int64)

    fake = type("Fusion", (), {"model": Graph()})()
    with pytest.raises(TypeError):  # what ORT 1.31.1 does under numpy 2 (if this passes, ORT is fixed)
        original(fake, helper.make_node("Reshape", ["q", "shape"], ["r"]), True)
    with ort_fusion._num_heads_fix():
        assert cls.get_num_heads(fake, helper.make_node("Reshape", ["q", "shape"], ["r"]), True) == 8
    assert cls.get_num_heads is original


def test_fuse_refuses_an_fp16_or_foreign_graph(tmp_path: Path) -> None:
    model = _embedding_graph()
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(InputError, match="not those of an sdrt sd1 UNet"):
        ort_fusion.fuse_for_ort_cuda(tmp_path / "m.onnx", tmp_path / "o.onnx", family="sd1")
    with pytest.raises(InputError, match="unknown family"):
        ort_fusion.fuse_for_ort_cuda(tmp_path / "m.onnx", tmp_path / "o.onnx", family="sd9")
    model.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(tmp_path / "h.onnx"))
    with pytest.raises(InputError, match="fp16 graph"):
        ort_fusion.fuse_for_ort_cuda(tmp_path / "h.onnx", tmp_path / "o.onnx", family="sd1")


def _fake_export(folder: Path, model: LoadedModel, family: str = "sd1", preset: str = "sd15-tiny") -> None:
    """An sdrt.json with an fp32 UNet (the graph itself is never opened: the fusion is stubbed)."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.onnx").write_bytes(b"")
    unet = Component("unet/model.onnx", "fp32", (TensorSpec("sample", "float32", ("batch", 4, "h", "w")),),
                     (TensorSpec("out_sample", "float32", ("batch", 4, "h", "w")),))
    vae = Component("vae_decoder/model.onnx", "fp32", (), ())
    ExportManifest(family, preset, "epsilon", {"unet": unet, "vae_decoder": vae}, 4, 8, 64, 77,
                   source=dict(model.source), tools={"sdrt": "x"}).write(folder)


def test_add_variant_records_it_in_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_fuse(src: Path, out: Path, **kw: Any) -> dict[str, int]:
        calls.append((src, out.name, kw))
        out.parent.mkdir(parents=True)
        out.write_bytes(b"graph")
        (out.parent / f"{out.name}_data").write_bytes(b"weights")
        return {"MultiHeadAttention": 2}

    monkeypatch.setattr(ort_fusion, "fuse_for_ort_cuda", fake_fuse)
    model = random_model("sd15-tiny")
    folder = tmp_path / "export"
    _fake_export(folder, model)
    report = ort_fusion.add_ort_cuda_variant(folder, model, verify=False)
    # an fp32 export's UNet is fused as it is, to an fp32 variant
    assert calls == [(folder / "unet" / "model.onnx", ort_fusion.VARIANT_FILE,
                      {"fp16": False, "family": "sd1", "external": True})]
    assert report == {"path": "unet/model_ort_cuda.onnx", "fused": {"MultiHeadAttention": 2}, "parity": None}
    assert (folder / "unet" / "model_ort_cuda.onnx").read_bytes() == b"graph"
    assert (folder / "unet" / "model_ort_cuda.onnx_data").read_bytes() == b"weights"
    m = ExportManifest.read(folder)
    assert m.components["unet"].variants == {"ort-cuda": "unet/model_ort_cuda.onnx"}
    assert m.components["vae_decoder"].variants == {} and m.tools == {"sdrt": "x"}
    assert json.loads((folder / MANIFEST_NAME).read_text())["components"]["unet"]["path"] == "unet/model.onnx"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # scratch removed

    # a failed fusion leaves the export as it was
    def failing_fuse(src: Path, out: Path, **kw: Any) -> dict[str, int]:
        out.parent.mkdir(parents=True)
        out.write_bytes(b"half-written")
        raise ArtifactError("no attention fused")

    monkeypatch.setattr(ort_fusion, "fuse_for_ort_cuda", failing_fuse)
    before = (folder / MANIFEST_NAME).read_text()
    with pytest.raises(ArtifactError):
        ort_fusion.add_ort_cuda_variant(folder, model, verify=False)
    assert (folder / MANIFEST_NAME).read_text() == before
    assert (folder / "unet" / "model_ort_cuda.onnx").read_bytes() == b"graph"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]

    # another model than the one exported
    other = tmp_path / "xl"
    _fake_export(other, random_model("sd15-tiny", seed=1))
    with pytest.raises(CompatibilityError, match="pass the model the export was made from"):
        ort_fusion.add_ort_cuda_variant(other, model, verify=False)


# -- the ort-cuda backend's parts that run on the CPU ------------------------------------------------------
def test_cuda_provider_options() -> None:
    plain = cuda_provider_options(1)
    assert plain == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                     "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "1",
                     "enable_cuda_graph": "0", "prefer_nhwc": "0"}
    graph = cuda_provider_options(0, cuda_graph=True, prefer_nhwc=True, gpu_mem_limit=8 << 30)
    assert graph["enable_cuda_graph"] == "1" and graph["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert graph["prefer_nhwc"] == "1" and graph["gpu_mem_limit"] == str(8 << 30)
    with pytest.raises(InputError, match="conv_algo_search"):
        cuda_provider_options(0, conv_algo_search="FAST")


def test_backend_picks_its_variant() -> None:
    comp = Component("unet/model.onnx", "fp16", (), (), variants={"ort-cuda": "unet/model_ort_cuda.onnx"})
    cpu = OrtBackend("cpu")
    assert cpu.graph_for(comp) == "unet/model.onnx"
    assert cpu.graph_for(dataclasses.replace(comp, variants={})) == "unet/model.onnx"
    assert not cpu.captures("unet")
    with pytest.raises(InputError, match="cuda_graph"):
        OrtBackend("cpu", cuda_graph=True)
    if not cuda_available():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu") as e:
            OrtBackend("cuda", cuda_graph=True)
        # the API names the keyword, the CLI the flag
        assert 'backend="ort-cpu"' in str(e.value) and "--backend" not in str(e.value)
        assert "--backend ort-cpu" in e.value.for_cli() and "backend=" not in e.value.for_cli()
    else:  # pragma: no cover - on a GPU machine
        be = OrtBackend("cuda", cuda_graph=True)
        assert be.graph_for(comp) == "unet/model_ort_cuda.onnx"
        assert be.captures("unet") and not be.captures("vae_decoder")
        assert dict(be.providers_for("unet")[0][1])["enable_cuda_graph"] == "1"
        assert dict(be.providers_for("vae_decoder")[0][1])["enable_cuda_graph"] == "0"


def test_load_errors_name_the_cause() -> None:
    from sdrt.runtime.ort_backend import load_error

    graph_msg = "This session cannot use the CUDA Graph feature as requested by the user"
    assert isinstance(load_error("u.onnx", RuntimeError(graph_msg), captured=True), BackendUnavailable)
    corrupt = RuntimeError("protobuf parsing failed")
    assert isinstance(load_error("u.onnx", corrupt, captured=False), ArtifactError)
    # (the CPU EP refusing the variant's CUDA-only operators is checked on the real graph above)


def test_static_bindings_reuse_fixed_buffers() -> None:
    """The CUDA-graph binding logic, run on the CPU EP (which ignores the graph id)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    g = helper.make_tensor_value_info("g", TensorProto.FLOAT, [])  # a 0-d input, like the guidance scale
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    nodes = [helper.make_node("Mul", ["x", "x"], ["xx"]), helper.make_node("Mul", ["xx", "g"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "sq", [x, g], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    static = StaticBindings(sess, ["y"], "cpu", 0, max_graphs=1)
    one = np.array(1.0, np.float32)

    def call(a: np.ndarray, as_ortvalue: bool = True, gain: np.ndarray = one) -> Any:
        return static.run({"x": ort.OrtValue.ortvalue_from_numpy(a) if as_ortvalue else a, "g": gain})["y"]

    first = call(np.array([1.0, 2.0], np.float32))  # uncaptured; makes the slot
    assert first.numpy().tolist() == [1.0, 4.0] and len(static.slots) == 1
    second = call(np.array([3.0, 4.0], np.float32))
    assert second.numpy().tolist() == [9.0, 16.0]
    third = call(np.array([5.0, 6.0], np.float32), as_ortvalue=False, gain=np.array(2.0, np.float32))
    assert third.numpy().tolist() == [50.0, 72.0]
    assert third.data_ptr() == second.data_ptr()  # the slot's fixed output buffer
    slot = next(iter(static.slots.values()))
    assert slot.graph_id == 0 and slot.inputs["x"].numpy().tolist() == [5.0, 6.0]
    assert slot.inputs["g"].shape() == []
    # feeding the slot's own output back in (the loop does this with latents) copies before running
    assert static.run({"x": third, "g": one})["y"].numpy().tolist() == [2500.0, 5184.0]
    # a second shape exceeds max_graphs: it runs uncaptured on fresh buffers
    other = call(np.array([2.0, 2.0, 2.0], np.float32))
    assert other.numpy().tolist() == [4.0] * 3 and other.data_ptr() != third.data_ptr()
    assert len(static.slots) == 1
