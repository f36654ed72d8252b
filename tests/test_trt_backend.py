"""The TensorRT backend without a GPU: what its logic does, checked against fakes, plus the checks that
need the real libraries (skipped here).

The fakes (tests/helpers/trt_fakes.py) stand in for cuda-python and TensorRT as this module understands
them; passing here says the backend's own logic is consistent (order of checks, bindings, buffer reuse,
scratch sizing, the captured loop's ping-pong), not that it runs on a GPU.

Numbers are checked against a float64 numpy reference (``samplers.run_reference``), independently of
the backend.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import importlib.util
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sdrt.runtime.trt_backend as tb
from sdrt.runtime.engine_manifest import (
    BuildFlags,
    EngineEnv,
    EngineManifest,
    EngineRecord,
    ProfileShapes,
)
from sdrt.runtime.errors import ArtifactError, BackendUnavailable, CompatibilityError, InputError
from sdrt.runtime.samplers import guide, make_plan, model_input, run_reference
from sdrt.runtime.step_graph import build_step_graph
from sdrt.runtime.step_loop import StepLoop

from .helpers.trt_fakes import (
    ENV,
    DataType,
    FakeContext,
    FakeCudart,
    FakeEngine,
    FakeTrt,
    Severity,
    fake_plan,
    refuse_enqueue_in_capture,
)

ROOT = Path(__file__).resolve().parents[1]
NEEDS_GPU = "needs TensorRT and an NVIDIA GPU (not available here)"
CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
          "set_alpha_to_one": False, "clip_sample": False}
B, LATENT, SEQ, DIM = 2, (4, 8, 8), 6, 5
GUIDANCE = 5.0


# -- fixtures -------------------------------------------------------------------------------------------

def fake_unet() -> onnx.ModelProto:
    """out = 0.5 sample + 0.001 t + mean(encoder_hidden_states) per row: rows answer differently."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("sample", f, ["N", 4, "H", "W"]),
              helper.make_tensor_value_info("timestep", f, ["N"]),
              helper.make_tensor_value_info("encoder_hidden_states", f, ["N", "S", "D"])]
    inits = [helper.make_tensor("half", f, [], [0.5]), helper.make_tensor("milli", f, [], [0.001]),
             helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1]),
             helper.make_tensor("axis3", TensorProto.INT64, [1], [3])]
    nodes = [helper.make_node("Mul", ["sample", "half"], ["a"]),
             helper.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
             helper.make_node("Mul", ["t4", "milli"], ["b"]),
             helper.make_node("ReduceMean", ["encoder_hidden_states"], ["m3"], axes=[1, 2], keepdims=1),
             helper.make_node("Unsqueeze", ["m3", "axis3"], ["m4"]),
             helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Add", ["ab", "m4"], ["out_sample"])]
    out = [helper.make_tensor_value_info("out_sample", f, ["N", 4, "H", "W"])]
    graph = helper.make_graph(nodes, "fake_unet", inputs, out, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def unet_np(sample: np.ndarray, t: float, hidden: np.ndarray) -> np.ndarray:
    return 0.5 * sample + 0.001 * t + hidden.mean(axis=(1, 2))[:, None, None, None]


UNET_PROFILE = {"sample": [[1, 4, 1, 1], [4, 4, 64, 64]], "timestep": [[1], [4]],
                "encoder_hidden_states": [[1, 1, 1], [4, 77, 64]]}


def write_folder(folder: Path, engines: dict[str, bytes], env: EngineEnv = ENV, flags: BuildFlags | None = None,
                 files: dict[str, str] | None = None, onnx: dict[str, bytes] | None = None) -> Path:
    """An engine folder with its manifest; ``onnx``: the graphs engines were built from (the runtime finds
    prebuilt step graphs by their digest)."""
    folder.mkdir(parents=True, exist_ok=True)
    flags = flags or BuildFlags()
    records = []
    for name, plan in engines.items():
        file = (files or {}).get(name, f"{name}.engine")
        (folder / file).write_bytes(plan)
        records.append(EngineRecord(component=name, file=file, precision="fp32",
                                    shapes=(), flags=flags, env=env, cache_key="k",
                                    onnx_sha256=hashlib.sha256((onnx or {})[name]).hexdigest() if name in (onnx or {})
                                    else "0" * 64,
                                    size_bytes=len(plan)))
    EngineManifest(profile_name="test", profile=ProfileShapes((1, 1, 2), (512, 512, 512), (512, 512, 512)),
                   engines=tuple(records), onnx_dir="/onnx", build_command="sdrt build /onnx --out ENGINES").write(folder)
    return folder


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch):
    """make(module=..., version=..., lean=..., gpus=...) -> (FakeCudart, FakeTrt), wired into trt_backend."""

    def make(**kw: Any) -> tuple[FakeCudart, FakeTrt]:
        cudart = FakeCudart(kw.pop("gpus", 1))
        trt = FakeTrt(cudart, **kw)
        monkeypatch.setattr(tb, "import_cudart", lambda: cudart)
        monkeypatch.setattr(tb, "import_tensorrt", lambda names: trt)
        return cudart, trt

    return make


STEP_ONNX = build_step_graph(True, np.float32).SerializeToString()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The stand-in UNet and the guided fp32 step graph, prebuilt (as ``sdrt build`` does)."""
    return write_folder(tmp_path / "engines", {"unet": fake_plan(fake_unet(), 10_000, UNET_PROFILE),
                                               "sampler_step": fake_plan(STEP_ONNX, 256)},
                        onnx={"sampler_step": STEP_ONNX})


# -- the manifest is checked before anything is deserialized ---------------------------------------------

@pytest.mark.parametrize("built, expect", [
    (EngineEnv("tensorrt", "10.0.1.6", "Fake GPU", "9.0"), "built with TensorRT 10.0.1.6, this is TensorRT 10.13.0.35"),
    (EngineEnv("tensorrt", "10.13.0.35", "NVIDIA A10", "8.6"), "built for compute capability 8.6 (NVIDIA A10)"),
    (EngineEnv("tensorrt_rtx", "1.1.0", "Fake GPU", "9.0"), "built for tensorrt_rtx, but this runtime uses tensorrt"),
])
def test_a_mismatched_engine_is_refused_before_deserialization(tmp_path, fakes, monkeypatch, built, expect):
    """Order check (fakes): CompatibilityError from the manifest, with the rebuild command; the engine file
    is never opened and TensorRT never asked to deserialize it."""
    _, trt = fakes()
    folder = write_folder(tmp_path, {"unet": fake_plan(fake_unet())}, env=built)
    opened = []
    monkeypatch.setattr(tb, "map_plan", lambda path: opened.append(path))
    be = tb.TrtBackend(folder)
    with pytest.raises(CompatibilityError) as e:
        be.load(str(folder / "unet.engine"), "unet")
    assert expect in str(e.value) and "sdrt build /onnx --out ENGINES" in str(e.value)
    assert opened == [] and trt.deserialized == []


def test_the_manifest_is_checked_once_per_folder(folder, fakes, monkeypatch):
    _, trt = fakes()
    calls = []
    real = tb.check_engine

    def counted(*a: Any, **k: Any) -> None:
        calls.append(a[1])
        real(*a, **k)

    monkeypatch.setattr(tb, "check_engine", counted)
    be = tb.TrtBackend(folder)
    for _ in range(2):
        be.load(str(folder / "unet.engine"), "unet")
    assert calls == [ENV] and len(trt.deserialized) == 2
    assert be.manifest is not None and be.manifest.build_command == "sdrt build /onnx --out ENGINES"


def test_folder_problems_are_artifact_errors(tmp_path, fakes):
    fakes()
    be = tb.TrtBackend(tmp_path)
    (tmp_path / "unet.engine").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not an sdrt engine folder; build one with `sdrt build"):
        be.load(str(tmp_path / "unet.engine"), "unet")
    f = write_folder(tmp_path / "a", {"unet": b"not a plan"})
    with pytest.raises(ArtifactError, match="could not deserialize .*not a plan.*Rebuild it: sdrt build"):
        tb.TrtBackend(f).load(str(f / "unet.engine"), "unet")
    with pytest.raises(ArtifactError, match="no vae_decoder engine"):
        tb.TrtBackend(f).load(str(f / "vae_decoder.engine"), "vae_decoder")
    g = write_folder(tmp_path / "b", {"unet": b"plan"}, files={"unet": "other.engine"})
    with pytest.raises(ArtifactError, match="export manifest names unet.engine, the engine manifest other.engine"):
        tb.TrtBackend(g).load(str(g / "unet.engine"), "unet")
    (g / "other.engine").unlink()
    with pytest.raises(CompatibilityError, match="unet: other.engine is missing"):
        tb.TrtBackend(g).load(str(g / "unet.engine"), "unet")


def test_the_lean_runtime_takes_only_version_compatible_engines(tmp_path, fakes):
    _, trt = fakes(name="tensorrt_lean_bindings", version="10.14.1.48", lean=True)
    plain = write_folder(tmp_path / "plain", {"unet": fake_plan(fake_unet())})
    with pytest.raises(CompatibilityError, match="the lean runtime runs only version-compatible engines"):
        tb.TrtBackend(plain).load(str(plain / "unet.engine"), "unet")
    vc = write_folder(tmp_path / "vc", {"unet": fake_plan(fake_unet())}, flags=BuildFlags(version_compatible=True))
    be = tb.TrtBackend(vc)
    be.load(str(vc / "unet.engine"), "unet")
    assert be.lean and trt.runtimes[-1].engine_host_code_allowed  # the plan's embedded runtime is host code
    excl = write_folder(tmp_path / "excl", {"unet": fake_plan(fake_unet())},
                        flags=BuildFlags(version_compatible=True, exclude_lean_runtime=True))
    with pytest.raises(CompatibilityError, match="--exclude-lean-runtime by TensorRT 10.13.0.35: only that exact"):
        tb.TrtBackend(excl).load(str(excl / "unet.engine"), "unet")
    with pytest.raises(ArtifactError, match=r"no prebuilt engine for this graph .*rebuild it: "
                                            r"sdrt build /onnx --out ENGINES"):
        be.load(STEP_ONNX, "sampler_step")


def test_a_step_graph_that_was_not_prebuilt_is_refused_with_the_rebuild_command(tmp_path, fakes):
    """The runtime loads, the builder builds: no engine is built at run time, whatever the module can do."""
    _, trt = fakes()
    assert hasattr(trt, "Builder")
    old = write_folder(tmp_path / "old", {"unet": fake_plan(fake_unet())})
    with pytest.raises(ArtifactError, match=r"sampler_step: the engine folder .*old has no prebuilt engine for this "
                                            r"graph.*rebuild it: sdrt build /onnx --out ENGINES"):
        tb.TrtBackend(old).load(STEP_ONNX, "sampler_step")
    with pytest.raises(ArtifactError, match=r"no engine folder .*sdrt build ONNX_DIR --out ENGINE_DIR"):
        tb.TrtBackend().load(STEP_ONNX, "sampler_step")
    assert trt.built == []


def test_module_choice_follows_the_manifest(tmp_path, monkeypatch):
    monkeypatch.delenv("SDRT_TENSORRT_MODULE", raising=False)
    assert tb.module_candidates(None, "tensorrt") == ["tensorrt", "tensorrt_lean", "tensorrt_lean_bindings"]
    assert tb.module_candidates(None, "tensorrt_rtx") == ["tensorrt_rtx", "tensorrt_rtx_bindings"]
    assert tb.module_candidates("tensorrt_lean", "tensorrt") == ["tensorrt_lean"]
    monkeypatch.setenv("SDRT_TENSORRT_MODULE", "tensorrt_rtx")
    assert tb.module_candidates(None, "tensorrt") == ["tensorrt_rtx", "tensorrt_rtx_bindings"]
    with pytest.raises(InputError, match="unknown TensorRT module 'trt'"):
        tb.module_candidates("trt")
    f = write_folder(tmp_path, {"unet": b"x"}, env=EngineEnv("tensorrt_rtx", "1.1.0"))
    assert tb.built_with(f) == "tensorrt_rtx" and tb.built_with(tmp_path / "none") is None


# -- missing pieces ---------------------------------------------------------------------------------------

def _hide(monkeypatch: pytest.MonkeyPatch, prefixes: tuple[str, ...]) -> None:
    real = importlib.import_module

    def fake(name: str, package: str | None = None) -> Any:
        if name.startswith(prefixes):
            raise ImportError(f"No module named {name!r}")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_missing_libraries_and_gpu_are_listed_with_how_to_install(monkeypatch):
    _hide(monkeypatch, ("cuda", "tensorrt"))
    with pytest.raises(BackendUnavailable) as e:
        tb.TrtBackend()
    msg = str(e.value)
    assert "cuda-python is not installed" in msg and "pip install cuda-python" in msg
    assert "TensorRT is not available" in msg and "pip install tensorrt --extra-index-url https://pypi.nvidia.com" in msg
    assert "pip install tensorrt-lean-cu13-libs tensorrt-lean-cu13-bindings" in msg


def test_no_gpu_is_reported_before_tensorrt_is_touched(fakes):
    _, trt = fakes(gpus=0)
    with pytest.raises(BackendUnavailable, match="no NVIDIA GPU or no NVIDIA driver .*cudaErrorInsufficientDriver"):
        tb.TrtBackend()
    assert trt.runtimes == []  # a TensorRT Runtime made without a GPU can crash the process


def _real_cuda_without_gpu() -> None:
    """Skip unless the real cuda-python is installed and sees no GPU (as on this CPU machine)."""
    try:
        cudart = tb.import_cudart()
    except BackendUnavailable:
        pytest.skip("cuda-python is not installed")
    if int(cudart.cudaGetDeviceCount()[0]) == 0:
        pytest.skip("CUDA sees a GPU here; this checks the message on a machine without one")


def test_no_gpu_with_the_real_cuda_python_names_the_fix_for_api_and_cli(tiny_export):
    _real_cuda_without_gpu()
    from sdrt.runtime.pipeline import Pipeline

    with pytest.raises(BackendUnavailable) as e:
        Pipeline.load(tiny_export("sd15-tiny"), backend="tensorrt")
    api, cli = str(e.value), e.value.for_cli()
    for text in (api, cli):
        assert "no NVIDIA GPU or no NVIDIA driver" in text
    assert 'backend="ort-cpu"' in api and "--backend" not in api
    assert "--backend ort-cpu" in cli and "backend=" not in cli and "'ort-cpu'" not in cli


def test_cli_generate_without_a_gpu_exits_1_with_the_flag(tiny_export, tmp_path, capsys):
    _real_cuda_without_gpu()
    from sdrt.cli import main

    out = tmp_path / "x.png"
    code = main(["generate", str(tiny_export("sd15-tiny")), "--prompt", "a cat", "--steps", "1",
                 "--backend", "tensorrt", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("sdrt generate: error: the tensorrt backend cannot run here")
    assert "no NVIDIA GPU or no NVIDIA driver" in err and "use --backend ort-cpu" in err
    assert "backend=" not in err and "Traceback" not in err
    assert not out.exists()


def test_a_runtime_that_failed_to_initialize_is_refused_and_never_freed(fakes, monkeypatch):
    """The lean bindings, when CUDA cannot start under them, log an error and hand back a null runtime whose
    use or release crashes the process (seen on a CPU machine)."""
    _, trt = fakes()
    made = trt.Runtime

    def failing(logger: Any) -> Any:
        logger.log(Severity.ERROR, "createInferRuntime: CUDA initialization failure with error: 35")
        return made(logger)

    monkeypatch.setattr(trt, "Runtime", failing)
    monkeypatch.setattr(tb, "_BROKEN_RUNTIMES", [])
    with pytest.raises(BackendUnavailable, match="could not create its runtime: ERROR: createInferRuntime"):
        tb.TrtBackend()
    assert tb._BROKEN_RUNTIMES == trt.runtimes[-1:]


def test_type_stubs_alone_are_not_tensorrt(monkeypatch):
    monkeypatch.setattr(importlib, "import_module", lambda name: SimpleNamespace(__name__=name))
    with pytest.raises(BackendUnavailable, match="tensorrt: only type stubs are installed"):
        tb.import_tensorrt(["tensorrt"])


# -- descriptions and dtypes -----------------------------------------------------------------------------

def test_io_specs_from_an_engine(fakes):
    _, trt = fakes()
    engine = FakeEngine(trt, fake_plan(fake_unet(), 100, UNET_PROFILE))
    inputs, outputs = tb.io_specs(engine, "unet")
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert inputs["sample"].shape == (None, 4, None, None) and inputs["sample"].dtype == np.float32
    assert outputs["out_sample"].describe() == "out_sample: float32[?, 4, ?, ?]"
    trt.dtype_override["sample"] = DataType.BF16
    with pytest.raises(CompatibilityError, match="unet: tensor 'sample' is BF16, which sdrt cannot feed"):
        tb.io_specs(engine, "unet")


@pytest.mark.parametrize("name, dtype", [("FLOAT", np.float32), ("HALF", np.float16), ("INT32", np.int32),
                                         ("INT64", np.int64), ("INT8", np.int8), ("BOOL", np.bool_),
                                         ("UINT8", np.uint8)])
def test_dtype_mapping(name, dtype):
    assert tb.numpy_dtype(DataType[name], "t") == dtype


def test_profile_errors_name_the_range(folder, fakes):
    fakes()
    be = tb.TrtBackend(folder)
    unet = be.load(str(folder / "unet.engine"), "unet")
    feeds = {"sample": np.zeros((6, 4, 8, 8), np.float32), "timestep": np.zeros(6, np.float32),
             "encoder_hidden_states": np.zeros((6, SEQ, DIM), np.float32)}
    with pytest.raises(InputError, match=r"'sample' of shape \[6, 4, 8, 8\] is outside the engine's profile "
                                         r"\(from \[1, 4, 1, 1\] to \[4, 4, 64, 64\]\)"):
        unet(feeds)
    feeds["sample"] = np.zeros((2, 4, 8, 8), np.float16)
    with pytest.raises(InputError, match="input 'sample' is float16, expected sample: float32"):
        unet(feeds)


# -- arrays, output buffers, scratch --------------------------------------------------------------------

def test_arrays_round_trip(fakes):
    fakes()
    be = tb.TrtBackend()
    for a in (np.arange(12, dtype=np.float16).reshape(3, 4), np.array(7.5, np.float32), np.array([True, False]),
              np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2]):
        d = be.to_device(a)
        assert be.meta(d) == (a.dtype, a.shape)
        np.testing.assert_array_equal(be.to_host(d), a)
    with pytest.raises(InputError, match="cannot put a complex128 array on the device"):
        be.to_device(np.zeros(2, complex))
    d = be.to_device(np.ones(3, np.float32))
    d.free()
    with pytest.raises(InputError, match=r"float32\[3\]\) was freed"):
        _ = d.ptr


def test_outputs_reuse_buffers_the_caller_has_dropped(folder, fakes):
    """Logic check: an output buffer is reused only when no array handed out for it is alive."""
    fakes()
    be = tb.TrtBackend(folder)
    unet = be.load(str(folder / "unet.engine"), "unet")
    assert isinstance(unet, tb.TrtEngine)
    feeds = {"sample": be.to_device(np.ones((2, 4, 8, 8), np.float32)), "timestep": be.to_device(np.ones(2, np.float32)),
             "encoder_hidden_states": be.to_device(np.zeros((2, SEQ, DIM), np.float32))}
    first = unet(feeds)["out_sample"]
    ptr = first.ptr
    del first
    again = unet(feeds)["out_sample"]
    assert again.ptr == ptr and unet.buffers.allocations == 1  # dropped, so reused
    held = [again] + [unet(feeds)["out_sample"] for _ in range(5)]
    assert len({a.ptr for a in held}) == 6  # all held: all distinct
    assert unet.buffers.allocations == 6 and len(unet.buffers.slots["out_sample"][2]) == tb.BUFFERS_PER_OUTPUT
    assert [a.owned for a in held] == [False] * 4 + [True] * 2  # past the limit, outputs are the caller's own
    np.testing.assert_allclose(be.to_host(held[-1]), 0.5 + 0.001)
    # feeding an output back as an input never lets the next call overwrite it
    x = unet(feeds)["out_sample"]
    y = unet({**feeds, "sample": x})["out_sample"]
    assert x.ptr != y.ptr
    np.testing.assert_allclose(be.to_host(y), 0.5 * (0.5 + 0.001) + 0.001, rtol=1e-6)


def test_one_scratch_block_sized_to_the_largest_engine(tmp_path, fakes):
    """Logic check: every context points at one block, regrown (and every context re-pointed) when a
    larger engine arrives; runs after the growth use the new block (the fake fails on freed memory)."""
    cudart, _ = fakes()
    plans = {"text_encoder": fake_plan(fake_unet(), 3_000), "unet": fake_plan(fake_unet(), 50_000),
             "vae_decoder": fake_plan(fake_unet(), 20_000)}
    folder = write_folder(tmp_path, plans)
    be = tb.TrtBackend(folder)
    engines = [be.load(str(folder / f"{n}.engine"), n) for n in plans]
    ptrs = {e.context.memory for e in engines}  # type: ignore[attr-defined]
    assert ptrs == {(be.scratch.ptr, 50_000)} and be.scratch.generation == 2
    be.synchronize()  # frees are stream-ordered
    assert sum(1 for size in cudart.live.values() if size >= 3_000) == 1  # the smaller block was freed
    feeds = {"sample": np.ones((1, 4, 2, 2), np.float32), "timestep": np.zeros(1, np.float32),
             "encoder_hidden_states": np.zeros((1, 1, 1), np.float32)}
    for e in engines:
        np.testing.assert_allclose(be.to_host(e(feeds)["out_sample"]), 0.5)
    assert tb.scratch_size(SimpleNamespace(device_memory_size_v2=10, num_optimization_profiles=2,
                                           get_device_memory_size_for_profile_v2=lambda i: [5, 30][i])) == 30


# -- the denoising loop: plain, and as a CUDA graph ----------------------------------------------------------

def _setup(be: tb.TrtBackend, folder: Path, sampler: str, steps: int = 6, seed: int = 0):
    unet = be.load(str(folder / "unet.engine"), "unet")
    step = be.load(STEP_ONNX, "sampler_step")
    plan = make_plan(sampler, steps, CONFIG)
    rng = np.random.default_rng(seed)
    x = (plan.init_noise_sigma * rng.standard_normal((B, *LATENT))).astype(np.float32)
    hidden = rng.standard_normal((2 * B, SEQ, DIM)).astype(np.float32)
    noises = rng.standard_normal((steps, B, *LATENT)).astype(np.float32) if plan.needs_noise else None
    return unet, step, plan, x, hidden, noises


def _reference(plan, x, hidden, noises) -> np.ndarray:
    def model(unet_in: np.ndarray, t: float) -> np.ndarray:
        out = unet_np(np.concatenate([unet_in] * 2), t, hidden.astype(np.float64))
        return guide(out, GUIDANCE)

    return run_reference(plan, x.astype(np.float64), model, None if noises is None else noises.astype(np.float64))


def _start_state(be, plan, x, hidden):
    dev = be.to_device
    return {"x_dev": dev(x), "zeros": dev(np.zeros_like(x)), "cond": {"encoder_hidden_states": dev(hidden)},
            "guidance": dev(np.array(GUIDANCE, np.float32)),
            "unet_in": dev(np.concatenate([model_input(plan, 0, x)] * 2).astype(np.float32))}


def _plain_loop(be, unet, step, plan, x, hidden, noises) -> np.ndarray:
    """The pipeline's loop as pipeline.py runs it today."""
    s = _start_state(be, plan, x, hidden)
    x_dev, x0_prev, unet_in = s["x_dev"], s["zeros"], s["unet_in"]
    for i in range(plan.steps):
        t = be.to_device(np.full((2 * B,), plan.timesteps[i], np.float32))
        out = unet({"sample": unet_in, "timestep": t, **s["cond"]})["out_sample"]
        res = step({"latents": x_dev, "unet_out": out, "guidance": s["guidance"], "coeffs": be.to_device(plan.coeffs(i)),
                    "x0_prev": x0_prev, "noise": be.to_device(noises[i]) if noises is not None else s["zeros"]})
        x_dev, x0_prev, unet_in = res["latents_next"], res["x0"], res["unet_in_next"]
        be.synchronize()
    return be.to_host(x_dev)


def _captured_loop(be, unet, step, plan, x, hidden, noises, between=None) -> tuple[np.ndarray, tb.CapturedStepLoop]:
    """The loop as the module docstring tells the pipeline to run it."""
    s = _start_state(be, plan, x, hidden)
    loop = be.step_loop(unet, step)
    loop.start(latents=s["x_dev"], unet_in=s["unet_in"], x0_prev=s["zeros"], cond=s["cond"],
               guidance=s["guidance"], timesteps=plan.timesteps, coeffs=plan.table, noise=noises)
    del s  # the loop keeps its own copies
    for i in range(plan.steps):
        loop.step(i)
        be.synchronize()
        if between is not None:
            between(i)
    return be.to_host(loop.latents), loop


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler-a"])
def test_captured_loop_matches_the_plain_loop_and_numpy(folder, fakes, sampler):
    """Logic check on fakes: the StepLoop (captured graphs, and the direct fallback) gives bit-for-bit the
    plain loop's latents, and both match the float64 numpy reference loop."""
    cudart, trt = fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, sampler)
    ref = _reference(plan, x, hidden, noises)
    plain = _plain_loop(be, unet, step, plan, x, hidden, noises)
    graphed, loop = _captured_loop(be, unet, step, plan, x, hidden, noises)
    assert loop.captured and loop.reason == "" and cudart.captures == 2 and cudart.launches == plan.steps
    np.testing.assert_allclose(plain, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(graphed, plain)
    # a second call with the same shapes reuses the graphs; fresh inputs, same answer
    again, _ = _captured_loop(be, unet, step, plan, x, hidden, noises)
    assert cudart.captures == 2
    np.testing.assert_array_equal(again, plain)
    assert trt.built == []  # the step graph came prebuilt: the runtime builds nothing
    be_direct = tb.TrtBackend(folder, cuda_graph=False)
    unet2, step2, *_ = _setup(be_direct, folder, sampler)
    direct, loop2 = _captured_loop(be_direct, unet2, step2, plan, x, hidden, noises)
    assert not loop2.captured and "cuda_graph=False" in loop2.reason
    np.testing.assert_array_equal(direct, plain)


def test_a_context_that_cannot_be_captured_runs_directly(folder, fakes, monkeypatch):
    """TensorRT for RTX answers is_stream_capturable() up front: when an engine says no, the loop runs
    the engines directly (same latents) and says why, without trying a capture."""
    cudart, _ = fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, "ddim")
    plain = _plain_loop(be, unet, step, plan, x, hidden, noises)
    asked: list[int] = []
    monkeypatch.setattr(FakeContext, "is_stream_capturable", lambda self, stream: asked.append(stream) or False,
                        raising=False)
    out, loop = _captured_loop(be, unet, step, plan, x, hidden, noises)
    assert not loop.captured and "cannot stream-capture unet, sampler_step" in loop.reason
    assert cudart.captures == 0 and asked == [be.device.handle] * 2
    np.testing.assert_array_equal(out, plain)


