"""The result document's records: a measurement made from a worker's result, the backends' entries, ratios to
the baseline and fractions of the floor, the notes, and the document that holds them (``schema.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import schema
from .artifacts import export_precision, manifest_spacing
from .config import BenchConfig, cache_record
from .env import device_label
from .jobs import Job
from .memory import MemoryPeaks
from .stats import ratio, summarize

# figures timed by the backend's clock (sdrt: Result.timings["clock"]; the baseline: CUDA events on a GPU);
# the totals, images/s and the cold start are the host's wall clock
CLOCKED_BY_BACKEND = ("text_encoder_ms", "unet_step_ms", "vae_decoder_ms", "its")
# a base+refiner run's stages, each a summary over the repeats (milliseconds per image call)
REFINER_STAGES = ("base_text_encoder_ms", "base_denoise_ms", "refiner_text_encoder_ms", "refiner_denoise_ms",
                  "vae_decoder_ms")
STOCHASTIC_SAMPLERS = ("euler-a", "lcm")  # they draw fresh noise every step: each side from its own RNG


@dataclass
class BackendRecord:
    """A backend's entry in the result, filled in as its jobs finish."""

    name: str
    role: str
    device: str
    status: str = "ok"
    reason: str | None = None
    precision: str | None = None
    threads: dict[str, Any] | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    timing_method: str | None = None
    build_s: float | None = None
    artifact_bytes: int | None = None


def measurement(job: Job, res: dict[str, Any], peaks: MemoryPeaks, cfg: BenchConfig, guided: bool) -> dict[str, Any]:
    """A job's measurement record from its worker's result and memory peaks: every figure summarized over the
    repeats, with the raw runs and the clock each figure was timed on (a failed job: its status and reason)."""
    m: dict[str, Any] = {
        "backend": job.name, "role": job.role, "device": job.device,
        "status": res["status"], "reason": res.get("reason"), "height": job.height, "width": job.width,
        "batch_size": job.batch_size, "sampler": job.sampler, "steps": job.steps,
        "guidance_scale": cfg.guidance_scale, "guided": guided,
        "unet_batch": 2 * job.batch_size if guided else job.batch_size,
        "warmup": cfg.warmup, "repeats": cfg.repeats,
        "import_ms": res.get("import_ms"), "load_ms": res.get("load_ms"), "first_image_ms": res.get("first_image_ms"),
        "cold_start_ms": None,
        "text_encoder_ms": None, "unet_step_ms": None, "vae_decoder_ms": None, "total_ms": None,
        "its": None, "images_per_s": None,
        "peak_vram_bytes": peaks.peak_process_bytes, "device_mem_delta_bytes": peaks.device_delta_bytes,
        "torch_peak_allocated_bytes": res.get("torch_peak_allocated_bytes"),
        "peak_rss_bytes": res.get("peak_rss_bytes"), "rss_sampled_peak_bytes": peaks.rss_peak_bytes,
        "memory_notes": list(peaks.notes),
        "artifact_bytes": res.get("weight_bytes") if job.is_baseline else job.artifact_bytes,
        "raw": None, "flops": None, "floor_ms": None, "of_floor": None,
        "baseline": None, "vs_baseline": None, "image_vs_baseline": None, "clocks": None,
        "cache": cache_record(job.cache), "full_steps": full_steps(job.cache, job.steps),
        "unet_full_step_ms": None, "unet_shallow_step_ms": None, "unet_equivalent_steps": None,
        "vs_uncached": None, "image_vs_uncached": None,
        "rounds": None, "spread": None, "contended": None,
    }
    if res["status"] != "ok":
        return m
    runs = res["runs"]
    m["cold_start_ms"] = res["load_ms"] + res["first_image_ms"]
    if res.get("load_breakdown_ms"):  # sdrt's rows: where the load went, per engine
        m["load_breakdown_ms"] = {str(k): float(v) for k, v in res["load_breakdown_ms"].items()}
    raw: dict[str, Any] = {
        "text_encoder_ms": [r["text_encoder_ms"] for r in runs],
        "unet_steps_ms": [r["unet_steps_ms"] for r in runs],
        "vae_decoder_ms": [r["vae_decoder_ms"] for r in runs],
        "total_ms": [r["total_ms"] for r in runs],
    }
    stage_clock = [str(r.get("clock") or "host") for r in runs]
    total_clock = [str(r.get("total_clock") or "host") for r in runs]
    raw["clocks"] = {"text_encoder_ms": stage_clock, "unet_steps_ms": stage_clock, "vae_decoder_ms": stage_clock,
                     "total_ms": total_clock}
    m["raw"] = raw
    stage, total = clock_label(stage_clock), clock_label(total_clock)
    m["clocks"] = {**{k: stage for k in CLOCKED_BY_BACKEND}, **{k: total for k in ("total_ms", "images_per_s")},
                   **{k: "host" for k in ("import_ms", "load_ms", "first_image_ms", "cold_start_ms")}}
    m["text_encoder_ms"] = summarize(raw["text_encoder_ms"])
    m["unet_step_ms"] = summarize([x for r in raw["unet_steps_ms"] for x in r])
    m["vae_decoder_ms"] = summarize(raw["vae_decoder_ms"])
    m["total_ms"] = summarize(raw["total_ms"])
    m["its"] = step_rate(m, raw["unet_steps_ms"])
    add_step_split(m, job.cache, raw["unet_steps_ms"])
    m["images_per_s"] = job.batch_size * 1e3 / m["total_ms"]["p50"]
    if any(any(r.get("nonfinite") or []) for r in [res.get("first", {}), *runs]):
        m["memory_notes"].append("some images decoded to NaN/inf")
    return m


