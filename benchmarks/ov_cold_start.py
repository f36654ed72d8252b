"""The openvino backend's cold start with each model cache design, side by side: load and first image of an
export in a fresh process with

* ``openvino-cache``: OpenVINO's own ``CACHE_DIR`` (``compile_model`` writes each blob before it returns: how the
  backend cached before runtime/ov_blobs.py),
* ``sdrt-blobs``: the backend's model cache (compile, the blob written by a background thread, mapped on a later
  load),
* ``no-cache``: every load compiles,

each of the first two with an empty cache and then with the cache that run filled. The designs alternate in
interleaved rounds (``--rounds``, at least two), each measurement a process of its own, and each records the share
of the machine other work used meanwhile (``contention.py``; over a tenth flags it busy). Per run: the load (with
the pipeline's per-component breakdown), the first image, their sum (the cold start), the wait for background
writes after the image (``settle``), peak RSS and the process's CPU time. Figures are medians over the rounds with
their ranges (``stats.py``).

    python -m sdrt.benchmarks.ov_cold_start EXPORT [--rounds 2] [--steps 2] [--size 512] [--threads 2]
        [--precision auto] [--quiet 0.05] [-o benchmarks/results]

The result file (``ov-cold-start-TIME.json``) is schema ``sdrt-ov-cold-start`` version 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdrt.runtime.atomic import atomic_write_text

from . import contention
from .stats import summarize

SCHEMA_NAME = "sdrt-ov-cold-start"
SCHEMA_VERSION = 1
# each design: which cache the backend uses, sdrt's own (cache_dir=) or OpenVINO's CACHE_DIR
DESIGNS = {"openvino-cache": {"sdrt": False, "openvino": True}, "sdrt-blobs": {"sdrt": True, "openvino": False},
           "no-cache": {"sdrt": False, "openvino": False}}


def child(design: str, folder: str, cache: str, steps: int, size: int, threads: int, precision: str) -> dict[str, Any]:
    """One cold start, in this (fresh) process."""
    t0 = time.perf_counter()
    from sdrt.runtime.ov_backend import OvBackend
    from sdrt.runtime.pipeline import Pipeline

    import_ms = (time.perf_counter() - t0) * 1e3
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    uses = DESIGNS[design]
    backend = OvBackend(threads=threads, precision=precision, cache_dir=cache if uses["sdrt"] else False)
    if uses["openvino"]:
        backend.config["CACHE_DIR"] = cache  # OpenVINO writes the blob inside compile_model
    pipe = Pipeline.load(folder, backend=backend)
    load_ms = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    pipe("a lighthouse at dawn", steps=steps, height=size, width=size, seed=0, sampler="euler")
    first_ms = (time.perf_counter() - t1) * 1e3
    settle_ms = backend.settle() * 1e3
    pipe.close()
    return {"design": design, "import_ms": import_ms, "load_ms": load_ms, "load_breakdown_ms": dict(pipe.load_ms),
            "first_image_ms": first_ms, "cold_start_ms": load_ms + first_ms, "settle_ms": settle_ms,
            "cpu_ms": (time.process_time() - cpu0) * 1e3,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "compiles": [list(c) for c in backend.compiles]}


def measure(design: str, cache: Path, args: argparse.Namespace, fill: str) -> dict[str, Any]:
    if args.quiet is not None:
        contention.wait_quiet(args.quiet, args.quiet_timeout)
    before = contention.snapshot()
    out = subprocess.run(
        [sys.executable, "-m", "sdrt.benchmarks.ov_cold_start", "--child", design, str(args.export), str(cache),
         "--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads),
         "--precision", args.precision], check=False, capture_output=True, text=True)
    after = contention.snapshot()
    if out.returncode != 0:
        raise SystemExit(f"the {design} run failed:\n{out.stderr[-3000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    share = contention.other_cpu(before, after)
    rec.update(cache=fill, other_cpu=share, busy=share is not None and share > contention.BUSY_OTHER_CPU,
               load_avg=os.getloadavg()[0])
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.ov_cold_start", description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("cache", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=list(DESIGNS), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--quiet", type=float, default=None, help="wait before each run until other work uses at most "
                                                              "this share of the machine")
    ap.add_argument("--quiet-timeout", type=float, default=300)
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, str(args.export), args.cache, args.steps, args.size, args.threads,
                               args.precision)))
        return 0
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: one round cannot show its own noise")
    if not (args.export / "sdrt.json").is_file():
        ap.error(f"{args.export} is not an sdrt export (no sdrt.json); make one with `sdrt export`")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdrt-ov-cold-") as tmp:
        for r in range(1, args.rounds + 1):
            for design, uses in DESIGNS.items():
                cache = Path(tmp) / f"{design}-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
                fills = ("empty", "filled") if any(uses.values()) else ("none",)
                for fill in fills:
                    rec = measure(design, cache, args, fill)
                    rec["round"] = r
                    runs.append(rec)
                    print(f"round {r} {design:15s} {fill:7s} load {rec['load_ms'] / 1e3:6.1f} s  first image "
                          f"{rec['first_image_ms'] / 1e3:6.1f} s  cold start {rec['cold_start_ms'] / 1e3:6.1f} s  "
                          f"settle {rec['settle_ms'] / 1e3:5.1f} s" + ("  [busy host]" if rec["busy"] else ""),
                          flush=True)
                shutil.rmtree(cache, ignore_errors=True)
    summary = {}
    for design in DESIGNS:
        for fill in ("empty", "filled", "none"):
            rows = [x for x in runs if x["design"] == design and x["cache"] == fill]
            if rows:
                summary[f"{design}/{fill}"] = {k: summarize([x[k] for x in rows])
                                               for k in ("load_ms", "first_image_ms", "cold_start_ms", "settle_ms")}
                summary[f"{design}/{fill}"]["busy_runs"] = sum(x["busy"] for x in rows)
    print("median cold start (load + first image), over the rounds:")
    for k, v in summary.items():
        c = v["cold_start_ms"]
        print(f"  {k:24s} {c['p50'] / 1e3:6.1f} s (runs {c['min'] / 1e3:.1f}-{c['max'] / 1e3:.1f}); load "
              f"{v['load_ms']['p50'] / 1e3:.1f} s; settle {v['settle_ms']['p50'] / 1e3:.1f} s"
              + (f"; {v['busy_runs']} busy" if v["busy_runs"] else ""))
    when = datetime.now(timezone.utc)
    rec = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "when": when.isoformat(),
           "machine": platform.machine(), "cpu": _cpu_name(), "export": str(args.export), "steps": args.steps,
           "size": args.size, "threads": args.threads, "precision": args.precision, "rounds": args.rounds,
           "quiet": args.quiet, "runs": runs, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ov-cold-start-{when.strftime('%Y%m%dT%H%M%S')}.json"
    atomic_write_text(path, json.dumps(rec, indent=1))
    print(f"wrote {path}")
    return 0


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    raise SystemExit(main())
