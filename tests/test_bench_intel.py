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


def _fake_intel_env(tmp_path: Path, cli_body: str) -> str:
    """An "Intel environment" without optimum-intel: this interpreter under another name, beside a stand-in
    ``optimum-cli`` (``cli_body``: Python run with ``out``, the folder it was asked to write). intel_worker.py's
    export job runs the ``optimum-cli`` beside its interpreter, so the real worker runs against the stand-in."""
    bin_dir = tmp_path / "intel-env" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.symlink_to(sys.executable)
    cli = bin_dir / "optimum-cli"
    cli.write_text(f"#!{sys.executable}\nimport os, sys\nfrom pathlib import Path\nout = Path(sys.argv[-1])\n"
                   f"(Path(__file__).parent / 'asked').write_text(str(out))\n{cli_body}\n")
    cli.chmod(0o755)
    return str(python)


def _export(tmp_path: Path, python: str) -> tuple[Path, str | None, float | None]:
    from sdrt.benchmarks.baselines import intel_export
    from sdrt.benchmarks.jobs import run_worker

    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    folder = work / "intel-ov-baseline"
    why, export_s = intel_export(tmp_path / "baseline", folder, lambda spec: run_worker(
        spec, work, "optimum-cli export openvino", "cpu", threads=1, timeout_s=60, emit=lambda *a, **k: None,
        python=python)[0])
    return folder, why, export_s


STOPPED_HALF_WAY = """out.mkdir(parents=True)
(out / "model_index.json").write_text("{}")
os.kill(os.getpid(), 9)  # stopped after model_index.json, before any weights
"""


def test_an_intel_export_stopped_half_way_leaves_nothing_to_reuse(tmp_path: Path) -> None:
    python = _fake_intel_env(tmp_path, STOPPED_HALF_WAY)
    folder, why, export_s = _export(tmp_path, python)
    asked = Path((Path(python).parent / "asked").read_text())
    assert asked != folder and asked.name == folder.name  # it was writing elsewhere, a sibling's folder
    assert why is not None and "export failed" in why and export_s is None
    assert not folder.exists()  # the bench reuses a folder with model_index.json: there is none
    assert not list(folder.parent.glob(f"*{folder.name}*"))  # nor the half-written one, anywhere


def test_an_intel_export_without_model_index_is_not_moved_into_place(tmp_path: Path) -> None:
    python = _fake_intel_env(tmp_path, 'out.mkdir(parents=True)\n(out / "unet.bin").write_bytes(b"w")')
    folder, why, _ = _export(tmp_path, python)
    assert why is not None and "without writing model_index.json" in why
    assert not folder.exists() and not list(folder.parent.glob(f"*{folder.name}*"))


def test_a_finished_intel_export_is_renamed_into_place(tmp_path: Path) -> None:
    python = _fake_intel_env(tmp_path, """out.mkdir(parents=True)
(out / "unet").mkdir()
(out / "unet" / "openvino_model.bin").write_bytes(b"weights")
(out / "model_index.json").write_text("{}")
""")
    (tmp_path / "work").mkdir()
    stale = tmp_path / "work" / "intel-ov-baseline"  # left by a run before exports were written aside
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    folder, why, export_s = _export(tmp_path, python)
    assert why is None and export_s is not None and export_s > 0
    assert Path((Path(python).parent / "asked").read_text()) != folder
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "openvino_model.bin").read_bytes() == b"weights"
    assert not (folder / "half.bin").exists()  # the stale folder was replaced whole
    assert [p.name for p in folder.parent.iterdir() if folder.name in p.name] == [folder.name]


def test_intel_rows_compute_in_the_precision_sdrt_openvino_does() -> None:
    """The rows' ``INFERENCE_PRECISION_HINT`` follows the run's openvino precision: ``auto`` is bf16 exactly where
    OpenVINO reports BF16 for the CPU (its own default there), f32 elsewhere; ``fp32`` / no setting is f32."""
    ov = pytest.importorskip("openvino")
    from sdrt.benchmarks import intel_worker  # self-contained: importable here too
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert intel_worker.inference_precision({"ov_precision": "auto"}) == ("bf16" if has_bf16 else "f32")
    assert intel_worker.inference_precision({"ov_precision": "fp32"}) == "f32"
    assert intel_worker.inference_precision({}) == "f32"
    if has_bf16:
        assert intel_worker.inference_precision({"ov_precision": "bf16"}) == "bf16"
    else:
        with pytest.raises(ValueError, match="no bf16 support"):
            intel_worker.inference_precision({"ov_precision": "bf16"})
