"""The openvino backend: f32 images as ort-cpu's, bf16 within its documented bounds, the dtypes of sdrt's
graphs through OpenVINO, the model cache, the allocation-free loop, and a missing device refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino backend needs pip install 'sdrt[openvino]'")

from sdrt.runtime.errors import ArtifactError, BackendUnavailable, InputError
from sdrt.runtime.ov_backend import OvBackend, OvStepLoop, default_cache_dir
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.step_loop import PlainStepLoop

HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 (OpenVINO's CPU capabilities lack BF16: "
                                                     "no AVX512_BF16 or AMX); the bf16 path cannot run here")
KW = {"prompt": "a lighthouse at dawn", "negative_prompt": "blurry", "steps": 4, "seed": 3, "height": 64, "width": 80}


def load(folder: Path, backend: Any) -> Pipeline:
    """Pipeline.load over a backend configured here (its own model cache, precision)."""
    return Pipeline.load(folder, backend=backend)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def pipes(tiny_export, cache: Path) -> dict[tuple[str, str], Pipeline]:
    """(preset, backend) -> pipeline; backend: ort-cpu, f32, bf16 (bf16 only where the CPU has it)."""
    out: dict[tuple[str, str], Pipeline] = {}
    for preset in ("sd15-tiny", "sdxl-tiny"):
        folder = tiny_export(preset, "fp32")
        out[preset, "ort-cpu"] = Pipeline.load(folder, backend="ort-cpu")
        out[preset, "f32"] = load(folder, OvBackend(precision="f32", cache_dir=cache))
        if HAS_BF16:
            out[preset, "bf16"] = load(folder, OvBackend(precision="bf16", cache_dir=cache))
    return out


def image(pipe: Pipeline, **kw: Any) -> np.ndarray:
    return np.asarray(pipe(**{**KW, **kw}).images[0]).astype(np.int16)


@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-a"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_f32_images_match_ort_cpu(pipes: dict, preset: str, sampler: str, guidance: float) -> None:
    ref = image(pipes[preset, "ort-cpu"], sampler=sampler, guidance_scale=guidance)
    got = image(pipes[preset, "f32"], sampler=sampler, guidance_scale=guidance)
    assert got.shape == ref.shape == (64, 80, 3)
    assert np.abs(got - ref).max() <= 1  # ort-cpu's images are within 1/255 of diffusers' (test_pipeline_parity)


@needs_bf16
@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-a"])
def test_bf16_image_within_its_bound_of_fp32(pipes: dict, preset: str, sampler: str) -> None:
    from sdrt.export.onnx_export import IMAGE_LEVELS

    ref = image(pipes[preset, "ort-cpu"], sampler=sampler)
    got = image(pipes[preset, "bf16"], sampler=sampler)
    diff = np.abs(got - ref)
    assert diff.max() <= IMAGE_LEVELS["bf16"]
    assert diff.max() > 0  # bf16 really ran: an f32 run would match to the level


@needs_bf16
@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
def test_bf16_graph_parity_against_pytorch_fp32(tiny_export, preset: str) -> None:
    from sdrt.export.exporter import component_specs
    from sdrt.export.loading import load_model
    from sdrt.export.onnx_export import PARITY_BOUND, check_parity_openvino

    folder = tiny_export(preset, "fp32")
    specs = component_specs(load_model(random_preset=preset))  # the exported weights: the same seed
    rels = {}
    for spec in specs:
        path = folder / spec.name / "model.onnx"
        f32 = check_parity_openvino(spec, path, (2, 8, 6), inference_precision="f32")
        assert f32.rel_err <= f32.bound and f32.bound <= PARITY_BOUND["fp32"] * 1.0001 or spec.name == "vae_decoder"
        bf = check_parity_openvino(spec, path, (2, 8, 6))  # raises ParityError past the bf16 bound
        assert bf.rel_err <= bf.bound
        rels[spec.name] = bf.rel_err
    assert set(rels) >= {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    # bf16 rounding shows: the float graphs are off by more than fp32's bound
    assert rels["unet"] > PARITY_BOUND["fp32"] and rels["text_encoder"] > PARITY_BOUND["fp32"]


def test_dtypes_of_sdrt_graphs_survive(pipes: dict) -> None:
    p = pipes["sd15-tiny", "f32"]
    e = p.engines
    assert e["text_encoder"].inputs["input_ids"].dtype == np.int32
    assert e["vae_decoder"].outputs["images"].dtype == np.uint8
    assert e["vae_decoder"].outputs["finite"].dtype == np.bool_
    assert e["vae_encoder"].inputs["image"].dtype == np.uint8
    be = p.backend
    lat = be.to_device(np.zeros((1, 4, 8, 10), np.float32))
    out = e["vae_decoder"]({"latent_sample": lat})
    assert be.meta(out["images"]) == (np.dtype(np.uint8), (1, 64, 80, 3))
    assert be.to_host(out["finite"]).tolist() == [True]
    with pytest.raises(InputError, match="int32"):
        e["text_encoder"]({"input_ids": be.to_device(np.zeros((1, 77), np.int64)),
                           "attention_mask": be.to_device(np.ones((1, 77), np.int32))})
    # img2img runs the uint8 encoder: the same image as ort-cpu's within a level
    init = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    ref = image(pipes["sd15-tiny", "ort-cpu"], image=init, strength=0.6, sampler="ddim")
    got = image(p, image=init, strength=0.6, sampler="ddim")
    assert np.abs(got - ref).max() <= 1


def test_loop_keeps_tensors_and_matches_the_plain_loop(pipes: dict, monkeypatch: pytest.MonkeyPatch,
                                                       tiny_export, cache: Path) -> None:
    p = pipes["sd15-tiny", "f32"]
    emb = p.encode_prompt("a cat")
    plan = p.plan("dpmpp-2m", 4)
    lat = p.prepare_latents(plan, 64, 80, seed=1)
    out = p.denoise(emb, lat, plan)
    loop = p._loops[(True, "float32", None, False, (), False, False)]  # guided, float32, plain, no SLG
    assert isinstance(loop, OvStepLoop)
    assert isinstance(loop.latents, ov.Tensor) and any(loop.latents is s["latents_next"] for s in loop._sets)
    plain = load(tiny_export("sd15-tiny", "fp32"), OvBackend(precision="f32", cache_dir=cache))
    monkeypatch.setattr(plain.backend, "step_loop", lambda u, s, c=(): PlainStepLoop(plain.backend, u, s, c))
    ref = plain.denoise(plain.encode_prompt("a cat"), plain.prepare_latents(plan, 64, 80, seed=1), plan)
    a, b = p.backend.to_host(out.x), plain.backend.to_host(ref.x)
    assert np.array_equal(a, b)
    # the caller's latents are its own: another run does not change them
    p.denoise(emb, p.prepare_latents(plan, 64, 80, seed=2), plan)
    assert np.array_equal(p.backend.to_host(out.x), a)
    plain.close()


def test_static_shapes_give_the_same_image(pipes: dict, tiny_export, cache: Path) -> None:
    static = load(tiny_export("sd15-tiny", "fp32"), OvBackend(precision="f32", cache_dir=cache, static_shapes=True))
    ref = image(pipes["sd15-tiny", "f32"])
    assert np.abs(image(static) - ref).max() <= 1
    assert np.abs(image(static, height=80, width=64) - image(pipes["sd15-tiny", "f32"], height=80, width=64)).max() <= 1
    static.close()


def test_model_cache_is_where_asked_and_not_in_the_export(tiny_export, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_export("sd15-tiny", "fp32")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    cache = tmp_path / "cache"
    p = load(folder, OvBackend(precision="f32", cache_dir=cache))
    p("a cat", steps=2, seed=0, height=64, width=64)
    p.close()
    blobs = list(cache.rglob("*.sdrt-blob"))
    assert len(blobs) >= 4  # text encoder, UNet, VAE decoder and encoder (and the step graph)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sdrt" / "openvino"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "sdrt" / "openvino"
    nocache = OvBackend(precision="f32", cache_dir=False)
    assert nocache.blobs is None and "CACHE_DIR" not in nocache.config


def test_missing_device_and_bad_options_are_refused(tiny_export) -> None:
    have = ov.Core().available_devices
    missing = next(d for d in ("NPU", "GPU", "HDDL") if d not in have)
    with pytest.raises(BackendUnavailable, match=rf"no '{missing}' device here \(it has: .*CPU") as e:
        OvBackend(device=missing)
    assert "--backend ort-cpu" in e.value.for_cli()
    with pytest.raises(InputError, match="precision 'fp8'"):
        OvBackend(precision="fp8")
    with pytest.raises(InputError, match="threads"):
        OvBackend(threads=0)
    be = OvBackend(precision="f32", cache_dir=False)
    with pytest.raises(ArtifactError, match="missing; re-export"):
        be.load(str(tiny_export("sd15-tiny", "fp32") / "nope" / "model.onnx"), "unet")
    if not HAS_BF16:
        with pytest.raises(BackendUnavailable, match="no bf16"):
            OvBackend(precision="bf16")
    assert OvBackend(precision="auto", cache_dir=False).precision == ("bf16" if HAS_BF16 else "f32")
    be.close()
    with pytest.raises(InputError, match="closed"):
        be.load(b"", "x")


def test_threads_are_passed_to_openvino(tiny_export) -> None:
    be = OvBackend(precision="f32", threads=1, cache_dir=False)
    e = be.load(str(tiny_export("sd15-tiny", "fp32") / "text_encoder" / "model.onnx"), "text_encoder")
    assert int(e._compiled[()].get_property("INFERENCE_NUM_THREADS")) == 1
    assert e._compiled[()].get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_bench_and_info_know_the_backend(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from sdrt.benchmarks.bench import backend_device, check_backends, unavailable_reason
    from sdrt.cli import main

    check_backends(["openvino", "ort-cpu"])  # no error
    assert backend_device("openvino") == "cpu"
    assert unavailable_reason("openvino", gpus=0) is None
    monkeypatch.delenv("SDRT_OPENVINO_CACHE_GB", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"openvino    yes (OpenVINO {ov.__version__.split('-')[0]}" in out
    assert f"model cache {default_cache_dir()}: " in out and "GB (the least recently used past 64 GB go)" in out


def test_info_shows_the_model_caches_use_and_bound(tiny_export, ov_cache_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main
    from sdrt.runtime.ov_blobs import SUFFIX

    with Pipeline.load(tiny_export("sd15-tiny", "fp32"), backend="openvino", precision="fp32"):
        pass  # closing waits for the blob writes
    size = sum(p.stat().st_size for p in ov_cache_home.iterdir() if p.name.endswith((SUFFIX, ".json")))
    assert size > 1e6
    monkeypatch.setenv("SDRT_OPENVINO_CACHE_GB", "2.5")
    assert main(["info"]) == 0
    assert f"model cache {ov_cache_home}: {size / 1e9:.1f} GB (the least recently used past 2.5 GB go)" in \
        capsys.readouterr().out
    monkeypatch.setenv("SDRT_OPENVINO_CACHE_GB", "none")
    assert main(["info"]) == 0  # a bad bound is said, not fatal to the report
    assert "SDRT_OPENVINO_CACHE_GB must be a number of GB above 0" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["sd15-inpaint-tiny", "sd15-tiny"])
def test_inpainting_runs_on_openvino_like_ort_cpu(tiny_export, cache: Path, preset: str) -> None:
    """A 9-channel inpainting UNet (the UNet predicts 4 of its 9 input channels) and 4-channel blending
    through OpenVINO's fixed-buffer loop: the ort-cpu images (which match diffusers) within a level."""
    from .helpers.inputs import image_and_mask

    folder = tiny_export(preset)
    img, mask = image_and_mask(96, 64)
    kw: dict[str, Any] = {"image": img, "mask_image": mask, "steps": 4, "seed": 1, "sampler": "dpmpp-2m"}
    with Pipeline.load(folder, backend="ort-cpu") as ref_pipe:
        ref = np.asarray(ref_pipe("a fox", **kw).images[0], np.int16)
    with load(folder, OvBackend(precision="f32", cache_dir=cache)) as ov_pipe:
        got = np.asarray(ov_pipe("a fox", **kw).images[0], np.int16)
    assert ref.shape == got.shape and np.abs(ref - got).max() <= 1 and ref.std() > 1