def test_an_error_asking_whether_a_context_can_be_captured_runs_directly(folder, fakes, monkeypatch):
    """is_stream_capturable() itself failing (a driver or binding error) is a capture failure like any other:
    the engines run directly, with the reason."""
    cudart, _ = fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, "ddim")
    plain = _plain_loop(be, unet, step, plan, x, hidden, noises)

    def fail(self, stream):
        raise RuntimeError("cudaErrorInvalidResourceHandle")

    monkeypatch.setattr(FakeContext, "is_stream_capturable", fail, raising=False)
    out, loop = _captured_loop(be, unet, step, plan, x, hidden, noises)
    assert not loop.captured and cudart.captures == 0
    assert loop.reason == "CUDA graph capture failed: RuntimeError: cudaErrorInvalidResourceHandle"
    np.testing.assert_array_equal(out, plain)


def test_captured_loop_recaptures_when_the_scratch_block_moves(folder, tmp_path, fakes):
    """A larger engine loaded mid-loop moves the shared scratch: the graphs holding the old address are
    captured again without losing the state (the fake fails on a launch that touches freed memory)."""
    cudart, _ = fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, "dpmpp-2m")
    big = write_folder(tmp_path / "big", {"vae_decoder": fake_plan(fake_unet(), 10**6)})
    loaded = []

    def load_bigger(i: int) -> None:
        if i == 2:
            loaded.append(be.load(str(big / "vae_decoder.engine"), "vae_decoder"))

    out, loop = _captured_loop(be, unet, step, plan, x, hidden, noises, between=load_bigger)
    assert loop.captured and cudart.captures == 4 and be.scratch.size == 10**6
    np.testing.assert_array_equal(out, _plain_loop(be, unet, step, plan, x, hidden, noises))


