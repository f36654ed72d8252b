"""Skip-layer guidance (SD 3.5 Medium's ``skip_guidance_layers``; runtime/layer_skip.py, ``sdrt export --skip-layers``)
against diffusers' ``StableDiffusion3Pipeline`` with ``skip_guidance_layers`` on the tiny 3.5 Medium structure's
seeded weights and the same latents: images within 1/255 on ort-cpu and openvino; the skip pass's graph against
diffusers' transformer with ``skip_layers``, reading the transformer's weights file; calls without SLG unchanged;
the bad input refused before any work.

Everything here is this module's own: its export (made with the skip layers, never the session's shared SD3
exports), its diffusers reference (built here, never mutated: each call passes its scheduler) and its pipelines.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError
from sdrt.runtime.layer_skip import SKIP_UNET
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

from .helpers.pipelines import loaded_on

PRESET = "sd35-medium-tiny"  # block 0 has dual attention, block 1 (the last) ends the context stream
LAYERS = [0]
PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def slg_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    out = tmp_path_factory.mktemp("slg") / f"{PRESET}-skip-{'-'.join(map(str, LAYERS))}"
    export_sd3(load_sd3(random_preset=PRESET), out, fp16=False, skip_layers=LAYERS)
    return out


@pytest.fixture(scope="module")
def slg_pipe(slg_export: Path):
    with Pipeline.load(slg_export, backend="ort-cpu") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def reference(slg_export: Path):
    return _reference_pipe(slg_export)


def _reference_pipe(folder: Path):
    """diffusers' pipeline over freshly built seeded modules (the export's weights), with the export's tokenizers."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    p = get_sd3_preset(PRESET)
    m = build_modules(p, seed=0)
    pipe = StableDiffusion3Pipeline(
        transformer=m.transformer, vae=m.vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(p.scheduler),
        text_encoder=m.text_encoders[0], tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=m.text_encoders[1], tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=m.text_encoders[2], tokenizer_3=T5TokenizerFast.from_pretrained(folder / "tokenizer_3"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(ref, latents: np.ndarray, steps: int, guidance: float, slg: dict | None) -> np.ndarray:
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config)  # a fresh one per call
    kw = {} if slg is None else {"skip_guidance_layers": LAYERS, **slg}
    with torch.no_grad():
        out = ref(PROMPT, negative_prompt=NEGATIVE, height=latents.shape[2] * 8, width=latents.shape[3] * 8,
                  num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents.copy()),
                  output_type="np", **kw).images
    return (out * 255).round().astype(np.int32)


def _latents(seed: int, h: int = 64, w: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, h // 8, w // 8), dtype=np.float32)


# (steps, guidance, diffusers' SLG keywords; the steps i with steps * start < i < steps * stop run the pass)
CASES = [
    (20, 5.0, {"skip_layer_guidance_scale": 2.8}, 3),  # diffusers' window 0.01..0.2: steps 1, 2, 3
    (8, 3.0, {"skip_layer_guidance_scale": 1.5, "skip_layer_guidance_start": 0.0,
              "skip_layer_guidance_stop": 0.5}, 3),  # steps 1, 2, 3 (step 0 and 4 are the window's excluded ends)
    (6, 4.5, {"skip_layer_guidance_scale": 4.0, "skip_layer_guidance_start": 0.2,
              "skip_layer_guidance_stop": 1.0}, 4),  # steps 2 to 5, the last included
]


@pytest.mark.parametrize(("steps", "guidance", "slg", "runs"), CASES)
def test_images_match_diffusers(slg_pipe: Pipeline, reference, steps: int, guidance: float, slg: dict,
                                runs: int) -> None:
    latents = _latents(steps)
    want = _diffusers(reference, latents, steps, guidance, slg)
    plain = _diffusers(reference, latents, steps, guidance, None)
    res = slg_pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=96, steps=steps, guidance_scale=guidance,
                   sampler="flow-euler", latents=latents, **slg)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    assert want.std() > 5
    # SLG changes the image past the tolerance: the comparison is not the plain one again
    assert np.abs(want - plain).max() > 3
    assert np.abs(got - want).max() <= 1
    assert res.loop.endswith(f"skip-layer guidance on {runs} of {steps} steps")


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino"])
def test_other_backends_give_the_diffusers_images(slg_export: Path, reference, monkeypatch: pytest.MonkeyPatch,
                                                  backend: str) -> None:
    """openvino in fp32, and ort-cuda's code path (OrtValues, IO binding; it says nothing of a GPU) on the CPU EP,
    where SLG runs the engines step by step instead of the composed loop."""
    steps, guidance, slg, runs = CASES[1]
    latents = _latents(5)
    want = _diffusers(reference, latents, steps, guidance, slg)
    with loaded_on(slg_export, backend, monkeypatch, cuda_graph=True) as pipe:
        res = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=96, steps=steps, guidance_scale=guidance,
                   sampler="flow-euler", latents=latents, **slg)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    assert want.std() > 5 and np.abs(got - want).max() <= 1
    assert res.loop.endswith(f"skip-layer guidance on {runs} of {steps} steps")


