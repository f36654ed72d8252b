"""``sdrt bench``: a tiny CPU run end to end, the schema and its migration, reports, bad input, FLOPs.

No test asserts a timing: only that figures exist, are consistent with the raw numbers in the file
(recomputed here by hand or with numpy), and that reports show what the files hold.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdrt.benchmarks import report, schema
from sdrt.benchmarks.bench import BenchConfig, run_bench, save, unavailable_reason
from sdrt.benchmarks.flops import count_flops, floor_ms
from sdrt.benchmarks.memory import MemorySampler, peak_rss_self
from sdrt.benchmarks.stats import percentile, summarize
from sdrt.cli import main
from sdrt.runtime.errors import CompatibilityError, InputError

from .helpers.bench_results import synthetic_results

ROOT = Path(__file__).resolve().parents[1]

# -- a tiny CPU run, end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_run(tiny_export, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench-work")
    cfg = BenchConfig(artifact=str(tiny_export("sd15-tiny")), backends=("ort-cpu", "ort-cuda", "tensorrt"),
                      steps=(2,), warmup=0, repeats=2, threads=1, work_dir=str(work), matmul_n=256)
    events: list[dict[str, Any]] = []
    doc = run_bench(cfg, progress=events.append)
    doc["_events"] = events  # for the test only; removed before validation
    return doc


def _doc(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "_events"}


def _one(doc: dict[str, Any], backend: str) -> dict[str, Any]:
    (m,) = [m for m in doc["measurements"] if m["backend"] == backend]
    return m


def test_cpu_run_is_schema_valid_and_complete(cpu_run: dict[str, Any], tmp_path: Path) -> None:
    doc = _doc(cpu_run)
    assert schema.problems(doc) == []
    path = save(doc, tmp_path / "run.json")
    assert schema.load(path) == json.loads(json.dumps(doc))
    assert doc["schema"] == "sdrt-bench" and doc["schema_version"] == schema.SCHEMA_VERSION
    env = doc["env"]
    assert env["cpu"]["model"] and env["versions"]["onnxruntime"] and env["versions"]["torch"]
    assert env["gpus"] == [] and env["date"]
    assert doc["config"]["threads"] == 1 and doc["config"]["isolation"] == "subprocess"
    by_name = {b["name"]: b for b in doc["backends"]}
    assert set(by_name) == {"ort-cpu", "ort-cuda", "tensorrt", "torch-cpu"}
    assert by_name["ort-cpu"]["status"] == "ok" and by_name["torch-cpu"]["status"] == "ok"
    assert by_name["ort-cpu"]["threads"]["intra_op"] == 1
    assert doc["config"]["cuda_graph"] is False
    assert by_name["ort-cpu"]["timing_method"].endswith("denoising loop: engines run step by step")
    assert by_name["torch-cpu"]["threads"]["torch_num_threads"] == 1
    for m in doc["measurements"]:
        assert m["status"] == "ok", m["reason"]
        assert m["unet_batch"] == 2 and m["guided"]
        # two rounds (the default) of two repeats, pooled: 4 images of 2 steps
        assert m["text_encoder_ms"]["n"] == 4 and m["unet_step_ms"]["n"] == 8
        assert m["peak_rss_bytes"] > 0 and m["artifact_bytes"] > 0
        assert m["peak_vram_bytes"] is None  # CPU run: no GPU figure, and none invented
    assert doc["model"]["artifact_bytes"] == sum(c["size_bytes"] for c in doc["model"]["components"].values())
    phases = {e.get("phase") for e in cpu_run["_events"] if e["stage"] == "job"}
    assert {"start", "load", "cold", "repeat", "done"} <= phases


def test_the_cold_start_is_broken_down_per_engine(cpu_run: dict[str, Any]) -> None:
    """sdrt's row records where its load went (the manifest and backend, each engine of the export, the tokenizers),
    parts within the load's wall time; the baseline's none. The report says it per row."""
    doc = _doc(cpu_run)
    (m,) = [m for m in doc["measurements"] if m["backend"] == "ort-cpu"]
    parts = m["load_breakdown_ms"]
    assert set(parts) == {"backend", "tokenizers", *doc["model"]["components"]}
    assert all(v >= 0 for v in parts.values()) and parts["unet"] > 0
    assert sum(parts.values()) <= m["load_ms"]
    assert "load_breakdown_ms" not in next(m for m in doc["measurements"] if m["backend"] == "torch-cpu")
    text = report.markdown([doc])
    assert "## Cold start" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("- [1] ort-cpu ") and "cold start" in ln]
    assert f"load {m['load_ms'] / 1e3:.1f} s" in line and f"first image {m['first_image_ms'] / 1e3:.1f} s" in line
    bad = json.loads(json.dumps(doc))
    next(x for x in bad["measurements"] if x["backend"] == "ort-cpu")["load_breakdown_ms"]["unet"] = -1
    assert any("load_breakdown_ms" in p for p in schema.problems(bad))


def test_rows_run_interleaved_in_rounds_with_their_spread(cpu_run: dict[str, Any]) -> None:
    """The default two rounds run A, B, A, B (each a worker process of its own); each round's medians are its own
    runs' (the first ``repeats`` pooled runs, then the next), the spread is the rounds' (slowest - fastest) /
    fastest, and the host's other CPU use during each round is recorded (and flags the row past a tenth)."""
    doc = _doc(cpu_run)
    starts = [(e["job_index"], e["round"]) for e in cpu_run["_events"]
              if e["stage"] == "job" and e.get("phase") == "start"]
    assert starts == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert doc["config"]["rounds"] == 2 and doc["config"]["quiet"] is None
    for m in doc["measurements"]:
        rounds = m["rounds"]
        assert [r["round"] for r in rounds] == [1, 2] and all(r["status"] == "ok" for r in rounds)
        totals = m["raw"]["total_ms"]
        for k, r in enumerate(rounds):
            assert r["total_ms_p50"] == pytest.approx(np.median(totals[2 * k:2 * k + 2]))
            assert 0 < r["cpu_share"] <= 1.5 and (r["other_cpu"] is None or 0 <= r["other_cpu"] <= 1)
        a, b = (r["total_ms_p50"] for r in rounds)
        assert m["spread"]["total_ms_p50"] == pytest.approx(abs(a - b) / min(a, b))
        others = [r["other_cpu"] for r in rounds if r["other_cpu"] is not None]
        assert m["contended"] == (any(x > 0.10 for x in others) if others else None)
    assert "2 rounds, interleaved" in report.text_table(doc)