def add_rounds(m: dict[str, Any], rounds: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]],
               threads: int) -> None:
    """Each round's medians (from its own measurement), the host's state meanwhile (``other_cpu``: the share of
    the machine other processes used; the 1-minute load average before; the wait for a quiet host) and the
    worker's CPU share (its CPU time over its runs' wall time and ``threads``); ``spread``: (slowest - fastest) /
    fastest of the rounds' median image time and step rate; ``contended``: other work took more than
    ``contention.BUSY_OTHER_CPU`` of the machine during any round (None where that cannot be measured)."""
    from .contention import BUSY_OTHER_CPU

    rows = []
    for mr, res, info in rounds:
        ok = mr["status"] == "ok"
        runs = res.get("runs") or []
        cpu = [r.get("cpu_ms") for r in runs]
        wall = [r.get("run_wall_ms") for r in runs]
        share = (sum(cpu) / (sum(wall) * threads)  # type: ignore[arg-type]
                 if runs and None not in cpu and None not in wall and sum(wall) > 0 else None)  # type: ignore[arg-type]
        rows.append({"round": info["round"], "status": mr["status"],
                     "total_ms_p50": mr["total_ms"]["p50"] if ok else None,
                     "unet_step_ms_p50": mr["unet_step_ms"]["p50"] if ok else None,
                     "its": mr["its"] if ok else None, "cpu_share": share, "other_cpu": info.get("other_cpu"),
                     "load_avg": info.get("load_avg"), "waited_s": info.get("waited_s")})
    m["rounds"] = rows
    done = [r for r in rows if r["status"] == "ok"]
    if len(done) >= 2:
        m["spread"] = {k: (max(r[k] for r in done) - min(r[k] for r in done)) / min(r[k] for r in done)
                       for k in ("total_ms_p50", "its")}
    seen = [r["other_cpu"] for r in rows if r["other_cpu"] is not None]
    m["contended"] = any(x > BUSY_OTHER_CPU for x in seen) if seen else None


def step_rate(m: dict[str, Any], steps_ms: list[list[float]]) -> float:
    """Denoising steps per second: 1000 / the median step (every step alike); a cached row mixes full and
    shallow steps, so its rate is its steps over the median run's loop time instead."""
    if m.get("cache") is None:
        return float(1e3 / m["unet_step_ms"]["p50"])
    from .stats import percentile

    return float(1e3 * m["steps"] / percentile([sum(r) for r in steps_ms], 50))


def full_steps(policy: Any, steps: int) -> int:
    """How many of ``steps`` steps run the full UNet under ``policy`` (all of them uncached)."""
    return steps if policy is None else int(policy.full_steps(steps).sum())


