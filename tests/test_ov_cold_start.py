"""The cold-start benchmark (benchmarks/ov_cold_start.py): what it records says what each design did (OpenVINO's
own cache, sdrt's blobs mapped on the filled run, no cache), and a request it cannot measure is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="the openvino backend needs pip install 'sdrt[openvino]'")

from sdrt.benchmarks import ov_cold_start


def test_each_design_is_measured_as_it_says(tiny_export, tmp_path: Path) -> None:
    folder = tiny_export("sd15-tiny", "fp32")
    assert ov_cold_start.main([str(folder), "--size", "64", "--steps", "1", "--threads", "1", "--precision", "f32",
                               "-o", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("ov-cold-start-*.json")
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sdrt-ov-cold-start" and not list(tmp_path.glob("*.tmp"))
    runs = {(r["round"], r["design"], r["cache"]): r for r in doc["runs"]}
    assert len(runs) == 2 * 5
    for r in (1, 2):
        empty, filled = runs[r, "sdrt-blobs", "empty"], runs[r, "sdrt-blobs", "filled"]
        assert {how for _, how in empty["compiles"]} == {"compiled"}
        assert sorted(filled["compiles"]) == sorted([name, "mapped"] for name, _ in empty["compiles"])
        # OpenVINO's cache and no cache compile every graph in sdrt's account (OpenVINO's hits are its own)
        for key in ("openvino-cache", "empty"), ("openvino-cache", "filled"), ("no-cache", "none"):
            assert {how for _, how in runs[(r, *key)]["compiles"]} == {"compiled"}
        for rec in runs.values():
            assert rec["cold_start_ms"] == pytest.approx(rec["load_ms"] + rec["first_image_ms"])
    assert set(doc["summary"]) == {"openvino-cache/empty", "openvino-cache/filled", "sdrt-blobs/empty",
                                   "sdrt-blobs/filled", "no-cache/none"}


def test_one_round_and_a_folder_without_an_export_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        ov_cold_start.main([str(tmp_path), "--rounds", "1"])
    assert e.value.code == 2 and "--rounds must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ov_cold_start.main([str(tmp_path)])
    assert e.value.code == 2 and "not an sdrt export" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