def test_a_busy_row_is_flagged_in_the_reports(cpu_run: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(_doc(cpu_run)))
    m = _one(doc, "ort-cpu")
    m["contended"], m["rounds"][1]["other_cpu"] = True, 0.42
    text = report.text_table(doc)
    assert "ort-cpu (busy)" in text and "round 2: 42%" in text and "--quiet" in text
    assert "ort-cpu (busy host)" in report.markdown([doc])


def test_the_quiet_wait_measures_other_work() -> None:
    """``contention``: a child's CPU time is the bench's own, not other work; a busy thread in this process is
    other work to it (it is no child)."""
    import subprocess
    import sys
    import threading
    import time

    from sdrt.benchmarks import contention

    before = contention.snapshot()
    subprocess.run([sys.executable, "-c", "import time; t = time.time()\nwhile time.time() - t < 1.0: pass"],
                   check=True)
    child = contention.other_cpu(before, contention.snapshot())
    if child is None:
        pytest.skip("no /proc/stat on this platform: other work cannot be measured")
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.2)
        busy = contention.host_busy(1.0)
        waited, share = contention.wait_quiet(0.01, 1.5, interval_s=0.5)
    finally:
        stop.set()
        t.join()
    cores = __import__("os").cpu_count() or 1
    assert busy is not None and busy > 0.5 / cores and child < busy
    assert waited >= 1.5 and share is not None and share > 0.01  # it gave up after the timeout, still busy


def test_absent_backends_are_skipped_with_the_reason(cpu_run: dict[str, Any]) -> None:
    by_name = {b["name"]: b for b in cpu_run["backends"]}
    assert by_name["ort-cuda"]["status"] == "skipped"
    assert "onnxruntime-gpu" in by_name["ort-cuda"]["reason"]
    assert by_name["tensorrt"]["status"] == "skipped"
    assert "TensorRT" in by_name["tensorrt"]["reason"]
    assert not [m for m in cpu_run["measurements"] if m["backend"] in ("ort-cuda", "tensorrt")]
    text = report.text_table(_doc(cpu_run))
    assert "ort-cuda: skipped" in text and "tensorrt: skipped" in text


def test_cpu_run_figures_match_raw_numbers(cpu_run: dict[str, Any]) -> None:
    doc = _doc(cpu_run)
    sd, base = _one(doc, "ort-cpu"), _one(doc, "torch-cpu")
    for m in (sd, base):
        steps = [x for run in m["raw"]["unet_steps_ms"] for x in run]
        assert m["unet_step_ms"]["p50"] == pytest.approx(np.percentile(steps, 50))
        assert m["unet_step_ms"]["p90"] == pytest.approx(np.percentile(steps, 90))
        assert m["total_ms"]["p90"] == pytest.approx(np.percentile(m["raw"]["total_ms"], 90))
        assert m["its"] == pytest.approx(1000 / np.median(steps))
        assert m["images_per_s"] == pytest.approx(1000 / np.median(m["raw"]["total_ms"]))
        assert m["cold_start_ms"] == pytest.approx(m["load_ms"] + m["first_image_ms"])
        # the floor, by hand: FLOPs over the measured rate
        (ceiling,) = doc["ceilings"]
        unet_floor = m["flops"]["unet_step"] / (ceiling["tflops"] * 1e12) * 1e3
        assert m["floor_ms"]["unet_step"] == pytest.approx(unet_floor)
        assert m["of_floor"]["unet_step"] == pytest.approx(unet_floor / m["unet_step_ms"]["p50"])
        total_floor = (m["floor_ms"]["text_encoder"] + 2 * unet_floor + m["floor_ms"]["vae_decoder"])
        assert m["floor_ms"]["total"] == pytest.approx(total_floor)
    # ratios: from the raw timings each side measured, not from the summaries the bench derived from them
    vs = sd["vs_baseline"]
    assert sd["baseline"] == "torch-cpu" and base["vs_baseline"] is None

    def steps(m: dict[str, Any]) -> list[float]:
        return [x for run in m["raw"]["unet_steps_ms"] for x in run]

    assert vs["its"] == pytest.approx(np.median(steps(base)) / np.median(steps(sd)))
    assert vs["images_per_s"] == pytest.approx(np.median(base["raw"]["total_ms"]) / np.median(sd["raw"]["total_ms"]))
    assert vs["total_ms_p50"] == pytest.approx(np.median(sd["raw"]["total_ms"]) / np.median(base["raw"]["total_ms"]))
    assert vs["unet_step_ms_p90"] == pytest.approx(np.percentile(steps(sd), 90) / np.percentile(steps(base), 90))
    assert vs["cold_start_ms"] == pytest.approx((sd["load_ms"] + sd["first_image_ms"])
                                                / (base["load_ms"] + base["first_image_ms"]))
    assert vs["peak_vram_bytes"] is None
    # the same weights and latents on both sides: the same picture (dpmpp-2m is deterministic)
    assert sd["image_vs_baseline"]["mean_abs"] < 3.0


