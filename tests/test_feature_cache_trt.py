"""DeepCache (runtime/feature_cache.py) on the TensorRT path, on fakes: ``sdrt export --deepcache`` ->
``build_engines`` -> ``Pipeline(tensorrt)``, against ort-cpu's step-by-step loop on the same export.

The fakes (tests/helpers/trt_fakes.py) run the "engines" as ONNX graphs on onnxruntime and check that every
engine input and output has an address at each run: a pass says the captured loop's bindings, its four graphs
(full and shallow steps, even and odd) and the per-step plan hold together, nothing about real TensorRT. The
refit tests run on CPU (a refitted copy of the ONNX export against PyTorch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdrt.runtime.trt_backend as tb
from sdrt.export import trt_build
from sdrt.export.profiles import custom_profile
from sdrt.export.trt_build import BuildOptions, build_engines
from sdrt.runtime.engine_manifest import EngineManifest
from sdrt.runtime.errors import InputError
from sdrt.runtime.feature_cache import DEEP_FEATURE, SHALLOW_UNET
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.step_graph import build_step_graph

from .helpers.trt_fakes import ENV, FakeCudart, FakeTrt, fake_plan, with_builder
from .test_trt_backend import write_folder

KW: dict[str, Any] = {"negative_prompt": "blurry", "steps": 6, "seed": 3, "height": 64, "width": 96}
CACHE: dict[str, Any] = {"cache": "deepcache", "cache_interval": 3}  # full steps 0 and 3 of 6


@pytest.fixture(scope="module")
def dc_export(deepcache_export) -> Path:
    """The session's sd15-tiny export made with ``--deepcache`` (conftest)."""
    return deepcache_export("sd15-tiny")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def deepcache_engines(dc_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export built by ``build_engines`` on its own fakes (the tests' runtime fakes are fresh per test)."""
    out = tmp_path_factory.mktemp("engines") / "sd15-tiny-deepcache"
    cudart = FakeCudart()
    trt = with_builder(FakeTrt(cudart))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt_build, "load_tensorrt", lambda module=None: trt)
        mp.setattr(trt_build, "current_env", lambda backend, version: dataclasses.replace(
            ENV, backend=backend, version=version))
        build_engines(dc_export, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                      BuildOptions(workspace_gb=1))
    return out


@pytest.fixture(scope="module")
def reference(dc_export: Path) -> dict[str, np.ndarray]:
    """ort-cpu's images (its step-by-step loop, PlainStepLoop) with the cache and without."""
    with Pipeline.load(dc_export, backend="ort-cpu") as pipe:
        cached = pipe("a red fox", **CACHE, **KW)
        assert "2 of 6 steps ran the full UNet" in cached.loop
        return {"cached": np.asarray(cached.images[0], np.int16),
                "plain": np.asarray(pipe("a red fox", **KW).images[0], np.int16)}


def _close(got: Any, want: np.ndarray) -> None:
    a = np.asarray(got.images[0], np.int16)
    assert a.shape == want.shape == (64, 96, 3)
    assert np.abs(a - want).max() <= 1, "the fake engines run the same ONNX graphs as ort-cpu"


def test_the_shallow_engine_is_built_over_the_unet_batch_and_feature_shape(dc_export: Path,
                                                                            deepcache_engines: Path) -> None:
    """``unet_shallow`` gets an engine like any component; its ``deep_feature`` input spans the UNet's batch and
    latent sides, with the channels the export fixed."""
    records = {r.component: r for r in EngineManifest.read(deepcache_engines).engines}
    shapes = {s.name: s for s in records[SHALLOW_UNET].shapes}
    sample, feature = shapes["sample"], shapes[DEEP_FEATURE]
    channels = ExportManifest.read(dc_export).components[SHALLOW_UNET].inputs[-1].shape[1]
    assert isinstance(channels, int) and channels > 0
    for which in ("min", "opt", "max"):
        s, f = getattr(sample, which), getattr(feature, which)
        assert f == (s[0], channels, s[2], s[3]), which
    assert {s.name: s for s in records["unet"].shapes}["sample"] == sample  # the same CFG-doubled batch
    assert ExportManifest.read(deepcache_engines).components[SHALLOW_UNET].path == f"{SHALLOW_UNET}.engine"


def test_deepcache_on_tensorrt_gives_ort_cpus_images(deepcache_engines: Path, reference: dict[str, np.ndarray],
                                                     fake_gpu) -> None:
    """Captured: four graphs (full and shallow, even and odd), one launch per step, the shallow engine on the
    four steps the plan marks; the image is ort-cpu's with the same cache settings. Caching off on the same
    engines (the UNet's deep feature bound to a buffer nobody reads) is ort-cpu's uncached image."""
    cudart, _ = fake_gpu
    assert np.abs(reference["cached"] - reference["plain"]).max() > 1  # the shallow steps change the picture
    with Pipeline.load(deepcache_engines, backend="tensorrt") as pipe:
        got = pipe("a red fox", **CACHE, **KW)
        assert got.loop == ("captured CUDA graphs; feature cache deepcache (every 3): 2 of 6 steps ran the full "
                            "UNet, the others its shallow path")
        assert cudart.captures == 4
        _close(got, reference["cached"])

        unet, shallow = pipe.engines["unet"].context, pipe.engines[SHALLOW_UNET].context
        runs, launches = (unet.runs, shallow.runs), cudart.launches
        again = pipe("a red fox", **CACHE, **KW)  # replayed, not captured anew
        assert cudart.captures == 4 and cudart.launches - launches == 6
        assert (unet.runs - runs[0], shallow.runs - runs[1]) == (2, 4)
        assert np.array_equal(np.asarray(again.images[0]), np.asarray(got.images[0]))

        plain = pipe("a red fox", **KW)
        assert plain.loop == "captured CUDA graphs" and cudart.captures == 6
        _close(plain, reference["plain"])


def test_deepcache_without_capture_runs_the_same_bindings(deepcache_engines: Path,
                                                          reference: dict[str, np.ndarray], fake_gpu) -> None:
    cudart, _ = fake_gpu
    with Pipeline.load(deepcache_engines, backend="tensorrt", cuda_graph=False) as pipe:
        got, plain = pipe("a red fox", **CACHE, **KW), pipe("a red fox", **KW)
    assert got.loop.startswith("engines run directly (CUDA graphs are off") and "2 of 6 steps" in got.loop
    assert cudart.captures == 0
    _close(got, reference["cached"])
    _close(plain, reference["plain"])


def test_the_cached_loop_recaptures_without_losing_the_deep_feature(deepcache_engines: Path, tmp_path: Path,
                                                                    reference: dict[str, np.ndarray],
                                                                    fake_gpu) -> None:
    """A larger engine loaded after step 1 moves the shared scratch: step 2 (shallow) captures all four graphs
    again, whose warm-up runs write the deep feature; the one step 0 wrote must be what step 2 reads."""
    cudart, _ = fake_gpu
    big = write_folder(tmp_path / "big", {"big": fake_plan(build_step_graph(True, np.float32), 10**6)})
    loaded = []
    with Pipeline.load(deepcache_engines, backend="tensorrt") as pipe:
        be = pipe.backend
        assert isinstance(be, tb.TrtBackend)

        def load_bigger(step: int, steps: int) -> None:
            if step == 1:
                loaded.append(be.load(str(big / "big.engine"), "big"))

        got = pipe("a red fox", callback=load_bigger, **CACHE, **KW)
        assert loaded and be.scratch.size == 10**6
    assert got.loop.startswith("captured CUDA graphs") and cudart.captures == 8
    _close(got, reference["cached"])


def test_the_loop_refuses_what_it_cannot_cache(deepcache_engines: Path, fake_gpu) -> None:
    """ControlNets beside a shallow path that takes none of their residuals (an export made without ControlNets),
    and a UNet that does not return the deep feature, are refused when the loop is made; a plan with shallow steps
    on a loop made without one, at ``start``."""
    with Pipeline.load(deepcache_engines, backend="tensorrt") as pipe:
        be, e = pipe.backend, pipe.engines
        step = pipe.device_graphs.step(True, np.dtype(np.float32), None, False)
        with pytest.raises(InputError, match="takes no ControlNet residuals"):
            be.step_loop(e["unet"], step, [e["unet"]], shallow=e[SHALLOW_UNET])
        with pytest.raises(InputError, match=f"does not return {DEEP_FEATURE}.*--feature-cache"):
            be.step_loop(e[SHALLOW_UNET], step, shallow=e[SHALLOW_UNET])
        loop = be.step_loop(e["unet"], step)
        assert be.step_loop(e["unet"], step, shallow=e[SHALLOW_UNET]) is not loop  # a loop per shallow engine
        x = be.to_device(np.zeros((1, 4, 8, 12), np.float32))
        u = be.to_device(np.zeros((2, 4, 8, 12), np.float32))
        cond = {"encoder_hidden_states": be.to_device(np.zeros((2, 77, 32), np.float32))}
        with pytest.raises(InputError, match="made without a shallow engine"):
            loop.start(latents=x, unet_in=u, cond=cond, timesteps=[999.0, 500.0], coeffs=np.zeros((2, 8), np.float32),
                       guidance=be.to_device(np.array(7.5, np.float32)), full=np.array([True, False]))


def _shallow_feeds(export: Path) -> dict[str, np.ndarray]:
    channels = ExportManifest.read(export).components[SHALLOW_UNET].inputs[-1].shape[1]
    g = np.random.default_rng(0)
    return {"sample": g.standard_normal((2, 4, 8, 16)).astype(np.float32),
            "timestep": np.array([999.0, 321.0], np.float32),
            "encoder_hidden_states": g.standard_normal((2, 77, 32)).astype(np.float32),
            DEEP_FEATURE: g.standard_normal((2, channels, 8, 16)).astype(np.float32)}


def _shallow_error(folder: Path, unet: Any, feeds: dict[str, np.ndarray]) -> float:
    """The relative difference of ``folder``'s shallow graph (onnxruntime) from DeepCache's shallow path of
    ``unet`` in PyTorch."""
    import onnxruntime as ort
    import torch

    from sdrt.export import wrappers

    with torch.inference_mode():
        want = wrappers.UNetShallow(unet, sdxl=False)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    path = folder / ExportManifest.read(folder).components[SHALLOW_UNET].path
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_lora_refit_covers_the_shallow_path(dc_export: Path, tmp_path: Path) -> None:
    """``refit`` takes ``unet_shallow`` with the UNet (its weights are the UNet's last layers): a LoRA reaches
    both graphs, and the refitted shallow graph is DeepCache's shallow path of diffusers' fused UNet."""
    pytest.importorskip("torch")
    from sdrt.export.loading import load_model
    from sdrt.export.refit import RefitRequest, refit_folder
    from sdrt.runtime.lora_files import LoraSpec

    from .helpers.models import make_lora
    from .helpers.references import diffusers_fused

    model = load_model(random_preset="sd15-tiny")  # the weights the export holds (seed 0)
    te = model.text_encoders[0]
    lora = make_lora(tmp_path / "a.safetensors", model.unet, te, "diffusers", seed=11)
    result = refit_folder(dc_export, RefitRequest(loras=(LoraSpec(lora, 0.8),)), out=tmp_path / "refit")
    assert set(result.components) == {"unet", "text_encoder", SHALLOW_UNET} and result.warnings == ()
    fused, _ = diffusers_fused(model.unet, te, model.vae, [(lora, 0.8)])
    feeds = _shallow_feeds(dc_export)
    assert _shallow_error(tmp_path / "refit", fused, feeds) < 1e-4
    assert _shallow_error(dc_export, fused, feeds) > 1e-2  # the LoRA changes the shallow path


def test_checkpoint_refit_covers_the_shallow_path(dc_export: Path, tmp_path: Path) -> None:
    """Another checkpoint of the architecture (a diffusers folder) refits ``unet_shallow`` from its UNet."""
    pytest.importorskip("torch")
    import json

    from sdrt.export.loading import random_model
    from sdrt.export.refit import RefitRequest, refit_folder

    other = random_model("sd15-tiny", seed=7)
    src = tmp_path / "other"
    for sub, module in (("unet", other.unet), ("vae", other.vae), ("text_encoder", other.text_encoders[0])):
        module.save_pretrained(src / sub)
    (src / "tokenizer").mkdir()
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps(other.scheduler_config))
    (src / "model_index.json").write_text("{}")
    result = refit_folder(dc_export, RefitRequest(checkpoint=str(src)), out=tmp_path / "refit")
    assert SHALLOW_UNET in result.components
    feeds = _shallow_feeds(dc_export)
    assert _shallow_error(tmp_path / "refit", other.unet, feeds) < 1e-4
    assert _shallow_error(dc_export, other.unet, feeds) > 1e-2  # not the export's own weights
