"""SD 3 / 3.5 on the TensorRT path: build profiles (the T5 and joint text axes, 16-pixel sides), ``build_engines``
on the fakes driving the pipeline like ort-cpu, and the graphs on TensorRT for RTX's real builder (no GPU).

The fakes (tests/helpers/trt_fakes.py) run the "engines" as ONNX graphs on onnxruntime: a pass says sdrt's
build, engine folder and captured loop hold together for this family, nothing about real TensorRT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from sdrt.export.profiles import custom_profile, engine_shapes, load_profile, validate
from sdrt.export.trt_build import BuildOptions, build_engines
from sdrt.runtime.errors import InputError
from sdrt.runtime.manifest import ExportManifest, ShapeLimits
from sdrt.runtime.pipeline import Pipeline

from .helpers.trt_modules import RTX


@pytest.fixture
def rtx() -> ModuleType:
    if RTX is None:
        pytest.skip("needs the TensorRT for RTX bindings: pip install tensorrt-rtx-cu13-libs "
                    "tensorrt-rtx-cu13-bindings")
    return RTX


def test_profile_shapes_by_hand(sd3_export) -> None:
    """Each input's min/opt/max under a dynamic profile, computed by hand: T5 at its 256 tokens, the
    transformer's text at 77 + 256, CFG-doubled rows for the encoders and the transformer."""
    man = ExportManifest.read(sd3_export("sd3-tiny"))
    shapes = engine_shapes(custom_profile(batch="1:1:2", height="64:64:128", width="64:96:256"), man)
    by = {c: {s.name: (s.min, s.opt, s.max) for s in v} for c, v in shapes.items()}
    assert by["text_encoder_3"]["input_ids"] == ((2, 256), (2, 256), (4, 256))
    assert by["text_encoder"]["input_ids"] == ((2, 77), (2, 77), (4, 77))
    unet = by["unet"]
    assert unet["sample"] == ((2, 16, 8, 8), (2, 16, 8, 12), (4, 16, 16, 32))
    assert unet["encoder_hidden_states"] == ((2, 333, 48), (2, 333, 48), (4, 333, 48))
    assert unet["pooled_projections"] == ((2, 32), (2, 32), (4, 32))
    assert unet["timestep"] == ((2,), (2,), (4,))
    assert by["vae_decoder"]["latent_sample"] == ((1, 16, 8, 8), (1, 16, 8, 12), (2, 16, 16, 32))


def test_a_t5_range_by_hand(sd3_export) -> None:
    """A profile's T5 range: T5's input at its min/opt/max tokens, the transformer's text axis 77 CLIP tokens
    more (by hand: 77 + 32, 77 + 64, 77 + 128); the CLIP encoders keep their 77."""
    man = ExportManifest.read(sd3_export("sd3-tiny"))
    prof = custom_profile(batch="1:1:2", height=64, t5_tokens="32:64:128")
    by = {c: {s.name: (s.min, s.opt, s.max) for s in v} for c, v in engine_shapes(prof, man).items()}
    assert by["text_encoder_3"]["input_ids"] == ((2, 32), (2, 64), (4, 128))
    assert by["unet"]["encoder_hidden_states"] == ((2, 109, 48), (2, 141, 48), (4, 205, 48))
    assert by["text_encoder"]["input_ids"] == by["text_encoder_2"]["input_ids"] == ((2, 77), (2, 77), (4, 77))
    static = {s.name: s for s in engine_shapes(custom_profile(height=64, t5_tokens=100), man)["unet"]}
    assert static["encoder_hidden_states"].min == static["encoder_hidden_states"].max == (2, 177, 48)


def test_shipped_profiles_fit_a_full_size_export(sd3_export) -> None:
    """sd3-1024 and sd3-dynamic against the limits a full-size SD 3.5 export records (a 192-patch grid:
    3072 px, sides in 16s); the tiny export's own grid (256 px) refuses them, naming its range."""
    man = ExportManifest.read(sd3_export("sd3-tiny"))
    full = dataclasses.replace(man, limits=ShapeLimits(min_size=64, max_size=3072, multiple_of=16))
    for name in ("sd3-1024", "sd3-dynamic"):
        prof = load_profile(name)
        assert prof.family == "sd3"
        validate(prof, full)
        with pytest.raises(InputError, match=r"outside what the export supports \(64\.\.256 px\)"):
            validate(prof, man)
    sample = {s.name: s for s in engine_shapes(load_profile("sd3-1024"), full)["unet"]}["sample"]
    assert sample.min == sample.max == (2, 16, 128, 128)
    with pytest.raises(InputError, match="multiple of 16"):
        validate(custom_profile(height=72, width=64), man)
    with pytest.raises(InputError, match="use chunks 1"):
        validate(custom_profile(height=64, chunks="1:1:2"), man)


