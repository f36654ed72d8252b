"""One measurement job: what it runs, its input files, the spec its worker process reads, and running it in a
process of its own (``worker.py``), its memory sampled from here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BenchConfig, cache_label, cache_record
from .memory import MemoryPeaks, MemorySampler
from .worker import PREFIX

SDRT, BASELINE, INTEL = "sdrt", "diffusers", "intel"  # Job.kind: the system a row measures
INTEL_WORKER = Path(__file__).with_name("intel_worker.py")  # run by the Intel environment's own interpreter


@dataclass
class Job:
    kind: str  # the system measured: SDRT, BASELINE (diffusers on PyTorch) or INTEL (Intel's pipelines)
    name: str  # backend name in the result: "ort-cpu", "torch-cpu", "torch-cuda-compile", ...
    device: str
    folder: Path
    height: int
    width: int
    batch_size: int
    sampler: str
    steps: int
    compile: bool = False
    autocast: str | None = None  # "bfloat16": the diffusers baseline under torch.autocast
    artifact_bytes: int | None = None
    image_out: Path | None = None
    latents: Path | None = None  # the starting latents, shared by every job of this shape
    inputs: dict[str, str] = field(default_factory=dict)  # the workload's image files (workload_inputs)
    cache: Any = None  # a feature_cache.CachePolicy: the sdrt job runs with feature caching; None: uncached

    @property
    def row_name(self) -> str:
        """The backend as the row names it: ``ort-cpu``, or ``ort-cpu + deepcache/3`` with a cache."""
        return self.name + (f" + {cache_label(self.cache)}" if self.cache is not None else "")

    @property
    def is_baseline(self) -> bool:
        """The row measures the PyTorch baseline (diffusers), not sdrt."""
        return self.kind == BASELINE

    @property
    def role(self) -> str:
        """The result's role: ``sdrt``, or ``baseline`` for every other system (diffusers, Intel's pipelines)."""
        return "sdrt" if self.kind == SDRT else "baseline"

    def label(self) -> str:
        return f"{self.row_name} {self.height}x{self.width} batch {self.batch_size} {self.sampler}/{self.steps} steps"


def write_latents(work: Path, seed: int, h: int, w: int, batch_size: int, channels: int, scale: int) -> Path:
    """The starting latents of one shape, drawn once from ``seed`` and saved (.npy) for every job of that shape,
    so the baseline and each backend start from the same noise."""
    import numpy as np

    noise = np.random.default_rng(seed).standard_normal((batch_size, channels, h // scale, w // scale),
                                                        dtype=np.float32)
    path = work / f"latents-{h}x{w}-b{batch_size}.npy"
    np.save(path, noise)
    return path


def workload_inputs(workload: str, work: Path, h: int, w: int, seed: int) -> dict[str, str]:
    """The workload's images, made once per size and shared by every job: a control image (blocks and
    lines, the kind of map a ControlNet reads), or an image and a mask (a box in the middle to repaint)."""
    import numpy as np
    from PIL import Image

    if workload not in ("controlnet", "inpaint"):
        return {}
    rng = np.random.default_rng(seed)
    if workload == "controlnet":
        a = np.zeros((h, w, 3), np.uint8)
        for _ in range(8):
            y, x = rng.integers(0, h), rng.integers(0, w)
            a[y:y + h // 4, x:x + w // 4] = rng.integers(0, 256, 3)
        a[:, :: max(w // 16, 2)] = 255
        path = work / f"control-{h}x{w}.png"
        Image.fromarray(a).save(path)
        return {"control_image": str(path)}
    img, mask = work / f"init-{h}x{w}.png", work / f"mask-{h}x{w}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    Image.fromarray(m, mode="L").save(mask)
    return {"init_image": str(img), "mask_image": str(mask)}


def job_spec(job: Job, cfg: BenchConfig, *, precision: str, family: str, threads: int) -> dict[str, Any]:
    """What the worker process reads: the job, and the run's settings it is measured with."""
    return {
        "job": job.kind, "backend": job.name, "folder": str(job.folder), "device": job.device,
        "precision": precision, "family": family, "height": job.height, "width": job.width,
        "batch_size": job.batch_size, "sampler": job.sampler, "steps": job.steps,
        "guidance_scale": cfg.guidance_scale, "prompt": cfg.prompt, "seed": cfg.seed, "warmup": cfg.warmup,
        "repeats": cfg.repeats, "threads": threads, "latents": str(job.latents),
        "image_out": str(job.image_out), "compile": job.compile, "compile_mode": cfg.compile_mode,
        "cuda_graph": cfg.cuda_graph, "autocast": job.autocast, "workload": cfg.workload,
        "cache": cache_record(job.cache),
        **job.inputs,
    }


def run_worker(spec: dict[str, Any], work: Path, label: str, device: str, *, threads: int,
               timeout_s: float | None, emit: Callable[..., None],
               python: str | None = None) -> tuple[dict[str, Any], MemoryPeaks]:
    """Run ``spec`` in a worker process of its own (``threads`` for every math library; stopped after
    ``timeout_s``), passing its progress events to ``emit`` and sampling its memory meanwhile: (its result, or a
    failure with the reason and its stderr's tail; the memory peaks)."""
    fd, spec_name = tempfile.mkstemp(prefix="job-", suffix=".json", dir=work)
    os.close(fd)
    spec_path = Path(spec_name)
    result_path = spec_path.with_suffix(".result.json")
    err_path = spec_path.with_suffix(".stderr.txt")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    t = str(threads)
    env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # an Intel job: that environment's interpreter runs the self-contained intel_worker.py (no sdrt there)
    cmd = ([python, str(INTEL_WORKER)] if python is not None else [sys.executable, "-m", "sdrt.benchmarks.worker"]) \
        + [str(spec_path), str(result_path)]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = None
        if timeout_s:
            timer = threading.Timer(timeout_s, proc.kill)
            timer.start()
        with MemorySampler(proc.pid, gpu_index=0 if device == "cuda" else None) as sampler:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(PREFIX):
                    try:
                        event = json.loads(line[len(PREFIX):])
                    except json.JSONDecodeError:
                        continue
                    emit("job", label, **event)
            rc = proc.wait()
        if timer is not None:
            timer.cancel()
    peaks = sampler.peaks
    if result_path.is_file():
        return json.loads(result_path.read_text()), peaks
    why = f"the worker process exited with code {rc} without a result"
    if timeout_s and rc == -9:
        why = f"the worker process ran past --timeout {timeout_s:g} s and was stopped"
    return {"status": "failed", "reason": f"{why}: {tail(err_path.read_text())}", "peak_rss_bytes": None}, peaks


def tail(text: str, lines: int = 8) -> str:
    """A process's last lines of output, on one line."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()) or "(no output)"