def test_step_loop_checks_its_inputs(folder, fakes):
    fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, _ = _setup(be, folder, "ddim")
    s = _start_state(be, plan, x, hidden)
    loop = be.step_loop(unet, step)
    assert be.step_loop(unet, step) is loop
    with pytest.raises(InputError, match="cond must hold all but sample and timestep"):
        loop.start(latents=s["x_dev"], unet_in=s["unet_in"], cond={}, timesteps=plan.timesteps, coeffs=plan.table,
                   guidance=s["guidance"])
    with pytest.raises(InputError, match="one row per timestep"):
        loop.start(latents=s["x_dev"], unet_in=s["unet_in"], cond=s["cond"], timesteps=plan.timesteps,
                   coeffs=plan.table[:-1], guidance=s["guidance"])
    with pytest.raises(InputError, match="step 0 is outside the 0 steps"):
        loop.step(0)
    with pytest.raises(InputError, match="engines loaded by this backend"):
        be.step_loop(SimpleNamespace(), step)  # type: ignore[arg-type]


# -- the Backend interface: request check, step loop, current device, capture fallback ------------------------

def test_check_request_follows_the_engine_profile(folder, fakes):
    fakes()
    be = tb.TrtBackend(folder)
    be.check_request(1, 512, 512, guided=True)  # nothing loaded yet: no profile to check against
    be.load(str(folder / "unet.engine"), "unet")
    be.check_request(1, 512, 512, guided=True)  # the folder's profile: batch 1..2 at 512 x 512
    with pytest.raises(InputError, match="height"):
        be.check_request(1, 256, 512, guided=True)
    with pytest.raises(InputError, match="batch"):
        be.check_request(3, 512, 512, guided=True)


