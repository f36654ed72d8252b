"""The server's overhead as a measured ratio: images/s and p50/p95/p99 latency through ``sdrt serve`` at 1, 4
and 16 concurrent clients, batching on and off, beside the bare Pipeline at the same batch sizes; RSS before and
after a run of requests; and the server's goal judged on them: at saturation (16 clients, batching) its
throughput within 5% of the bare batch-16 pipeline's.

Measured as ``sdrt bench`` measures its rows: the two sides alternate in interleaved rounds (bare, served, bare,
served, ...; ``--rounds``, at least two), each side in a worker process of its own (``jobs.run_worker``), so the
bare pipeline never runs while the server's threads are alive; inside each, every measurement is repeated
(``--repeats``), and each records the share of the machine other processes used meanwhile
(``contention.py``): more than a tenth flags it busy. Every figure is the median over its rounds and repeats with
its range and the spread of the rounds' medians (``stats.py``). The goal's verdict: **met** when even the slowest
served run reaches 0.95x the fastest bare one, **not met** when even the fastest falls short of the slowest (or
requests failed), **cannot tell** when the runs' range straddles the line or any of them ran on a busy host.
``--quiet SHARE`` waits before each side's process until other work uses at most that share of the machine.

The load: an httpx loop per client thread, loopback only, in a process of its own (in the server's process the
clients would hold the server's interpreter lock and be counted as its overhead). The mean images per batch the
server formed comes from its /metrics.

    python -m sdrt.benchmarks.serve_bench EXPORT_DIR [--backend ort-cpu] [--requests 8] [--rounds 2] [--repeats 2]
        [--quiet 0.05] [--rss-requests 1000]
    python -m sdrt.benchmarks.serve_bench --tiny      # exports sd15-tiny to a temporary folder first

The result file (``serve-BACKEND-MODEL-TIME.json``) is schema ``sdrt-serve-bench`` version 2 (benchmarks/README.md);
files without a ``schema`` field are version 1: one process, one pass, no spreads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .contention import BUSY_OTHER_CPU

SCHEMA_NAME = "sdrt-serve-bench"
SCHEMA_VERSION = 2  # 1: the files written before (no schema field): one process, one pass, no spreads
SIZES = (1, 4, 16)  # the bare pipeline's batch sizes, and the served runs' concurrent clients
SATURATION = 16  # clients = the server's max batch = the bare batch it is judged against
GOAL = 0.95  # the server's goal: at saturation, at least this share of the bare pipeline's images/s
SIDES = ("bare", "served")  # the order within each round
VERDICTS = ("met", "not met", "cannot tell")
SIZE = 64  # the images' height and width


# -- one measurement ---------------------------------------------------------------------------------------

def bare(pipe: Any, batch: int, body: dict[str, Any], calls: int) -> dict[str, Any]:
    """``calls`` calls of the bare pipeline at ``batch``: images/s over them, and each call's latency."""
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter()
        pipe([body["prompt"]] * batch, height=SIZE, width=SIZE, steps=body["steps"], seed=list(range(batch)))
        lat.append(time.perf_counter() - t0)
    return {"images_per_s": batch * calls / sum(lat), "latency_ms": [x * 1e3 for x in lat]}


def _load_here(url: str, clients: int, per_client: int, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as c:
            barrier.wait()
            for i in range(per_client):
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/images/generations", json=dict(body, seed=k * 1000 + i))
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    errors[0] += r.status_code != 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "errors": errors[0], "images_per_s": len(lat) / wall,
            "latency_ms": [x * 1e3 for x in lat]}


def _batches(url: str) -> tuple[float, float]:
    """(images, batches) the server has run so far, from its Prometheus counters."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    pattern = re.compile(r"^sdrt_batch_images_(sum|count) (\S+)$", re.MULTILINE)
    got = {m.group(1): float(m.group(2)) for m in pattern.finditer(text)}
    return got.get("sum", 0.0), got.get("count", 0.0)


def load(url: str, clients: int, per_client: int, body: dict[str, Any]) -> dict[str, Any]:
    """``clients`` concurrent clients sending ``per_client`` requests each, from a separate process."""
    images0, batches0 = _batches(url)
    cmd = [sys.executable, "-m", "sdrt.benchmarks.serve_bench", "--load-from", url, "--clients", str(clients),
           "--requests", str(per_client), "--body", json.dumps(body)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr.strip()[-2000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    images1, batches1 = _batches(url)
    row["images_per_batch"] = (images1 - images0) / max(1.0, batches1 - batches0)
    return row


def _watched(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s figures with the share of the machine other processes used meanwhile (``other_cpu``: this
    process and its load generators are the measuring side) and the 1-minute load average before."""
    from .contention import other_cpu, snapshot
    from .env import load_average

    avg, before = load_average(), snapshot(own=True)
    row = measure()
    row["other_cpu"] = other_cpu(before, snapshot(own=True))
    row["load_avg"] = None if avg is None else avg[0]
    return row


