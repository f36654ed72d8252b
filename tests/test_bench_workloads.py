"""``sdrt bench`` workloads: few-step (1 and 4 steps, guidance 0, images/s) and SDXL base + refiner, tiny, on CPU.

As in test_bench: no timing is asserted, only that figures exist and agree with the raw numbers in the
result (recomputed here with numpy), and that the baseline is the matching diffusers pipeline (its images,
where the sampler is deterministic, equal sdrt's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sdrt.benchmarks import report, schema
from sdrt.benchmarks.bench import BenchConfig, run_bench
from sdrt.benchmarks.records import REFINER_STAGES


def _run(tmp_path_factory, **kw: Any) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench-work")
    cfg = BenchConfig(backends=("ort-cpu",), warmup=0, repeats=2, rounds=1, threads=1, work_dir=str(work), matmul_n=256, **kw)
    return run_bench(cfg)


def _by_backend(doc: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(m["backend"], m["steps"]): m for m in doc["measurements"]}


def test_few_step_workload(tiny_export, tmp_path_factory) -> None:
    doc = _run(tmp_path_factory, artifact=str(tiny_export("sd-turbo-tiny")), steps=(1, 4), samplers=("euler-a",),
               guidance_scale=0.0, workload="few-step")
    assert schema.problems(doc) == [] and doc["config"]["workload"] == "few-step"
    ms = _by_backend(doc)
    assert set(ms) == {("torch-cpu", 1), ("ort-cpu", 1), ("torch-cpu", 4), ("ort-cpu", 4)}
    for (backend, steps), m in ms.items():
        assert m["status"] == "ok", m["reason"]
        assert not m["guided"] and m["unet_batch"] == 1
        assert m["unet_step_ms"]["n"] == 2 * steps
        assert m["images_per_s"] == pytest.approx(1000 / np.median(m["raw"]["total_ms"]))
    for steps in (1, 4):
        sd, base = ms[("ort-cpu", steps)], ms[("torch-cpu", steps)]
        assert sd["baseline"] == "torch-cpu"
        assert sd["vs_baseline"]["images_per_s"] == pytest.approx(
            np.median(base["raw"]["total_ms"]) / np.median(sd["raw"]["total_ms"]))
    # one trailing Euler-ancestral step ends at sigma 0, so it adds no noise: the baseline (diffusers'
    # EulerAncestralDiscreteScheduler from the model's trailing config) makes the same image
    assert ms[("ort-cpu", 1)]["image_vs_baseline"]["max_abs"] <= 1
    assert any("timestep_spacing 'trailing'" in n for n in doc["notes"])
    text = report.text_table(doc)
    assert f"ort-cpu euler-a/1: {ms[('ort-cpu', 1)]['images_per_s']:.2f} images/s" in text


def test_base_refiner_workload(tiny_export, tmp_path_factory) -> None:
    doc = _run(tmp_path_factory, artifact=str(tiny_export("sdxl-tiny")), refiner=str(tiny_export("sdxl-refiner-tiny")),
               refiner_start=0.8, steps=(10,), samplers=("euler",), workload="base-refiner")
    assert schema.problems(doc) == []
    assert doc["config"]["refiner"] == {"preset": "sdxl-refiner-tiny", "refiner_start": 0.8}
    ms = _by_backend(doc)
    assert set(ms) == {("torch-cpu", 10), ("ort-cpu", 10)}
    for m in ms.values():
        assert m["status"] == "ok", m["reason"]
        assert m["unet_step_ms"]["n"] == 2 * 10  # the base's 8 steps and the refiner's 2, per run
        assert [len(r) for r in m["raw"]["unet_steps_ms"]] == [10, 10]
        for k in REFINER_STAGES:
            assert m["stages_ms"][k]["p50"] == pytest.approx(np.median([r[k] for r in m["raw"]["stages"]]))
        total = [sum(r.values()) for r in m["raw"]["stages"]]
        assert all(t <= tot for t, tot in zip(total, m["raw"]["total_ms"], strict=True))
        assert m["peak_rss_bytes"] > 0 and m["images_per_s"] == pytest.approx(1000 / np.median(m["raw"]["total_ms"]))
        # CPU: the stages on the (synchronized) host clock, as the totals
        assert m["clocks"]["stages_ms"] == m["clocks"]["unet_step_ms"] == m["clocks"]["total_ms"] == "host"
        assert m["raw"]["clocks"]["stages"] == ["host", "host"]
    sd = ms[("ort-cpu", 10)]
    (method,) = [b["timing_method"] for b in doc["backends"] if b["name"] == "ort-cpu"]
    assert method.endswith("denoising loop: base 8 steps: engines run step by step; refiner 2 steps (from 0.8 of "
                           "the schedule): engines run step by step")
    assert sd["image_vs_baseline"]["max_abs"] <= 1  # diffusers' base(denoising_end) + img2img(denoising_start)
    text = report.text_table(doc)
    assert "base sdxl-tiny + refiner sdxl-refiner-tiny from 0.8" in text and "ort-cpu: " in text
