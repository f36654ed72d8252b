"""``sdrt bench --cache``: feature caching (DeepCache) measured beside the uncached run of each sdrt backend.

A tiny preset end to end (exported with ``--deepcache`` by the bench), the figures recomputed from the raw
per-step times, the cached rows never matched with the uncached ones as if they were the same configuration,
the schema's migration from version 3, and the refusals made before any measurement.
No test asserts a timing.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdrt.benchmarks import report, schema
from sdrt.benchmarks.bench import BenchConfig, run_bench
from sdrt.benchmarks.config import cache_label, parse_cache
from sdrt.benchmarks.records import add_ratios, add_uncached
from sdrt.cli import main
from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.feature_cache import CachePolicy

from .helpers.bench_results import synthetic_results

STEPS = 4
CACHE = {"kind": "deepcache", "interval": 2, "schedule": "uniform"}


def _backends() -> list[str]:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["ort-cpu"]
    return ["ort-cpu", "openvino"]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The command a user types: a preset (exported here with --deepcache), each backend uncached and with
    deepcache:2, no baseline."""
    tmp = tmp_path_factory.mktemp("bench-cache")
    out = tmp / "run.json"
    args = ["bench", "--preset", "sd15-tiny", "--backends", ",".join(_backends()), "--cache", "deepcache:2",
            "--steps", str(STEPS), "--warmup", "0", "--repeats", "2", "--rounds", "1", "--threads", "1", "--baseline", "none",
            "--matmul-size", "256", "--work-dir", str(tmp / "work"), "-o", str(out)]
    if "openvino" in _backends():
        args += ["--openvino-precision", "fp32"]
    assert main(args) == 0
    return schema.load(out), report.text_table(schema.load(out))


def test_each_backend_runs_uncached_then_cached(cached_run: tuple[dict[str, Any], str]) -> None:
    doc, _ = cached_run
    assert doc["schema_version"] == schema.SCHEMA_VERSION and schema.problems(doc) == []
    assert doc["config"]["caches"] == [CACHE]
    assert "unet_shallow" in doc["model"]["components"]  # the preset's export was made with --deepcache
    ms = doc["measurements"]
    assert [(m["backend"], m["cache"]) for m in ms] == [x for b in _backends() for x in ((b, None), (b, CACHE))]
    for b in doc["backends"]:  # the backend's loop is its uncached one
        assert b["status"] == "ok" and "feature cache" not in b["timing_method"]
    for m in ms:
        assert m["status"] == "ok", m["reason"]
        assert all(len(run) == STEPS for run in m["raw"]["unet_steps_ms"])


def test_cached_figures_from_the_raw_step_times(cached_run: tuple[dict[str, Any], str]) -> None:
    doc, _ = cached_run
    ms = doc["measurements"]
    for uncached, cached in zip(ms[::2], ms[1::2]):
        assert uncached["full_steps"] == STEPS and uncached["vs_uncached"] is None
        assert uncached["image_vs_uncached"] is None and uncached["unet_shallow_step_ms"] is None
        assert uncached["unet_full_step_ms"] == pytest.approx(
            np.median([x for r in uncached["raw"]["unet_steps_ms"] for x in r]))
        assert cached["full_steps"] == math.ceil(STEPS / 2) == 2
        # deepcache every 2nd step: steps 0 and 2 full, 1 and 3 shallow
        full = [r[k] for r in cached["raw"]["unet_steps_ms"] for k in (0, 2)]
        shallow = [r[k] for r in cached["raw"]["unet_steps_ms"] for k in (1, 3)]
        assert cached["unet_full_step_ms"] == pytest.approx(np.median(full))
        assert cached["unet_shallow_step_ms"] == pytest.approx(np.median(shallow))
        assert cached["unet_equivalent_steps"] == pytest.approx(2 + 2 * np.median(shallow) / np.median(full))
        vs = cached["vs_uncached"]
        assert set(vs) == {*schema.UNCACHED_METRICS, *schema.SPEEDUPS}
        assert vs["speedup_total_ms_p50"] == pytest.approx(
            np.median(uncached["raw"]["total_ms"]) / np.median(cached["raw"]["total_ms"]))
        unet = [np.mean([x for r in m["raw"]["unet_steps_ms"] for x in r]) for m in (uncached, cached)]
        assert vs["speedup_unet_ms_per_image"] == pytest.approx(unet[0] / unet[1])
        assert vs["unet_step_ms_mean"] == pytest.approx(unet[1] / unet[0])
        img = cached["image_vs_uncached"]
        assert img["mean_abs"] >= 0 and 0 <= img["max_abs"] <= 255 and "same starting latents" in img["note"]
        assert cached["of_floor"] is None  # the floor counts a full UNet every step