def test_make_current_selects_the_gpu_in_the_calling_thread(fakes):
    cudart, _ = fakes(gpus=2)
    be = tb.TrtBackend(device_id=1)
    seen: list[int | None] = []

    def worker() -> None:
        be.make_current()
        seen.append(cudart.current.get(threading.get_ident()))

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    assert seen == [1] and cudart.current[threading.get_ident()] == 1


def test_step_loop_is_the_captured_loop_and_describes_itself_like_the_base(folder, fakes):
    fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, "ddim")
    loop = be.step_loop(unet, step)
    assert isinstance(loop, StepLoop) and be.step_loop(unet, step) is loop
    _, ran = _captured_loop(be, unet, step, plan, x, hidden, noises)
    assert ran is loop and loop.describe() == "captured CUDA graphs"
    off = tb.TrtBackend(folder, cuda_graph=False)
    unet2, step2, *_ = _setup(off, folder, "ddim")
    _, direct = _captured_loop(off, unet2, step2, plan, x, hidden, noises)
    assert direct.describe() == "engines run directly (CUDA graphs are off (TrtBackend(cuda_graph=False)))"


def test_any_error_during_capture_falls_back_to_running_the_engines(folder, fakes, monkeypatch):
    """TensorRT's bindings raise RuntimeError when an enqueue fails inside a capture: the loop runs the
    engines directly (the plain loop's latents) and says why."""
    cudart, _ = fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, "euler-a")
    plain = _plain_loop(be, unet, step, plan, x, hidden, noises)
    refuse_enqueue_in_capture(monkeypatch, cudart)
    out, loop = _captured_loop(be, unet, step, plan, x, hidden, noises)
    assert not loop.captured and cudart.capturing is None and cudart.launches == 0
    assert loop.reason == ("CUDA graph capture failed: RuntimeError: enqueueV3: operation not permitted when "
                           "stream is capturing")
    assert loop.describe().startswith("engines run directly (CUDA graph capture failed: RuntimeError")
    np.testing.assert_array_equal(out, plain)
    assert cudart.alive()["graphs"] == 0