# -- one side, in its worker process (worker.py's "serve" job) ---------------------------------------------

def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One side of one round, in the worker process this is (``spec["side"]``): ``bare`` (the pipeline alone at
    each batch size), ``served`` (the server, batching on and off, at each client count) or ``rss`` (the server's
    memory across ``rss_requests`` requests). The pipeline is warmed at every batch size first, on both sides."""
    from sdrt.runtime.pipeline import Pipeline

    from .worker import emit

    body = {"prompt": "a lighthouse at dusk", "steps": spec["steps"], "size": f"{SIZE}x{SIZE}"}
    emit(phase="load")
    with Pipeline.load(spec["folder"], backend=spec["backend"], threads=spec["threads"]) as pipe:
        emit(phase="warmup")
        for b in SIZES:  # each batch shape's first call pays for its buffers: not measured, on either side
            pipe([body["prompt"]] * b, height=SIZE, width=SIZE, steps=spec["steps"], seed=list(range(b)))
        if spec["side"] == "bare":
            return {"status": "ok", "pid": os.getpid(), "runs": _bare_runs(pipe, spec, body)}
        if spec["side"] == "served":
            return {"status": "ok", "pid": os.getpid(), "runs": _served_runs(pipe, spec, body)}
        return {"status": "ok", "pid": os.getpid(), "rss": _rss(pipe, spec, body)}


def _bare_runs(pipe: Any, spec: dict[str, Any], body: dict[str, Any]) -> list[dict[str, Any]]:
    from .worker import emit

    runs = []
    for rep in range(1, spec["repeats"] + 1):
        for b in SIZES:
            emit(phase=f"bare batch {b}", i=rep, n=spec["repeats"])
            runs.append({"batch": b, "repeat": rep, **_watched(lambda b=b: bare(pipe, b, body, spec["calls"]))})
    return runs


def _app(pipe: Any, spec: dict[str, Any], batching: bool) -> Any:
    from sdrt.serve import create_app

    return create_app(pipe, max_batch=SATURATION, batch_window_ms=spec["window_ms"], max_queue=256,
                      batching=batching, warmup=False)


def _served_runs(pipe: Any, spec: dict[str, Any], body: dict[str, Any]) -> list[dict[str, Any]]:
    from sdrt.serve.live import LiveServer

    from .worker import emit

    runs = []
    for batching in (True, False):
        with LiveServer(_app(pipe, spec, batching)) as s:
            for rep in range(1, spec["repeats"] + 1):
                for c in SIZES:
                    emit(phase=f"served {'batching' if batching else 'unbatched'} {c} clients", i=rep,
                         n=spec["repeats"])
                    row = _watched(lambda c=c: load(s.url, c, spec["requests"], body))
                    runs.append({"batching": batching, "clients": c, "repeat": rep, **row})
    return runs


def _rss(pipe: Any, spec: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    import psutil

    from sdrt.serve.live import LiveServer

    from .worker import emit

    proc = psutil.Process()
    with LiveServer(_app(pipe, spec, True)) as s:
        emit(phase="rss")
        load(s.url, 4, 25, body)  # settle allocator pools before the baseline
        before = proc.memory_info().rss
        per = max(1, spec["rss_requests"] // 8)
        load(s.url, 8, per, body)
        after = proc.memory_info().rss
    return {"requests": per * 8, "before_mb": before / 2**20, "after_mb": after / 2**20,
            "growth_mb": (after - before) / 2**20}


# -- the rounds ---------------------------------------------------------------------------------------------

def interleave(rounds: int, run_one: Callable[[int, str], dict[str, Any]],
               before_each: Callable[[], dict[str, Any]] = dict) -> list[dict[str, Any]]:
    """Every side once per round, in ``SIDES`` order: bare, served, bare, served, ... ``run_one(round, side)`` runs
    one (its result: ``status``, ``runs``); ``before_each()`` runs before each (the wait for a quiet host; what it
    returns is kept with the entry). Stops at the first side that fails: (every entry run, in order)."""
    order = []
    for r in range(1, rounds + 1):
        for side in SIDES:
            info = before_each()
            t0 = time.monotonic()
            res = run_one(r, side)
            order.append({"round": r, "side": side, **info, "wall_s": time.monotonic() - t0, "result": res})
            if res.get("status") != "ok":
                return order
    return order


def figure(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One figure over its runs (every round's repeats; each run has ``round``, ``images_per_s``, ``latency_ms``
    and ``other_cpu``): images/s summarized (p50 over the runs, their min and max), ``spread``: (max - min) / min of
    the rounds' median images/s (None with one round), the latency percentiles over every request pooled,
    ``contended``: some run had other work take more than ``BUSY_OTHER_CPU`` of the machine (None where no run
    could tell); each run is kept (without its latencies), ``busy`` where it was."""
    from .stats import percentile, summarize

    if not runs:
        raise ValueError("a figure of no runs")
    by_round: dict[int, list[float]] = {}
    for r in runs:
        by_round.setdefault(int(r["round"]), []).append(float(r["images_per_s"]))
    medians = [{"round": k, "images_per_s_p50": percentile(v, 50)} for k, v in sorted(by_round.items())]
    meds = [m["images_per_s_p50"] for m in medians]
    lat = [x for r in runs for x in r.get("latency_ms", [])]
    seen = [r["other_cpu"] for r in runs if r.get("other_cpu") is not None]
    kept = [{**{k: v for k, v in r.items() if k != "latency_ms"},
             "busy": None if r.get("other_cpu") is None else r["other_cpu"] > BUSY_OTHER_CPU} for r in runs]
    return {
        "images_per_s": summarize([float(r["images_per_s"]) for r in runs]),
        "spread": (max(meds) - min(meds)) / min(meds) if len(meds) >= 2 and min(meds) > 0 else None,
        "rounds": medians,
        "latency_ms": {f"p{q}": percentile(lat, q) for q in (50, 95, 99)} if lat else None,
        "contended": any(x > BUSY_OTHER_CPU for x in seen) if seen else None,
        "runs": kept,
    }