HOST_FIGURES = ("total_ms", "images_per_s", "import_ms", "load_ms", "first_image_ms", "cold_start_ms")


def test_cpu_run_records_the_clock_of_each_figure(cpu_run: dict[str, Any], tiny_export) -> None:
    """Every figure says which clock measured it: the stages and steps the backend's (sdrt: what the
    Pipeline's Result says; the baseline on CPU: the host's), the totals the host wall clock; and each raw
    list has its clock per repeat."""
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as pipe:
        pipeline_clock = pipe("a cat", steps=1, height=64, width=64).timings["clock"]
    assert pipeline_clock == "host"
    doc = _doc(cpu_run)
    for m, stage_clock in ((_one(doc, "ort-cpu"), pipeline_clock), (_one(doc, "torch-cpu"), "host")):
        assert m["clocks"] == {"text_encoder_ms": stage_clock, "unet_step_ms": stage_clock,
                               "vae_decoder_ms": stage_clock, "its": stage_clock, **{k: "host" for k in HOST_FIGURES}}
        n = m["repeats"] * doc["config"]["rounds"]  # every round's repeats, pooled
        repeats = [stage_clock] * n
        assert m["raw"]["clocks"] == {"text_encoder_ms": repeats, "unet_steps_ms": repeats,
                                      "vae_decoder_ms": repeats, "total_ms": ["host"] * n}
        assert len(m["raw"]["total_ms"]) == len(m["raw"]["clocks"]["total_ms"]) == 4
    (line,) = [x for x in report.text_table(doc).splitlines() if x.startswith("clocks (")]
    assert line.startswith("clocks (steps and stages / image ms and img/s): ")
    assert sorted(line.split(": ", 1)[1].split("; ")) == ["ort-cpu host / host", "torch-cpu host / host"]


def test_a_measurement_labels_device_clock_figures_apart_from_the_host_totals() -> None:
    """The worker's per-run clocks reach the measurement: a GPU backend's device-event stages beside its
    host totals; runs that disagree are labelled so, not given the first run's clock."""
    from sdrt.benchmarks.jobs import Job
    from sdrt.benchmarks.memory import MemoryPeaks
    from sdrt.benchmarks.records import measurement

    job = Job("sdrt", "tensorrt", "cuda", Path("x"), 64, 64, 1, "euler", 2)

    def run(clock: str) -> dict[str, Any]:
        return {"text_encoder_ms": 1.0, "unet_steps_ms": [2.0, 2.0], "vae_decoder_ms": 3.0, "total_ms": 9.0,
                "wall_ms": 9.5, "clock": clock, "total_clock": "host", "nonfinite": [False]}

    res = {"status": "ok", "import_ms": 1.0, "load_ms": 2.0, "first_image_ms": 3.0, "runs": [run("device")] * 2}
    cfg = BenchConfig(preset="sd15-tiny", backends=("ort-cpu",))
    m = measurement(job, res, MemoryPeaks(), cfg, guided=True)
    assert {k: m["clocks"][k] for k in ("text_encoder_ms", "unet_step_ms", "vae_decoder_ms", "its")} == \
        dict.fromkeys(("text_encoder_ms", "unet_step_ms", "vae_decoder_ms", "its"), "device")
    assert all(m["clocks"][k] == "host" for k in HOST_FIGURES)
    assert m["raw"]["clocks"]["unet_steps_ms"] == ["device", "device"]
    assert m["raw"]["clocks"]["total_ms"] == ["host", "host"]
    mixed = measurement(job, {**res, "runs": [run("device"), run("host")]}, MemoryPeaks(), cfg, guided=True)
    assert mixed["clocks"]["unet_step_ms"] == "mixed: device, host"
    assert mixed["raw"]["clocks"]["vae_decoder_ms"] == ["device", "host"]
    failed = measurement(job, {"status": "failed", "reason": "r"}, MemoryPeaks(), cfg, guided=True)
    assert failed["clocks"] is None


