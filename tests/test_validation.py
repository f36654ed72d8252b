"""Every request is checked before the first engine runs; what a person reads says what happened.

API cases check the exception type and message; CLI cases (in-process ``sdrt.cli.main``) the exit code,
the message (the problem and the fix), and the file system afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sdrt.cli import main
from sdrt.runtime.errors import CompatibilityError, DeviceMemoryError, InputError
from sdrt.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def sd15(tiny_export) -> Path:
    return tiny_export("sd15-tiny", "fp32")


@pytest.fixture(scope="module")
def pipe(sd15: Path) -> Pipeline:
    return Pipeline.load(sd15, backend="ort-cpu")


@pytest.fixture
def ran(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the pipeline's engines that ran, in order."""
    calls: list[str] = []
    for name, engine in pipe.engines.items():
        def spy(feeds, _run=engine.run, _name=name):
            calls.append(_name)
            return _run(feeds)

        monkeypatch.setattr(engine, "run", spy)
    return calls


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """For CLI cases: records any generation the command starts (none should)."""
    started: list[object] = []
    real = Pipeline.generate

    def record(self, request, **kw):
        started.append(request)
        return real(self, request, **kw)

    monkeypatch.setattr(Pipeline, "generate", record)  # __call__ goes through generate too
    return started


def _cli(sd15: Path, *extra: str) -> int:
    return main(["generate", str(sd15), "--prompt", "a cat", "--steps", "2", "--backend", "ort-cpu", *extra])


# -- sizes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, shown", [
    ({"height": 0}, "height 0"), ({"width": 0}, "width 0"), ({"height": -64}, "height -64"),
    ({"width": 100}, "width 100"), ({"height": True}, "height True"), ({"height": 64.0}, "height 64.0"),
])
def test_size_zero_negative_or_odd_is_an_error(pipe: Pipeline, ran: list[str], kwargs: dict, shown: str) -> None:
    with pytest.raises(InputError, match=f"{shown} is not supported: use a multiple of 8 between 64 and 2048"):
        pipe("a cat", steps=2, **kwargs)
    assert ran == []


def test_img2img_size_follows_the_txt2img_rule(pipe: Pipeline, ran: list[str]) -> None:
    img = np.full((100, 100, 3), 128, np.uint8)
    with pytest.raises(InputError, match="height 100 is not supported"):
        pipe("a cat", image=img, height=100, steps=2)
    assert ran == []
    # no size given: the image's own size, rounded down to a multiple of 8 (as diffusers does)
    assert pipe("a cat", image=img, steps=2, seed=0).images[0].size == (96, 96)