def judge(bare_ips: Sequence[float], served_ips: Sequence[float], *, busy: bool | None, errors: int = 0,
          goal: float = GOAL) -> dict[str, Any]:
    """The server's goal judged on every run's images/s at saturation, bare and served: ``ratio`` of the medians,
    ``low`` (the slowest served run over the fastest bare one) and ``high`` (the fastest over the slowest), and the
    verdict: ``not met`` when requests failed or ``high`` is below ``goal``; ``cannot tell`` when the host was
    ``busy`` during any of them, a side has one run (no spread), or ``low`` and ``high`` straddle ``goal``;
    ``met`` when ``low`` reaches it."""
    from .stats import percentile

    if not bare_ips or not served_ips:
        raise ValueError("judging the goal needs runs of both sides")
    ratio = percentile(served_ips, 50) / percentile(bare_ips, 50)
    low, high = min(served_ips) / max(bare_ips), max(served_ips) / min(bare_ips)
    if errors:
        verdict, reason = "not met", f"{errors} served requests failed"
    elif busy:
        verdict, reason = "cannot tell", (f"other work took more than {BUSY_OTHER_CPU:.0%} of the machine during "
                                          "some of these runs (rerun with --quiet 0.05)")
    elif min(len(bare_ips), len(served_ips)) < 2:
        verdict, reason = "cannot tell", "one run a side: no spread to judge against"
    elif low >= goal:
        verdict, reason = "met", f"even the slowest served run is {low:.2f}x the fastest bare one"
    elif high < goal:
        verdict, reason = "not met", f"even the fastest served run is {high:.2f}x the slowest bare one"
    else:
        verdict, reason = "cannot tell", f"the runs range from {low:.2f}x to {high:.2f}x, across the {goal:.2f}x line"
    return {"target": goal, "ratio": ratio, "low": low, "high": high, "busy": busy, "verdict": verdict,
            "reason": reason}