# -- lifecycle ----------------------------------------------------------------------------------------------

def _use_everything(be: tb.TrtBackend, folder: Path) -> tuple[Any, ...]:
    """Engines, outputs, a captured loop and a clock: everything a pipeline call leaves on the device."""
    unet, step, plan, x, hidden, noises = _setup(be, folder, "dpmpp-2m")
    clock = be.clock()
    clock.mark()
    _, loop = _captured_loop(be, unet, step, plan, x, hidden, noises)
    clock.mark()
    held = be.to_device(x)
    return unet, step, loop, clock, held


def test_close_releases_everything_and_refuses_further_use(folder, fakes):
    cudart, _ = fakes()
    before = cudart.alive()
    be = tb.TrtBackend(folder)
    unet, step, loop, _, held = _use_everything(be, folder)
    during = cudart.alive()
    assert during["allocations"] > 10 and during["graphs"] == 2 and during["streams"] == 1 and during["events"] == 2
    be.close()
    assert cudart.alive() == before == {"allocations": 0, "streams": 0, "graphs": 0, "events": 0}
    be.close()  # idempotent
    closed = "closed; load it again"
    for use in (lambda: be.to_device(np.zeros(2, np.float32)), lambda: be.load(str(folder / "unet.engine"), "unet"),
                lambda: be.step_loop(unet, step), be.synchronize, be.clock, be.make_current,
                lambda: unet({"sample": held}), lambda: loop.step(0), lambda: be.to_host(held),
                lambda: held.ptr, lambda: be.check_request(1, 512, 512, True)):
        with pytest.raises(InputError, match=closed):
            use()