def test_reports_show_the_cached_rows_apart(cached_run: tuple[dict[str, Any], str]) -> None:
    doc, table = cached_run
    for b in _backends():
        assert f"\n{b} + deepcache/2 " in table
        assert f"feature cache: {b} + deepcache/2 64x64 batch 1 dpmpp-2m/{STEPS}: " in table
    md = report.markdown([doc])
    # a row measured while other work ran is marked "(busy host)": what the host did is not under test here
    assert "## Feature caching" in md and re.search(r"\| ort-cpu \+ deepcache/2( \(busy host\))? \| sd15-tiny fp32 \|", md)
    assert "faster per image than uncached" in md and "2 of 4 steps full" in md


def test_cached_rows_are_matched_with_their_own_configuration(tmp_path: Path) -> None:
    """The baseline row is the uncached torch row for every sdrt row; each cached row is compared with the uncached
    row of its backend, never with another cached one, and the uncached row with nothing."""
    doc = synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 2**31)
    base, plain = doc["measurements"]
    plain["baseline"] = plain["vs_baseline"] = None
    every3 = copy.deepcopy(plain)
    every3.update(cache=dict(CACHE, interval=3), full_steps=7, total_ms={**plain["total_ms"], "p50": 200.0})
    every5 = copy.deepcopy(plain)
    every5.update(cache=dict(CACHE, interval=5), full_steps=4, total_ms={**plain["total_ms"], "p50": 100.0})
    ms = [base, plain, every3, every5]
    add_ratios(ms, lambda m: None if m["role"] == "baseline" else "torch-cuda", tmp_path)
    add_uncached(ms, tmp_path)
    assert [m["baseline"] for m in ms] == [None, "torch-cuda", "torch-cuda", "torch-cuda"]
    assert every5["vs_baseline"]["total_ms_p50"] == pytest.approx(100.0 / base["total_ms"]["p50"])
    assert plain["vs_uncached"] is None
    assert every3["vs_uncached"]["speedup_total_ms_p50"] == pytest.approx(plain["total_ms"]["p50"] / 200.0)
    assert every5["vs_uncached"]["speedup_total_ms_p50"] == pytest.approx(plain["total_ms"]["p50"] / 100.0)
    assert every5["image_vs_uncached"] is None  # no images in tmp_path
    doc["config"]["caches"] = [dict(CACHE, interval=3), dict(CACHE, interval=5)]
    doc["measurements"] = ms
    assert schema.problems(doc) == []
    every5["full_steps"] = 21
    every3["vs_uncached"].pop("speedup_unet_ms_per_image")
    plain["cache"] = {"kind": "fastcache", "interval": 3, "schedule": "uniform"}
    found = "\n".join(schema.problems(doc))
    assert "measurements[3].full_steps 21 is not from 1 to steps (20)" in found
    assert "measurements[2].vs_uncached lacks some of" in found
    assert "measurements[1].cache: cache 'fastcache' is not one of deepcache" in found


def test_a_version_3_result_migrates_uncached(tmp_path: Path) -> None:
    v3 = synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 2**31)
    v3["schema_version"] = 3
    del v3["config"]["caches"]
    for m in v3["measurements"]:
        for key in ("cache", "full_steps", "unet_full_step_ms", "unet_shallow_step_ms", "unet_equivalent_steps",
                    "vs_uncached", "image_vs_uncached"):
            del m[key]
    assert "config.caches is missing" in schema.problems(v3)
    p = tmp_path / "v3.json"
    p.write_text(json.dumps(v3))
    doc = schema.load(p)
    assert doc["schema_version"] == schema.SCHEMA_VERSION and doc["migrated_from"] == 3
    assert doc["config"]["caches"] == []
    for m in doc["measurements"]:
        assert m["cache"] is None and m["full_steps"] == m["steps"] == 20
        assert m["vs_uncached"] is None and m["unet_shallow_step_ms"] is None and m["unet_equivalent_steps"] is None
    assert "## Feature caching" not in report.markdown([doc])