def document(meta: dict[str, Any], order: list[dict[str, Any]], rss: dict[str, Any] | None) -> dict[str, Any]:
    """The result: ``meta`` (the run's settings), the order the sides ran in with the host meanwhile, each
    figure over its rounds, the goal's verdict."""
    bare_runs: dict[int, list[dict[str, Any]]] = {}
    served_runs: dict[tuple[bool, int], list[dict[str, Any]]] = {}
    for entry in order:
        for run in entry["result"]["runs"]:
            run = {"round": entry["round"], **run}
            if entry["side"] == "bare":
                bare_runs.setdefault(run["batch"], []).append(run)
            else:
                served_runs.setdefault((run["batching"], run["clients"]), []).append(run)
    bares = [{"batch": b, **figure(bare_runs[b])} for b in sorted(bare_runs)]
    by_batch = {f["batch"]: f for f in bares}
    served = []
    for (batching, clients), runs in sorted(served_runs.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        f: dict[str, Any] = {"batching": batching, "clients": clients, **figure(runs),
                             "requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs),
                             "images_per_batch": sum(r["images_per_batch"] for r in runs) / len(runs)}
        ref = by_batch.get(clients)
        f["vs_bare_same_batch"] = None
        if batching and ref is not None:
            v = judge([r["images_per_s"] for r in ref["runs"]], [r["images_per_s"] for r in f["runs"]], busy=None)
            f["vs_bare_same_batch"] = {k: v[k] for k in ("ratio", "low", "high")}
        served.append(f)
    at = next((f for f in served if f["batching"] and f["clients"] == SATURATION), None)
    ref = by_batch.get(SATURATION)
    goal: dict[str, Any] = {"goal": f"served throughput at {SATURATION} clients, batching, within "
                                    f"{1 - GOAL:.0%} of the bare batch-{SATURATION} pipeline's", "clients": SATURATION}
    if at is None or ref is None:
        goal.update(target=GOAL, ratio=None, low=None, high=None, busy=None, verdict="cannot tell",
                    reason="the run did not measure both sides at saturation")
    else:
        flags = [x for x in (ref["contended"], at["contended"]) if x is not None]
        goal.update(judge([r["images_per_s"] for r in ref["runs"]], [r["images_per_s"] for r in at["runs"]],
                          busy=any(flags) if flags else None, errors=at["errors"]))
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **meta,
            "order": [{**{k: v for k, v in e.items() if k != "result"},
                       **{k: e["result"].get(k) for k in ("pid", "other_cpu", "peak_rss_bytes")}} for e in order],
            "bare": bares, "served": served, "rss": rss, "goal": goal}


_FIGURE_KEYS = ("images_per_s", "spread", "rounds", "latency_ms", "contended", "runs")
_TOP_KEYS = ("when", "machine", "backend", "model", "steps", "size", "batch_window_ms", "threads", "rounds",
             "repeats", "requests", "calls", "quiet", "order", "bare", "served", "rss", "goal")