def test_recorded_results_without_per_figure_clocks_still_render(tmp_path: Path) -> None:
    """A result file written before the clocks were recorded (a base + refiner run, with stages) renders
    as before: the report has its rows and claims no clock the file does not hold."""
    old = ROOT / "benchmarks" / "results" / "bench-cpu-sdxl-tiny-20261201T214623-base-refiner.json"
    written = json.loads(old.read_text())
    assert all("clocks" not in m for m in written["measurements"])
    out = tmp_path / "report"
    assert main(["bench", "report", str(old), "-o", str(out)]) == 0
    md = (out / "bench.md").read_text()
    backends = {m["backend"] for m in written["measurements"] if m["status"] == "ok"}
    rows = [line for line in md.splitlines() if line.startswith("| ") and "sdxl-tiny" in line]
    assert {r.split(" | ")[1] for r in rows} == backends
    text = report.text_table(schema.load(old))
    assert "clocks (" not in text and "refiner sdxl-refiner-tiny" in text


def test_ratios_and_image_difference_by_hand(tmp_path: Path) -> None:
    """``vs_baseline`` and ``image_vs_baseline`` on made-up measurements whose answers are known: sdrt's
    UNet step at 10 ms against the baseline's 40 ms is 4x the it/s; pixels (103, 100, 97) against
    (100, 100, 100) differ by 2 levels on average, 3 at most."""
    from PIL import Image

    from sdrt.benchmarks.records import add_ratios

    def measurement(backend: str, step_ms: float, total_ms: float, rss: int) -> dict[str, Any]:
        return {"backend": backend, "status": "ok", "height": 64, "width": 64, "batch_size": 1,
                "sampler": "dpmpp-2m", "steps": 2, "its": 1000 / step_ms, "images_per_s": 1000 / total_ms,
                "unet_step_ms": {"p50": step_ms, "p90": step_ms}, "total_ms": {"p50": total_ms, "p90": total_ms},
                "text_encoder_ms": {"p50": 5.0, "p90": 5.0}, "vae_decoder_ms": {"p50": 20.0, "p90": 20.0},
                "cold_start_ms": 2 * total_ms, "peak_rss_bytes": rss, "peak_vram_bytes": None,
                "device_mem_delta_bytes": None, "artifact_bytes": 1000}

    ms = [measurement("torch-cpu", 40.0, 200.0, 4 << 30), measurement("ort-cpu", 10.0, 50.0, 1 << 30)]
    Image.new("RGB", (8, 8), (100, 100, 100)).save(tmp_path / "image-0.png")
    Image.new("RGB", (8, 8), (103, 100, 97)).save(tmp_path / "image-1.png")
    add_ratios(ms, lambda m: "torch-cpu" if m["backend"] == "ort-cpu" else None, tmp_path)
    vs = ms[1]["vs_baseline"]
    assert ms[1]["baseline"] == "torch-cpu" and "vs_baseline" not in ms[0]
    assert vs["its"] == 4.0 and vs["images_per_s"] == 4.0
    assert vs["unet_step_ms_p50"] == vs["total_ms_p50"] == vs["cold_start_ms"] == 0.25
    assert vs["text_encoder_ms_p50"] == vs["artifact_bytes"] == 1.0 and vs["peak_rss_bytes"] == 0.25
    assert vs["peak_vram_bytes"] is None and vs["device_mem_delta_bytes"] is None
    diff = ms[1]["image_vs_baseline"]
    assert diff["mean_abs"] == pytest.approx(2.0) and diff["max_abs"] == 3