def test_dropping_every_reference_frees_the_device_without_the_garbage_collector(folder, fakes):
    cudart, _ = fakes()
    gc.collect()
    gc.disable()  # refcounting alone must free it: no reference cycle may hold device memory
    try:
        be = tb.TrtBackend(folder)
        stuff = _use_everything(be, folder)
        assert cudart.alive()["allocations"] > 10
        del be, stuff
        assert cudart.alive() == {"allocations": 0, "streams": 0, "graphs": 0, "events": 0}
    finally:
        gc.enable()


def test_loading_and_closing_ten_times_does_not_grow(folder, fakes):
    cudart, _ = fakes()
    peaks = []
    for _ in range(10):
        be = tb.TrtBackend(folder)
        _use_everything(be, folder)
        peaks.append(dict(cudart.alive()))
        be.close()
        assert cudart.alive() == {"allocations": 0, "streams": 0, "graphs": 0, "events": 0}
    assert all(p == peaks[0] for p in peaks)


# -- device-clock timing ----------------------------------------------------------------------------------

def test_the_device_clock_records_events_without_synchronizing(folder, fakes):
    cudart, _ = fakes()
    be = tb.TrtBackend(folder)
    unet, step, plan, x, hidden, noises = _setup(be, folder, "ddim")
    s = _start_state(be, plan, x, hidden)
    loop = be.step_loop(unet, step)
    loop.start(latents=s["x_dev"], unet_in=s["unet_in"], x0_prev=s["zeros"], cond=s["cond"], guidance=s["guidance"],
               timesteps=plan.timesteps, coeffs=plan.table, noise=noises)
    clock = be.clock()
    assert clock.kind == "device"
    syncs = cudart.syncs
    clock.mark()
    for i in range(plan.steps):
        loop.step(i)
        clock.mark()
    assert cudart.syncs == syncs  # marks only queue events
    ms = clock.intervals_ms()
    assert cudart.syncs == syncs + 1  # one wait, when the times are read
    assert len(ms) == plan.steps and all(m >= 0 for m in ms)
    # each step queues 3 copies and one launch of a graph of 2 engine runs: the fake times 0.25 ms an operation
    assert ms == [pytest.approx(ms[0])] * plan.steps and ms[0] > 0
    clock.close()
    assert cudart.alive()["events"] == 0


