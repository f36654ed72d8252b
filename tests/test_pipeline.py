"""The runtime pipeline's contract beyond image parity: errors, leanness, long prompts, threads, CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd15(tiny_export) -> Path:
    return tiny_export("sd15-tiny", "fp32")


@pytest.fixture(scope="module")
def pipe(sd15: Path) -> Pipeline:
    return Pipeline.load(sd15, backend="ort-cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 100}, "multiple of 8"),
        ({"width": 4096}, "between 64 and 2048"),
        ({"batch_size": 17}, "1..16"),
        ({"sampler": "plms"}, "ddim"),
        ({"steps": 0}, "steps"),
        ({"latents": np.zeros((1, 4, 3, 3), np.float32)}, "expected (1, 4, 8, 8)"),
        ({"negative_prompt": ["a", "b", "c"], "batch_size": 2}, "negative prompts"),
    ],
)
def test_bad_input_is_named_and_pipeline_survives(pipe: Pipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe("a cat", steps=kwargs.pop("steps", 2), **kwargs)
    assert len(pipe("a cat", steps=2, seed=0).images) == 1  # still usable


def test_img2img_strength_out_of_range(pipe: Pipeline) -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    for strength in (0.0, 1.5):
        with pytest.raises(InputError, match="strength"):
            pipe("a", image=img, strength=strength, steps=4)


def test_seed_is_deterministic_and_matters(pipe: Pipeline) -> None:
    a = np.asarray(pipe("a cat", steps=3, seed=1).images[0])
    b = np.asarray(pipe("a cat", steps=3, seed=1).images[0])
    c = np.asarray(pipe("a cat", steps=3, seed=2).images[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_long_prompt_is_chunked_not_an_error(pipe: Pipeline) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))  # far beyond 77 tokens
    ids = pipe.tokenizers[0].encode_chunks([long_prompt])
    assert ids.shape[1] >= 3
    short = np.asarray(pipe("word0", steps=2, seed=0).images[0])
    long_ = np.asarray(pipe(long_prompt, steps=2, seed=0).images[0])
    assert long_.shape == short.shape and not np.array_equal(short, long_)
    # the tail of a long prompt is not dropped: changing only the last word changes the image
    other = np.asarray(pipe(long_prompt[:-5] + "zebra", steps=2, seed=0).images[0])
    assert not np.array_equal(long_, other)


def test_nan_latents_are_refused_before_any_work(pipe: Pipeline) -> None:
    bad = np.full((1, 4, 8, 8), np.nan, np.float32)
    with pytest.raises(InputError, match="latents hold NaN or inf values: pass finite noise"):
        pipe("a", steps=2, latents=bad)


def test_nan_reaching_an_fp32_vae_warns_with_the_cause(pipe: Pipeline) -> None:
    """Latents that turn non-finite in the UNet (here: given straight to decode) reach the fp32 VAE: the
    warning says where to look, not to re-export the VAE."""
    with pytest.warns(RuntimeWarning, match="VAE runs in fp32, so the latents reaching it were not finite"):
        _, nonfinite = pipe.decode(np.full((1, 4, 8, 8), np.nan, np.float32))
    assert nonfinite == [True]


def test_nan_from_an_fp16_vae_names_the_vae_fix(tiny_export) -> None:
    with Pipeline.load(tiny_export("sd15-tiny", "fp16"), backend="ort-cpu") as fp16:
        assert fp16.engines["vae_decoder"].inputs["latent_sample"].dtype == np.float16
        with pytest.warns(RuntimeWarning, match="fp16 VAE overflows.*--vae-fp32"):
            _, nonfinite = fp16.decode(np.full((1, 4, 8, 8), np.nan, np.float16))
    assert nonfinite == [True]


def test_threads_get_the_same_images(pipe: Pipeline) -> None:
    want = np.asarray(pipe("a lake", steps=3, seed=5).images[0])
    got: list[np.ndarray] = []

    def work() -> None:
        got.append(np.asarray(pipe("a lake", steps=3, seed=5).images[0]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and all(np.array_equal(g, want) for g in got)


def test_text_stage_is_built_once_from_many_threads(sd15: Path, pipe: Pipeline,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``conditioning_key`` (a server's batch key: several threads, no pipeline lock) from 6 threads at once on a
    fresh pipeline builds its text stage once, and every thread gets the same key. Each construction waits (up
    to 2 s) for all 6 threads to be inside one, so an unguarded build is caught every time, not by chance."""
    from sdrt.runtime import pipeline as pipeline_module

    want = pipe.conditioning_key(["a lake"], None, 7.5)  # another pipeline of the same export, built alone
    real = pipeline_module.TextConditioning
    built: list[object] = []
    cond = threading.Condition()
    n = 6

    def counted(*args: object, **kw: object) -> object:
        with cond:
            built.append(None)
            cond.notify_all()
            cond.wait_for(lambda: len(built) >= n, timeout=2)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline_module, "TextConditioning", counted)
    with Pipeline.load(sd15, backend="ort-cpu") as fresh:
        keys: list[object] = []
        barrier = threading.Barrier(n)

        def work() -> None:
            barrier.wait()
            keys.append(fresh.conditioning_key(["a lake"], None, 7.5))

        threads = [threading.Thread(target=work) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(built) == 1
        assert keys == [want] * n



def test_closed_pipeline_builds_no_text_stage(sd15: Path) -> None:
    """A batch key asked of a closed pipeline (a server thread racing its shutdown) is refused by name; the closed
    pipeline does not build its text stage again over released engines."""
    fresh = Pipeline.load(sd15, backend="ort-cpu")
    fresh.conditioning_key(["a lake"], None, 7.5)
    fresh.close()
    with pytest.raises(InputError, match="was closed"):
        fresh.conditioning_key(["a lake"], None, 7.5)
    assert fresh._text is None

def test_missing_and_corrupt_files(sd15: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="sdrt export"):
        Pipeline.load(tmp_path, backend="ort-cpu")
    broken = tmp_path / "broken"
    shutil.copytree(sd15, broken)
    (broken / "unet" / "model.onnx_data").unlink()
    with pytest.raises(ArtifactError, match="unet"):
        Pipeline.load(broken, backend="ort-cpu")
    shutil.rmtree(broken)
    shutil.copytree(sd15, broken)
    data = (broken / "vae_decoder" / "model.onnx").read_bytes()
    (broken / "vae_decoder" / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="corrupt"):
        Pipeline.load(broken, backend="ort-cpu")


def test_artifacts_of_another_family(tiny_export, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_export("sd15-tiny", "fp32"), mixed)
    shutil.rmtree(mixed / "unet")
    shutil.copytree(tiny_export("sdxl-tiny", "fp32") / "unet", mixed / "unet")
    with pytest.raises(ArtifactError, match="different models or families"):
        Pipeline.load(mixed, backend="ort-cpu")
    man = json.loads((mixed / "sdrt.json").read_text())
    man["family"] = "sdxl"
    (mixed / "sdrt.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="text_encoder_2"):
        Pipeline.load(mixed, backend="ort-cpu")


def test_unknown_and_absent_backends(sd15: Path) -> None:
    from sdrt.runtime.errors import BackendUnavailable

    with pytest.raises(InputError, match="ort-cpu"):
        Pipeline.load(sd15, backend="cuda")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        Pipeline.load(sd15, backend="ort-cuda")
    with pytest.raises(InputError, match="cuda_graph needs a GPU backend"):
        Pipeline.load(sd15, backend="ort-cpu", cuda_graph=True)


def test_runtime_imports_no_torch(sd15: Path) -> None:
    code = f"""
import sys
import sdrt
from sdrt.runtime.pipeline import Pipeline
pipe = Pipeline.load({str(sd15)!r}, backend="ort-cpu")
pipe("a cat", steps=2, seed=0).images[0].save("/dev/null", format="png")
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_cli_generate_and_demo(sd15: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "img.png"
    assert main(["generate", str(sd15), "--prompt", "a cat", "--steps", "3", "--seed", "1",
                 "--backend", "ort-cpu", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "per UNet step" in printed and "denoising loop: engines run step by step" in printed
    assert main(["generate", str(sd15), "--prompt", "a", "--backend", "ort-cpu", "--cuda-graph", "-o",
                 str(tmp_path / "no.png")]) == 1
    assert "cuda_graph needs a GPU backend" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
    # a new -o: an existing one is refused first (it needs --overwrite)
    assert main(["generate", str(sd15), "--prompt", "a", "--height", "100", "-o", str(tmp_path / "h.png")]) == 1
    assert "multiple of 8" in capsys.readouterr().err and not (tmp_path / "h.png").exists()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--preset", "sd15-tiny", "--steps", "3", "--size", "64"]) == 0
    assert (tmp_path / "demo" / "demo.png").is_file()
    printed = capsys.readouterr().out
    assert "it/s" in printed
    # the decoder's parity is in image levels, not the float bound (1e-4) the README gives for fp32 graphs
    assert re.search(r"vae_decoder: image parity \d of 255 levels, bound 1 level \(", printed), printed


def test_engine_profile_range_checked_before_work(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """With TensorRT engines, the build profile (narrower than the export) is checked up front."""
    from sdrt.runtime.engine_manifest import ProfileShapes

    profile = ProfileShapes((1, 1, 2), (64, 64, 128), (64, 64, 128), (1, 1, 1), True)
    monkeypatch.setattr(pipe.backend, "check_request",
                        lambda b, h, w, guided: profile.check_request(b, h, w, guided=guided))
    with pytest.raises(InputError, match=r"height 192 \(engines take 64..128\)"):
        pipe("a", height=192, steps=2)
    with pytest.raises(InputError, match="batch 3"):
        pipe("a", batch_size=3, steps=2)
    assert len(pipe("a", height=128, steps=2).images) == 1


def test_sdxl_fp16_unet_with_fp32_vae_tracks_fp32(tiny_export) -> None:
    """SDXL's real layout: fp16 UNet, fp32 VAE (cast once before decoding). The fp32 pipeline is the
    reference here; it matches diffusers (test_pipeline_parity)."""
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    imgs = {}
    for precision in ("fp32", "fp16"):
        pipe = Pipeline.load(tiny_export("sdxl-tiny", precision), backend="ort-cpu")
        assert pipe.engines["vae_decoder"].inputs["latent_sample"].dtype == np.float32
        res = pipe("a castle", steps=6, latents=lat, sampler="euler")
        assert res.nonfinite == [False]
        imgs[precision] = np.asarray(res.images[0]).astype(np.int32)
    diff = np.abs(imgs["fp16"] - imgs["fp32"])
    # measured: mean 0.03, max 1 level; other latents give a mean difference of about 50
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def test_info_lists_backends_and_every_tensorrt_module(tiny_export, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import onnxruntime

    folder = tiny_export("sd15-tiny")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"ort-cpu     yes (onnxruntime {onnxruntime.__version__})" in out
    assert f"{folder}: sd15-tiny (sd1, epsilon)" in out and "unet" in out
    for name in ("tensorrt_rtx_bindings", "tensorrt_lean_bindings"):
        if importlib.util.find_spec(name) is not None:  # the [trt-api] extra
            assert name in out
    # with no TensorRT module at all, the line says how to install it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorrt") else real(name, *a))
    assert main(["info"]) == 0
    assert "tensorrt    no: pip install tensorrt --extra-index-url https://pypi.nvidia.com" in capsys.readouterr().out


def test_img2img_without_a_vae_encoder_is_named_before_work(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    engines = {k: v for k, v in pipe.engines.items() if k != "vae_encoder"}
    monkeypatch.setattr(pipe, "engines", engines)
    ran = []
    monkeypatch.setitem(engines, "text_encoder", lambda feeds: ran.append(feeds))
    with pytest.raises(ArtifactError, match="no VAE encoder, which img2img needs"):
        pipe("a", image=np.zeros((64, 64, 3), np.uint8), steps=2)
    assert ran == []  # refused before the first engine ran


def test_a_backend_made_by_the_caller(sd15: Path, tmp_path: Path) -> None:
    """Pipeline.load(backend=OrtBackend(...)): the same image as the named backend; the pipeline closes it;
    an engine folder is refused for an ONNX Runtime backend, and an ONNX export for a TensorRT one, before
    any engine loads."""
    from sdrt.runtime.errors import CompatibilityError
    from sdrt.runtime.ort_backend import OrtBackend

    be = OrtBackend("cpu", threads=1)
    with Pipeline.load(sd15, backend=be) as pipe:
        got = np.asarray(pipe("a boat", steps=2, seed=4).images[0])
    assert be.closed
    with Pipeline.load(sd15, backend="ort-cpu", threads=1) as named:
        np.testing.assert_array_equal(got, np.asarray(named("a boat", steps=2, seed=4).images[0]))
    with pytest.raises(InputError, match="device_id configure the backend"):
        Pipeline.load(sd15, backend=OrtBackend("cpu"), device_id=1)
    fake_engines = tmp_path / "engines"
    fake_engines.mkdir()
    (fake_engines / "sdrt-engines.json").write_text("{}")
    with pytest.raises(CompatibilityError, match="TensorRT engine folder .* ort-cpu cannot run"):
        Pipeline.load(fake_engines, backend=OrtBackend("cpu"))
    trt_like = OrtBackend("cpu")
    trt_like.name = "tensorrt"
    with pytest.raises(CompatibilityError, match="is an ONNX export; the tensorrt backend runs engine folders"):
        Pipeline.load(sd15, backend=trt_like)