def test_cpu_run_flops_match_an_independent_count(cpu_run: dict[str, Any]) -> None:
    """The bench counts on meta-device modules; here the real tiny modules are run and counted. On CPU the
    fused attention kernel has no FLOP formula (it counts 0), so the math backend runs it as matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sdrt.export.loading import random_model

    m = _one(_doc(cpu_run), "ort-cpu")
    model = random_model("sd15-tiny")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        unet_flops, _ = count_flops(lambda: model.unet(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]),
                                                       torch.randn(2, 77, 32)))
    assert m["flops"]["unet_step"] == unet_flops


def test_cli_run_without_baseline(tiny_export, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.json"
    args = ["bench", "--artifact", str(tiny_export("sd15-tiny")), "--backends", "ort-cpu", "--baseline", "none",
            "--steps", "1", "--warmup", "0", "--repeats", "1", "--rounds", "1", "--threads", "1", "--matmul-size", "256",
            "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ort-cpu" in printed and f"wrote {out}" in printed
    doc = schema.load(out)
    (m,) = doc["measurements"]
    assert m["status"] == "ok" and m["baseline"] is None and m["vs_baseline"] is None
    assert [b["name"] for b in doc["backends"]] == ["ort-cpu"]


def test_cpu_comparison_with_the_bf16_autocast_baseline(tiny_export, tmp_path: Path) -> None:
    """openvino (fp32 inference, asked on the command line) beside diffusers fp32 and diffusers under bf16
    autocast, in one run; the bf16 row is on by default when openvino is measured."""
    pytest.importorskip("openvino")
    out = tmp_path / "run.json"
    assert main(["bench", "--artifact", str(tiny_export("sd15-tiny")), "--backends", "openvino",
                 "--openvino-precision", "fp32", "--steps", "2", "--warmup", "0", "--repeats", "2", "--rounds", "1", "--threads", "1",
                 "--matmul-size", "256", "-o", str(out)]) == 0
    doc = schema.load(out)
    by_name = {b["name"]: b for b in doc["backends"]}
    assert set(by_name) == {"openvino", "torch-cpu", "torch-cpu-bf16"}
    assert all(b["status"] == "ok" for b in by_name.values()), by_name
    assert doc["config"]["bf16_baseline"] is True and doc["config"]["openvino_precision"] == "fp32"
    bf16 = by_name["torch-cpu-bf16"]
    assert bf16["role"] == "baseline" and bf16["precision"] == "fp32 weights, bf16 autocast"
    assert bf16["versions"]["autocast"] == "bfloat16" and "autocast" in bf16["timing_method"]
    assert by_name["openvino"]["precision"] == "float32 graphs, f32 inference"
    base, auto, ovm = _one(doc, "torch-cpu"), _one(doc, "torch-cpu-bf16"), _one(doc, "openvino")
    for m in (base, auto, ovm):
        assert m["status"] == "ok", m["reason"]
        steps = [x for run in m["raw"]["unet_steps_ms"] for x in run]
        assert len(steps) == 4 and min(steps) > 0
        assert m["its"] == pytest.approx(1000 / np.median(steps))
        assert m["total_ms"]["p50"] == pytest.approx(np.median(m["raw"]["total_ms"]))
        assert m["peak_rss_bytes"] > 0
    # the bf16 row is compared with the fp32 baseline, as every other row, from the raw timings
    assert auto["baseline"] == "torch-cpu" and ovm["baseline"] == "torch-cpu" and base["baseline"] is None
    assert auto["vs_baseline"]["its"] == pytest.approx(
        np.median([x for r in base["raw"]["unet_steps_ms"] for x in r])
        / np.median([x for r in auto["raw"]["unet_steps_ms"] for x in r]))
    # each row's floor, by hand, over the matmul rate of its own arithmetic: bf16 for the autocast row
    rates = {(c["device"], c["dtype"]): c["tflops"] for c in doc["ceilings"]}
    assert set(rates) == {("cpu", "float32"), ("cpu", "bfloat16")} and all(r > 0 for r in rates.values())
    for m, dtype in ((base, "float32"), (auto, "bfloat16"), (ovm, "float32")):
        floor = m["flops"]["unet_step"] / (rates["cpu", dtype] * 1e12) * 1e3
        assert m["floor_ms"]["unet_step"] == pytest.approx(floor)
    # same weights and latents: fp32 OpenVINO gives the fp32 picture; bf16 autocast really ran (it differs)
    assert ovm["image_vs_baseline"]["max_abs"] <= 2
    assert auto["image_vs_baseline"]["max_abs"] > 0
    text = report.markdown([doc])
    assert "torch-cpu-bf16" in text and "fp32 weights, bf16 autocast" in text
    # the report's precision column: the export's, and the backend's arithmetic where it differs (auto: bf16)
    assert {r["backend"]: r["precision"] for r in report.rows([doc])}["openvino"] == "fp32"
    by_name["openvino"]["precision"] = "float32 graphs, bf16 inference"
    assert {r["backend"]: r["precision"] for r in report.rows([doc])}["openvino"] == "fp32 graphs, bf16 inference"
    by_name["openvino"]["precision"] = "float32 graphs, bf16 inference (text_encoder at f32)"
    assert {r["backend"]: r["precision"] for r in report.rows([doc])}["openvino"] == \
        "fp32 graphs, bf16 inference (text_encoder at f32)"
    doc["model"]["precision"] = "bf16"  # a bf16 export on bf16 inference: the export's, with what stays f32
    by_name["openvino"]["precision"] = "bfloat16 graphs, bf16 inference (text_encoder at f32)"
    assert {r["backend"]: r["precision"] for r in report.rows([doc])}["openvino"] == "bf16 (text_encoder at f32)"


def test_openvino_precision_and_bf16_baseline_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--preset", "sd15-tiny", "--backends", "ort-cpu", "--openvino-precision", "bf16"]) == 1
    err = capsys.readouterr().err
    assert "--openvino-precision applies to the openvino backend" in err and "--backends" in err
    with pytest.raises(InputError, match="unknown openvino precision 'f16'"):
        BenchConfig(preset="sd15-tiny", backends=("openvino",), openvino_precision="f16")
    with pytest.raises(InputError, match="bf16 baseline is diffusers on PyTorch"):
        BenchConfig(preset="sd15-tiny", baseline="none", bf16_baseline=True)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "sd15-tiny", "--openvino-precision", "f16"])
    assert e.value.code == 2


# -- reports -----------------------------------------------------------------------------------------------

def test_synthetic_results_are_valid() -> None:
    assert schema.problems(synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 3 * 2**30)) == []


def test_report_merges_runs_from_two_gpus(tmp_path: Path) -> None:
    a, b = tmp_path / "h100.json", tmp_path / "h200.json"
    a.write_text(json.dumps(synthetic_results("NVIDIA H100 80GB HBM3", "ort-cuda", 40.0, 3 * 2**30)))
    b.write_text(json.dumps(synthetic_results("NVIDIA H200", "ort-cuda", 55.0, 3 * 2**30)))
    out = tmp_path / "report"
    assert main(["bench", "report", str(a), str(b), "-o", str(out)]) == 0
    md = (out / "bench.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| NVIDIA")]
    assert len(rows) == 4  # two GPUs x (baseline + backend)
    h100 = [r for r in rows if "H100" in r and "ort-cuda" in r]
    h200 = [r for r in rows if "H200" in r and "ort-cuda" in r]
    assert len(h100) == 1 and "| 40.00 |" in h100[0] and "| 0.80x |" in h100[0]  # 40 it/s vs 50 it/s
    assert len(h200) == 1 and "| 55.00 |" in h200[0] and "| 1.10x |" in h200[0]
    assert "TensorRT is not installed here" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_readme_section_between_markers(tmp_path: Path) -> None:
    res = tmp_path / "results"
    res.mkdir()
    f = res / "h100.json"
    f.write_text(json.dumps(synthetic_results("NVIDIA H100", "tensorrt", 60.0, 2**31)))
    readme = tmp_path / "README.md"
    readme.write_text("# sdrt\n\n## Performance\n<!-- bench:start -->\nold text\n<!-- bench:end -->\n\n## More\n")
    assert main(["bench", "report", str(f), "-o", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old text" not in text and text.startswith("# sdrt\n") and text.endswith("## More\n")
    inner = text.split("<!-- bench:start -->")[1].split("<!-- bench:end -->")[0]
    assert "| NVIDIA H100 | tensorrt |" in inner and "60.00" in inner
    assert "](results/bench.png)" in inner and "`results/h100.json`" in inner
    # regenerating gives the same text
    assert main(["bench", "report", str(f), "-o", str(res), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    with pytest.raises(InputError, match="bench:start"):
        report.update_readme(bare, [f])


# -- schema versions -------------------------------------------------------------------------------------

def test_newer_older_and_foreign_files_are_refused(tmp_path: Path) -> None:
    good = synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 2**31)
    cases = {
        "newer": ({**good, "schema_version": schema.SCHEMA_VERSION + 1}, "newer than this sdrt reads"),
        "older": ({**good, "schema_version": 0}, "cannot migrate"),
        "unversioned": ({k: v for k, v in good.items() if k != "schema_version"}, "no integer schema_version"),
        "foreign": ({"images": 3}, "not an sdrt bench result"),
        "broken": ({**good, "measurements": [{"backend": "x"}]}, r"measurements\[0\]\.role is missing"),
    }
    for name, (doc, message) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(CompatibilityError, match=message):
            schema.load(p)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(InputError, match="not JSON"):
        schema.load(tmp_path / "text.json")
    # the CLI reports the refusal and fails
    assert main(["bench", "report", str(tmp_path / "newer.json"), "-o", str(tmp_path / "r")]) == 1


def test_older_version_is_migrated(tmp_path: Path) -> None:
    """Version 1 had no config.cuda_graph (its runs never asked for CUDA graphs): migrated to false; nor
    had version 2 config.workload (every run was txt2img)."""
    v1 = synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 2**31)
    del v1["config"]["cuda_graph"]
    del v1["config"]["workload"]
    v1["schema_version"] = 1
    assert "config.cuda_graph is missing" in schema.problems(v1)
    assert "config.workload is missing" in schema.problems(v1)
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(v1))
    doc = schema.load(p)
    assert doc["schema_version"] == schema.SCHEMA_VERSION and doc["migrated_from"] == 1 and doc["config"]["cuda_graph"] is False
    assert doc["config"]["workload"] == "txt2img"
    assert schema.problems(doc) == []
    assert json.loads(p.read_text()) == v1  # the file itself is left alone
    assert "migrated from schema 1" in report.markdown([doc])
    # the project's recorded runs stay readable
    for f in sorted((ROOT / "benchmarks" / "results").glob("bench-*.json")):
        assert schema.load(f)["schema_version"] == schema.SCHEMA_VERSION


# -- bad input ---------------------------------------------------------------------------------------------

def test_unknown_backend_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="ort-cpu, ort-cuda, tensorrt"):
        BenchConfig(preset="sd15-tiny", backends=("ort-gpu",))
    assert main(["bench", "--preset", "sd15-tiny", "--backends", "ort-cpu,trt"]) == 1
    err = capsys.readouterr().err
    assert "'trt'" in err and "ort-cpu, ort-cuda, tensorrt" in err


def test_other_bad_requests() -> None:
    with pytest.raises(InputError, match="exactly one model"):
        BenchConfig()
    with pytest.raises(InputError, match="multiples of 8"):
        BenchConfig(preset="sd15-tiny", resolutions=((64, 60),))
    with pytest.raises(InputError, match="repeats"):
        BenchConfig(preset="sd15-tiny", rounds=1, repeats=0)
    with pytest.raises(InputError, match="rounds must be from 1 to 20"):
        BenchConfig(preset="sd15-tiny", rounds=0)
    with pytest.raises(InputError, match="share of the machine"):
        BenchConfig(preset="sd15-tiny", quiet=1.5)
    with pytest.raises(InputError, match="baseline"):
        BenchConfig(preset="sd15-tiny", baseline="tensorflow")
    with pytest.raises(InputError, match="'unipc'.*dpmpp-2m"):
        BenchConfig(preset="sd15-tiny", samplers=("dpmpp-2m", "unipc"))


def test_unavailable_reasons_without_a_gpu() -> None:
    assert unavailable_reason("ort-cpu", gpus=0) is None
    assert "onnxruntime-gpu" in (unavailable_reason("ort-cuda", gpus=0) or "")
    assert "TensorRT" in (unavailable_reason("tensorrt", gpus=0) or "")


# -- building blocks ------------------------------------------------------------------------------------

def test_flop_counter_matches_hand_counts() -> None:
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    assert count_flops(lambda: lin(x))[0] == 2 * 5 * 64 * 32  # 2 per multiply-add, bias not counted
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    img = torch.randn(2, 3, 16, 16)
    assert count_flops(lambda: conv(img))[0] == 2 * 2 * 8 * 16 * 16 * (3 * 3 * 3)
    grouped = torch.nn.Conv2d(8, 8, kernel_size=3, stride=2, groups=4)
    y = torch.randn(1, 8, 9, 9)  # output 4x4; each output sees 8/4 input channels
    assert count_flops(lambda: grouped(y))[0] == 2 * 1 * 8 * 4 * 4 * (2 * 3 * 3)
    a, b = torch.randn(3, 7, 5), torch.randn(3, 5, 11)
    assert count_flops(lambda: torch.bmm(a, b))[0] == 2 * 3 * 7 * 5 * 11
    # attention as the bench counts it (meta tensors): Q K^T and P V, each 2 * b * h * s * s * d
    q = torch.empty(2, 4, 77, 8, device="meta")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: sdpa(q, q, q))[0] == 2 * (2 * 2 * 4 * 77 * 77 * 8)
    # floor: 2 TFLOP at 1000 TFLOP/s is 2 ms
    fl = floor_ms({"text_encoder": 10**12, "unet_step": 2 * 10**12, "vae_decoder": 3 * 10**12}, 1000.0, steps=10)
    assert fl["unet_step"] == pytest.approx(2.0) and fl["total"] == pytest.approx(1 + 10 * 2 + 3)


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 20):
        xs = list(rng.random(n) * 100)
        s = summarize(xs)
        assert s["p50"] == pytest.approx(np.percentile(xs, 50)) and s["p90"] == pytest.approx(np.percentile(xs, 90))
        assert s["n"] == n and s["min"] == min(xs)
    assert percentile([3.0, 1.0], 50) == 2.0


def test_memory_sampler_on_this_process() -> None:
    import os

    block = None
    with MemorySampler(os.getpid(), gpu_index=None, interval_s=0.005) as s:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        import time

        time.sleep(0.05)
    assert s.peaks.rss_peak_bytes is not None and s.peaks.rss_peak_bytes > 64 * 2**20
    assert s.peaks.samples >= 2 and s.peaks.peak_process_bytes is None
    assert (peak_rss_self() or 0) >= s.peaks.rss_peak_bytes * 0.9
    del block


def test_synthetic_fixture_is_not_mutated_by_reports() -> None:
    doc = synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 2**31)
    before = copy.deepcopy(doc)
    report.markdown([doc])
    report.rows([doc])
    assert doc == before


@pytest.mark.slow  # exports and benchmarks: over 1 min on 2 busy cores
def test_a_preset_measured_on_ort_cuda_gets_the_fused_unet(tmp_path: Path) -> None:
    """With ort-cuda among the backends, the preset's export also gets the UNet variant with ONNX Runtime's
    fused CUDA operators (what `sdrt export --ort-cuda` writes), also when the export is reused."""
    from sdrt.benchmarks.bench import _Run

    events: list[dict[str, Any]] = []
    run = _Run(BenchConfig(preset="sd15-tiny", backends=("ort-cpu",)), events.append)
    folder, manifest, export_s = run.model(tmp_path, "fp32")
    assert "ort-cuda" not in manifest.components["unet"].variants and export_s is not None and export_s > 0
    folder2, fused, again_s = run.model(tmp_path, "fp32", fuse=True)  # the export is reused, then fused
    assert folder2 == folder and again_s is None
    path = folder / fused.components["unet"].variants["ort-cuda"]
    assert path.is_file() and path != folder / fused.components["unet"].path
    assert any("fused CUDA operators" in e["message"] for e in events)
    assert any("reused" in n for n in run.notes)


class _FakeNvml:
    """nvidia-ml-py's calls the sampler makes, over a scripted timeline of (device used, {pid: used}) states:
    the sampler's logic (peaks, device delta, the pid NVML cannot see) without a GPU."""

    def __init__(self, timeline: list[tuple[int, dict[int, int]]]) -> None:
        self.timeline, self.i, self.shutdowns = timeline, 0, 0

    def _now(self) -> tuple[int, dict[int, int]]:
        return self.timeline[min(self.i, len(self.timeline) - 1)]

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetMemoryInfo(self, h: str) -> Any:
        from types import SimpleNamespace

        used = self._now()[0]
        self.i += 1  # every sample reads the device first: advance the timeline
        return SimpleNamespace(used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: str) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in self._now()[1].items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: str) -> list[Any]:
        raise RuntimeError("not supported")  # as on compute GPUs

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1