def test_built_engines_drive_the_pipeline_like_ort_cpu(sd3_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on fakes: export -> build_engines -> Pipeline(tensorrt) gives the ort-cpu images, the loop
    captured; no text-join graph is built (the family joins on the host)."""
    cudart, _ = fake_gpu
    src = sd3_export("sd3-tiny")
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                             BuildOptions(workspace_gb=1))
    names = {r.component for r in manifest.engines}
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae_decoder", "vae_encoder"} <= names
    assert not any(n.startswith("text_join") for n in names)
    kw = {"negative_prompt": "blurry", "steps": 4, "seed": 5, "height": 64, "width": 96, "guidance_scale": 4.0}
    want = Pipeline.load(src, backend="ort-cpu")("a red fox", **kw)
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = pipe("a red fox", **kw)
        # without --t5-tokens the profile holds T5's default length (256) alone: another is refused before any
        # engine runs, naming the engines' length and the rebuild
        ran = _spy_engines(pipe)
        with pytest.raises(InputError, match=r"max_sequence_length 64 is outside the T5 tokens per prompt these "
                                             r"engines were built for \(256\): give max_sequence_length 256, or "
                                             r"rebuild .* --t5-tokens 64:256:256"):
            pipe("a red fox", **kw, max_sequence_length=64)
        assert ran == []
    assert got.loop == "captured CUDA graphs" and cudart.launches == 4
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.shape == b.shape == (64, 96, 3) and a.std() > 1
    assert np.abs(a - b).max() <= 1


def _spy_engines(pipe: Pipeline) -> list[str]:
    """The names of the pipeline's engines as they run, from now on."""
    ran: list[str] = []
    for name, engine in pipe.engines.items():
        def run(feeds, _name=name, _run=engine.run):  # type: ignore[no-untyped-def]
            ran.append(_name)
            return _run(feeds)
        engine.run = run  # type: ignore[method-assign]
    return ran


def test_engines_built_for_a_t5_range_serve_it(sd3_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on fakes: engines built with ``t5_tokens`` 32:64:128 run a call's max_sequence_length inside it
    as ort-cpu does (the same length there, within 1/255), and refuse one outside it, or the default 256, before
    any engine runs, naming the range and the rebuild; the manifest records the range."""
    src, out = sd3_export("sd3-tiny"), tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(height=64, t5_tokens="32:64:128"), BuildOptions(workspace_gb=1))
    assert manifest.profile.t5_tokens == (32, 64, 128) and "T5 tokens 32..128 (opt 64)" in manifest.profile.describe()
    assert "--t5-tokens 32:64:128" in manifest.build_command
    kw = {"negative_prompt": "blurry", "steps": 3, "seed": 7, "height": 64, "width": 64, "guidance_scale": 4.0}
    ref = Pipeline.load(src, backend="ort-cpu")
    with Pipeline.load(out, backend="tensorrt") as pipe:
        for n in (32, 100):
            a = np.asarray(ref("a red fox", **kw, max_sequence_length=n).images[0], np.int16)
            b = np.asarray(pipe("a red fox", **kw, max_sequence_length=n).images[0], np.int16)
            assert a.shape == b.shape == (64, 64, 3) and a.std() > 1
            assert np.abs(a - b).max() <= 1, n
        # a server's warm-up call fits the engines: T5's smallest length, as the default 256 is outside the range
        warm = pipe.warmup_request()
        assert (warm.max_sequence_length, warm.height, warm.width, warm.batch_size) == (32, 64, 64, 1)
        assert pipe.generate(warm).images[0].size == (64, 64)
        assert ref.warmup_request().max_sequence_length is None  # ONNX graphs take the default
        ran = _spy_engines(pipe)
        with pytest.raises(InputError, match=r"max_sequence_length 129 is outside the T5 tokens per prompt these "
                                             r"engines were built for \(32\.\.128\): give max_sequence_length "
                                             r"from 32 to 128, or rebuild .* --t5-tokens 32:64:129"):
            pipe("a red fox", **kw, max_sequence_length=129)
        with pytest.raises(InputError, match=r"max_sequence_length 256 \(the model's default where a call gives "
                                             r"none\) is outside"):
            pipe("a red fox", **kw)
        with pytest.raises(InputError, match=r"max_sequence_length 16 is outside") as e:
            pipe.check_sequence_length(16)
        assert "--max-sequence-length 16 is outside" in e.value.for_cli()
        assert "give --max-sequence-length from 32 to 128" in e.value.for_cli()
        # the server checks the field (and, without it, the default) before it queues the request: a 422
        from sdrt.serve.checks import sequence_length_of
        from sdrt.serve.errors import ApiError

        st = SimpleNamespace(pipeline=lambda: pipe)
        assert sequence_length_of(st, 64) == 64  # type: ignore[arg-type]
        for given in (8, None):
            with pytest.raises(ApiError, match="is outside the T5 tokens") as api:
                sequence_length_of(st, given)  # type: ignore[arg-type]
            assert (api.value.status, api.value.param) == (422, "max_sequence_length")
        assert ran == []


@pytest.mark.parametrize("component", ["unet", "text_encoder_3"])
def test_the_transformer_and_t5_parse_in_tensorrt(rtx: ModuleType, sd3_export, component: str) -> None:
    """The MMDiT and T5 graphs (fp16 export; T5 kept fp32) parse in TensorRT for RTX's real ONNX parser."""
    import sdrt.runtime.trt_backend as tb
    from sdrt.export import trt_build
    from sdrt.runtime.engine_manifest import EngineEnv

    src = sd3_export("sd3-tiny", precision="fp16")
    env = EngineEnv("tensorrt_rtx", str(rtx.__version__), None, None)
    _, plans = trt_build.plan_engines(src, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                                      trt_build.BuildOptions(module="tensorrt_rtx"), env)
    (plan,) = [p for p in plans if p.record.component == component]
    builder = rtx.Builder(tb.make_logger(rtx, []))
    network, _parser = trt_build.parse_onnx(rtx, builder, plan.onnx_path, builder.logger, component, True)
    assert network.num_inputs == len(ExportManifest.read(src).components[component].inputs)


def test_sdrt_build_makes_a_whole_sd3_engine_folder_on_rtx(rtx: ModuleType, sd3_export, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``sdrt build`` on a real TensorRT builder: every component of an SD3 export (T5 kept fp32 in the fp16
    export) and the step graphs, a dynamic profile with a T5 range (T5's token axis and the transformer's text
    axis dynamic), the tokenizers copied; no join graph (about 12 s)."""
    from sdrt.cli import main
    from sdrt.runtime.engine_manifest import EngineManifest

    src, out = sd3_export("sd3-tiny", precision="fp16"), tmp_path / "engines"
    assert main(["build", str(src), "--out", str(out), "--batch", "1:1:2", "--height", "64:64:128",
                 "--width", "64:96:128", "--t5-tokens", "32:64:128", "--tensorrt-module", "tensorrt_rtx"]) == 0
    printed = capsys.readouterr().out
    m = EngineManifest.read(out)
    assert m.profile.t5_tokens == (32, 64, 128) and "T5 tokens 32..128 (opt 64)" in printed
    shapes = {r.component: {s.name: (s.min, s.opt, s.max) for s in r.shapes} for r in m.engines}
    assert shapes["text_encoder_3"]["input_ids"] == ((2, 32), (2, 64), (4, 128))
    assert shapes["unet"]["encoder_hidden_states"] == ((2, 109, 48), (2, 141, 48), (4, 205, 48))
    precision = {r.component: r.precision for r in m.engines}
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae_decoder", "vae_encoder",
            "sampler_step_cfg", "sampler_step"} <= set(precision)
    assert precision["text_encoder_3"] == "fp32" and precision["unet"] == "fp16"
    assert not any(c.startswith("text_join") for c in precision)
    for rec in m.engines:
        assert (out / rec.file).stat().st_size == rec.size_bytes > 0 and f"{rec.component}: built in" in printed
    assert (out / "tokenizer_3" / "tokenizer.json").is_file()
    assert ExportManifest.read(out).components["unet"].path == "unet.engine"