def test_tensorrt_engines_run_slg_like_diffusers(slg_export: Path, reference, tmp_path: Path, fake_gpu) -> None:
    """Logic check on fakes (tests/helpers/trt_fakes.py: the "engines" run as ONNX graphs on onnxruntime; a pass says
    sdrt's build, engine folder and loop hold together, nothing about real TensorRT): ``build_engines`` builds the
    skip pass beside the transformer, loaded on the first call asking for SLG, which runs the engines step by step,
    images within 1/255 of diffusers'; a call without SLG stays captured."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    steps, guidance, slg, runs = CASES[1]
    latents = _latents(5)
    want = _diffusers(reference, latents, steps, guidance, slg)
    out = tmp_path / "engines"
    manifest = build_engines(slg_export, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:96:96"),
                             BuildOptions(workspace_gb=1, refittable=True))
    skip = {r.component: r for r in manifest.engines}[SKIP_UNET]
    assert {s.name: s.max for s in skip.shapes}["sample"] == (4, 16, 12, 12)  # the guided rows, as the transformer's
    kw = {"negative_prompt": NEGATIVE, "height": 64, "width": 96, "steps": steps, "guidance_scale": guidance,
          "sampler": "flow-euler", "latents": latents}
    with Pipeline.load(out, backend="tensorrt") as pipe:
        assert SKIP_UNET not in pipe.engines
        assert pipe(PROMPT, **kw).loop == "captured CUDA graphs"
        assert SKIP_UNET not in pipe.engines  # a call without SLG never loads the pass
        res = pipe(PROMPT, **kw, **slg)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    assert want.std() > 5 and np.abs(got - want).max() <= 1
    assert res.loop == ("engines run directly (unet+unet_skip is not one engine: the loop captures engines); "
                        f"skip-layer guidance on {runs} of {steps} steps")
    # the pass's engine holds its own copy of the transformer's weights, which refit does not update: refused
    from sdrt.export.refit import RefitRequest, refit_folder

    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(CompatibilityError, match="unet_skip.*own copy of the transformer's weights"):
        refit_folder(out, RefitRequest(base=True))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


def test_sdrt_build_builds_the_skip_pass_on_rtx(slg_export: Path, tmp_path: Path) -> None:
    """TensorRT for RTX's real builder (no GPU) builds the skip pass's graph, which reads the transformer's weights
    file, into an engine of its own."""
    from sdrt.cli import main
    from sdrt.runtime.engine_manifest import EngineManifest

    from .helpers.trt_modules import RTX

    if RTX is None:
        pytest.skip("needs the TensorRT for RTX bindings: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    out = tmp_path / "engines"
    assert main(["build", str(slg_export), "--out", str(out), "--batch", "1", "--height", "64", "--width", "96",
                 "--tensorrt-module", "tensorrt_rtx"]) == 0
    rec = {r.component: r for r in EngineManifest.read(out).engines}[SKIP_UNET]
    assert (out / rec.file).stat().st_size == rec.size_bytes > 0
    assert {s.name for s in rec.shapes} == {i.name for i in ExportManifest.read(slg_export).components[SKIP_UNET].inputs}


# -- with LoRA slots: the pass takes the transformer's slot inputs, and a call's LoRAs reach both passes --------

SLOTS = "8:attn-ff"


@pytest.fixture(scope="module")
def slotted_slg_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    out = tmp_path_factory.mktemp("slg-slots") / f"{PRESET}-skip-slots"
    export_sd3(load_sd3(random_preset=PRESET), out, fp16=False, skip_layers=LAYERS, lora_slots=SlotPlan.parse(SLOTS))
    return out


@pytest.fixture(scope="module")
def style_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusers' own LoRA file of every block linear and both CLIP encoders (tests/test_lora_transformers.py's)."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from .test_lora_transformers import peft_lora

    return peft_lora(tmp_path_factory.mktemp("lora"), "sd3", seed=1, rank=3, alpha=6.0)


LORA_SCALE = 0.8


@pytest.fixture(scope="module")
def lora_reference(slotted_slg_export: Path, style_lora: Path):
    """diffusers' pipeline with the LoRA loaded at LORA_SCALE (``load_lora_weights`` + ``set_adapters``)."""
    ref = _reference_pipe(slotted_slg_export)
    ref.load_lora_weights(str(style_lora), adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[LORA_SCALE])
    return ref