def test_cli_height_zero(sd15: Path, tmp_path: Path, capsys, no_generation) -> None:
    out = tmp_path / "x.png"
    assert _cli(sd15, "--height", "0", "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "--height 0 is not supported" in err and "leave it out for the default (64)" in err
    assert not out.exists() and os.listdir(tmp_path) == []


# -- guidance ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("g", [float("nan"), float("inf"), -float("inf"), 1e30, 100.5, -1.0, "7"])
def test_guidance_must_be_finite_and_in_range(pipe: Pipeline, ran: list[str], g: object) -> None:
    with pytest.raises(InputError, match="guidance_scale must be a finite number from 0 to 100"):
        pipe("a cat", steps=2, guidance_scale=g)
    assert ran == []


def test_guidance_range_ends_are_accepted(pipe: Pipeline) -> None:
    for g in (0.0, 100.0):
        assert pipe("a cat", steps=2, guidance_scale=g, seed=0).nonfinite == [False]


def test_cli_guidance_inf(sd15: Path, tmp_path: Path, capsys, no_generation) -> None:
    out = tmp_path / "x.png"
    assert _cli(sd15, "--guidance", "inf", "-o", str(out)) == 1
    assert "--guidance must be a finite number from 0 to 100" in capsys.readouterr().err
    assert not out.exists()


# -- seeds ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "1"])
def test_seed_out_of_range_is_an_error(pipe: Pipeline, ran: list[str], seed: object) -> None:
    with pytest.raises(InputError, match="seed must be an integer from 0 to 4294967295"):
        pipe("a cat", steps=2, seed=seed)
    assert ran == []


def test_random_seed_is_returned_and_reproduces_the_image(pipe: Pipeline) -> None:
    first = pipe("a cat", steps=2, sampler="euler-a")  # ancestral: every step draws from the seed too
    assert 0 <= first.seed < 2**32
    again = pipe("a cat", steps=2, sampler="euler-a", seed=first.seed)
    assert again.seed == first.seed
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert pipe("a cat", steps=2, seed=2**32 - 1).seed == 2**32 - 1


def test_cli_prints_the_seed_used_and_it_reproduces(sd15: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert _cli(sd15, "-o", str(a)) == 0
    seed = int(re.search(r"^seed (\d+)$", capsys.readouterr().out, re.MULTILINE).group(1))
    assert _cli(sd15, "--seed", str(seed), "-o", str(b)) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_cli_seed_minus_one(sd15: Path, tmp_path: Path, capsys, no_generation) -> None:
    out = tmp_path / "x.png"
    assert _cli(sd15, "--seed", "-1", "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "--seed must be an integer from 0 to 4294967295, got -1" in err and "leave --seed out" in err
    assert "Traceback" not in err and not out.exists()


# -- strength ---------------------------------------------------------------------------------------

def test_strength_without_image_is_an_error(pipe: Pipeline, ran: list[str]) -> None:
    with pytest.raises(InputError, match=r"strength applies to img2img only: pass image=\.\.\."):
        pipe("a cat", steps=2, strength=0.5)
    assert ran == []


def test_cli_strength_without_init_image(sd15: Path, tmp_path: Path, capsys, no_generation) -> None:
    out = tmp_path / "x.png"
    assert _cli(sd15, "--strength", "0.5", "-o", str(out)) == 1
    assert "--strength applies to img2img only: pass --init-image" in capsys.readouterr().err
    assert no_generation == [] and not out.exists()


def test_img2img_strength_defaults_to_0_8(pipe: Pipeline) -> None:
    img = np.full((64, 64, 3), 128, np.uint8)
    a = np.asarray(pipe("a cat", image=img, steps=5, seed=3).images[0])
    b = np.asarray(pipe("a cat", image=img, steps=5, seed=3, strength=0.8).images[0])
    c = np.asarray(pipe("a cat", image=img, steps=5, seed=3, strength=0.4).images[0])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# -- the output path --------------------------------------------------------------------------------

def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new files even to root
        return Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist; create it first"),
    ("unwritable", "cannot write to"),
    ("folder", "is a folder; give a file name"),
    ("xyz", "unknown image extension '.xyz'; end the name in one of .png"),
    ("bare", "no image extension ''"),
])
def test_cli_output_path_checked_first(sd15: Path, tmp_path: Path, capsys, no_generation,
                                       case: str, message: str) -> None:
    out = {"missing": tmp_path / "nope" / "x.png", "unwritable": _unwritable(tmp_path) / "x.png",
           "folder": tmp_path / "dir.png", "xyz": tmp_path / "x.xyz", "bare": tmp_path / "x"}[case]
    if case == "folder":
        out.mkdir()
    before = sorted(os.listdir(out.parent)) if out.parent.is_dir() else None
    assert _cli(sd15, "--seed", "1", "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert no_generation == []
    assert (sorted(os.listdir(out.parent)) if out.parent.is_dir() else None) == before
    assert not out.is_file()


def test_cli_output_replaces_the_named_file_atomically(sd15: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "img.png"
    out.write_bytes(b"old")
    assert _cli(sd15, "--seed", "1", "--batch-size", "2", "-o", str(out)) == 0
    assert sorted(os.listdir(tmp_path)) == ["img.png", "img_1.png", "img_2.png"]  # no temporary left behind
    assert out.read_bytes() == b"old"  # a batch writes _1, _2: the named file is not touched
    assert _cli(sd15, "--seed", "1", "-o", str(out)) == 1  # an existing file needs --overwrite
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert _cli(sd15, "--seed", "1", "-o", str(out), "--overwrite") == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(os.listdir(tmp_path)) == [
        "img.png", "img_1.png", "img_2.png"]


# -- memory -----------------------------------------------------------------------------------------

def _ort_alloc_failure(kind: str = "RuntimeException") -> Exception:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return getattr(state, kind)(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
        "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* "
        "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool) Failed to allocate memory for requested "
        "buffer of size 274877906944")


@pytest.mark.parametrize("kind", ["RuntimeException", "Fail"])
def test_ort_allocation_failure_says_what_to_lower(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch,
                                                   kind: str) -> None:
    session = pipe.engines["unet"].session

    def fail(*a, **kw):
        raise _ort_alloc_failure(kind)

    monkeypatch.setattr(session, "run", fail)
    with pytest.raises(DeviceMemoryError) as info:
        pipe("a cat", steps=2, height=64, width=128, batch_size=2)
    msg = str(info.value)
    assert "128x64, 2 images, guided" in msg and "unet: ort-cpu could not allocate memory" in msg
    assert "one buffer of 256.0 GiB could not be allocated" in msg  # 274877906944 / 2**30
    assert "Lower height and width" in msg and "batch_size" in msg and "guidance_scale=1" in msg
    assert "--batch-size" in info.value.for_cli() and "--guidance 1" in info.value.for_cli()
    monkeypatch.undo()
    assert len(pipe("a cat", steps=2, seed=0).images) == 1  # still usable


def test_any_backends_memory_error_gets_the_request(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT raises DeviceMemoryError itself (a failed cudaMalloc): the pipeline adds the request."""
    def fail(feeds):
        raise DeviceMemoryError("vae_decoder: cudaMalloc of 3.0 GiB failed (cudaErrorMemoryAllocation)")

    monkeypatch.setattr(pipe.engines["vae_decoder"], "run", fail)
    with pytest.raises(DeviceMemoryError, match="64x64, 1 image does not fit in ort-cpu's memory") as info:
        pipe("a cat", steps=2, guidance_scale=1.0)
    assert "cudaMalloc of 3.0 GiB failed" in str(info.value) and "GiB of weights" in str(info.value)


def test_cli_memory_error_exit_1_and_no_file(sd15: Path, tmp_path: Path, capsys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from sdrt.runtime import ort_backend

    real = ort_backend.OrtEngine.__init__

    def init(self, backend, path, name):
        real(self, backend, path, name)
        if name == "unet":
            def fail(*a, **kw):
                raise _ort_alloc_failure()

            self.session.run = fail

    monkeypatch.setattr(ort_backend.OrtEngine, "__init__", init)
    out = tmp_path / "big.png"
    assert _cli(sd15, "--height", "2048", "--width", "2048", "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert "2048x2048, 1 image, guided" in err and "Lower --height and --width" in err and "--guidance 1" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


# -- an engine folder on ONNX Runtime -----------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_folder(sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `sdrt build` writes, without TensorRT: engine files, sdrt.json pointing at them, the manifest."""
    from sdrt.runtime.engine_manifest import EngineManifest, ProfileShapes
    from sdrt.runtime.manifest import ExportManifest

    folder = tmp_path_factory.mktemp("engines") / "sd15-trt"
    folder.mkdir()
    for item in ("tokenizer", "scheduler"):
        shutil.copytree(sd15 / item, folder / item)
    man = ExportManifest.read(sd15)
    comps = {}
    for name, comp in man.components.items():
        (folder / f"{name}.engine").write_bytes(b"\x00not-onnx" * 64)
        comps[name] = replace(comp, path=f"{name}.engine", variants={})
    replace(man, components=comps, kind="tensorrt").write(folder)
    prof = ProfileShapes((1, 1, 1), (64, 64, 64), (64, 64, 64))
    EngineManifest("custom", prof, (), str(sd15.resolve()), f"sdrt build {sd15} --out {folder}").write(folder)
    return folder


@pytest.mark.parametrize("backend", ["ort-cpu", "ort-cuda", "openvino"])
def test_engine_folder_on_onnx_runtime_names_the_way_out(engine_folder: Path, sd15: Path, backend: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sdrt.runtime import ort_backend

    loaded: list[str] = []
    monkeypatch.setattr(ort_backend.OrtBackend, "load", lambda self, path, name: loaded.append(name))
    with pytest.raises(CompatibilityError) as info:
        Pipeline.load(engine_folder, backend=backend)
    msg = str(info.value)
    assert f"{engine_folder} is a TensorRT engine folder (made by `sdrt build`)" in msg
    assert 'backend="tensorrt"' in msg and f"{sd15.resolve()} with backend={backend!r}" in msg
    assert loaded == []


def test_cli_engine_folder_on_ort_cpu(engine_folder: Path, sd15: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    assert main(["generate", str(engine_folder), "--prompt", "a", "--backend", "ort-cpu", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "TensorRT engine folder" in err and "use --backend tensorrt" in err
    assert f"pass the ONNX export it was built from, {sd15.resolve()} with --backend ort-cpu" in err
    assert "Protobuf" not in err and not out.exists()


# -- what a person reads ------------------------------------------------------------------------------

def test_timing_rows_add_up_to_the_total(sd15: Path, tmp_path: Path, capsys) -> None:
    """A fresh load: the first call pays session warm-up that no stage measures."""
    assert _cli(sd15, "--seed", "1", "-o", str(tmp_path / "x.png")) == 0
    out = capsys.readouterr().out
    table = out[out.index("stage "):].splitlines()
    rows = {line[:-10].strip(): float(line[-10:]) for line in table[1:] if not line.startswith(("it/s", "denoising loop"))}
    total = rows.pop("total")
    rows.pop("per UNet step (median)")
    assert set(rows) == {"text encoding", "denoising (2 steps)", "VAE decode", "other (warm-up, uploads, host)"}
    assert abs(sum(rows.values()) - total) <= 0.05 * (len(rows) + 1), (rows, total)


def test_cli_warning_is_one_plain_line_after_the_bar(sd15: Path, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = Pipeline.finish

    def nan_latents(self, latents, output):  # NaN reaching the VAE: the non-finite warning
        return real(self, np.full((1, 4, 8, 8), np.nan, np.float32), output)

    monkeypatch.setattr(Pipeline, "finish", nan_latents)
    assert _cli(sd15, "--seed", "1", "-o", str(tmp_path / "x.png")) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith("warning: 1 of 1 images decoded to NaN/inf"), err
    assert "warnings.warn" not in err and "RuntimeWarning" not in err and "pipeline.py" not in err
    assert err.rindex("warning: ") > err.rindex("denoising")  # after the bar


def test_demo_help_documents_every_option(capsys) -> None:
    from sdrt.commands import demo

    p = argparse.ArgumentParser()
    demo.register(p)
    undocumented = [a.option_strings for a in p._actions if a.option_strings and not a.help]
    assert undocumented == []
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS denoising steps" in text and "--size SIZE image height and width" in text


def test_image_parity_line_says_levels() -> None:
    from sdrt.export.onnx_export import parity_line
    from sdrt.runtime.manifest import Parity

    image = Parity(reference="t", max_abs_err=1.0, rel_err=1 / 255, bound=1.5 / 255)
    line = parity_line(image, "fp32")
    assert line.startswith("image parity 1 of 255 levels, bound 1 level (3.9e-03 of full scale, bound 6e-03")
    assert "the 1e-04 bound is for float outputs" in line
    assert parity_line(Parity("t", 2e-7, 1e-6, 1e-4), "fp32") == (
        "parity rel err 1.00e-06 (bound 1e-04), max abs 2.00e-07")


def test_real_allocation_failure_under_a_memory_limit(sd15: Path) -> None:
    """ONNX Runtime's own failure, not a fake: 2048x2048 under a 4 GiB address-space limit."""
    import subprocess
    import sys

    resource = pytest.importorskip("resource")
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, ({4 << 30}, {4 << 30}))
from sdrt.runtime.errors import DeviceMemoryError
from sdrt.runtime.pipeline import Pipeline
pipe = Pipeline.load({str(sd15)!r}, backend="ort-cpu", threads=1)
try:
    pipe("a", height=2048, width=2048, steps=1, seed=0)
except DeviceMemoryError as e:
    print("DeviceMemoryError:", e)
"""
    if not hasattr(resource, "RLIMIT_AS"):
        pytest.skip("no address-space limit on this platform")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("DeviceMemoryError: 2048x2048, 1 image, guided"), out.stdout + out.stderr[-2000:]
    assert "Lower height and width" in out.stdout
