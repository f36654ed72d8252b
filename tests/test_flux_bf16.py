"""FLUX.1 exported in bf16 (``sdrt export --bf16``): the text encoders and the transformer as bf16 graphs behind a
float32 interface, the VAE in fp32; the parity gate's bf16 emulation checked by hand and shown to refuse a broken
graph; images on openvino against diffusers' ``FluxPipeline`` with its transformer and text encoders in bf16; the
streamed (full-size) path; TensorRT for RTX's real builder; the refusals (ort-cpu, --weakly-typed, the flags).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdrt.runtime.errors import CompatibilityError, InputError, ParityError
from sdrt.runtime.manifest import ExportManifest

from .helpers.references import flux_packed, flux_preset_pipeline
from .helpers.trt_modules import RTX

PRESET = "flux-schnell-tiny"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
BF16_PARTS = ("text_encoder", "text_encoder_2", "unet")
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _graph_types(path: Path) -> tuple[set[int], set[int]]:
    """(the float initializers' types, the float input and output types) of a graph, its weights left on disk."""
    g = onnx.load(str(path), load_external_data=False).graph
    weights = {t.data_type for t in g.initializer if t.data_type in FLOATS and np.prod(t.dims) > 1}
    io = {v.type.tensor_type.elem_type for v in [*g.input, *g.output]} & set(FLOATS)
    return weights, io


def _weight_bytes(path: Path) -> int:
    g = onnx.load(str(path), load_external_data=False).graph
    size = {TensorProto.FLOAT: 4, TensorProto.BFLOAT16: 2, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8}
    return sum(int(np.prod(t.dims)) * size[t.data_type] for t in g.initializer if t.data_type in size)


def test_the_export_writes_bf16_weights_behind_a_float32_interface(flux_export) -> None:
    folder, fp32 = flux_export(PRESET, bf16=True), flux_export(PRESET)
    m, m32 = ExportManifest.read(folder), ExportManifest.read(fp32)
    assert {n: c.precision for n, c in m.components.items()} == {
        "text_encoder": "bf16", "text_encoder_2": "bf16", "unet": "bf16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    for name in BF16_PARTS:
        comp = m.components[name]
        weights, io = _graph_types(folder / comp.path)
        assert weights == {TensorProto.BFLOAT16}, name
        assert io <= {TensorProto.FLOAT}, name
        assert {s.dtype for s in comp.inputs + comp.outputs} <= {"float32", "int32"}
        assert comp.parity is not None and "emulating bf16" in comp.parity.reference
        assert comp.parity.rel_err <= comp.parity.bound
    # the transformer's weights: half the bytes of the fp32 graph's
    ratio = _weight_bytes(folder / m.components["unet"].path) / _weight_bytes(fp32 / m32.components["unet"].path)
    assert 0.45 < ratio < 0.55, ratio
    assert _graph_types(folder / m.components["vae_decoder"].path)[0] == {TensorProto.FLOAT}


def test_the_emulation_rounds_each_result_to_bf16_by_hand(tmp_path: Path) -> None:
    """``bf16_emulation`` on a hand-made bf16 graph (Cast, MatMul, Add, Cast back) on ONNX Runtime's CPU provider
    equals the same steps done by hand: float32 arithmetic, each result rounded to bf16 (ml_dtypes, nearest even)."""
    import ml_dtypes
    import onnxruntime as ort

    from sdrt.export.onnx_export import bf16_emulation

    bf = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(bf)
    b = rng.standard_normal(4).astype(bf)
    x = rng.standard_normal((3, 5)).astype(np.float32) * 3
    c = np.array(1.7, dtype=bf)  # a Constant node's bf16 value
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("MatMul", ["xb", "w"], ["p"]),
         helper.make_node("Add", ["p", "b"], ["s"]),
         helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
         helper.make_node("Mul", ["s", "c"], ["m"]),
         helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(bf16_emulation(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    xb = x.astype(bf).astype(np.float32)
    p = (xb @ w.astype(np.float32)).astype(bf).astype(np.float32)
    sums = (p + b.astype(np.float32)).astype(bf).astype(np.float32)
    want = (sums * c.astype(np.float32)).astype(bf).astype(np.float32)
    assert np.array_equal(got, want)
    exact = (x @ w.astype(np.float32) + b.astype(np.float32)) * np.float32(c.astype(np.float32))
    assert not np.array_equal(got, exact)  # the roundings happened


def test_the_float32_interface_by_hand() -> None:
    """``fp32_interface`` on a hand-made bf16 graph: an input cast where read, an output cast at the end, an
    output read inside the graph too, an input passed straight through and an output listed twice; the result
    checks as ONNX, and ONNX Runtime's reference evaluator gives the bf16 arithmetic on float32 values."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    from sdrt.export.onnx_export import fp32_interface

    bf, b16 = ml_dtypes.bfloat16, TensorProto.BFLOAT16
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["s"]), helper.make_node("Mul", ["s", "a"], ["m"])],
        "g", [helper.make_tensor_value_info("a", b16, [2])],
        [helper.make_tensor_value_info(n, b16, [2]) for n in ("s", "m", "a", "m")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32_interface(model.graph)
    onnx.checker.check_model(model, full_check=True)
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} == {TensorProto.FLOAT}
    a = np.array([1.5, 3.0078125], np.float32)  # the second is no bf16 value: the graph rounds it on the way in
    s, m, passed, m2 = ReferenceEvaluator(model).run(None, {"a": a})
    ab = a.astype(bf).astype(np.float32)
    assert np.array_equal(s, (ab + ab).astype(bf).astype(np.float32))
    assert np.array_equal(m, (s * ab).astype(bf).astype(np.float32)) and np.array_equal(m2, m)
    assert np.array_equal(passed, a)


def test_a_bf16_checkpoint_streams_into_a_bf16_graph(tmp_path: Path) -> None:
    """A checkpoint whose tensors are bf16 (real FLUX.1 folders): streamed into a bf16 T5, each weight written
    as the checkpoint holds it."""
    import ml_dtypes

    from sdrt.export.flux_loading import load_flux
    from sdrt.export.flux_specs import streamed_t5
    from sdrt.export.streamed import export_streamed

    model = load_flux(random_preset=PRESET, stream=True)
    st = model.streamed["text_encoder_2"]

    def bf16_source(name: str) -> torch.Tensor:
        return st.weights(name).to(torch.bfloat16)

    comp = export_streamed(streamed_t5(st.config, model.preset.t5_tokens), bf16_source, "bf16", tmp_path / "t5")
    assert comp.precision == "bf16"
    path = tmp_path / "t5" / "model.onnx"
    init = next(t for t in onnx.load(str(path), load_external_data=False).graph.initializer
                if t.name.endswith("block.0.layer.0.SelfAttention.q.weight"))
    got = numpy_helper.to_array(init, str(path.parent))
    want = bf16_source(init.name.removeprefix("encoder.")).view(torch.int16).numpy()
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.int16), want)


def test_the_gate_refuses_a_broken_bf16_graph(tmp_path: Path) -> None:
    """The transformer exported in bf16 passes its gate; the same graph with one weight negated does not: the
    bound allowing for bf16's own error (twice PyTorch's bf16 module's) still catches a wrong graph."""
    from sdrt.export.flux_loading import load_flux
    from sdrt.export.flux_specs import flux_specs
    from sdrt.export.onnx_export import check_parity, export_component

    model = load_flux(random_preset=PRESET)
    spec = next(s for s in flux_specs(model.modules, model.preset.t5_tokens) if s.name == "unet")
    comp = export_component(spec, "bf16", tmp_path / "unet", opset=17, parity_shape=(1, 8, 10))
    assert comp.parity is not None and comp.parity.rel_err <= comp.parity.bound
    path = tmp_path / "unet" / "model.onnx"
    graph = onnx.load(str(path))
    big = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    assert big.data_type == TensorProto.BFLOAT16
    big.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(big), big.name))
    onnx.save_model(graph, str(path))
    with pytest.raises(ParityError, match="bf16"):
        check_parity(spec, "bf16", path, (1, 8, 10))


def _diffusers_bf16(folder: Path, latents: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' FluxPipeline on the preset's weights, as levels: (its transformer and text encoders in bf16 and
    its VAE in float32, as the export; all in float32)."""
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    kw = {"height": h, "width": w, "num_inference_steps": steps, "latents": flux_packed(latents)}
    fp32 = flux_preset_pipeline("FluxPipeline", PRESET, folder)
    with torch.no_grad():
        want32 = (fp32(PROMPT, output_type="np", **kw).images * 255).round().astype(np.int32)
    pipe = flux_preset_pipeline("FluxPipeline", PRESET, folder)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.to(torch.bfloat16)
    with torch.no_grad():  # decoded by hand: diffusers hands bf16 latents to the VAE as they are
        lat = pipe._unpack_latents(pipe(PROMPT, output_type="latent", **kw).images, h, w, pipe.vae_scale_factor)
        cfg = pipe.vae.config
        image = pipe.vae.decode(lat.float() / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    want = (pipe.image_processor.postprocess(image, output_type="np") * 255).round().astype(np.int32)
    return want, want32


def test_openvino_images_match_diffusers_in_bf16(flux_export) -> None:
    """The export's images, end to end, on openvino at f32 (every CPU has it; it runs the bf16 steps its own
    way, see docs/models/flux.md): within twice the distance between diffusers' own bf16 and fp32 images of
    diffusers' bf16 images, at its largest (at least 2 levels) and on average (at least half a level). An image
    check of the whole export, not of bf16 rounding (the gate's emulation is checked by hand above)."""
    from sdrt.runtime.pipeline import Pipeline

    folder = flux_export(PRESET, bf16=True)
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 12), dtype=np.float32)
    want, want32 = _diffusers_bf16(folder, latents, 4)
    own = np.abs(want - want32)
    with Pipeline.load(folder, backend="openvino", precision="f32") as pipe:
        got = np.asarray(pipe(PROMPT, height=64, width=96, steps=4, latents=latents).images[0]).astype(np.int32)
    diff = np.abs(got[None] - want)
    assert want.std() > 5
    assert int(diff.max()) <= max(2 * int(own.max()), 2), (int(diff.max()), int(own.max()))
    assert float(diff.mean()) <= max(2 * float(own.mean()), 0.5), (float(diff.mean()), float(own.mean()))


def test_ort_cpu_refuses_a_bf16_export_before_loading(flux_export) -> None:
    from sdrt.runtime.pipeline import Pipeline

    folder = flux_export(PRESET, bf16=True)
    with pytest.raises(CompatibilityError, match=r"cannot run text_encoder, text_encoder_2, unet: a bf16 graph.*"
                                                 r"openvino.*ort-cuda or tensorrt.*--fp32"):
        Pipeline.load(folder, backend="ort-cpu")


def test_the_streamed_export_writes_the_source_weights_in_bf16(flux_export) -> None:
    """The full-size models' path: the transformer and T5 streamed one tensor at a time in bf16, each weight the
    source's rounded to bf16 (read back from the external data), gated on reduced-depth copies."""
    import ml_dtypes

    from sdrt.export.flux_loading import load_flux

    folder = flux_export(PRESET, stream=True, bf16=True)
    m = ExportManifest.read(folder)
    assert m.source["streamed"] == ["text_encoder_2", "unet"]
    source = load_flux(random_preset=PRESET, stream=True).streamed["transformer"].weights
    path = folder / m.components["unet"].path
    graph = onnx.load(str(path), load_external_data=False)
    name = "transformer.transformer_blocks.0.attn.to_q.weight"
    init = next(t for t in graph.graph.initializer if t.name == name)
    got = numpy_helper.to_array(init, str(path.parent))
    want = source(name.removeprefix("transformer.")).numpy().astype(ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))
    for part in ("unet", "text_encoder_2"):
        comp = m.components[part]
        assert comp.precision == "bf16" and _graph_types(folder / comp.path) == ({TensorProto.BFLOAT16},
                                                                                 {TensorProto.FLOAT})
        assert comp.parity is not None and "emulating bf16" in comp.parity.reference
        assert "reduced depth" in comp.parity.reference and comp.parity.rel_err <= comp.parity.bound