def problems(doc: Any) -> list[str]:
    """What is wrong with a result document of this schema ([] when nothing)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("schema") != SCHEMA_NAME or doc.get("schema_version") != SCHEMA_VERSION:
        return [(f"not a {SCHEMA_NAME} version {SCHEMA_VERSION} document (schema {doc.get('schema')!r}, version "
                 f"{doc.get('schema_version')!r})")]
    out = [f"missing {k}" for k in _TOP_KEYS if k not in doc]
    for part in ("bare", "served"):
        for i, f in enumerate(doc.get(part) or []):
            out += [f"{part}[{i}] missing {k}" for k in _FIGURE_KEYS if k not in f]
            if not (f.get("runs") and all("round" in r and "other_cpu" in r and "busy" in r for r in f["runs"])):
                out.append(f"{part}[{i}]: runs without their round and contention")
    goal = doc.get("goal") or {}
    if goal.get("verdict") not in VERDICTS:
        out.append(f"goal.verdict {goal.get('verdict')!r} is not one of {', '.join(VERDICTS)}")
    return out


# -- the report ---------------------------------------------------------------------------------------------

def _cell(f: dict[str, Any]) -> str:
    s = f["images_per_s"]
    spread = "-" if f["spread"] is None else f"{f['spread']:.1%}"
    return (f"{s['p50']:.2f} images/s ({s['min']:.2f}-{s['max']:.2f} over {s['n']} runs; rounds spread {spread})"
            + (" [busy host]" if f["contended"] else ""))


def summary(doc: dict[str, Any]) -> str:
    """The run's figures and the goal's verdict, for the terminal."""
    lines = [(f"{doc['rounds']} rounds, interleaved ({', '.join(SIDES)} in each, each side in its own process), "
              f"{doc['repeats']} run{'s' if doc['repeats'] != 1 else ''} of every measurement a round")]
    for f in doc["bare"]:
        lines.append(f"  bare batch {f['batch']}: {_cell(f)}")
    for f in doc["served"]:
        vs = f["vs_bare_same_batch"]
        extra = "" if vs is None else f"; {vs['ratio']:.2f}x bare ({vs['low']:.2f}-{vs['high']:.2f})"
        lines.append(f"  served, {'batching' if f['batching'] else 'unbatched'}, {f['clients']} clients: {_cell(f)}"
                     f"{extra}; {f['images_per_batch']:.1f} images per batch, {f['errors']} errors")
    worst: dict[tuple[int, str], float] = {}  # (round, side): the most other work took during a busy run
    for side in SIDES:
        for f in doc[side]:
            for run in f["runs"]:
                if run["busy"]:
                    key = (run["round"], side)
                    worst[key] = max(worst.get(key, 0.0), run["other_cpu"])
    if worst:
        parts = ", ".join(f"round {r} {side} (up to {share:.0%})" for (r, side), share in sorted(worst.items()))
        lines.append(f"busy host: other work took more than {BUSY_OTHER_CPU:.0%} of the machine during {parts}; "
                     "those figures are not comparable (rerun with --quiet 0.05)")
    if doc["rss"]:
        lines.append(f"rss over {doc['rss']['requests']} requests: {doc['rss']['before_mb']:.1f} -> "
                     f"{doc['rss']['after_mb']:.1f} MB")
    g = doc["goal"]
    ratio = "" if g["ratio"] is None else f" ({g['ratio']:.2f}x; runs {g['low']:.2f}-{g['high']:.2f}x)"
    lines.append(f"goal, {g['goal']}: {g['verdict']}{ratio}: {g['reason']}")
    return "\n".join(lines)


# -- the command --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="an sdrt export folder")
    ap.add_argument("--tiny", action="store_true", help="export sd15-tiny (synthetic weights) first")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8, help="requests per client in each served measurement")
    ap.add_argument("--calls", type=int, default=None,
                    help="bare pipeline calls in each bare measurement (default: --requests, so a bare batch-N "
                         "measurement draws as many images as N clients' served one)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds: bare, served, bare, served, ... each side a process of its own "
                         "(default 2, at least 2)")
    ap.add_argument("--repeats", type=int, default=2, help="each measurement's repeats within a round (default 2)")
    ap.add_argument("--quiet", type=float, default=None, metavar="SHARE",
                    help="before each side, wait until other processes use at most this share of the machine "
                         "(e.g. 0.05); measurements while it was busier are flagged either way")
    ap.add_argument("--quiet-timeout", type=float, default=300.0, metavar="S",
                    help="the longest --quiet waits before a side, in seconds (default 300; then it measures, "
                         "flagged)")
    ap.add_argument("--threads", type=int, default=None, help="the pipeline's CPU threads (default: physical cores)")
    ap.add_argument("--rss-requests", type=int, default=1000,
                    help="requests of the RSS measurement, a process of its own after the rounds (0: none)")
    ap.add_argument("--window-ms", type=float, default=None,
                    help="the server's batch window (default: the server's own default)")
    ap.add_argument("--timeout", type=float, default=None, metavar="S", help="stop a side's process after S seconds")
    ap.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--load-from", metavar="URL", help=argparse.SUPPRESS)  # the load generator's process
    ap.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--body", help=argparse.SUPPRESS)
    return ap


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot run, before any work."""
    if args.tiny == (args.path is not None):
        ap.error("give an export folder or --tiny (one of them)")
    if args.path is not None and not (Path(args.path) / "sdrt.json").is_file():
        ap.error(f"{args.path} is not an sdrt export (no sdrt.json in it); make one with `sdrt export`, or use --tiny")
    if not 2 <= args.rounds <= 20:
        ap.error(f"--rounds must be from 2 to 20 (the verdict compares rounds), got {args.rounds}")
    for name in ("repeats", "requests", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.calls is not None and args.calls < 1:
        ap.error(f"--calls must be at least 1, got {args.calls}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    if args.rss_requests < 0:
        ap.error(f"--rss-requests must be 0 or more, got {args.rss_requests}")
    if args.quiet is not None and not 0.0 <= args.quiet < 1.0:
        ap.error(f"--quiet must be from 0 to 1 (e.g. 0.05), got {args.quiet}")
    if args.quiet_timeout <= 0:
        ap.error(f"--quiet-timeout must be positive, got {args.quiet_timeout}")
    if args.window_ms is not None and args.window_ms < 0:
        ap.error(f"--window-ms must be 0 or more, got {args.window_ms}")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"cannot write results to {args.output}: {e.strerror}")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.load_from:
        print(json.dumps(_load_here(args.load_from, args.clients, args.requests, json.loads(args.body))))
        return 0
    _check(ap, args)
    from sdrt.serve.config import ServeConfig

    from .contention import other_cpu, snapshot, wait_quiet
    from .env import physical_cores
    from .jobs import run_worker

    window_ms = ServeConfig().batch_window_ms if args.window_ms is None else args.window_ms
    threads = args.threads or physical_cores()
    # as many images as the served side at the same size: batch N x calls = N clients x requests (half as many
    # left the bare figures a handful of calls each, spread 53-79% between rounds on a quiet host)
    calls = args.calls or args.requests
    with tempfile.TemporaryDirectory(prefix="sdrt-serve-bench-") as tmp:
        work = Path(tmp)
        if args.tiny:
            from sdrt.export.exporter import export_model
            from sdrt.export.loading import load_model

            args.path = work / "sd15-tiny"
            export_model(load_model(random_preset="sd15-tiny"), args.path)
        spec = {"job": "serve", "folder": str(args.path), "backend": args.backend, "threads": threads,
                "steps": args.steps, "requests": args.requests, "calls": calls, "repeats": args.repeats,
                "window_ms": window_ms, "rss_requests": args.rss_requests}

        def say(stage: str, message: str, **event: Any) -> None:
            if stage == "quiet":
                print(message, flush=True)
            elif "phase" in event:
                done = f" {event['i']}/{event['n']}" if "i" in event else ""
                print(f"{message}: {event['phase']}{done}", flush=True)

        def run_one(r: int, side: str) -> dict[str, Any]:
            label = side if side == "rss" else f"round {r}/{args.rounds} {side}"
            before = snapshot()
            res, _ = run_worker({**spec, "side": side}, work, label, "cpu", threads=threads, timeout_s=args.timeout,
                                emit=say)
            res["other_cpu"] = other_cpu(before, snapshot())  # over the whole process, its start included
            return res

        def before_each() -> dict[str, Any]:
            if args.quiet is None:
                return {"waited_s": None, "quiet_share": None}
            waited, share = wait_quiet(args.quiet, args.quiet_timeout, say)
            return {"waited_s": waited, "quiet_share": share}

        order = interleave(args.rounds, run_one, before_each)
        failed = next((e for e in order if e["result"]["status"] != "ok"), None)
        if failed is not None:
            print(f"round {failed['round']} {failed['side']} failed: {failed['result'].get('reason')}",
                  file=sys.stderr)
            return 1
        rss = None
        if args.rss_requests:
            res = run_one(args.rounds, "rss")
            if res["status"] != "ok":
                print(f"the RSS measurement failed: {res.get('reason')}", file=sys.stderr)
                return 1
            rss = res["rss"]
    meta = {"when": datetime.now(timezone.utc).isoformat(), "machine": platform.processor() or platform.machine(),
            "backend": args.backend, "model": str(args.path), "steps": args.steps, "size": f"{SIZE}x{SIZE}",
            "batch_window_ms": window_ms, "threads": threads, "rounds": args.rounds, "repeats": args.repeats,
            "requests": args.requests, "calls": calls, "quiet": args.quiet}
    doc = document(meta, order, rss)
    wrong = problems(doc)
    if wrong:  # a bug here, not the user's: say what, and write nothing
        raise RuntimeError(f"the serve benchmark made a malformed result: {'; '.join(wrong)}")
    from sdrt.runtime.atomic import atomic_write_text

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = args.output / f"serve-{args.backend}-{Path(str(args.path)).name}-{stamp}.json"
    atomic_write_text(path, json.dumps(doc, indent=2))
    print(summary(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
