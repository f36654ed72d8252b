"""The server benchmark (``python -m sdrt.benchmarks.serve_bench``): the bare pipeline and the server alternate in
interleaved rounds, each side in a process of its own, every figure with its spread and the host's contention,
and the server's goal judged on them. No test here asserts a speed: the verdict is checked on hand-made numbers,
busy flags on injected contention figures, and the real run on its record's structure and arithmetic."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdrt.benchmarks import serve_bench
from sdrt.benchmarks.serve_bench import judge

# -- the verdict, on hand-made numbers -----------------------------------------------------------------------

def test_the_goal_is_met_when_even_the_slowest_served_run_is_within_5_percent() -> None:
    v = judge([10.0, 10.2], [9.8, 9.9], busy=False)  # 9.8 / 10.2 = 0.961
    assert v["verdict"] == "met"
    assert v["low"] == pytest.approx(9.8 / 10.2) and v["high"] == pytest.approx(9.9 / 10.0)
    assert v["ratio"] == pytest.approx(9.85 / 10.1)


def test_the_goal_is_not_met_when_even_the_fastest_served_run_falls_short() -> None:
    v = judge([10.0, 10.2], [8.0, 9.4], busy=False)  # 9.4 / 10.0 = 0.94
    assert v["verdict"] == "not met" and v["high"] == pytest.approx(0.94)


def test_cannot_tell_when_the_runs_straddle_the_line() -> None:
    v = judge([10.0, 10.2], [9.0, 10.0], busy=False)  # 9.0 / 10.2 = 0.88 .. 10.0 / 10.0 = 1.0
    assert v["verdict"] == "cannot tell" and "0.88x to 1.00x" in v["reason"]
    # the two runs, bare 14.6 and 9.8 images/s, served 9.0 and 8.7: on a quiet host even the fastest served
    # run would be under 0.95x the slowest bare one (9.0 / 9.8 = 0.92); measured on a busy one, nothing can be told
    assert judge([14.6, 9.8], [9.0, 8.7], busy=False)["verdict"] == "not met"
    assert judge([14.6, 9.8], [9.0, 8.7], busy=True)["verdict"] == "cannot tell"


def test_cannot_tell_on_a_busy_host_or_without_a_spread_and_failed_requests_are_not_met() -> None:
    busy = judge([10.0, 10.2], [9.8, 9.9], busy=True)
    assert busy["verdict"] == "cannot tell" and "--quiet" in busy["reason"]
    assert judge([10.0], [9.9], busy=False)["verdict"] == "cannot tell"
    failed = judge([10.0, 10.2], [9.8, 9.9], busy=False, errors=3)
    assert failed["verdict"] == "not met" and "3 served requests failed" in failed["reason"]
    with pytest.raises(ValueError, match="both sides"):
        judge([], [9.0], busy=False)


# -- the interleaving ----------------------------------------------------------------------------------------

def test_the_sides_alternate_round_by_round_and_a_failure_stops_them() -> None:
    calls: list[tuple[str, Any]] = []

    def run_one(r: int, side: str) -> dict[str, Any]:
        calls.append(("run", (r, side)))
        return {"status": "ok", "runs": []}

    def before_each() -> dict[str, Any]:
        calls.append(("wait", None))
        return {"waited_s": 0.5}

    order = serve_bench.interleave(3, run_one, before_each)
    assert [c for c in calls if c[0] == "run"] == [("run", (r, s)) for r in (1, 2, 3) for s in ("bare", "served")]
    assert [c[0] for c in calls] == ["wait", "run"] * 6  # a wait before every side
    assert [(e["round"], e["side"], e["waited_s"]) for e in order] == [
        (r, s, 0.5) for r in (1, 2, 3) for s in ("bare", "served")]

    def fails_second(r: int, side: str) -> dict[str, Any]:
        return {"status": "failed" if (r, side) == (1, "served") else "ok", "runs": []}

    stopped = serve_bench.interleave(3, fails_second)
    assert [(e["round"], e["side"]) for e in stopped] == [(1, "bare"), (1, "served")]


# -- figures and busy flags, on injected contention ---------------------------------------------------------

def _run(ips: float, other: float | None, **extra: Any) -> dict[str, Any]:
    return {"images_per_s": ips, "latency_ms": [1000.0 / ips], "other_cpu": other, "load_avg": 1.0, **extra}


def _order(bare_other: dict[int, float | None], served_ips: float = 9.9) -> list[dict[str, Any]]:
    """Two rounds of hand-made results: bare batch 16 at 10.0 and 10.2 images/s (round 1, 2), served at 16 clients,
    batching, at ``served_ips``; bare round r's other work took ``bare_other[r]`` of the machine."""
    order = []
    for r, bare_ips in ((1, 10.0), (2, 10.2)):
        order.append({"round": r, "side": "bare", "waited_s": None, "wall_s": 1.0, "result": {
            "status": "ok", "runs": [_run(bare_ips, bare_other[r], batch=16, repeat=1)]}})
        order.append({"round": r, "side": "served", "waited_s": None, "wall_s": 1.0, "result": {
            "status": "ok", "runs": [_run(served_ips, 0.01, batching=True, clients=16, repeat=1, requests=16,
                                          errors=0, images_per_batch=16.0)]}})
    return order