def add_step_split(m: dict[str, Any], policy: Any, steps_ms: list[list[float]]) -> None:
    """The median full-step and shallow-step times, split by the policy's plan of each run's steps, and the
    UNet-equivalent work per image: full steps + shallow steps x (shallow ms / full ms). Uncached: every
    step is full. A run whose step times do not number its steps (a loop that times only its whole) leaves
    the split out, with a note."""
    from .stats import percentile

    steps = m["steps"]
    if any(len(r) != steps for r in steps_ms):
        m["memory_notes"].append("the loop did not time each step: no full/shallow step split")
        return
    plan = [True] * steps if policy is None else [bool(x) for x in policy.full_steps(steps)]
    full = [x for r in steps_ms for x, f in zip(r, plan) if f]
    shallow = [x for r in steps_ms for x, f in zip(r, plan) if not f]
    m["unet_full_step_ms"] = percentile(full, 50)
    m["unet_shallow_step_ms"] = percentile(shallow, 50) if shallow else None
    n_full = m["full_steps"]
    m["unet_equivalent_steps"] = (n_full + (steps - n_full) * m["unet_shallow_step_ms"] / m["unet_full_step_ms"]
                                  if shallow and m["unet_full_step_ms"] > 0 else float(n_full))


def add_refiner_stages(m: dict[str, Any], res: dict[str, Any]) -> None:
    """A base+refiner measurement's stages: each summarized over the repeats, raw, on the stages' clock."""
    m["stages_ms"] = {k: summarize([r["stages"][k] for r in res["runs"]]) for k in REFINER_STAGES}
    m["raw"]["stages"] = [r["stages"] for r in res["runs"]]
    m["raw"]["clocks"]["stages"] = m["raw"]["clocks"]["text_encoder_ms"]
    m["clocks"]["stages_ms"] = m["clocks"]["text_encoder_ms"]


def clock_label(kinds: Sequence[str]) -> str:
    """The clock of a figure pooled over runs: the runs' one clock, or each of them when they differ."""
    found = sorted(set(kinds))
    return found[0] if len(found) == 1 else "mixed: " + ", ".join(found)


def add_floor(m: dict[str, Any], flops: dict[str, int] | None, tflops: float | None) -> None:
    """The measurement's FLOPs per stage and, with its device's measured rate, the floor and the fraction of it
    reached."""
    if flops is None:
        return
    m["flops"] = dict(flops)
    if tflops is None or m["status"] != "ok":
        return
    from .flops import floor_ms

    fl = floor_ms(flops, tflops, m["steps"])
    m["floor_ms"] = fl
    measured = {s: m[f"{s}_ms"]["p50"] for s in schema.STAGES}
    m["of_floor"] = {s: ratio(fl[s], measured[s]) for s in schema.STAGES}


def _metric(m: dict[str, Any], path: tuple[str, ...]) -> Any:
    v: Any = m
    for k in path:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v


def add_ratios(measurements: list[dict[str, Any]], baseline_of: Callable[[dict[str, Any]], str | None],
               work: Path) -> None:
    """Each measurement against its baseline row (``baseline_of``) of the same configuration: the ratios of
    its figures and the pixel difference of the two first images (``work``/image-INDEX.png)."""
    by_key = {_key(m): (i, m) for i, m in enumerate(measurements) if m["status"] == "ok"}
    images = {i: work / f"image-{i}.png" for i in range(len(measurements))}
    for i, m in enumerate(measurements):
        name = baseline_of(m)
        if name is None or m["status"] != "ok":
            continue
        hit = by_key.get(_key(m, backend=name, uncached=True))  # the baseline is never cached
        if hit is None:
            continue
        j, b = hit
        m["baseline"] = name
        m["vs_baseline"] = {k: ratio(_metric(m, p), _metric(b, p)) for k, p in schema.RATIO_METRICS.items()}
        m["image_vs_baseline"] = _image_diff(images[i], images[j], m["sampler"])


def add_uncached(measurements: list[dict[str, Any]], work: Path) -> None:
    """Each cached measurement against the uncached one of the same backend and configuration: the ratios of
    its figures (cached / uncached), the speed-ups (uncached / cached) and the pixel difference of the two
    first images (``work``/image-INDEX.png)."""
    by_key = {_key(m): (i, m) for i, m in enumerate(measurements) if m["status"] == "ok"}
    for i, m in enumerate(measurements):
        if m.get("cache") is None or m["status"] != "ok":
            continue
        hit = by_key.get(_key(m, uncached=True))
        if hit is None:
            continue
        j, u = hit
        vs: dict[str, Any] = {k: ratio(_metric(m, p), _metric(u, p)) for k, p in schema.UNCACHED_METRICS.items()}
        vs["speedup_total_ms_p50"] = ratio(_metric(u, ("total_ms", "p50")), _metric(m, ("total_ms", "p50")))
        vs["speedup_unet_ms_per_image"] = ratio(_metric(u, ("unet_step_ms", "mean")),
                                                _metric(m, ("unet_step_ms", "mean")))
        m["vs_uncached"] = vs
        m["image_vs_uncached"] = _image_diff(work / f"image-{i}.png", work / f"image-{j}.png", m["sampler"])