def test_memory_sampler_gpu_logic_on_a_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import time

    gib = 2**30
    pid, other = 4242, 7
    timeline = [(10 * gib, {other: 1 * gib}),  # at start: another process holds memory
                (13 * gib, {other: 1 * gib, pid: 3 * gib}),
                (15 * gib, {other: 1 * gib, pid: 5 * gib}),  # the peak
                (12 * gib, {other: 1 * gib, pid: 2 * gib})]
    fake = _FakeNvml(timeline)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    s = MemorySampler(pid, gpu_index=0, interval_s=0.001)
    with s:
        while fake.i < len(timeline) + 2:
            time.sleep(0.001)
    p = s.peaks
    assert p.device_used_start_bytes == 10 * gib
    assert p.peak_process_bytes == 5 * gib and p.device_delta_bytes == 5 * gib
    assert fake.shutdowns == 1 and not any("never listed" in n for n in p.notes)
    # a pid NVML never lists (containers): no process figure, the device delta, and a note saying why
    hidden = _FakeNvml([(10 * gib, {}), (14 * gib, {other: 4 * gib})])
    monkeypatch.setitem(sys.modules, "pynvml", hidden)
    with MemorySampler(pid, gpu_index=0, interval_s=0.001) as s2:
        while hidden.i < 4:
            time.sleep(0.001)
    assert s2.peaks.peak_process_bytes is None and s2.peaks.device_delta_bytes == 4 * gib
    assert any(f"never listed pid {pid}" in n for n in s2.peaks.notes)