def test_cache_specs_parse_and_bad_ones_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_cache("deepcache:3") == CachePolicy("deepcache", 3, "uniform")
    assert parse_cache("deepcache:5:nonuniform") == CachePolicy("deepcache", 5, "nonuniform")
    assert cache_label(parse_cache("deepcache:5:nonuniform")) == "deepcache/5/nonuniform"
    assert cache_label(CACHE) == "deepcache/2"
    assert cache_label(parse_cache("first-block:2")) == "first-block/2"
    for spec, message in (("deepcache", "use KIND:INTERVAL"), ("deepcache:x", "use KIND:INTERVAL"),
                          ("deepcache:3:1:2", "use KIND:INTERVAL"), ("first-block:0.2", "use KIND:INTERVAL"),
                          ("fastcache:3", "not one of deepcache, first-block.*the form is KIND:INTERVAL"),
                          ("deepcache:0", "integer from 1 to 50.*the form is KIND:INTERVAL"),
                          ("deepcache:3:weird", "'weird' is not one of uniform, nonuniform")):
        with pytest.raises(InputError, match=message):
            BenchConfig(preset="sd15-tiny", caches=(spec,))
    with pytest.raises(InputError, match="given twice"):
        BenchConfig(preset="sd15-tiny", caches=("deepcache:3", "deepcache:3:uniform"))
    # ControlNets: DeepCache on a UNet preset is measured (its shallow path takes the nets' residuals); first-block
    # caching and transformer presets are refused, as a refiner pair is
    assert BenchConfig(preset="sd15-tiny", workload="controlnet", caches=("deepcache:3",)).caches == ("deepcache:3",)
    assert BenchConfig(preset="sdxl-tiny", workload="controlnet", caches=("deepcache:2:nonuniform",)).caches
    for preset, cache in (("sd3-tiny", "deepcache:3"), ("flux-dev-tiny", "first-block:2"), ("sd15-tiny", "first-block:2")):
        with pytest.raises(InputError, match="beside ControlNets only as DeepCache on a UNet model"):
            BenchConfig(preset=preset, workload="controlnet", caches=(cache,))
    with pytest.raises(InputError, match="not measured on the base-refiner workload"):
        BenchConfig(preset="sdxl-tiny", workload="base-refiner", caches=("deepcache:3",))
    # the command line names the flag, before anything runs
    assert main(["bench", "--preset", "sd15-tiny", "--backends", "ort-cpu", "--cache", "deepcache"]) == 1
    err = capsys.readouterr().err
    assert "--cache 'deepcache': use KIND:INTERVAL[:SCHEDULE]" in err


def test_an_export_without_the_shallow_path_is_refused_before_any_measurement(tiny_export, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    cfg = BenchConfig(artifact=str(tiny_export("sd15-tiny")), backends=("ort-cpu",), caches=("deepcache:3",),
                      steps=(2,), warmup=0, repeats=1, baseline="none", work_dir=str(tmp_path))
    with pytest.raises(ArtifactError, match=r"no cheap step for feature caching \(unet_shallow\).*sdrt export \.\.\. "
                                            r"--feature-cache"):
        run_bench(cfg, events.append)
    assert not [e for e in events if e["stage"] in ("job", "ceiling", "flops")]
    assert main(["bench", "--artifact", str(tiny_export("sd15-tiny")), "--backends", "ort-cpu", "--cache",
                 "deepcache:3", "--baseline", "none", "--work-dir", str(tmp_path)]) == 1
    # an SD 3 / 3.5 preset has no UNet for DeepCache (its kind is first-block): refused before it is exported
    events.clear()
    with pytest.raises(InputError, match="sd3-tiny is an SD 3 / 3.5 model: it has no deepcache feature caching "
                                         r"\(it has: first-block\)"):
        run_bench(BenchConfig(preset="sd3-tiny", backends=("ort-cpu",), caches=("deepcache:3",), baseline="none",
                              work_dir=str(tmp_path)), events.append)
    assert not [e for e in events if e["stage"] in ("export", "job")]