def _pixels(res) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.stack([np.asarray(im) for im in res.images]).astype(np.int32)


def test_slg_with_a_lora_matches_diffusers(slotted_slg_export: Path, slg_pipe: Pipeline, reference, lora_reference,
                                           style_lora: Path) -> None:
    """One slotted export with the pass: a LoRA with SLG (both moving the image), a LoRA without SLG (the pass never
    loaded), SLG without a LoRA (the plain SLG export's image): each diffusers' image within 1/255."""
    steps, guidance, slg, runs = CASES[1]
    latents = _latents(21)
    want = _diffusers(lora_reference, latents, steps, guidance, slg)
    lora_only = _diffusers(lora_reference, latents, steps, guidance, None)
    slg_only = _diffusers(reference, latents, steps, guidance, slg)
    assert want.std() > 5 and np.abs(want - lora_only).max() > 3 and np.abs(want - slg_only).max() > 3
    loras = [(str(style_lora), LORA_SCALE)]
    kw = {"negative_prompt": NEGATIVE, "height": 64, "width": 96, "steps": steps, "guidance_scale": guidance,
          "sampler": "flow-euler", "latents": latents}
    with Pipeline.load(slotted_slg_export, backend="ort-cpu") as pipe:
        res = pipe(PROMPT, loras=loras, **kw)
        assert SKIP_UNET not in pipe.engines and "skip-layer" not in res.loop
        assert np.abs(_pixels(res) - lora_only).max() <= 1
        res = pipe(PROMPT, loras=loras, **kw, **slg)
        assert np.abs(_pixels(res) - want).max() <= 1
        assert res.loop.endswith(f"skip-layer guidance on {runs} of {steps} steps")
        got = _pixels(pipe(PROMPT, **kw, **slg))
        assert np.abs(got - _pixels(slg_pipe(PROMPT, **kw, **slg))).max() <= 1
        assert np.abs(got - slg_only).max() <= 1


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino"])
def test_slg_with_a_lora_on_other_backends(slotted_slg_export: Path, lora_reference, style_lora: Path,
                                           monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    steps, guidance, slg, runs = CASES[1]
    latents = _latents(22)
    want = _diffusers(lora_reference, latents, steps, guidance, slg)
    with loaded_on(slotted_slg_export, backend, monkeypatch, cuda_graph=True) as pipe:
        res = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=96, steps=steps, guidance_scale=guidance,
                   sampler="flow-euler", latents=latents, loras=[(str(style_lora), LORA_SCALE)], **slg)
    assert want.std() > 5 and np.abs(_pixels(res) - want).max() <= 1
    assert res.loop.endswith(f"skip-layer guidance on {runs} of {steps} steps")