# -- the precision option through Pipeline.load, make_backend and the CLI ----------------------------------
@pytest.fixture()
def ov_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pipeline.load's openvino backend caches under $XDG_CACHE_HOME: a folder of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "sdrt" / "openvino"


def test_load_with_precision_fp32_matches_ort_cpu(pipes: dict, tiny_export, ov_cache_home: Path) -> None:
    with Pipeline.load(tiny_export("sd15-tiny", "fp32"), backend="openvino", precision="fp32") as p:
        assert p.backend.precision == "f32"
        assert p.engines["unet"]._compiled[()].get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
        got = image(p)
    assert np.abs(got - image(pipes["sd15-tiny", "ort-cpu"])).max() <= 1
    assert ov_cache_home.is_dir()  # the default cache, where the environment says


@needs_bf16
def test_load_with_precision_bf16_is_within_the_bf16_bound(pipes: dict, tiny_export, ov_cache_home: Path) -> None:
    from sdrt.export.onnx_export import IMAGE_LEVELS

    with Pipeline.load(tiny_export("sd15-tiny", "fp32"), backend="openvino", precision="bf16") as p:
        assert p.backend.precision == "bf16"
        diff = np.abs(image(p) - image(pipes["sd15-tiny", "ort-cpu"]))
    assert 0 < diff.max() <= IMAGE_LEVELS["bf16"]