def test_tensorrt_for_rtx_builds_the_bf16_engines(flux_export, tmp_path: Path) -> None:
    """``sdrt build`` on TensorRT for RTX's real builder (no GPU): the bf16 graphs build strongly typed; the graphs
    the runtime makes around them (the step, the first input) take their float32 interface."""
    if RTX is None:
        pytest.skip("needs the TensorRT for RTX bindings: pip install tensorrt-rtx-cu13-libs "
                    "tensorrt-rtx-cu13-bindings")
    from sdrt.cli import main
    from sdrt.runtime.engine_manifest import EngineManifest

    src, out = flux_export(PRESET, bf16=True), tmp_path / "engines"
    assert main(["build", str(src), "--out", str(out), "--batch", "1:1:1", "--height", "64:64:96",
                 "--width", "64:64:96", "--tensorrt-module", "tensorrt_rtx"]) == 0
    precision = {r.component: r.precision for r in EngineManifest.read(out).engines}
    assert {precision[n] for n in BF16_PARTS} == {"bf16"}
    assert precision["vae_decoder"] == precision["sampler_step"] == precision["sampler_input"] == "fp32"
    assert not any(n.startswith("latents_") for n in precision)  # no cast: the UNet hands the VAE float32


def test_refusals(flux_export, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    assert main(["export", "--random", PRESET, "--out", str(tmp_path / "a"), "--bf16", "--fp32"]) == 1
    assert "--bf16 and --fp32 each choose the graphs' precision: give one" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with pytest.raises(InputError, match="--bf16"):  # fp16: FLUX.1 overflows it; the message names both ways
        export_flux(load_flux(random_preset=PRESET), tmp_path / "b", fp16=True)
    with pytest.raises(InputError, match="text_encoder is a bf16 graph, which builds strongly typed"):
        build_engines(flux_export(PRESET, bf16=True), tmp_path / "e", custom_profile(height=64, cfg=False),
                      BuildOptions(weakly_typed=True))
    with pytest.raises(InputError, match="does not refit bf16 engines yet: leave --refittable out"):
        build_engines(flux_export(PRESET, bf16=True), tmp_path / "e", custom_profile(height=64, cfg=False),
                      BuildOptions(refittable=True))
    assert not (tmp_path / "e").exists()