def _key(m: dict[str, Any], backend: str | None = None, uncached: bool = False) -> tuple[Any, ...]:
    """A measurement's configuration: backend, shape, sampler, steps and its cache (so a cached row is never
    matched with the uncached one); ``backend`` / ``uncached``: the key of another row of that configuration."""
    c = None if uncached else m.get("cache")
    cache = None if c is None else (c["kind"], c["interval"], c["schedule"])
    return (backend or m["backend"], m["height"], m["width"], m["batch_size"], m["sampler"], m["steps"], cache)


def _image_diff(a: Path, b: Path, sampler: str) -> dict[str, Any] | None:
    """Pixel difference of two first images made from the same latents (0..255 units)."""
    if not (a.is_file() and b.is_file()):
        return None
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return {"mean_abs": None, "max_abs": None, "note": f"image shapes differ: {x.shape} vs {y.shape}"}
    d = np.abs(x - y)
    note = "first image, same starting latents"
    if sampler in STOCHASTIC_SAMPLERS:
        note += f"; {sampler} adds fresh noise every step, drawn by each side's own generator: they differ by design"
    return {"mean_abs": float(d.mean()), "max_abs": int(d.max()), "note": note}


def cold_start(res: dict[str, Any]) -> dict[str, Any]:
    """A second cold start (a backend with a model cache, found filled): its load, first image and sum."""
    if res.get("status") != "ok":
        return {"status": res.get("status"), "reason": res.get("reason")}
    return {"status": "ok", "import_ms": res["import_ms"], "load_ms": res["load_ms"],
            "first_image_ms": res["first_image_ms"], "cold_start_ms": res["load_ms"] + res["first_image_ms"],
            "peak_rss_bytes": res.get("peak_rss_bytes")}


def note_backend(b: BackendRecord, res: dict[str, Any], job: Job) -> None:
    """What a finished job tells about its backend: versions, threads, timing method, computed precision."""
    if res["status"] != "ok":
        return
    b.versions = dict(res.get("versions") or {})
    b.threads = dict(res.get("threads") or {})
    b.timing_method = res.get("timing_method")
    if res.get("precision"):  # what the backend computed in, where that is not the export's (openvino bf16)
        b.precision = str(res["precision"])
    if job.is_baseline:
        b.artifact_bytes = res.get("weight_bytes")


def fail_unmeasured(backends: dict[str, BackendRecord], measurements: list[dict[str, Any]]) -> None:
    """A backend none of whose measurements succeeded takes the first one's status and reason."""
    for b in backends.values():
        ran = [m for m in measurements if m["backend"] == b.name]
        if b.status == "ok" and ran and all(m["status"] != "ok" for m in ran):
            b.status, b.reason = ran[0]["status"], ran[0]["reason"]


def standard_notes(cfg: BenchConfig, guided: bool) -> list[str]:
    """The notes every result carries: what it/s, the statistics, the processes, the ratios and the floor mean."""
    steps = ("Guidance is on, so every step runs the UNet once at batch 2 x batch_size (conditional and "
             "unconditional halves together); a step also includes the guidance combination and the sampler "
             "update." if guided else "Guidance is off: every step runs the UNet at batch_size.")
    stats = (f"Statistics: the cold first image and {cfg.warmup} warm-up run(s) are excluded; p50/p90 over "
             f"{cfg.repeats} repeats (step times pooled over every step of every repeat).")
    processes = ("Each measurement ran in its own process, one after another: peak RSS (the kernel's VmHWM "
                 "high-water mark) and GPU memory belong to that process alone; cold start = loading the model "
                 "+ the first image, in a fresh process, after imports (import_ms is recorded apart).")
    ratios = ("vs_baseline = this figure / the same figure of diffusers on PyTorch (eager), measured in this run "
              "with the same weights, shape, sampler, steps, latents and thread count. Above 1 is better for it/s "
              "and images/s; below 1 is better for times, memory and sizes.")
    floor = ("of_floor = the floor time (matrix FLOPs / the matmul rate measured in the row's arithmetic: bf16 for "
             "openvino inferring in bf16, the bf16 autocast baseline and bf16 exports, else the run's precision) / "
             "the measured time: the fraction of the device's matrix throughput a stage achieves (1.0 is the "
             "physical limit).")
    notes = ["it/s is denoising steps per second: 1000 / the median step time. " + steps, stats, processes,
             ratios, floor]
    if cfg.caches:
        notes.append("Feature caching (DeepCache): each sdrt configuration ran uncached, then once per cache "
                     "(" + ", ".join(cfg.caches) + ") on the same export (made with --deepcache: its UNet also "
                     "returns the deep feature), weights, latents and threads. full_steps = steps that ran the full "
                     "UNet; a cached row's it/s is its steps over its loop time (its step p50 is a shallow step's); "
                     "vs_uncached = the cached figure / the uncached one (below 1 is better for times), "
                     "speedup_* = uncached / cached; unet_equivalent_steps = full steps + shallow steps x (median "
                     "shallow step ms / median full step ms); image_vs_uncached: the first images' pixel difference.")
    return notes