# -- against the real libraries --------------------------------------------------------------------------

def _real_module(names: tuple[str, ...]) -> Any:
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "Runtime"):
            return mod
    return None


REAL_TRT = _real_module(tb.RUNTIME_MODULES)


def _gpu_ready() -> bool:
    if REAL_TRT is None or not hasattr(REAL_TRT, "Builder"):
        return False
    try:
        cudart = tb.import_cudart()
        res = cudart.cudaGetDeviceCount()
        return int(res[0]) == 0 and int(res[1]) > 0
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _gpu_ready(), reason=NEEDS_GPU)
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-a"])
def test_on_a_gpu_the_captured_loop_matches_numpy(tmp_path, sampler):
    """On a GPU with the full TensorRT: the stand-in UNet and the step graph, built by the builder's own
    functions into an engine folder, the plain loop and the captured loop against the float64 numpy reference."""
    be = tb.TrtBackend(_real_engine_folder(tmp_path, REAL_TRT))
    unet = be.load(str(tmp_path / "unet.engine"), "unet")
    step = be.load(STEP_ONNX, "sampler_step")
    plan = make_plan(sampler, 8, CONFIG)
    rng = np.random.default_rng(3)
    x = (plan.init_noise_sigma * rng.standard_normal((B, *LATENT))).astype(np.float32)
    hidden = rng.standard_normal((2 * B, SEQ, DIM)).astype(np.float32)
    noises = rng.standard_normal((plan.steps, B, *LATENT)).astype(np.float32) if plan.needs_noise else None
    ref = _reference(plan, x, hidden, noises)
    plain = _plain_loop(be, unet, step, plan, x, hidden, noises)
    graphed, loop = _captured_loop(be, unet, step, plan, x, hidden, noises)
    atol = 1e-3 * np.abs(ref).max()  # TF32 may round the stand-in's mean
    np.testing.assert_allclose(plain, ref, rtol=1e-3, atol=atol)
    assert loop.captured, loop.reason
    np.testing.assert_allclose(graphed, ref, rtol=1e-3, atol=atol)