@pytest.mark.slow  # exports and benchmarks: 1-1.5 min a case on 2 busy cores
@pytest.mark.parametrize(("workload", "preset"), [("controlnet", "sd15-tiny"), ("inpaint", "sd15-inpaint-tiny")])
def test_controlnet_and_inpainting_workloads_run_tiny_beside_diffusers(tmp_path: Path, workload: str,
                                                                       preset: str) -> None:
    """The ControlNet workload exports one ControlNet and runs diffusers' ControlNet pipeline; the
    inpainting one a 9-channel UNet with an image and a mask beside diffusers' inpainting pipeline. Both sides
    start from the same latents, so their images agree (with the same tolerance as txt2img's)."""
    cfg = BenchConfig(preset=preset, workload=workload, backends=("ort-cpu",), resolutions=((64, 80),), steps=(3,),
                      samplers=("ddim",), warmup=0, repeats=1, threads=1, work_dir=str(tmp_path), matmul_n=128,
                      rounds=1)
    doc = run_bench(cfg)
    assert schema.problems(doc) == [] and doc["config"]["workload"] == workload
    comps = doc["model"]["components"]
    assert (("controlnet_0" in comps and "unet_control" in comps) if workload == "controlnet"
            else "vae_encoder_masked" in comps)
    sd, base = _one(doc, "ort-cpu"), _one(doc, "torch-cpu")
    assert sd["status"] == base["status"] == "ok", (sd["reason"], base["reason"])
    for m in (sd, base):
        steps = [x for run in m["raw"]["unet_steps_ms"] for x in run]
        assert len(steps) == 3 and m["its"] == pytest.approx(1000 / np.median(steps))
        assert m["text_encoder_ms"]["p50"] > 0 and m["vae_decoder_ms"]["p50"] > 0
    assert sd["vs_baseline"]["its"] == pytest.approx(sd["its"] / base["its"])
    assert sd["of_floor"] is None  # the FLOP count is txt2img's: no floor for these workloads
    # inpainting: diffusers samples the image's latents (sdrt: their mean), a small difference by design
    assert sd["image_vs_baseline"]["mean_abs"] < (3.0 if workload == "controlnet" else 8.0)
    assert f"{preset} ({workload})" in report.markdown([doc])


