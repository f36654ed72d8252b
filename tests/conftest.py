"""Shared fixtures: tiny synthetic models, exported once per session and reused by every test; the
TensorRT fakes wired in; shared pipelines closed at each module's end. Helpers (no fixtures) live in tests/helpers/."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist worker: one CPU thread each for sdrt's backends (``SDRT_THREADS``) and for PyTorch (the
    diffusers references). Two workers on two cores, each with thread pools sized to both cores, would run twice
    as many threads as cores, and ONNX Runtime's spinning threads take turns badly."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("SDRT_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def own_cache_home(tmp_path_factory: pytest.TempPathFactory):
    """sdrt's caches (openvino's compiled models, by default under ``$XDG_CACHE_HOME``) go to the session's temporary
    folder, never the user's ``~/.cache``: the tests' exports live in temporary folders, so blobs cached there
    would never be asked for again."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's ``--dist loadgroup`` (``make test``): a module's tests stay on one worker (its module
    fixtures are made once), and the heavy tests (``slow``: full-size models, GBs of memory; ``ray``: a local
    cluster) all run on one worker, one after another, so two of them never add up in memory."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        heavy = item.get_closest_marker("slow") or item.get_closest_marker("ray")
        item.add_marker(pytest.mark.xdist_group("heavy" if heavy else item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return {}


def shared_export(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder ``name`` of the session's exports, made by ``make(folder)`` once per test run: under pytest-xdist
    the workers share one folder (their base temp's parent) and take a file lock per export, so the first worker
    to need it exports and the others wait and reuse it. The exporter writes to a temporary path and renames
    when complete, so a folder that exists is whole; each export has a parent folder of its own (what a test sees
    beside its export is its own, not another worker's export in progress)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-exports"
    (root / name).mkdir(parents=True, exist_ok=True)
    out = root / name / name
    with FileLock(str(root / name) + ".lock"):
        if not out.exists():
            make(out)
    return out


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """tiny_export(preset, precision) -> folder of an sdrt export of synthetic weights (seed 0)."""

    def get(preset: str, precision: str = "fp32") -> Path:
        key = (preset, precision)
        if key not in export_cache:
            from sdrt.export.exporter import export_model
            from sdrt.export.loading import load_model

            def make(out: Path) -> None:
                export_model(load_model(random_preset=preset), out, fp16=precision == "fp16")

            export_cache[key] = shared_export(tmp_path_factory, f"{preset}-{precision}", make)
        return export_cache[key]

    return get


@pytest.fixture(scope="session")
def deepcache_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """deepcache_export(preset, precision) -> folder of an sdrt export of synthetic weights (seed 0) made with
    ``--deepcache`` (the shallow path ``unet_shallow``; the UNet also returns the deep feature)."""

    def get(preset: str, precision: str = "fp32") -> Path:
        key = (f"{preset}-deepcache", precision)
        if key not in export_cache:
            from sdrt.export.exporter import export_model
            from sdrt.export.loading import load_model

            def make(out: Path) -> None:
                export_model(load_model(random_preset=preset), out, fp16=precision == "fp16", deepcache=True)

            export_cache[key] = shared_export(tmp_path_factory, f"{preset}-deepcache-{precision}", make)
        return export_cache[key]

    return get


@pytest.fixture(scope="session")
def slotted_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """slotted_export(preset, slots="8", precision="fp32", deepcache=False) -> folder of an sdrt export of synthetic
    weights (seed 0) made with ``--lora-slots SLOTS`` (the UNet takes LoRA factors as inputs), and ``deepcache``:
    with ``--deepcache`` too."""

    def get(preset: str, slots: str = "8", precision: str = "fp32", deepcache: bool = False) -> Path:
        key = (f"{preset}-slots-{slots}{'-deepcache' if deepcache else ''}", precision)
        if key not in export_cache:
            from sdrt.export.exporter import export_model
            from sdrt.export.loading import load_model
            from sdrt.export.lora_slots import SlotPlan

            def make(out: Path) -> None:
                export_model(load_model(random_preset=preset), out, fp16=precision == "fp16",
                             lora_slots=SlotPlan.parse(slots), deepcache=deepcache)

            name = f"{preset}-slots-{slots.replace(':', '-')}{'-deepcache' if deepcache else ''}-{precision}"
            export_cache[key] = shared_export(tmp_path_factory, name, make)
        return export_cache[key]

    return get


@pytest.fixture(scope="session")
def sd3_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """sd3_export(preset, t5=True, precision="fp32", block_cache=False) -> folder of an sdrt export (fp32, fp16 or
    bf16) of an SD3 preset's seeded weights (seed 0), with its T5 encoder or without it; ``block_cache``: made with
    ``--feature-cache`` (first-block caching's cached step ``unet_shallow``; the transformer returns its residuals)."""

    def get(preset: str, t5: bool = True, precision: str = "fp32", block_cache: bool = False) -> Path:
        key = (f"{preset}{'' if t5 else '-no-t5'}{'-block-cache' if block_cache else ''}", precision)
        if key not in export_cache:
            from sdrt.export.sd3_export import export_sd3
            from sdrt.export.sd3_loading import load_sd3

            def make(out: Path) -> None:
                export_sd3(load_sd3(random_preset=preset), out, fp16=precision == "fp16", bf16=precision == "bf16",
                           without_t5=not t5, block_cache=block_cache)

            export_cache[key] = shared_export(tmp_path_factory, f"{key[0]}-{precision}", make)
        return export_cache[key]

    return get


@pytest.fixture
def mean_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdrt encodes a control image (and an img2img image) to the latent mean (deterministic); make diffusers
    (whose ControlNet and control pipelines sample the latent distribution) do the same."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.fixture(scope="session")
def flux_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """flux_export(preset, stream=False, block_cache=False, bf16=False) -> folder of an sdrt export of a FLUX.1
    preset's seeded weights (seed 0, fp32: FLUX.1 exports no fp16; ``bf16``: its text encoders and transformer in
    bf16); ``stream``: the transformer and T5 streamed (export/streamed.py), as a full-size model's are;
    ``block_cache``: made with ``--feature-cache`` (first-block caching's cached step ``unet_shallow``; the
    transformer returns its residuals)."""

    def get(preset: str, stream: bool = False, block_cache: bool = False, bf16: bool = False) -> Path:
        precision = "bf16" if bf16 else "fp32"
        key = (f"{preset}{'-streamed' if stream else ''}{'-block-cache' if block_cache else ''}", precision)
        if key not in export_cache:
            from sdrt.export.flux_export import export_flux
            from sdrt.export.flux_loading import load_flux

            def make(out: Path) -> None:
                export_flux(load_flux(random_preset=preset, stream=stream), out, block_cache=block_cache, bf16=bf16)

            name = key[0] if precision == "fp32" else f"{key[0]}-{precision}"
            export_cache[key] = shared_export(tmp_path_factory, name, make)
        return export_cache[key]

    return get


@pytest.fixture(scope="session")
def shapes_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """shapes_export(precision) -> folder of an sdrt export of the committed shapes model (sdrt.quality)."""

    def get(precision: str = "fp32") -> Path:
        key = ("shapes", precision)
        if key not in export_cache:
            from sdrt.export.exporter import export_model
            from sdrt.export.loading import load_model
            from sdrt.quality import MODEL_DIR

            def make(out: Path) -> None:
                export_model(load_model(MODEL_DIR), out, fp16=precision == "fp16")

            export_cache[key] = shared_export(tmp_path_factory, f"shapes-{precision}", make)
        return export_cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_controlnet_export(tmp_path_factory: pytest.TempPathFactory, export_cache: dict[tuple[str, str], Path]):
    """tiny_controlnet_export(preset, precision, nets, deepcache=False) -> folder of an sdrt export of synthetic
    weights (seed 0) with ``nets`` synthetic ControlNets of the matching tiny preset (seeds 1, 2, ...); ``deepcache``:
    made with ``--deepcache`` too (its shallow path takes the residuals of the skips it reads)."""

    def get(preset: str = "sd15-tiny", precision: str = "fp32", nets: int = 2, deepcache: bool = False) -> Path:
        key = (f"{preset}+{nets}cn{'-deepcache' if deepcache else ''}", precision)
        if key not in export_cache:
            from sdrt.export.controlnet_loading import random_controlnet
            from sdrt.export.exporter import export_model
            from sdrt.export.loading import load_model

            cn = preset.removesuffix("-tiny") + "-controlnet-tiny"
            name = f"{preset}-{nets}cn{'-deepcache' if deepcache else ''}-{precision}"

            def make(out: Path) -> None:
                export_model(load_model(random_preset=preset), out, fp16=precision == "fp16", deepcache=deepcache,
                             controlnets=[random_controlnet(cn, seed=1 + j) for j in range(nets)])

            export_cache[key] = shared_export(tmp_path_factory, name, make)
        return export_cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def close_shared_pipelines():
    """At the session's end, close the pipelines tests shared (``helpers.pipelines.shared_pipeline``) still open."""
    yield
    from .helpers.pipelines import close_all

    close_all()


@pytest.fixture(scope="module", autouse=True)
def close_module_pipelines():
    """At each test module's end, close the shared pipelines first opened during it and empty the reference caches
    (``helpers.pipelines.module_cache``): kept to the session's end, every module's pipelines and diffusers
    references added up in the one test process (the suite's peak memory). Set up before the module's own
    fixtures, so torn down after them (a module-scoped fixture holding a shared pipeline is done with it)."""
    from .helpers.pipelines import closing_opened

    with closing_opened():
        yield


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """(FakeCudart, FakeTrt with the builder API) wired into the tensorrt backend and ``build_engines``."""
    import dataclasses

    import sdrt.runtime.trt_backend as tb
    from sdrt.export import trt_build

    from .helpers.trt_fakes import ENV, FakeCudart, FakeTrt, with_builder

    cudart = FakeCudart()
    trt = with_builder(FakeTrt(cudart))
    monkeypatch.setattr(tb, "import_cudart", lambda: cudart)
    monkeypatch.setattr(tb, "import_tensorrt", lambda names: trt)
    monkeypatch.setattr(trt_build, "load_tensorrt", lambda module=None: trt)
    # the builder's view of the GPU is the fake device's (name and compute capability)
    monkeypatch.setattr(trt_build, "current_env", lambda backend, version: dataclasses.replace(
        ENV, backend=backend, version=version))
    return cudart, trt