def test_slotted_skip_graph_is_diffusers_skip_layers_with_the_lora(slotted_slg_export: Path, lora_reference,
                                                                    style_lora: Path) -> None:
    """The slotted pass's graph, as written: the transformer's slot inputs for the blocks it runs (the skipped
    block's have none: they do not reach its output), the transformer's weights file; fed the factors a call binds
    for the LoRA, it is diffusers' transformer with the LoRA loaded and ``skip_layers``, combined by hand."""
    m = ExportManifest.read(slotted_slg_export)
    comp, unet = m.components[SKIP_UNET], m.components["unet"]
    slots = {i.name: i.shape for i in comp.inputs if i.name.startswith("lora.")}
    unet_slots = {i.name: i.shape for i in unet.inputs if i.name.startswith("lora.")}
    assert slots and all(unet_slots[n] == s for n, s in slots.items())
    assert {n for n in unet_slots if n not in slots} == {n for n in unet_slots
                                                          if n.startswith(f"lora.transformer_blocks.{LAYERS[0]}.")}
    assert comp.parity is not None and comp.parity.rel_err <= comp.parity.bound
    graph = onnx.load(str(slotted_slg_export / comp.path), load_external_data=False)
    assert {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"model.onnx_data"}
    assert sum(len(t.raw_data) for t in graph.graph.initializer) < 1 << 16  # its own bytes: small constants only

    with Pipeline.load(slotted_slg_export, backend="ort-cpu") as pipe:
        factors = pipe.lora_inputs([(str(style_lora), LORA_SCALE)])
    sess = ort.InferenceSession(str(slotted_slg_export / comp.path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 16, 8, 12, generator=g), torch.rand(2, generator=g) * 1000
    text, pooled = torch.randn(2, 333, 48, generator=g), torch.randn(2, 32, generator=g)
    pred, k = torch.randn(2, 16, 8, 12, generator=g), 0.6
    with torch.no_grad():
        skipped = lora_reference.transformer(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=text[1:],
                                             pooled_projections=pooled[1:], skip_layers=LAYERS).sample
        plain = _plain_skipped(x[1:], t[1:], text[1:], pooled[1:])
    assert float((skipped - plain).abs().max()) > 1e-3  # the LoRA moves the pass
    want = torch.cat([pred[:1], pred[1:] + k * (pred[1:] - skipped)]).numpy()
    (got,) = sess.run(["out_sample"], {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states":
                                       text.numpy(), "pooled_projections": pooled.numpy(), "unet_out": pred.numpy(),
                                       "skip_scale": np.array([k], np.float32),
                                       **{n: np.asarray(factors[n]) for n in slots}})
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


def _plain_skipped(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    tr = build_modules(get_sd3_preset(PRESET), seed=0).transformer
    return tr(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
              skip_layers=LAYERS).sample


def test_staged_denoise_runs_slg(slg_pipe: Pipeline, sd3_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """``denoise()`` takes the call's SLG keywords: two windows of the schedule give the call's image (the window of
    SLG steps a fraction of the plan's steps, whichever part a call runs); what the call refuses it refuses."""
    steps, guidance, slg, runs = CASES[2]  # steps 2 to 5: some in each of the two windows
    latents = _latents(23)
    whole = slg_pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=96, steps=steps, guidance_scale=guidance,
                     sampler="flow-euler", latents=latents, **slg)
    emb = slg_pipe.encode_prompt(PROMPT, NEGATIVE, guided=True)
    plan = slg_pipe.plan("flow-euler", steps, height=64, width=96)
    first: dict = {}
    rest: dict = {}
    lat = slg_pipe.denoise(emb, slg_pipe.prepare_latents(plan, 64, 96, latents=latents), plan,
                           guidance_scale=guidance, end=0.5, timings=first, **slg)
    assert 0 < lat.step < steps
    lat = slg_pipe.denoise(emb, lat, plan, guidance_scale=guidance, timings=rest, **slg)
    ran = [int(re.search(r"skip-layer guidance on (\d+) of", t["loop"]).group(1)) for t in (first, rest)]
    assert all(ran) and sum(ran) == runs  # the window split across the two calls
    images, _ = slg_pipe.decode(lat)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(whole.images[0]))
    plain_lat = slg_pipe.denoise(emb, slg_pipe.prepare_latents(plan, 64, 96, latents=latents), plan,
                                 guidance_scale=guidance)
    assert np.abs(np.asarray(slg_pipe.decode(plain_lat)[0][0]).astype(int) - np.asarray(images[0])).max() > 3

    def no_work(*a, **k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(Pipeline, "_denoise", no_work)
    fresh = slg_pipe.prepare_latents(plan, 64, 96, latents=latents)
    with pytest.raises(InputError, match="guidance_scale above 1"):
        slg_pipe.denoise(slg_pipe.encode_prompt(PROMPT, guided=False), fresh, plan, guidance_scale=1.0, **slg)
    with pytest.raises(InputError, match="feature caching"):
        slg_pipe.denoise(emb, fresh, plan, guidance_scale=guidance, cache="first-block", **slg)
    with pytest.raises(InputError, match="give one"):
        slg_pipe.denoise(emb, fresh, plan, guidance_scale=guidance, skip_layer_guidance_stop=0.5)
    with Pipeline.load(sd3_export(PRESET), backend="ort-cpu") as plain, \
            pytest.raises(ArtifactError, match="--skip-layers 7,8,9"):
        plain.denoise(plain.encode_prompt(PROMPT, guided=True), plain.prepare_latents(plan, 64, 96, latents=latents),
                      plan, guidance_scale=guidance, **slg)


def test_skip_graph_is_diffusers_skip_layers_over_the_transformers_weights(slg_export: Path) -> None:
    """The pass's graph, as written (reading the transformer's weights file), against diffusers' transformer with
    ``skip_layers`` on the conditional rows, combined by hand."""
    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    m = ExportManifest.read(slg_export)
    comp = m.components[SKIP_UNET]
    assert comp.path == "transformer/skip_layers.onnx" and m.source["skip_layers"] == LAYERS
    assert comp.parity is not None and comp.parity.rel_err <= comp.parity.bound
    graph = onnx.load(str(slg_export / comp.path), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == \
        {"model.onnx_data"}
    assert sum(len(t.raw_data) for t in graph.graph.initializer) < 1 << 16  # its own bytes: small constants only
    assert not (slg_export / "unet_skip").exists() and not (slg_export / "transformer" / "skip_layers.onnx_data").exists()

    tr = build_modules(get_sd3_preset(PRESET), seed=0).transformer
    sess = ort.InferenceSession(str(slg_export / comp.path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    for rows, h, w, tokens in [(2, 8, 12, 333), (4, 6, 10, 85)]:
        x, t = torch.randn(rows, 16, h, w, generator=g), torch.rand(rows, generator=g) * 1000
        text, pooled = torch.randn(rows, tokens, 48, generator=g), torch.randn(rows, 32, generator=g)
        pred, k = torch.randn(rows, 16, h, w, generator=g), 0.7
        n = rows // 2
        with torch.no_grad():
            skipped = tr(hidden_states=x[n:], timestep=t[n:], encoder_hidden_states=text[n:],
                         pooled_projections=pooled[n:], skip_layers=LAYERS).sample
        want = torch.cat([pred[:n], pred[n:] + k * (pred[n:] - skipped)]).numpy()
        (got,) = sess.run(["out_sample"], {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states":
                                           text.numpy(), "pooled_projections": pooled.numpy(),
                                           "unet_out": pred.numpy(), "skip_scale": np.array([k], np.float32)})
        assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


def test_calls_without_slg_are_unchanged(slg_export: Path, sd3_export) -> None:
    """An export with the pass, called without SLG (or with a window no step falls in), gives the latents of the
    export without it, bit for bit, and never loads the pass."""
    kw = {"negative_prompt": NEGATIVE, "height": 64, "width": 64, "steps": 5, "guidance_scale": 5.0,
          "sampler": "flow-euler", "latents": _latents(11, 64, 64), "output": "latents"}
    with Pipeline.load(sd3_export(PRESET), backend="ort-cpu") as plain:
        want = plain(PROMPT, **kw).latents
    with Pipeline.load(slg_export, backend="ort-cpu") as pipe:
        got = pipe(PROMPT, **kw)
        assert SKIP_UNET not in pipe.engines and "skip-layer" not in got.loop
        np.testing.assert_array_equal(got.latents, want)
        # 5 * 0.9 < i < 5 * 0.95: no step; the call runs the skip pass's denoiser and loop, and no pass
        empty = pipe(PROMPT, skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.9,
                     skip_layer_guidance_stop=0.95, **kw)
        assert empty.loop.endswith("skip-layer guidance on 0 of 5 steps")
        np.testing.assert_array_equal(empty.latents, want)


@pytest.mark.parametrize("key", ["sd1", "sd2", "sdxl", "sd3", "flux"])
def test_families_declare_skip_layer_guidance_as_diffusers_pipelines_have_it(key: str) -> None:
    import inspect

    import diffusers

    from sdrt.runtime.families import family_named

    fam = family_named(key)
    call = getattr(diffusers, f"{fam.diffusers_pipeline}Pipeline").__call__
    assert ("skip_guidance_layers" in inspect.signature(call).parameters) == fam.skip_layer_guidance


@pytest.mark.parametrize(("fields", "words"), [
    ({"skip_layer_guidance_scale": 0.0}, "above 0"),
    ({"skip_layer_guidance_scale": float("nan")}, "above 0"),
    ({"skip_layer_guidance_scale": True}, "above 0"),
    ({"skip_layer_guidance_scale": 101.0}, "at most 100"),
    ({"skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": -0.1}, "from 0 to 1"),
    ({"skip_layer_guidance_scale": 2.8, "skip_layer_guidance_stop": 1.5}, "from 0 to 1"),
    ({"skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.3, "skip_layer_guidance_stop": 0.3},
     "must be below"),
    ({"skip_layer_guidance_start": 0.1}, "give one"),
])
def test_out_of_range_settings_are_refused_before_work(fields: dict, words: str) -> None:
    with pytest.raises(InputError, match=words):
        GenerationRequest(prompt="x", **fields).checked()


def test_calls_that_cannot_run_slg_are_refused_before_work(slg_pipe: Pipeline, sd3_export, tiny_export,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*a, **k):
        raise AssertionError("work started before the refusal")

    kw = {"height": 64, "width": 64, "steps": 4, "skip_layer_guidance_scale": 2.8}
    monkeypatch.setattr(Pipeline, "_denoise", no_work)
    with pytest.raises(InputError, match="guidance_scale above 1"):
        slg_pipe(PROMPT, guidance_scale=1.0, **kw)
    with pytest.raises(InputError, match="feature caching"):
        slg_pipe(PROMPT, guidance_scale=5.0, cache="first-block", **kw)
    with pytest.raises(InputError, match="guidance_rescale"):
        slg_pipe(PROMPT, guidance_scale=5.0, guidance_rescale=0.7, **kw)
    with Pipeline.load(sd3_export(PRESET), backend="ort-cpu") as plain, \
            pytest.raises(ArtifactError, match="--skip-layers 7,8,9"):
        plain(PROMPT, guidance_scale=5.0, **kw)
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as sd15, \
            pytest.raises(InputError, match="no skip-layer guidance"):
        sd15(PROMPT, guidance_scale=5.0, **kw)


def test_export_refuses_bad_layers_and_refit(slg_export: Path, tmp_path: Path) -> None:
    from sdrt.export.refit import RefitRequest, refit_folder
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    model = load_sd3(random_preset=PRESET)
    for layers in ([2], [0, 0], [0, 1], [], [-1]):  # past the 2 blocks, twice, every block, none, negative
        with pytest.raises(InputError, match="distinct blocks"):
            export_sd3(model, tmp_path / "out", skip_layers=layers)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CompatibilityError, match="unet_skip"):
        refit_folder(slg_export, RefitRequest(base=True), out=tmp_path / "refit")


@pytest.mark.slow
def test_a_streamed_transformer_gets_a_streamed_pass(tmp_path: Path) -> None:
    """The full-size path: the transformer streamed, its pass traced on fake tensors, gated on a reduced-depth copy
    that keeps the skipped blocks, and sharing the transformer's weights file; the pass against diffusers' on the
    same (synthetic, per-tensor) weights."""
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    model = load_sd3(random_preset=PRESET, stream=True)
    m = export_sd3(model, tmp_path / "out", fp16=False, skip_layers=[1])
    comp = m.components[SKIP_UNET]
    assert comp.parity is not None and "blocks" in comp.parity.reference
    graph = onnx.load(str(tmp_path / "out" / comp.path), load_external_data=False)
    assert sum(len(t.raw_data) for t in graph.graph.initializer) < 1 << 16  # its own bytes: small constants only
    assert not (tmp_path / "out" / "transformer" / "skip_layers.onnx_data").exists()
    tr = model.held().transformer
    sess = ort.InferenceSession(str(tmp_path / "out" / comp.path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 16, 6, 10, generator=g), torch.rand(2, generator=g) * 1000
    text, pooled, pred = torch.randn(2, 85, 48, generator=g), torch.randn(2, 32, generator=g), torch.randn(2, 16, 6, 10)
    with torch.no_grad():
        skipped = tr(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=text[1:], pooled_projections=pooled[1:],
                     skip_layers=[1]).sample
    want = torch.cat([pred[:1], pred[1:] + 0.5 * (pred[1:] - skipped)]).numpy()
    (got,) = sess.run(["out_sample"], {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": text.numpy(),
                                       "pooled_projections": pooled.numpy(), "unet_out": pred.numpy(),
                                       "skip_scale": np.array([0.5], np.float32)})
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


@pytest.mark.slow
def test_a_streamed_slotted_transformer_gets_a_slotted_streamed_pass(tmp_path: Path) -> None:
    """The full-size path with LoRA slots: the streamed pass takes the transformer's slot inputs (the skipped
    block's too, unused: torch.export keeps every input), is gated with random factors, shares the transformer's
    weights file, and with factors is the transformer with ``up @ down`` added to each slotted weight (by hand)
    and ``skip_layers``."""
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    model = load_sd3(random_preset=PRESET, stream=True)
    m = export_sd3(model, tmp_path / "out", fp16=False, without_t5=True, skip_layers=[1],
                   lora_slots=SlotPlan.parse("4:attn-ff"))
    comp = m.components[SKIP_UNET]
    slots = {i.name: i.shape for i in comp.inputs if i.name.startswith("lora.")}
    assert slots and slots == {i.name: i.shape for i in m.components["unet"].inputs if i.name.startswith("lora.")}
    assert comp.parity is not None and "blocks" in comp.parity.reference
    graph = onnx.load(str(tmp_path / "out" / comp.path), load_external_data=False)
    assert sum(len(t.raw_data) for t in graph.graph.initializer) < 1 << 16  # its own bytes: small constants only
    assert not (tmp_path / "out" / "transformer" / "skip_layers.onnx_data").exists()
    tr = model.held().transformer
    g = torch.Generator().manual_seed(6)
    factors = {n: torch.randn(*(int(d) for d in shape), generator=g) * 0.05 for n, shape in slots.items()}
    with torch.no_grad():
        layers = dict(tr.named_modules())
        for n in {k.removeprefix("lora.").rsplit(".", 1)[0] for k in slots}:
            layers[n].weight += factors[f"lora.{n}.up"] @ factors[f"lora.{n}.down"]
    sess = ort.InferenceSession(str(tmp_path / "out" / comp.path), providers=["CPUExecutionProvider"])
    x, t = torch.randn(2, 16, 6, 10, generator=g), torch.rand(2, generator=g) * 1000
    text, pooled, pred = torch.randn(2, 77, 48, generator=g), torch.randn(2, 32, generator=g), torch.randn(2, 16, 6, 10)
    with torch.no_grad():
        skipped = tr(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=text[1:], pooled_projections=pooled[1:],
                     skip_layers=[1]).sample
    want = torch.cat([pred[:1], pred[1:] + 0.5 * (pred[1:] - skipped)]).numpy()
    (got,) = sess.run(["out_sample"], {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": text.numpy(),
                                       "pooled_projections": pooled.numpy(), "unet_out": pred.numpy(),
                                       "skip_scale": np.array([0.5], np.float32),
                                       **{n: f.numpy() for n, f in factors.items()}})
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-5


def test_sdrt_export_and_generate_take_the_flags(slg_export: Path, slg_pipe: Pipeline, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from sdrt.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", str(slg_export), "--prompt", PROMPT, "--steps", "5", "--height", "64", "--width", "64",
                 "--seed", "4", "--guidance", "5", "--slg-scale", "2.5", "--slg-stop", "0.8", "--backend", "ort-cpu",
                 "-o", str(out)]) == 0
    want = slg_pipe(PROMPT, steps=5, height=64, width=64, seed=4, guidance_scale=5.0, skip_layer_guidance_scale=2.5,
                    skip_layer_guidance_stop=0.8).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    capsys.readouterr()
    assert main(["generate", str(slg_export), "--prompt", "x", "--slg-start", "0.1", "-o",
                 str(tmp_path / "x.png")]) == 1
    assert "give --slg-scale" in capsys.readouterr().err
    assert main(["export", "--random", "sd15-tiny", "--out", str(tmp_path / "e"), "--skip-layers", "7,8,9"]) == 1
    assert "this model is not SD 3 / 3.5" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "e").exists()


def test_the_servers_take_the_fields(slg_pipe: Pipeline) -> None:
    """A1111's txt2img and the OpenAI endpoint with sdrt's SLG fields give the pipeline's images; settings that do
    not go together are a 422 naming the field, before the request is queued."""
    import httpx

    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    key = "test-key-slg"
    auth = {"Authorization": f"Bearer {key}"}
    slg = {"skip_layer_guidance_scale": 2.0, "skip_layer_guidance_stop": 0.9}
    want = np.asarray(slg_pipe("a lighthouse", negative_prompt="fog", height=64, width=64, steps=3,
                               guidance_scale=4.0, sampler="flow-euler", seed=10, **slg).images[0])
    plain = np.asarray(slg_pipe("a lighthouse", negative_prompt="fog", height=64, width=64, steps=3,
                                guidance_scale=4.0, sampler="flow-euler", seed=10).images[0])
    assert np.abs(want.astype(np.int16) - plain).max() > 1
    app = create_app(slg_pipe, api_key=key, max_batch=4, batch_window_ms=50, max_steps=4, max_pixels=128 * 128)
    with LiveServer(app) as server:
        body = {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 10, "sampler_name": "Euler",
                "steps": 3, "cfg_scale": 4.0, "width": 64, "height": 64, **slg}
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
        r = httpx.post(f"{server.url}/v1/images/generations", headers=auth, timeout=120,
                       json={"prompt": "a lighthouse", "negative_prompt": "fog", "size": "64x64", "steps": 3,
                             "seed": 10, "guidance_scale": 4.0, "response_format": "b64_json", **slg})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        for bad, field in (({"skip_layer_guidance_start": 0.1}, "skip_layer_guidance_start"),
                           ({"skip_layer_guidance_scale": 2.0, "cfg_scale": 1.0}, "skip_layer_guidance_scale")):
            r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, **{k: None for k in slg}, **bad},
                           headers=auth, timeout=120)
            assert r.status_code == 422 and field in r.text, r.text