def test_controlnet_workload_on_a_plain_export_is_refused(tiny_export, tmp_path: Path) -> None:
    cfg = BenchConfig(artifact=str(tiny_export("sd15-tiny")), workload="controlnet", backends=("ort-cpu",),
                      work_dir=str(tmp_path))
    with pytest.raises(InputError, match="needs an export with a ControlNet.*--controlnet"):
        run_bench(cfg)
    assert not list(tmp_path.glob("job-*"))  # no measurement started
    with pytest.raises(InputError, match="unknown workload 'img2vid'"):
        BenchConfig(preset="sd15-tiny", workload="img2vid")


def test_each_rows_floor_is_taken_at_its_own_arithmetic() -> None:
    """Which matmul rate a row's floor divides by: the bf16 one where the row computes in bf16."""
    from sdrt.benchmarks.bench import matmul_dtype
    from sdrt.benchmarks.jobs import BASELINE, INTEL, SDRT, Job

    def job(kind: str, name: str, device: str = "cpu", autocast: str | None = None) -> Job:
        return Job(kind, name, device, Path("."), 64, 64, 1, "euler", 2, autocast=autocast)

    assert matmul_dtype(job(SDRT, "ort-cpu"), "fp32") == "float32"
    assert matmul_dtype(job(SDRT, "openvino"), "fp32", openvino_bf16=True) == "bfloat16"
    assert matmul_dtype(job(SDRT, "openvino"), "fp32", openvino_bf16=False) == "float32"
    assert matmul_dtype(job(INTEL, "openvino-intel"), "fp32", openvino_bf16=True) == "bfloat16"
    assert matmul_dtype(job(BASELINE, "torch-cpu-bf16", autocast="bfloat16"), "fp32") == "bfloat16"
    assert matmul_dtype(job(BASELINE, "torch-cpu"), "fp32", export_bf16=True) == "float32"  # fp32 weights
    assert matmul_dtype(job(SDRT, "tensorrt", "cuda"), "fp16") == "float16"
    assert matmul_dtype(job(SDRT, "tensorrt", "cuda"), "fp32", export_bf16=True) == "bfloat16"
    assert matmul_dtype(None, "fp16", "cuda") == "float16" and matmul_dtype(None, "fp32") == "float32"