META = {"when": "t", "machine": "x86_64", "backend": "ort-cpu", "model": "m", "steps": 2, "size": "64x64",
        "batch_window_ms": 10.0, "threads": 2, "rounds": 2, "repeats": 1, "requests": 1, "calls": 1, "quiet": None}


def test_a_measurement_on_a_busy_host_is_flagged_and_the_verdict_cannot_tell() -> None:
    quiet = serve_bench.document(META, _order({1: 0.02, 2: 0.03}), None)
    assert serve_bench.problems(quiet) == []
    assert quiet["goal"]["verdict"] == "met" and quiet["goal"]["busy"] is False  # 9.9 / 10.2 = 0.97
    doc = serve_bench.document(META, _order({1: 0.02, 2: 0.35}), None)
    assert serve_bench.problems(doc) == []
    (bare16,) = doc["bare"]
    assert bare16["contended"] is True and [r["busy"] for r in bare16["runs"]] == [False, True]
    assert doc["served"][0]["contended"] is False
    assert doc["goal"]["verdict"] == "cannot tell" and doc["goal"]["busy"] is True
    text = serve_bench.summary(doc)
    assert "round 2 bare (up to 35%)" in text and "[busy host]" in text and "cannot tell" in text
    assert "round 1 bare" not in text


def test_contention_that_cannot_be_measured_flags_nothing() -> None:
    doc = serve_bench.document(META, _order({1: None, 2: None}), None)
    (bare16,) = doc["bare"]
    assert bare16["contended"] is None and [r["busy"] for r in bare16["runs"]] == [None, None]
    assert doc["goal"]["busy"] is False  # the served side was measured, and quiet


def test_a_figure_pools_its_runs_and_spreads_its_rounds() -> None:
    runs = [_run(x, 0.0, round=r) for r, x in ((1, 4.0), (1, 6.0), (2, 5.5), (2, 6.5))]
    f = serve_bench.figure(runs)
    assert f["images_per_s"]["p50"] == pytest.approx(5.75) and f["images_per_s"]["n"] == 4
    assert [m["images_per_s_p50"] for m in f["rounds"]] == [pytest.approx(5.0), pytest.approx(6.0)]
    assert f["spread"] == pytest.approx((6.0 - 5.0) / 5.0)
    assert f["latency_ms"]["p50"] == pytest.approx(np.percentile([1000 / x for x in (4.0, 6.0, 5.5, 6.5)], 50))
    assert all("latency_ms" not in r for r in f["runs"])