def test_precision_is_refused_by_the_other_backends(tiny_export) -> None:
    folder = tiny_export("sd15-tiny", "fp32")
    with pytest.raises(InputError, match="sets the openvino backend's inference precision; the backend here is "
                                         "ort-cpu") as e:
        Pipeline.load(folder, backend="ort-cpu", precision="bf16")
    assert "--backend openvino" in e.value.for_cli()
    with pytest.raises(InputError, match="precision 'fp8'"):
        Pipeline.load(folder, backend="openvino", precision="fp8")


def test_generate_cli_precision(pipes: dict, tiny_export, tmp_path: Path, ov_cache_home: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from sdrt.cli import main

    folder = str(tiny_export("sd15-tiny", "fp32"))
    args = ["generate", folder, "--prompt", KW["prompt"], "--negative-prompt", KW["negative_prompt"], "--steps",
            str(KW["steps"]), "--seed", str(KW["seed"]), "--height", "64", "--width", "80"]
    out = tmp_path / "ov.png"
    assert main([*args, "--backend", "openvino", "--precision", "fp32", "-o", str(out)]) == 0
    assert "openvino, f32 inference" in capsys.readouterr().out
    got = np.asarray(Image.open(out).convert("RGB"), np.int16)
    assert np.abs(got - image(pipes["sd15-tiny", "ort-cpu"])).max() <= 1
    refused = tmp_path / "refused.png"
    assert main([*args, "--backend", "ort-cpu", "--precision", "bf16", "-o", str(refused)]) == 1
    err = capsys.readouterr().err
    assert "--precision sets the openvino backend's inference precision" in err and "--backend openvino" in err
    assert not refused.exists()
    with pytest.raises(SystemExit) as e:  # argparse: only the three names
        main([*args, "--precision", "fp8"])
    assert e.value.code == 2


def test_a_configured_backend_is_loaded_on_and_owned(tiny_export, cache: Path) -> None:
    """Pipeline.load(backend=OvBackend(...)): the pipeline runs on that backend, closes it with itself, and
    refuses the settings that only configure a backend it makes; the image is the named backend's."""
    folder = tiny_export("sd15-tiny", "fp32")
    be = OvBackend(precision="f32", cache_dir=cache)
    with pytest.raises(InputError, match="threads, precision configure the backend load\\(\\) makes"):
        Pipeline.load(folder, backend=be, threads=2, precision="bf16")
    with Pipeline.load(folder, backend=be) as pipe:
        assert pipe.backend is be
        got = image(pipe)
    assert be._closed
    with pytest.raises(InputError, match="closed"):
        be.load(str(folder / "unet" / "model.onnx"), "unet")
    with Pipeline.load(folder, backend="openvino", precision="fp32") as named:
        np.testing.assert_array_equal(got, image(named))


def test_sdrt_serve_takes_openvinos_precision(tiny_export) -> None:
    """create_app(..., backend="openvino", precision=...) (``sdrt serve --precision``) loads the pipeline that
    Pipeline.load(precision=...) loads: the served image is that pipeline's."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    folder = tiny_export("sd15-tiny", "fp32")
    app = create_app(folder, backend="openvino", precision="fp32", max_steps=4, warmup=False)
    with LiveServer(app) as s:
        r = httpx.post(f"{s.url}/v1/images/generations", timeout=120,
                       json={"prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json",
                             "steps": 3, "seed": 4})
        assert r.status_code == 200, r.text
        got = pixels(r.json()["data"][0]["b64_json"])
    with Pipeline.load(folder, backend="openvino", precision="fp32") as ref:
        want = np.asarray(ref("a lighthouse", steps=3, seed=4, height=64, width=64).images[0])
    np.testing.assert_array_equal(got, want)


def test_the_probe_times_whole_images_dynamic_against_static(tiny_export, tmp_path: Path) -> None:
    """``python -m sdrt.benchmarks.ov_probe --image-rounds``: images alternate between the two pipelines, each
    image with the other processes' share; the two give the same image; the ratio is of the recorded medians."""
    import json

    from sdrt.benchmarks import ov_probe

    out = tmp_path / "probe.json"
    assert ov_probe.main([str(tiny_export("sd15-tiny", "fp32")), "--size", "64", "--steps", "2", "--skip-loop",
                          "--skip-static", "--image-rounds", "2", "--precision", "f32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["image_static_vs_dynamic"]
    assert [(i["round"], i["shapes"]) for i in res["images"]] == [(1, "dynamic"), (1, "static"), (2, "dynamic"),
                                                                  (2, "static")]
    assert res["image_max_abs_diff"] <= 1
    quiet = {k: sorted(i["total_ms"] for i in res["images"] if i["shapes"] == k and not i["busy"])
             for k in ("dynamic", "static")}
    if quiet["dynamic"] and quiet["static"]:  # on a busy host every image may be flagged: then no ratio
        assert res["median_total_ms"]["dynamic"] == pytest.approx(float(np.median(quiet["dynamic"])))
        assert res["static_over_dynamic"] == pytest.approx(res["median_total_ms"]["static"]
                                                           / res["median_total_ms"]["dynamic"])
    else:
        assert res["static_over_dynamic"] is None
    assert res["busy_images"] == sum(i["busy"] for i in res["images"])


def test_static_shapes_from_load_and_the_server(tiny_export, pipes: dict) -> None:
    """``Pipeline.load(..., static_shapes=True)`` and ``sdrt serve --static-shapes`` (ServeConfig) compile per
    shape on openvino with the dynamic pipeline's images; another backend refuses the setting by name."""
    folder = tiny_export("sd15-tiny", "fp32")
    with Pipeline.load(folder, backend="openvino", precision="fp32", static_shapes=True) as pipe:
        assert pipe.backend.static_shapes
        assert np.abs(image(pipe) - image(pipes["sd15-tiny", "f32"])).max() <= 1
    with pytest.raises(InputError, match="static_shapes compiles the openvino backend's graphs per shape; the "
                                         "backend here is ort-cpu"):
        Pipeline.load(folder, backend="ort-cpu", static_shapes=True)
    pytest.importorskip("fastapi")
    import argparse

    from sdrt.commands import serve as serve_command
    from sdrt.serve import create_app
    from sdrt.serve.live import LiveServer

    parser = argparse.ArgumentParser()
    serve_command.register(parser)
    assert serve_command.config_from(parser.parse_args([str(folder), "--static-shapes"])).static_shapes
    from sdrt.cli import main

    # another backend is refused before the server starts: a non-zero exit naming the flag
    assert main(["serve", str(folder), "--backend", "ort-cpu", "--static-shapes"]) == 1
    app = create_app(folder, backend="openvino", precision="fp32", static_shapes=True, warmup=False)
    with LiveServer(app):
        assert app.state.serve.pipeline().backend.static_shapes


def test_serve_names_what_auto_picks_before_refusing_openvino_settings(
        tiny_export, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend auto`` with openvino's settings on a machine where auto picks another backend (here: no
    OpenVINO, no GPU) is refused before the server starts, naming the backend auto picked."""
    pytest.importorskip("fastapi")
    from sdrt.cli import main
    from sdrt.runtime import ov_backend

    folder = tiny_export("sd15-tiny", "fp32")
    monkeypatch.setattr(ov_backend, "available", lambda: False)
    for flags, named in ((["--static-shapes"], "--static-shapes"), (["--precision", "fp32"], "--precision")):
        assert main(["serve", str(folder), *flags]) == 1
        err = capsys.readouterr().err
        assert named in err and "--backend auto (here: ort-cpu)" in err and "use --backend openvino" in err


def hint(engine: Any) -> Any:
    """The inference precision an engine's graph was compiled at."""
    return engine._compiled[()].get_property("INFERENCE_PRECISION_HINT")


@needs_bf16
def test_text_encoders_compile_at_f32_in_bf16_mode(pipes: dict) -> None:
    """A bf16 backend compiles the text encoders at f32 (loaded exact) and the rest at bf16, and says so."""
    for preset, encoders in (("sd15-tiny", {"text_encoder"}), ("sdxl-tiny", {"text_encoder", "text_encoder_2"})):
        p = pipes[preset, "bf16"]
        got = {n: hint(e) for n, e in p.engines.items()}
        assert {n for n, h in got.items() if h == ov.Type.f32} == encoders, got
        assert got["unet"] == got["vae_decoder"] == ov.Type.bf16
        assert f"on CPU, bf16 ({', '.join(sorted(encoders))} at f32)" in p.backend.describe()
    # an f32 backend names nothing: every graph is at f32 already
    assert "at f32" not in pipes["sd15-tiny", "f32"].backend.describe()


@needs_bf16
def test_t5_stays_at_f32_precision_in_bf16_mode(flux_export, tmp_path: Path) -> None:
    """FLUX.1's T5 on a bf16 backend matches ONNX Runtime's fp32 run of its graph (the export's gate checks that
    one against PyTorch) to f32's precision, where the same graph compiled in OpenVINO's bf16 mode is not; its
    exact blob is cached apart from the bf16 ones and mapped on the next load."""
    import onnxruntime as ort

    folder = flux_export("flux-schnell-tiny")
    path = folder / "text_encoder_2" / "model.onnx"
    ids = np.random.default_rng(0).integers(0, 32, size=(2, 16)).astype(np.int32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ref = sess.run(None, {name: ids})[0]

    def rel(got: np.ndarray) -> float:
        return float(np.abs(got - ref).max() / np.abs(ref).max())

    lowered = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    assert rel(np.asarray(lowered({name: ids})[0])) > 1e-3  # what bf16 mode would do to it
    cache = tmp_path / "ov-cache"
    for round_ in ("compiled", "mapped"):
        backend = OvBackend(precision="bf16", cache_dir=cache)
        with Pipeline.load(folder, backend=backend) as pipe:
            t5 = pipe.engines["text_encoder_2"]
            assert hint(t5) == ov.Type.f32 and hint(pipe.engines["unet"]) == ov.Type.bf16
            out = backend.to_host(t5({name: backend.to_device(ids)})[next(iter(t5.outputs))])
            assert rel(out) <= 1e-4
            assert dict(backend.compiles)["text_encoder_2"] == round_
            backend.settle()
        backend.close()
