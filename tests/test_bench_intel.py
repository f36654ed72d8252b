"""Intel's CPU pipelines as bench rows (``--intel-python``): refused with the reason where they cannot run, and,
where an environment with optimum-intel and openvino-genai is given (``SDRT_INTEL_PYTHON``, the interpreter of
the virtualenv benchmarks/README.md describes), measured beside diffusers on the same weights and latents, with
their images' difference from diffusers' recorded beside their speed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sdrt.benchmarks import schema
from sdrt.benchmarks.bench import BenchConfig, run_bench
from sdrt.benchmarks.report import text_table
from sdrt.runtime.errors import InputError

INTEL_PYTHON = os.environ.get("SDRT_INTEL_PYTHON")


def test_a_bad_interpreter_or_no_baseline_is_refused_before_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not an executable Python.*optimum-intel and openvino-genai"):
        BenchConfig(preset="sd15-tiny", intel_python=str(tmp_path / "nope" / "python"))
    with pytest.raises(InputError, match="compared with diffusers"):
        BenchConfig(preset="sd15-tiny", intel_python=sys.executable, baseline="none")


def test_a_family_they_do_not_run_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """An SDXL model: both rows skipped, naming why, before any Intel process starts (this interpreter stands in
    for the Intel environment: it is never run)."""
    doc = run_bench(BenchConfig(preset="sdxl-tiny", backends=("ort-cpu",), steps=(1,), warmup=0, repeats=1,
                                rounds=1, threads=1, work_dir=str(tmp_path), matmul_n=128,
                                intel_python=sys.executable))
    assert schema.problems(doc) == []
    by = {b["name"]: b for b in doc["backends"]}
    for name in ("optimum-intel", "openvino-genai"):
        assert by[name]["status"] == "skipped" and "SD 1.x / 2.x" in by[name]["reason"]
    assert not [m for m in doc["measurements"] if m["backend"] in by and by[m["backend"]]["status"] == "skipped"]


@pytest.mark.skipif(INTEL_PYTHON is None, reason="set SDRT_INTEL_PYTHON to the interpreter of a virtualenv with "
                                                 "optimum-intel and openvino-genai (benchmarks/README.md)")
def test_intel_pipelines_run_beside_diffusers_and_sdrt(tmp_path: Path) -> None:
    doc = run_bench(BenchConfig(preset="sd15-tiny", backends=("ort-cpu",), steps=(2,), samplers=("euler",),
                                warmup=0, repeats=2, rounds=2, threads=1, work_dir=str(tmp_path), matmul_n=128,
                                intel_python=INTEL_PYTHON))
    assert schema.problems(doc) == []
    by = {m["backend"]: m for m in doc["measurements"]}
    for name in ("optimum-intel", "openvino-genai"):
        m = by[name]
        assert m["status"] == "ok", m["reason"]
        assert m["role"] == "baseline" and m["baseline"] == "torch-cpu" and m["vs_baseline"]["its"] > 0
        assert len(m["raw"]["unet_steps_ms"]) == 4 and all(len(r) == 2 for r in m["raw"]["unet_steps_ms"])
        assert m["image_vs_baseline"]["max_abs"] is not None and [r["round"] for r in m["rounds"]] == [1, 2]
    backends = {b["name"]: b for b in doc["backends"]}
    assert backends["openvino-genai"]["versions"]["openvino-genai"] and backends["optimum-intel"]["build_s"] > 0
    assert by["ort-cpu"]["image_vs_baseline"]["max_abs"] <= 1
    assert "openvino-genai" in text_table(doc)
