"""``sdrt bench --quality``: what each lossy setting costs in picture quality, beside its speed.

It runs the shapes model (``sdrt.quality``: a tiny Stable Diffusion trained on captioned shapes, with a score
that reads back whether a picture shows what its prompt asked) and records, in one run:

- **settings**: every backend and precision this machine runs (ort-cpu on the fp32 and the fp16 export,
  openvino at f32 and bf16, ort-cuda on the fp16 export) and diffusers on PyTorch (fp32, the reference), each
  over the quality suite at the suite's sampler and steps: the score and seconds per image; a setting that
  cannot run here is recorded with the reason;
- **curve**: each sampler at 1 to 50 steps on ort-cpu (fp32): score and seconds per image, plotted;
- **cache**: feature caching (DeepCache, ``runtime/feature_cache.py``) at each interval and schedule on ort-cpu
  (fp32) at the suite's sampler and steps: score, seconds per image and the steps that ran the full UNet, beside
  the uncached run (interval 1), plotted;
- the score's **ceiling** (pictures drawn by the data set's renderer) and the score training recorded.

Every image of a prompt starts from the same noise, so settings differ only by what they compute.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "sdrt-quality"
VERSION = 1
CURVE_STEPS = (1, 2, 4, 8, 15, 25, 50)
# lcm is left out: its update is for latent-consistency-distilled models, which the shapes model is not
CURVE_SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-a")
# (interval, schedule) of the cache rows; interval 1 is the uncached run of the same export
CACHE_SETTINGS = ((1, "uniform"), (2, "uniform"), (3, "uniform"), (4, "uniform"), (5, "uniform"),
                  (3, "nonuniform"), (5, "nonuniform"))


@dataclass(frozen=True)
class Setting:
    """One way to run the model: a backend on an export of one precision (``precision``: openvino's
    inference precision)."""

    name: str
    backend: str
    export: str  # "fp32" | "fp16" | "torch" (diffusers on PyTorch)
    precision: str | None = None


SETTINGS = (
    Setting("ort-cpu fp32", "ort-cpu", "fp32"),
    Setting("ort-cpu fp16", "ort-cpu", "fp16"),
    Setting("openvino f32", "openvino", "fp32", "f32"),
    Setting("openvino bf16", "openvino", "fp32", "bf16"),
    Setting("ort-cuda fp16", "ort-cuda", "fp16"),
    Setting("diffusers fp32 (PyTorch)", "torch", "torch"),
)
REFERENCE = SETTINGS[0].name  # the curve's backend and precision


def _why_not(s: Setting, gpus: int) -> str | None:
    """Why ``s`` cannot run on this machine, or None."""
    from .backends import unavailable_reason

    if s.backend == "torch":
        return None
    reason = unavailable_reason(s.backend, gpus)
    if reason is None and s.precision == "bf16":
        import openvino

        caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in caps:
            reason = (f"this CPU has no bf16 (OpenVINO reports {', '.join(sorted(caps))}); bf16 needs AVX512_BF16 "
                      "or AMX")
    return reason


def _export(folder: Path, fp16: bool, log: Callable[[str], None]) -> Path:
    """The shapes model's export of one precision in ``folder`` (reused when it holds this model's)."""
    from sdrt.export.exporter import export_model
    from sdrt.export.loading import folder_digest, load_model
    from sdrt.quality import MODEL_DIR
    from sdrt.runtime.errors import ArtifactError, CompatibilityError
    from sdrt.runtime.feature_cache import SHALLOW_UNET
    from sdrt.runtime.manifest import ExportManifest

    out = folder / f"shapes-{'fp16' if fp16 else 'fp32'}"
    try:
        m = ExportManifest.read(out)
        if m.source.get("sha256") == folder_digest(MODEL_DIR) and SHALLOW_UNET in m.components:
            log(f"reusing {out}")
            return out
    except (ArtifactError, CompatibilityError):
        pass
    log(f"exporting the shapes model ({'fp16' if fp16 else 'fp32'}) to {out}")
    # with DeepCache's shallow path (the cache rows use it; caching off computes exactly the plain export's)
    export_model(load_model(MODEL_DIR), out, fp16=fp16, deepcache=True)
    return out


def _row(report: Any, seconds: float, n: int) -> dict[str, Any]:
    return {"status": "ok", "score": report.to_dict(), "s_per_image": round(seconds / n, 5)}


def run_quality(work_dir: str | Path | None = None, *, prompts: int | None = None,
                curve_steps: Sequence[int] = CURVE_STEPS, samplers: Sequence[str] = CURVE_SAMPLERS,
                threads: int | None = None, log: Callable[[str], None] = print,
                cache_settings: Sequence[tuple[int, str]] = CACHE_SETTINGS) -> dict[str, Any]:
    """The run (see the module docstring): the result document."""
    from sdrt.quality import MODEL_DIR, suite
    from sdrt.runtime.pipeline import Pipeline

    from .env import fingerprint

    env = fingerprint()
    n = prompts or suite.N_PROMPTS
    scenes = suite.suite(n)
    training = json.loads((MODEL_DIR / "training.json").read_text())
    doc: dict[str, Any] = {
        "schema": SCHEMA, "version": VERSION, "created": env["date"], "env": env,
        "suite": {"prompts": n, "steps": suite.STEPS, "sampler": suite.SAMPLER, "guidance": suite.GUIDANCE,
                  "seed": suite.SUITE_SEED},
        "model": {"folder": "sdrt.quality/model", "version": training.get("version"),
                  "data_seed": training.get("data_seed"), "trained_score": training.get("diffusers_score")},
        "ceiling": suite.ceiling().to_dict(), "settings": [], "curve": [], "cache": [],
        "notes": [("s_per_image: wall time of the suite's calls (10 prompts per call, text encoder, loop and VAE "
                   "decoder) over the number of images, in this process"),
                  "lcm is left out of the curve: it is for latent-consistency-distilled models",
                  ],
    }
    gpus = len(env["gpus"])
    with tempfile.TemporaryDirectory(prefix="sdrt-quality-") as tmp:
        folder = Path(work_dir) if work_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        exports: dict[str, Path] = {}
        for s in SETTINGS:
            entry: dict[str, Any] = {"name": s.name, "backend": s.backend, "export": s.export,
                                     "precision": s.precision}
            reason = _why_not(s, gpus)
            if reason is not None:
                log(f"{s.name}: skipped ({reason})")
                doc["settings"].append({**entry, "status": "skipped", "reason": reason})
                continue
            if s.backend == "torch":
                import torch
                from diffusers import StableDiffusionPipeline

                if threads:
                    torch.set_num_threads(threads)
                ref = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32,
                                                              local_files_only=True)
                t = time.perf_counter()
                images = suite.images_diffusers(ref, scenes)
                secs = time.perf_counter() - t
            else:
                if s.export not in exports:
                    exports[s.export] = _export(folder, s.export == "fp16", log)
                with Pipeline.load(exports[s.export], backend=s.backend, threads=threads,
                                   precision=s.precision) as pipe:
                    suite.images_pipeline(pipe, scenes[:1])  # warm up: the first call compiles and allocates
                    t = time.perf_counter()
                    images = suite.images_pipeline(pipe, scenes)
                    secs = time.perf_counter() - t
            report = suite.report(scenes, images)
            log(f"{s.name}: {report.summary()}, {secs / n:.3f} s per image")
            doc["settings"].append({**entry, **_row(report, secs, n)})
        ref_export = exports.get("fp32") or _export(folder, False, log)
        with Pipeline.load(ref_export, backend="ort-cpu", threads=threads) as pipe:
            for sampler in samplers:
                for steps in curve_steps:
                    t = time.perf_counter()
                    images = suite.images_pipeline(pipe, scenes, steps=steps, sampler=sampler)
                    secs = time.perf_counter() - t
                    report = suite.report(scenes, images)
                    log(f"{sampler} {steps:2d} steps: {report.summary()}")
                    doc["curve"].append({"sampler": sampler, "steps": steps, **_row(report, secs, n)})
            doc["cache"] = _cache_rows(pipe, scenes, cache_settings, log)
    return doc


def _cache_rows(pipe: Any, scenes: Sequence[Any], settings: Sequence[tuple[int, str]],
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """DeepCache at each (interval, schedule), at the suite's sampler and steps: score, seconds per image and
    full steps (interval 1: every step full, the uncached computation)."""
    from sdrt.quality import suite
    from sdrt.runtime.feature_cache import CachePolicy

    rows = []
    for interval, schedule in settings:
        policy = CachePolicy(interval=interval, schedule=schedule)
        t = time.perf_counter()
        images = suite.images_pipeline(pipe, scenes, cache="deepcache", cache_interval=interval,
                                       cache_schedule=schedule)
        secs = time.perf_counter() - t
        report = suite.report(scenes, images)
        full = int(policy.full_steps(suite.STEPS).sum())
        log(f"deepcache interval {interval} ({schedule}), {full} of {suite.STEPS} steps full: {report.summary()}")
        rows.append({"kind": "deepcache", "interval": interval, "schedule": schedule, "full_steps": full,
                     **_row(report, secs, len(scenes))})
    return rows


def text_table(doc: dict[str, Any]) -> str:
    """The settings and the curve as plain-text tables."""
    acc = ("shape", "colour", "position", "background")
    head = (f"quality suite: {doc['suite']['prompts']} prompts, {doc['suite']['sampler']} {doc['suite']['steps']} "
            f"steps, guidance {doc['suite']['guidance']:g}; ceiling {doc['ceiling']['overall']:.2f}")
    lines = [head,
             f"{'setting':26s} {'overall':>7s} " + " ".join(f"{a:>10s}" for a in acc) + f" {'s/image':>8s}"]
    for s in doc["settings"]:
        if s["status"] != "ok":
            lines.append(f"{s['name']:26s} skipped: {s['reason']}")
            continue
        sc = s["score"]
        lines.append(f"{s['name']:26s} {sc['overall']:7.2f} " + " ".join(f"{sc['accuracy'][a]:10.2f}" for a in acc)
                     + f" {s['s_per_image']:8.3f}")
    if doc["curve"]:
        steps = sorted({c["steps"] for c in doc["curve"]})
        lines += ["", f"overall score by sampler and steps ({REFERENCE}):",
                  f"{'sampler':16s} " + " ".join(f"{k:>5d}" for k in steps)]
        for sampler in dict.fromkeys(c["sampler"] for c in doc["curve"]):
            by = {c["steps"]: c["score"]["overall"] for c in doc["curve"] if c["sampler"] == sampler}
            lines.append(f"{sampler:16s} " + " ".join(f"{by[k]:5.2f}" if k in by else "    -" for k in steps))
    if doc.get("cache"):
        title = (f"feature caching (DeepCache, {REFERENCE}, {doc['suite']['sampler']} {doc['suite']['steps']} "
                 "steps; interval 1 = uncached):")
        lines += ["", title,
                  f"{'interval':9s} {'schedule':11s} {'full steps':>10s} {'overall':>7s} {'s/image':>8s}"]
        for c in doc["cache"]:
            lines.append(f"{c['interval']:<9d} {c['schedule']:11s} {c['full_steps']:>10d} "
                         f"{c['score']['overall']:7.2f} {c['s_per_image']:8.3f}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str | Path) -> Path:
    """Score against steps, one line per sampler, with the ceiling and the other settings' scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdrt.runtime.atomic import atomic_write_bytes

    cache = doc.get("cache") or []
    if cache:
        fig, (ax, cx) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
        _cache_panel(cx, doc)
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for sampler in dict.fromkeys(c["sampler"] for c in doc["curve"]):
        pts = sorted((c["steps"], c["score"]["overall"]) for c in doc["curve"] if c["sampler"] == sampler)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
    ax.axhline(doc["ceiling"]["overall"], color="gray", linestyle="--", linewidth=1, label="ceiling (drawn pictures)")
    ax.set_xscale("log")
    steps = sorted({c["steps"] for c in doc["curve"]})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("share of images showing all four asked attributes")
    ax.set_title(f"shapes model, {doc['suite']['prompts']} prompts, guidance {doc['suite']['guidance']:g} "
                 f"({REFERENCE})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _cache_panel(ax: Any, doc: dict[str, Any]) -> None:
    """The cache rows: score and seconds per image at each interval, one line per schedule."""
    for schedule, marker in (("uniform", "o"), ("nonuniform", "s")):
        pts = sorted((c["interval"], c["score"]["overall"], c["s_per_image"]) for c in doc["cache"]
                     if c["schedule"] == schedule or c["interval"] == 1)
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"score, {schedule}")
    twin = ax.twinx()
    pts = sorted((c["interval"], c["s_per_image"]) for c in doc["cache"] if c["schedule"] == "uniform")
    twin.plot([p[0] for p in pts], [p[1] for p in pts], color="gray", linestyle=":", marker=".",
              label="s per image, uniform")
    twin.set_ylabel("seconds per image")
    twin.set_ylim(bottom=0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("DeepCache interval (1 = uncached)")
    ax.set_ylabel("share of images showing all four attributes")
    ax.set_title(f"feature caching, {doc['suite']['sampler']} {doc['suite']['steps']} steps", fontsize=10)
    ax.grid(True, alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [str(h.get_label()) for h in lines], fontsize=8, loc="lower left")


def is_result(path: Path) -> bool:
    """``path`` holds a result of this run (so replacing it loses nothing foreign)."""
    try:
        return json.loads(path.read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse, before the run, a result path (or its plot, the same name with .png) that must not be replaced:
    an existing file not written by this run needs ``overwrite``."""
    from sdrt.runtime.atomic import check_output_file
    from sdrt.runtime.errors import InputError

    p = Path(path)
    ours = p.exists() and is_result(p)
    p = check_output_file(p, is_previous=is_result, overwrite=overwrite, what="an sdrt quality result")
    png = p.with_suffix(".png")
    if png.exists() and not (overwrite or ours):
        raise InputError(f"{png} exists and the plot of this result would replace it; choose another -o, or "
                         "pass --overwrite")
    return p


def save(doc: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the result JSON and its plot (the same name, .png), atomically."""
    from sdrt.runtime.atomic import atomic_write_text

    p = check_output(path, overwrite=overwrite)
    atomic_write_text(p, json.dumps(doc, indent=1) + "\n")
    return p, plot(doc, p.with_suffix(".png"))


def default_filename(doc: dict[str, Any]) -> str:
    stamp = doc["created"].replace(":", "").replace("-", "").replace("+0000", "")[:15]
    return f"quality-shapes-{stamp}.json"
