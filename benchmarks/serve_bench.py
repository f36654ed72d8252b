"""The server's overhead as a measured ratio: images/s and p50/p95/p99 latency through ``sdrt serve`` at 1, 4
and 16 concurrent clients, batching on and off, beside the bare Pipeline at the same batch sizes in the same
run; RSS before and after a run of requests. Load: an httpx loop per client thread, loopback only, in a process of
its own (in the server's process the clients would hold the server's interpreter lock and be counted as its
overhead). The mean images per batch the server formed comes from its /metrics.

    python -m sdrt.benchmarks.serve_bench EXPORT_DIR [--backend ort-cpu] [--requests 8] [--rss-requests 1000]
    python -m sdrt.benchmarks.serve_bench --tiny      # exports sd15-tiny to a temporary folder first
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99))}


def bare(pipe: Any, batch: int, body: dict[str, Any], rounds: int) -> dict[str, Any]:
    lat = []
    for r in range(rounds):
        t0 = time.perf_counter()
        pipe([body["prompt"]] * batch, height=64, width=64, steps=body["steps"], seed=list(range(batch)))
        lat.append(time.perf_counter() - t0)
    return {"batch": batch, "images_per_s": batch * rounds / sum(lat), **_pct(lat)}


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
    return {"clients": clients, "requests": len(lat), "errors": errors[0], "images_per_s": len(lat) / wall,
            **_pct(lat)}


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


def main(argv: list[str] | None = None) -> int:
    import psutil

    from sdrt.runtime.pipeline import Pipeline
    from sdrt.serve import create_app
    from sdrt.serve.live import LiveServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?")
    ap.add_argument("--tiny", action="store_true", help="export sd15-tiny (synthetic weights) first")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--rss-requests", type=int, default=1000)
    ap.add_argument("--window-ms", type=float, default=None,
                    help="the server's batch window (default: the server's own default)")
    ap.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--load-from", metavar="URL", help=argparse.SUPPRESS)  # the load generator's process
    ap.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--body", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load_from:
        print(json.dumps(_load_here(args.load_from, args.clients, args.requests, json.loads(args.body))))
        return 0
    from sdrt.serve.config import ServeConfig

    window_ms = ServeConfig().batch_window_ms if args.window_ms is None else args.window_ms
    tmp = None
    if args.tiny:
        from sdrt.export.exporter import export_model
        from sdrt.export.loading import load_model

        tmp = tempfile.TemporaryDirectory()
        args.path = Path(tmp.name) / "sd15-tiny"
        export_model(load_model(random_preset="sd15-tiny"), args.path)
    body = {"prompt": "a lighthouse at dusk", "steps": args.steps, "size": "64x64"}
    out: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(), "machine": platform.processor()
                           or platform.machine(), "backend": args.backend, "model": str(args.path),
                           "steps": args.steps, "size": "64x64", "batch_window_ms": window_ms, "bare": [], "served": []}
    proc = psutil.Process()
    with Pipeline.load(args.path, backend=args.backend) as pipe:
        pipe("warm-up", height=64, width=64, steps=args.steps, seed=0)
        for b in (1, 4, 16):
            out["bare"].append(bare(pipe, b, body, max(2, args.requests // 2)))
            print("bare", out["bare"][-1], flush=True)
        for batching in (True, False):
            app = create_app(pipe, max_batch=16, batch_window_ms=window_ms, max_queue=256, batching=batching,
                             warmup=False)
            with LiveServer(app) as s:
                for c in (1, 4, 16):
                    row = {"batching": batching, **load(s.url, c, args.requests, body)}
                    out["served"].append(row)
                    print("served", row, flush=True)
                if batching and args.rss_requests:
                    load(s.url, 4, 25, body)  # settle allocator pools before the baseline
                    before = proc.memory_info().rss
                    per = max(1, args.rss_requests // 8)
                    load(s.url, 8, per, body)
                    after = proc.memory_info().rss
                    out["rss"] = {"requests": per * 8, "before_mb": before / 2**20, "after_mb": after / 2**20,
                                  "growth_mb": (after - before) / 2**20}
                    print("rss", out["rss"], flush=True)
    by_batch = {r["batch"]: r["images_per_s"] for r in out["bare"]}
    for r in out["served"]:
        r["vs_bare_same_batch"] = r["images_per_s"] / by_batch[r["clients"]] if r["batching"] else None
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = args.output / f"serve-{args.backend}-{Path(str(args.path)).name}-{stamp}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