def _real_engine_folder(folder: Path, trt: Any) -> Path:
    """Build the stand-in UNet (the UNET_PROFILE) and the guided step graph (fixed at B x LATENT) with
    export/trt_build.py's functions, into an engine folder for this GPU."""
    from sdrt.export import trt_build
    from sdrt.runtime.engine_manifest import TensorShapes

    env = tb.TrtBackend().environment()
    latent, rows = (B, *LATENT), (2 * B, *LATENT)
    opt = {"sample": rows, "timestep": (2 * B,), "encoder_hidden_states": (2 * B, SEQ, DIM)}
    unet_shapes = [TensorShapes(n, tuple(lo), opt[n], tuple(hi)) for n, (lo, hi) in UNET_PROFILE.items()]
    step_model = onnx.load_from_string(STEP_ONNX)
    columns = next(d.dim_value for v in step_model.graph.input if v.name == "coeffs" for d in v.type.tensor_type.shape.dim)
    fixed = {"latents": latent, "unet_out": rows, "guidance": (), "coeffs": (columns,), "x0_prev": latent,
             "noise": latent}
    step_shapes = [TensorShapes(n, s, s, s) for n, s in fixed.items()]
    messages: list[str] = []
    builder = trt.Builder(tb.make_logger(trt, messages))
    plans = {}
    for name, model, shapes in (("unet", fake_unet().SerializeToString(), unet_shapes),
                                ("sampler_step", STEP_ONNX, step_shapes)):
        rec = EngineRecord(component=name, file=f"{name}.engine", precision="fp32", shapes=tuple(shapes),
                           flags=BuildFlags(), onnx_sha256="0" * 64, env=env, cache_key="k")
        plan = trt_build.EnginePlan(Path(f"<{name}>"), rec, model)
        plans[name] = trt_build.build_one(trt, plan, None, builder, messages, lambda msg: None)
    return write_folder(folder, plans, env=env, onnx={"sampler_step": STEP_ONNX})