def workload_notes(cfg: BenchConfig, folder: Path, manifest: Any, ref_manifest: Any) -> list[str]:
    """What a few-step or base+refiner run compares, beside the standard notes."""
    notes = []
    if cfg.workload == "few-step":
        spacing = manifest_spacing(folder)
        notes.append("few-step workload: compare images/s (at 1 step it/s counts one UNet call); the "
                     "baseline's scheduler is built from the model's own configuration "
                     f"(timestep_spacing {spacing!r}), as sdrt's sampler")
    if ref_manifest is not None:
        notes.append(f"base+refiner workload: {manifest.preset} denoises to {cfg.refiner_start} of the "
                     f"schedule, {ref_manifest.preset} the rest from its latents; the baseline is diffusers' "
                     "StableDiffusionXLPipeline(denoising_end) + StableDiffusionXLImg2ImgPipeline"
                     "(denoising_start); sdrt loads the refiner with share_with the base (one scratch block "
                     "on tensorrt); peak memory is the whole process's, both models loaded")
    return notes


def document(cfg: BenchConfig, env: dict[str, Any], *, threads: int, requested: list[str],
             resolutions: list[tuple[int, int]], bf16_baseline: bool, folder: Path, manifest: Any,
             export_s: float | None, ref_manifest: Any, shape_flops: dict[tuple[int, int, int], dict[str, int]],
             ceilings: list[dict[str, Any]], backends: dict[str, BackendRecord],
             measurements: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The result document (not validated here)."""
    components = {k: {"precision": c.precision, "size_bytes": c.size_bytes} for k, c in manifest.components.items()}
    onnx_bytes = sum(c.size_bytes for c in manifest.components.values())
    return {
        "schema": schema.SCHEMA_NAME,
        "schema_version": schema.SCHEMA_VERSION,
        "created": env["date"],
        "env": env,
        "config": {
            "preset": cfg.preset, "artifact": cfg.artifact, "engines": cfg.engines,
            "resolutions": [list(r) for r in resolutions], "steps": list(cfg.steps),
            "batch_sizes": list(cfg.batch_sizes), "samplers": list(cfg.samplers), "backends": requested,
            "baseline": cfg.baseline, "compile": cfg.compile, "cuda_graph": cfg.cuda_graph,
            "bf16_baseline": bf16_baseline, "openvino_precision": cfg.openvino_precision,
            "warmup": cfg.warmup, "repeats": cfg.repeats,
            "threads": threads, "guidance_scale": cfg.guidance_scale, "prompt": cfg.prompt, "seed": cfg.seed,
            "isolation": "subprocess", "workload": cfg.workload,
            "caches": [cache_record(policy) for policy in cfg.cache_policies],
            "rounds": cfg.rounds, "quiet": cfg.quiet,
            "refiner": None if ref_manifest is None else {"preset": ref_manifest.preset,
                                                          "refiner_start": cfg.refiner_start},
        },
        "model": {
            "family": manifest.family, "preset": manifest.preset, "precision": export_precision(manifest),
            "folder": str(folder) if cfg.artifact else f"(temporary export of {manifest.preset})",
            "export_s": export_s, "components": components, "artifact_bytes": onnx_bytes,
            "source": dict(manifest.source),
            "flops": {f"{h}x{w}-b{b}": v for (h, w, b), v in shape_flops.items()},
        },
        "ceilings": ceilings,
        "backends": [asdict(b) for b in backends.values()],
        "measurements": measurements,
        "notes": notes,
        "device_labels": {d: device_label(env, d) for d in sorted({b.device for b in backends.values()})},
    }
