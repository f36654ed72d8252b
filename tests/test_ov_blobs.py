"""The openvino backend's model cache (runtime/ov_blobs.py): the first load compiles and writes each graph's blob
in the background, a later load maps the blobs instead of compiling, with images identical to a fresh compile's;
a blob is keyed by its graph's files (a changed weights file compiles again), a damaged blob is replaced, and a
write never leaves half a blob under a real name."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino backend needs pip install 'sdrt[openvino]'")

from sdrt.runtime.errors import InputError
from sdrt.runtime.ov_backend import OvBackend
from sdrt.runtime.ov_blobs import (
    DEFAULT_MAX_GB,
    ENV_MAX,
    SUFFIX,
    TMP,
    BlobCache,
    FileStream,
    max_gb,
    remove_orphans,
    weight_files,
)
from sdrt.runtime.pipeline import Pipeline

KW = {"prompt": "a lighthouse at dawn", "negative_prompt": "blurry", "steps": 3, "seed": 3, "height": 64, "width": 80}


def image(folder: Path, backend: OvBackend) -> np.ndarray:
    with Pipeline.load(folder, backend=backend) as p:
        return np.asarray(p(**KW).images[0])


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture
def export(tiny_export, tmp_path: Path) -> Path:
    """A copy of the tiny SD 1.5 export of the test's own (one test changes a weights file's time)."""
    return Path(shutil.copytree(tiny_export("sd15-tiny", "fp32"), tmp_path / "export"))


def test_second_load_maps_the_blobs_the_first_wrote_and_draws_the_same_image(export: Path, tmp_path: Path) -> None:
    before = listing(export)
    cache = tmp_path / "cache"
    first_be = OvBackend(precision="f32", cache_dir=cache)
    first = image(export, first_be)  # the pipeline's close waits for the blob writes
    compiled = [name for name, how in first_be.compiles if how == "compiled"]
    assert compiled and all(how == "compiled" for _, how in first_be.compiles)
    blobs = sorted(cache.glob("*" + SUFFIX))
    assert len(blobs) == len(compiled) >= 4  # text encoder, UNet, VAE decoder and encoder, the step graph
    assert not list(cache.glob("*" + TMP))
    assert listing(export) == before  # nothing written into the export

    second_be = OvBackend(precision="f32", cache_dir=cache)
    second = image(export, second_be)
    assert sorted(second_be.compiles) == sorted((name, "mapped") for name in compiled)
    assert np.array_equal(first, second)
    # the reference: the same graphs compiled with no cache at all
    assert np.array_equal(first, image(export, OvBackend(precision="f32", cache_dir=False)))
    assert sorted(cache.glob("*" + SUFFIX)) == blobs  # nothing rewritten


def test_a_changed_weights_file_compiles_again_and_a_damaged_blob_is_replaced(export: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    reference = image(export, OvBackend(precision="f32", cache_dir=cache))
    weights = weight_files(str(export / "unet" / "model.onnx"))
    assert weights, "the tiny UNet's weights are in an external data file"
    st = os.stat(weights[0])
    os.utime(weights[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as a re-export would leave it
    be = OvBackend(precision="f32", cache_dir=cache)
    assert np.array_equal(image(export, be), reference)
    assert [name for name, how in be.compiles if how == "compiled"] == ["unet"]

    assert be.blobs is not None
    blob = be.blobs.path(be.blobs.key(str(export / "unet" / "model.onnx"), (), be.config))  # the UNet's new blob
    size = blob.stat().st_size
    blob.write_bytes(blob.read_bytes()[: size // 2])
    be = OvBackend(precision="f32", cache_dir=cache)
    with pytest.warns(UserWarning, match="did not import"):
        again = image(export, be)
    assert np.array_equal(again, reference)
    assert [name for name, how in be.compiles if how == "compiled"] == ["unet"]
    assert blob.stat().st_size == size


def test_static_shapes_map_a_blob_per_shape(export: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first_be = OvBackend(precision="f32", cache_dir=cache, static_shapes=True)
    first = image(export, first_be)
    second_be = OvBackend(precision="f32", cache_dir=cache, static_shapes=True)
    assert np.array_equal(image(export, second_be), first)
    assert [how for _, how in second_be.compiles] == ["mapped"] * len(first_be.compiles)


def tiny_graph(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_the_streamed_blob_is_openvinos_own_export_byte_for_byte(tmp_path: Path) -> None:
    tiny_graph(tmp_path / "g.onnx")
    core = ov.Core()
    compiled = core.compile_model(str(tmp_path / "g.onnx"), "CPU", {})
    with open(tmp_path / "g.blob", "w+b") as f:
        compiled.export_model(FileStream(f))
    assert (tmp_path / "g.blob").read_bytes() == compiled.export_model().getvalue()


class FailingModel:
    """A compiled model whose export stops halfway (a full disk, say)."""

    def export_model(self, stream: Any) -> None:
        stream.write(b"x" * 1000)
        raise RuntimeError("No space left on device")


def test_a_failed_write_leaves_no_blob_and_orphans_of_dead_writers_are_removed(tmp_path: Path) -> None:
    core = ov.Core()
    cache = BlobCache(tmp_path, ov, core, "CPU", {})
    cache.store(FailingModel(), "k" * 40)
    cache.wait()
    assert list(tmp_path.iterdir()) == []
    assert cache.errors and "No space left" in cache.errors[0]
    # a write killed with its process leaves its temporary file: the next cache over the folder removes it
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its pid names no process now
    dead = ended.pid
    orphan = tmp_path / f".{'k' * 40}.{dead}.abc{TMP}"
    live = tmp_path / f".{'k' * 40}.{os.getpid()}.abc{TMP}"
    orphan.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert remove_orphans(tmp_path) == [orphan]
    assert live.exists() and not orphan.exists()


def cached(cache: Path) -> dict[str, int]:
    """The cache's blobs and weights indexes: name -> size."""
    return {p.name: p.stat().st_size for p in cache.iterdir() if p.name.endswith((SUFFIX, ".json"))}