def test_a_measurement_inside_its_own_process_is_not_other_work() -> None:
    """``contention.snapshot(own=True)``: a busy thread of this process (the server's, in the served side) is the
    measuring side's CPU time, not other work; without ``own`` it is other work."""
    from sdrt.benchmarks import contention

    if contention.snapshot().busy_s is None:
        pytest.skip("no /proc/stat on this platform: other work cannot be measured")
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    cpu0 = time.process_time()
    plain0, own0 = contention.snapshot(), contention.snapshot(own=True)
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    plain1, own1 = contention.snapshot(), contention.snapshot(own=True)
    cpu = time.process_time() - cpu0
    ours = (own1.children_s - own0.children_s) - (plain1.children_s - plain0.children_s)
    assert cpu > 0 and ours == pytest.approx(cpu, abs=0.05)  # this process's CPU time, the spinning thread's
    plain_share, own_share = contention.other_cpu(plain0, plain1), contention.other_cpu(own0, own1)
    assert plain_share is not None and own_share is not None and own_share <= plain_share


# -- requests that cannot run --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "give an export folder or --tiny"),
    (["--tiny", "--rounds", "1"], "--rounds must be from 2 to 20"),
    (["--tiny", "--quiet", "1.5"], "--quiet must be from 0 to 1"),
    (["--tiny", "--repeats", "0"], "--repeats must be at least 1"),
    (["NOWHERE"], "is not an sdrt export"),
])
def test_a_run_that_cannot_run_is_refused_before_work(argv: list[str], message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / a) if a == "NOWHERE" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        serve_bench.main([*argv, "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing made


# -- a real run --------------------------------------------------------------------------------------------

def test_serve_bench_on_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two rounds of ``--tiny`` at 2 steps: the record's structure, the interleaving as run (each side in a process
    of its own), and every figure's arithmetic from the runs it records."""
    assert serve_bench.main(["--tiny", "--steps", "2", "--rounds", "2", "--repeats", "1", "--requests", "1",
                             "--calls", "1", "--rss-requests", "0", "-o", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("serve-ort-cpu-sd15-tiny-*.json")
    doc = json.loads(report.read_text())
    assert serve_bench.problems(doc) == []
    assert doc["schema"] == "sdrt-serve-bench" and doc["schema_version"] == 2
    assert [(e["round"], e["side"]) for e in doc["order"]] == [(1, "bare"), (1, "served"), (2, "bare"), (2, "served")]
    pids = [e["pid"] for e in doc["order"]]
    assert len(set(pids)) == 4 and os.getpid() not in pids  # each side, each round: a process of its own
    assert [f["batch"] for f in doc["bare"]] == [1, 4, 16]
    assert [(f["batching"], f["clients"]) for f in doc["served"]] == [
        (True, 1), (True, 4), (True, 16), (False, 1), (False, 4), (False, 16)]
    for f in doc["bare"] + doc["served"]:
        ips = [r["images_per_s"] for r in f["runs"]]
        assert [r["round"] for r in f["runs"]] == [1, 2] and f["images_per_s"]["n"] == 2
        assert f["images_per_s"]["p50"] == pytest.approx(np.median(ips))
        assert f["spread"] == pytest.approx((max(ips) - min(ips)) / min(ips))
        for r in f["runs"]:
            assert r["busy"] == (None if r["other_cpu"] is None else r["other_cpu"] > 0.10)
        assert f["contended"] == (any(r["busy"] for r in f["runs"]) if f["runs"][0]["other_cpu"] is not None
                                  else None)
    for f in doc["served"]:
        assert f["errors"] == 0 and f["requests"] == 2 * f["clients"]
        # the server's own count: unbatched it never puts two requests together; batched, at most 16
        assert all((r["images_per_batch"] == 1.0) if not f["batching"] else (1.0 <= r["images_per_batch"] <= 16)
                   for r in f["runs"])
    assert doc["batch_window_ms"] == 10.0 and doc["rss"] is None
    bare16 = [r["images_per_s"] for r in doc["bare"][2]["runs"]]
    served16 = [r["images_per_s"] for r in doc["served"][2]["runs"]]
    goal = doc["goal"]
    assert goal["clients"] == 16 and goal["verdict"] in ("met", "not met", "cannot tell")
    assert goal["low"] == pytest.approx(min(served16) / max(bare16))
    assert goal["high"] == pytest.approx(max(served16) / min(bare16))
    out = capsys.readouterr().out
    assert f"goal, {goal['goal']}: {goal['verdict']}" in out and "served, batching, 16 clients" in out
