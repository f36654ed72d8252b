"""The TensorRT build: what runs without TensorRT here (plans, cache keys, rebuild commands, the CLI,
the missing-TensorRT error), a type check of the TensorRT code against the TensorRT 10 stubs, and the
real build, which skips unless TensorRT and a GPU are present."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdrt.export.profiles import custom_profile, load_profile
from sdrt.export.trt_build import BuildOptions, load_tensorrt, plan_engines, rebuild_command
from sdrt.runtime.engine_manifest import EngineEnv
from sdrt.runtime.errors import BackendUnavailable, InputError
from sdrt.runtime.text_join import join_graph_bytes

ROOT = Path(__file__).resolve().parents[1]
NEEDS_TRT = "needs TensorRT (not installable here; see README)"
ENV = EngineEnv("tensorrt", "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def _have_tensorrt() -> bool:
    """The full TensorRT (TensorRT for RTX, found by default where it alone is installed, is tested in
    test_trt_modules.py)."""
    try:
        load_tensorrt("tensorrt")
    except BackendUnavailable:
        return False
    return True


HAVE_TRT = _have_tensorrt()


# -- type check against the stubs ----------------------------------------------------------------------

def _mypy(files: list[str], stubs: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [sys.executable, "-m", "mypy", "--config-file", "tests/typecheck/mypy.ini", *files]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trt_stubs() -> Path:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install mypy)")
    sys.path.insert(0, str(ROOT / "tests" / "typecheck"))
    try:
        import patch_trt_stubs
    finally:
        sys.path.pop(0)
    stubs = patch_trt_stubs.prepared()
    if stubs is None:  # the tests never download: the install step puts them there
        pytest.skip(f"the patched {patch_trt_stubs.STUBS} are not in {patch_trt_stubs.DEFAULT_DEST}; "
                    "install them with `make install-test` (or: python tests/typecheck/patch_trt_stubs.py)")
    return stubs  # type: ignore[no-any-return]


def test_the_runtime_and_tensorrt_code_type_check_against_the_stubs(trt_stubs: Path) -> None:
    """Every runtime module (the TensorRT ones against the patched stubs), the TensorRT builder and the server
    (serve/; its ``sdrt.runtime`` imports go through the editable install, which mypy does not follow, so they
    are Any there: this checks the server's own code)."""
    r = _mypy(["export/trt_build.py", "export/refit.py", "runtime/", "serve/"], trt_stubs)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_stubs_are_in_effect(trt_stubs: Path) -> None:
    """Misused TensorRT calls fail: ``tensorrt`` resolved to the stubs, not to an untyped Any."""
    r = _mypy(["tests/typecheck/bad_trt_usage.py"], trt_stubs)
    assert r.returncode == 1
    assert '"Builder" has no attribute "create_netwrk"' in r.stdout
    assert 'incompatible type "str"; expected "BuilderFlag"' in r.stdout
    assert r.stdout.count("error:") == 3


# -- without TensorRT ---------------------------------------------------------------------------------------

@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_missing_tensorrt_says_how_to_install_it(tmp_path: Path) -> None:
    from sdrt.export.trt_build import build_engines

    with pytest.raises(BackendUnavailable, match=r"pip install tensorrt --extra-index-url https://pypi\.nvidia\.com"):
        load_tensorrt("tensorrt")
    with pytest.raises(BackendUnavailable, match="only type stubs|No module"):
        build_engines(tmp_path, tmp_path / "out", load_profile("sd15-512"), BuildOptions(module="tensorrt"))
    with pytest.raises(InputError, match="unknown TensorRT module"):
        load_tensorrt("tensorrt_llm")


def test_plans_cache_keys_and_precision(tiny_export) -> None:
    folder = tiny_export("sd15-tiny")
    prof = custom_profile(batch="1:1:2", height="64:64:128")
    manifest, plans = plan_engines(folder, prof, BuildOptions(), ENV)
    names = [p.record.component for p in plans]
    graphs = ["sampler_step_cfg", "sampler_step",  # the step graphs come last,
              "sampler_step_cfg_blend", "sampler_step_blend",  # then their inpainting (blend) variants
              "sampler_step_cfg_rescale",  # and the guided one with guidance rescale,
              "sampler_input_cfg", "sampler_input",  # then the first UNet input's graphs
              "image_noise_float32_to_float32"]  # and img2img's noising
    assert names == [*manifest.components, *graphs]
    n = len(graphs)
    by = {p.record.component: p.record for p in plans}
    assert by["sampler_step_cfg"].shapes[1].max == (4, 4, 16, 16)  # unet_out rows
    assert by["sampler_step"].shapes[1].max == (2, 4, 16, 16)
    assert by["sampler_step_cfg_rescale"].shapes[1].max == (4, 4, 16, 16)
    assert by["sampler_input"].shapes[0].max == (2, 4, 16, 16)  # the first-input graph's latents, per image
    noise = by["image_noise_float32_to_float32"]
    assert [(t.name, t.max) for t in noise.shapes] == [("image_latents", (1, 4, 16, 16)), ("noise", (2, 4, 16, 16))]
    assert all(not p.record.flags.refittable and p.onnx_bytes for p in plans[-n:])
    _, no_cfg = plan_engines(folder, custom_profile(height=64, cfg=False), BuildOptions(), ENV)
    assert [p.record.component for p in no_cfg][-4:] == ["sampler_step", "sampler_step_blend", "sampler_input",
                                                         "image_noise_float32_to_float32"]
    assert len(no_cfg) == len(plans) - 4
    unet = next(p.record for p in plans if p.record.component == "unet")
    assert unet.file == "unet.engine" and unet.precision == "fp32" and unet.flags.strongly_typed
    assert unet.shapes[0].max == (4, 4, 16, 16)
    _, again = plan_engines(folder, prof, BuildOptions(), ENV)
    assert [p.record.cache_key for p in again] == [p.record.cache_key for p in plans]
    _, refit = plan_engines(folder, prof, BuildOptions(refittable=True), ENV)
    assert all(a.record.cache_key != b.record.cache_key for a, b in zip(plans[:-n], refit[:-n]))
    assert [a.record.cache_key for a in plans[-n:]] == [b.record.cache_key for b in refit[-n:]]  # no weights
    _, other_gpu = plan_engines(folder, prof, BuildOptions(), EngineEnv("tensorrt", "10.13.0.35", "NVIDIA L4", "8.9"))
    assert all(a.record.cache_key != b.record.cache_key for a, b in zip(plans, other_gpu))


def test_the_text_join_is_planned_where_the_runtime_runs_it(tiny_export) -> None:
    """SD1.5 with one chunk needs no join (the encoder's output is the UNet's input); with long prompts it
    does, as SDXL always does: in the runtime's variant (the same bytes), refit off, before the step graphs."""
    sd = tiny_export("sd15-tiny")
    _, short = plan_engines(sd, custom_profile(height=64), BuildOptions(), ENV)
    assert not any(p.record.component.startswith("text_join") for p in short)
    _, long_ = plan_engines(sd, custom_profile(height=64, chunks="1:2:3"), BuildOptions(refittable=True), ENV)
    names = [p.record.component for p in long_]
    i = names.index("text_join_fp32_to_fp32")
    assert names[i + 1] == "sampler_step_cfg"
    rec = long_[i].record
    assert not rec.flags.refittable and rec.precision == "fp32"
    assert rec.onnx_sha256 == hashlib.sha256(join_graph_bytes(("float32",), None, "float32")).hexdigest()
    shapes = {s.name: s for s in rec.shapes}
    assert shapes["hidden_0"].min[0] == 2 and shapes["hidden_0"].opt[0] == 4 and shapes["hidden_0"].max[0] == 6
    assert shapes["keep"].min == shapes["keep"].max == (2,) and "text_embeds" not in shapes
    _, xl = plan_engines(tiny_export("sdxl-tiny"), custom_profile(height=64), BuildOptions(), ENV)
    join = next(p.record for p in xl if p.record.component.startswith("text_join"))
    assert join.component == "text_join_fp32_fp32_pooled_fp32_to_fp32"
    assert [s.name for s in join.shapes] == ["hidden_0", "hidden_1", "text_embeds", "keep"]


def test_build_options_validation_and_rebuild_command() -> None:
    with pytest.raises(InputError, match="0..5"):
        BuildOptions(opt_level=7)
    with pytest.raises(InputError, match="only with --version-compatible"):
        BuildOptions(exclude_lean_runtime=True)
    opts = BuildOptions(opt_level=5, workspace_gb=8, refittable=True, version_compatible=True,
                        timing_cache=Path("/c/t.timing.cache"))
    cmd = rebuild_command("/x/onnx", "/x/eng", load_profile("sd15-512"), opts)
    assert cmd == ("sdrt build /x/onnx --out /x/eng --profile sd15-512 --opt-level 5 --workspace 8 "
                   "--timing-cache /c/t.timing.cache --refittable --version-compatible")
    cmd = rebuild_command("/x/onnx", "/x/eng", custom_profile(batch="1:1:4", height="256:512:1024"), BuildOptions())
    assert "--batch 1:1:4 --height 256:512:1024 --width 256:512:1024 --chunks 1" in cmd
    assert BuildOptions(weakly_typed=True).flags("fp16").fp16 and not BuildOptions().flags("fp16").fp16
    assert not BuildOptions(weakly_typed=True).flags("fp32").fp16  # fp32 components (SDXL VAE) stay fp32


def _parse(argv: list[str]) -> argparse.Namespace:
    from sdrt.commands import build

    p = argparse.ArgumentParser()
    build.register(p)
    return p.parse_args(argv)


def test_cli_profile_choices() -> None:
    from sdrt.commands.build import _profile

    prof = _profile(_parse(["x", "--out", "y", "--dynamic", "256:512:1024", "--batch", "1:1:4"]), 512)
    assert prof.height.max == prof.width.max == 1024 and prof.batch.max == 4
    prof = _profile(_parse(["x", "--out", "y"]), 768)  # default: static at the model's size
    assert prof.is_static and prof.height.min == 768
    prof = _profile(_parse(["x", "--out", "y", "--height", "512", "--width", "768", "--no-cfg"]), 512)
    assert (prof.height.min, prof.width.min, prof.cfg) == (512, 768, False)
    with pytest.raises(InputError, match="not both"):
        _profile(_parse(["x", "--out", "y", "--profile", "sd15-512", "--batch", "2"]), 512)
    assert _profile(_parse(["x", "--out", "y", "--profile", "sd15-dynamic"]), 512) == load_profile("sd15-dynamic")


def test_cli_t5_tokens() -> None:
    """``--t5-tokens``: N or MIN:OPT:MAX into the profile (beside --profile too, replacing its range), the rebuild
    command recreating it; an unparsable or out-of-range value refused naming the flag."""
    from sdrt.commands.build import _profile
    from sdrt.export.profiles import Range

    prof = _profile(_parse(["x", "--out", "y", "--height", "512", "--t5-tokens", "64:256:512"]), 512)
    assert prof.t5_tokens == Range(64, 256, 512) and not prof.is_static
    assert _profile(_parse(["x", "--out", "y", "--t5-tokens", "128"]), 512).t5_tokens == Range.static(128)
    assert _profile(_parse(["x", "--out", "y"]), 512).t5_tokens is None
    shipped = _profile(_parse(["x", "--out", "y", "--profile", "sd3-dynamic", "--t5-tokens", "128:256:512"]), 512)
    assert (shipped.height, shipped.t5_tokens) == (Range(512, 1024, 1536), Range(128, 256, 512))
    assert shipped.name == "sd3-dynamic+t5_tokens=128:256:512"  # the engine folder says it is not the shipped one
    cmd = rebuild_command("/x/onnx", "/x/eng", shipped, BuildOptions())
    assert cmd == ("sdrt build /x/onnx --out /x/eng --batch 1:1:2 --height 512:1024:1536 --width 512:1024:1536 "
                   "--chunks 1 --t5-tokens 128:256:512")
    again = _profile(_parse(cmd.split()[2:]), 512)
    assert (again.batch, again.height, again.width, again.t5_tokens) == \
        (shipped.batch, shipped.height, shipped.width, shipped.t5_tokens)
    with pytest.raises(InputError, match=r"--t5-tokens: 'a' is not N or MIN:OPT:MAX"):
        _profile(_parse(["x", "--out", "y", "--t5-tokens", "a"]), 512)
    with pytest.raises(InputError, match=r"\(--t5-tokens\) 600 is outside 2\.\.512"):
        _profile(_parse(["x", "--out", "y", "--t5-tokens", "600"]), 512)


def test_cli_lists_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main

    assert main(["build", "--list-profiles"]) == 0
    out = capsys.readouterr().out
    assert "sd15-512" in out and "sdxl-1024" in out and "dynamic" in out


def test_cli_build_of_a_missing_folder_asks_for_an_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main

    assert main(["build", str(tmp_path / "nope"), "--out", str(tmp_path / "engines")]) == 1
    err = capsys.readouterr().err
    assert err == (f"sdrt build: error: {tmp_path / 'nope'} does not exist; pass an ONNX export, the folder written "
                   "by `sdrt export`\n")
    assert list(tmp_path.iterdir()) == []


# -- with TensorRT (and a GPU) --------------------------------------------------------------------------------

@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason=NEEDS_TRT)
def test_build_reuse_and_refit_with_tensorrt(tiny_export, tmp_path: Path) -> None:  # pragma: no cover - GPU only
    from sdrt.export.refit import RefitRequest, refit_folder
    from sdrt.export.trt_build import build_engines
    from sdrt.runtime.engine_manifest import EngineManifest, check_engine, current_env

    folder = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    prof = custom_profile(height=64)
    m = build_engines(folder, out, prof, BuildOptions(refittable=True, timing_cache=tmp_path / "t.timing.cache"))
    assert (tmp_path / "t.timing.cache").stat().st_size > 0
    for rec in m.engines:
        assert (out / rec.file).stat().st_size == rec.size_bytes
    env = current_env(m.engines[0].env.backend, m.engines[0].env.version)
    check_engine(EngineManifest.read(out), env, folder=out)
    messages: list[str] = []
    build_engines(folder, out, prof, BuildOptions(refittable=True), progress=messages.append)
    assert sum("reused" in msg for msg in messages) == len(m.engines)
    refit_folder(out, RefitRequest(base=True))