def test_the_cache_is_bounded_least_recently_used_first_never_what_is_in_use(export: Path, tmp_path: Path) -> None:
    """Past the bound, when a backend closes (and after each blob write), the least recently used files go (a hit
    renews a blob), never one a backend open in the process used: a model larger than the bound stays cached
    whole."""
    cache = tmp_path / "cache"
    reference = image(export, OvBackend(precision="f32", cache_dir=cache))
    real = cached(cache)
    assert len([n for n in real if n.endswith(SUFFIX)]) >= 4
    now = os.stat(cache).st_mtime_ns
    for name in real:  # as if last used long ago
        os.utime(cache / name, ns=(now, now - 2_000_000_000_000))
    stale = cache / ("s" * 40 + SUFFIX)  # a blob of an export since deleted, used after those
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, ns=(now, now - 1_000_000_000_000))
    be = OvBackend(precision="f32", cache_dir=cache, cache_max_gb=math.inf)  # hits: the real blobs used now
    assert np.array_equal(image(export, be), reference) and all(how == "mapped" for _, how in be.compiles)
    be.close()
    assert be.blobs is not None and be.blobs.removed == []

    bound = sum(real.values()) + 500  # room for the real blobs, not for the stale one too
    be = OvBackend(precision="f32", cache_dir=cache, cache_max_gb=bound / 1e9)
    assert be.blobs is not None and be.blobs.removed == []  # nothing goes before the backend closes
    assert np.array_equal(image(export, be), reference) and all(how == "mapped" for _, how in be.compiles)
    assert be.blobs.removed == [stale]  # (the pipeline closed it) the least recently used, though newer on disk
    assert cached(cache) == real

    small = OvBackend(precision="f32", cache_dir=cache, cache_max_gb=1e-9)  # one byte: smaller than any blob
    with Pipeline.load(export, backend=small) as pipe:
        assert np.array_equal(np.asarray(pipe(**KW).images[0]), reference)
        other = OvBackend(precision="f32", cache_dir=cache, cache_max_gb=1e-9)  # opened beside it, using nothing
        other.close()
        assert other.blobs is not None and other.blobs.removed == []  # what the open one uses is kept
    assert small.blobs is not None and small.blobs.removed == []  # in use by itself: kept whole, over the bound
    assert cached(cache) == real
    last = OvBackend(precision="f32", cache_dir=cache, cache_max_gb=1e-9)  # once none uses them, they go
    last.close()
    assert last.blobs is not None and sorted(p.name for p in last.blobs.removed) == sorted(real)
    assert cached(cache) == {}


def test_an_exact_graph_shares_the_f32_backends_blob(export: Path, tmp_path: Path) -> None:
    """A blob is keyed by the settings it was compiled with: the text encoder loaded exact (f32) on a bf16 backend
    maps the blob an f32 backend wrote for it."""
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 (OpenVINO's CPU capabilities lack BF16): no bf16 backend to load on")
    cache = tmp_path / "cache"
    image(export, OvBackend(precision="f32", cache_dir=cache))
    be = OvBackend(precision="bf16", cache_dir=cache)
    image(export, be)
    how = dict(be.compiles)
    assert how["text_encoder"] == "mapped" and how["unet"] == "compiled"


def test_the_bound_from_the_environment_and_bad_bounds_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_MAX, raising=False)
    assert max_gb() == DEFAULT_MAX_GB == 64
    monkeypatch.setenv(ENV_MAX, "2.5")
    assert max_gb() == 2.5 and max_gb(7) == 7 and OvBackend(cache_dir=tmp_path).blobs.max_bytes == 2.5e9
    monkeypatch.setenv(ENV_MAX, "inf")
    assert max_gb() == math.inf
    for bad in ("0", "-1", "lots", "nan"):
        monkeypatch.setenv(ENV_MAX, bad)
        with pytest.raises(InputError, match=f"{ENV_MAX} must be a number of GB above 0"):
            OvBackend(cache_dir=tmp_path)
    assert OvBackend(cache_dir=False).blobs is None  # no cache, no bound read
    monkeypatch.delenv(ENV_MAX)
    with pytest.raises(InputError, match="cache_max_gb must be a number of GB above 0"):
        OvBackend(cache_dir=tmp_path, cache_max_gb=0)
