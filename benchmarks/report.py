"""Reports from bench result files: a terminal table, a merged Markdown table, a PNG chart, and the
README's performance section (the text between ``README_START`` and ``README_END``).

Merging keeps every measurement of every file (runs from different GPUs and backends side by side) and
labels each with its device and run; ratios are never formed across files, only copied from the run
that measured both sides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError

from . import schema
from .config import cache_label
from .env import device_label

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
REPORT_HEADING = "# sdrt benchmark report\n"  # bench.md starts with it: how a later report knows the file is sdrt's
REPORT_TITLE = "sdrt benchmark report"  # bench.png's Title text chunk, for the same reason


# -- formatting -------------------------------------------------------------------------------------------

def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _gb(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**30:.2f} GiB" if v >= 2**28 else f"{v / 2**20:.0f} MiB"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _vs(m: dict[str, Any], key: str) -> float | None:
    vs = m.get("vs_baseline") or {}
    return vs.get(key)


def _backend(m: dict[str, Any]) -> str:
    """The row's backend, with its feature cache: ``ort-cpu``, ``ort-cpu + deepcache/3``."""
    c = m.get("cache")
    return m["backend"] + (f" + {cache_label(c)}" if c else "")


def cache_lines(measurements: Iterable[dict[str, Any]], prefix: str = "") -> list[str]:
    """One line per cached measurement: its speed-up over the uncached row of its configuration, the full
    steps, the UNet-equivalent work per image and the first images' pixel difference."""
    out = []
    for m in measurements:
        if m["status"] != "ok" or not m.get("cache"):
            continue
        vs, img = m.get("vs_uncached") or {}, m.get("image_vs_uncached") or {}
        eq = m.get("unet_equivalent_steps")
        out.append(f"{prefix}{_backend(m)} {m['height']}x{m['width']} batch {m['batch_size']} "
                   f"{m['sampler']}/{m['steps']}: {_x(vs.get('speedup_total_ms_p50'))} faster per image than uncached "
                   f"(UNet {_x(vs.get('speedup_unet_ms_per_image'))}); {m['full_steps']} of {m['steps']} steps "
                   f"full, UNet work {'-' if eq is None else f'{eq:.2f}'} full-step equivalents; image vs "
                   f"uncached mean {_num(img.get('mean_abs'), 2)} / max {img.get('max_abs', '-')} of 255")
    return out


def cold_start_lines(measurements: Iterable[dict[str, Any]], prefix: str = "") -> list[str]:
    """One line per measurement whose load was broken down (sdrt's rows): import, load and its largest parts,
    the first image; seconds."""
    out = []
    for m in measurements:
        parts = m.get("load_breakdown_ms") if m["status"] == "ok" else None
        if not parts:
            continue
        load = m["load_ms"]
        rest = max(load - sum(parts.values()), 0.0)  # what the pipeline's account leaves out (the backend object)
        shown = sorted(parts.items(), key=lambda kv: -kv[1])
        items = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in shown if v >= 50) or "every part under 0.05"
        out.append(f"{prefix}{_backend(m)} {m['height']}x{m['width']}: cold start {m['cold_start_ms'] / 1e3:.1f} s "
                   f"= load {load / 1e3:.1f} s ({items}; other {rest / 1e3:.1f}) + first image "
                   f"{m['first_image_ms'] / 1e3:.1f} s; imports {m['import_ms'] / 1e3:.1f} s before it")
    return out


def _memory(m: dict[str, Any]) -> tuple[int | None, str]:
    """(bytes, what they are) of a measurement's peak memory: GPU if measured, else host RSS."""
    if m["device"] == "cuda":
        if m.get("peak_vram_bytes") is not None:
            return m["peak_vram_bytes"], "VRAM"
        if m.get("device_mem_delta_bytes") is not None:
            return m["device_mem_delta_bytes"], "VRAM (device delta)"
    return m.get("peak_rss_bytes"), "host RSS"


def _run_label(doc: dict[str, Any]) -> str:
    env = doc["env"]
    commit = (env.get("sdrt_commit") or "")[:8]
    return f"{env['date'][:10]}" + (f" @{commit}" if commit else "") + ("+dirty" if env.get("sdrt_dirty") else "")


def _device(doc: dict[str, Any], device: str) -> str:
    label = str(doc.get("device_labels", {}).get(device) or device_label(doc["env"], device))
    if device == "cpu":
        threads = doc["config"]["threads"]
        label += f", {threads} thread{'s' if threads != 1 else ''}"
    return label


# -- the table at the end of a run ------------------------------------------------------------------

def text_table(doc: dict[str, Any]) -> str:
    """A plain-text table of one run, for the terminal."""
    head = ["backend", "size", "batch", "sampler/steps", "it/s", "vs torch", "step p50", "image p50/p90 ms",
            "spread", "img/s", "vs torch image", "peak mem", "RSS", "cold ms", "UNet floor"]
    rows = [head]
    for m in doc["measurements"]:
        cfg = f"{m['sampler']}/{m['steps']}"
        if m["status"] != "ok":
            rows.append([_backend(m), f"{m['height']}x{m['width']}", str(m["batch_size"]), cfg,
                         m["status"], "", "", "", "", "", "", "", "", "", ""])
            continue
        mem, _ = _memory(m) if m["device"] == "cuda" else (None, "")
        rows.append([
            _backend(m) + (" (busy)" if m.get("contended") else ""), f"{m['height']}x{m['width']}",
            str(m["batch_size"]), cfg,
            _num(m["its"], 2), _x(_vs(m, "its")), _num(m["unet_step_ms"]["p50"], 2),
            f"{_num(m['total_ms']['p50'])}/{_num(m['total_ms']['p90'])}", spread_cell(m),
            _num(m["images_per_s"], 2), image_cell(m),
            _gb(mem), _gb(m["peak_rss_bytes"]), _num(m["cold_start_ms"], 0),
            _pct((m.get("of_floor") or {}).get("unet_step")),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for b in doc["backends"]:
        if b["status"] != "ok":
            lines.append(f"{b['name']}: {b['status']}: {b['reason']}")
    for m in doc["measurements"]:
        if m["status"] != "ok":
            lines.append(f"{_backend(m)} {m['height']}x{m['width']} batch {m['batch_size']}: {m['status']}: {m['reason']}")
    lines += cache_lines(doc["measurements"], "feature cache: ")
    cfg = doc.get("config", {})
    if cfg.get("workload") == "few-step" or cfg.get("refiner"):
        # one or a few steps: images/s is the figure that means something (it/s is one UNet call or two)
        for m in doc["measurements"]:
            if m["status"] == "ok":
                vs = _vs(m, "images_per_s")
                lines.append(f"{_backend(m)} {m['sampler']}/{m['steps']}: {_num(m['images_per_s'], 2)} images/s"
                             + (f" ({_x(vs)} {m['baseline']})" if vs is not None else ""))
    ref = cfg.get("refiner")
    if ref:
        lines.append(f"base {doc['model']['preset']} + refiner {ref['preset']} from {ref['refiner_start']} of the "
                     "schedule; stages p50 ms (base text, base denoise, refiner text, refiner denoise, decode), peak:")
        for m in doc["measurements"]:
            st = m.get("stages_ms")
            if m["status"] == "ok" and st:
                parts = " / ".join(_num(st[k]["p50"], 1) for k in ("base_text_encoder_ms", "base_denoise_ms",
                                                                    "refiner_text_encoder_ms", "refiner_denoise_ms",
                                                                    "vae_decoder_ms"))
                mem, kind = _memory(m)
                lines.append(f"  {m['backend']}: {parts}; peak {_gb(mem)} ({kind})")
    lines += round_lines(doc)
    clocks = clock_summary(doc)
    if clocks:
        lines.append(f"clocks (steps and stages / image ms and img/s): {clocks}")
    guided = any(m.get("guided") for m in doc["measurements"])
    if guided:
        lines.append("it/s: denoising steps per second; each guided step runs the UNet at batch 2 x batch.")
    for c in doc["ceilings"]:
        if c["status"] == "ok":
            lines.append(f"floor: {c['device']} {c['dtype']} matmul measured at {c['tflops']:.3g} TFLOP/s (n={c['n']})")
    return "\n".join(lines)


def image_cell(m: dict[str, Any]) -> str:
    """The first image's difference from the baseline's (same weights and latents): max / mean, in levels of 255."""
    d = m.get("image_vs_baseline")
    if not d or d.get("max_abs") is None:
        return "-"
    return f"max {d['max_abs']} / mean {d['mean_abs']:.2g}"


def spread_cell(m: dict[str, Any]) -> str:
    """The rounds' spread of the median image time ("-" with one round)."""
    sp = m.get("spread")
    return "-" if not sp else f"{sp['total_ms_p50']:.1%}"


def round_lines(doc: dict[str, Any]) -> list[str]:
    """What the rounds say: how many, interleaved; each busy row's rounds with the other work's share."""
    cfg = doc.get("config", {})
    n = cfg.get("rounds") or 1
    lines = []
    if n > 1:
        lines.append(f"{n} rounds, interleaved (every row once per round, each in its own process); spread: "
                     "(slowest - fastest) / fastest of the rounds' median image times")
    for m in doc["measurements"]:
        if m.get("contended"):
            parts = ", ".join(f"round {r['round']}: {r['other_cpu']:.0%}" for r in m["rounds"] or []
                              if r.get("other_cpu") is not None)
            lines.append(f"busy host: {_backend(m)} {m['height']}x{m['width']} ran while other work used {parts} "
                         "of the machine; its figures are not comparable (rerun with --quiet 0.05)")
    return lines


def clock_summary(doc: dict[str, Any]) -> str:
    """Which clock each backend's figures came from, as the measurements record it ("" for files written
    before they did: their backends' ``timing_method`` says it)."""
    seen: dict[str, str] = {}
    for m in doc["measurements"]:
        c = m.get("clocks")
        if m["status"] == "ok" and c:
            seen.setdefault(m["backend"], f"{m['backend']} {c.get('unet_step_ms', '?')} / {c.get('total_ms', '?')}")
    return "; ".join(seen.values())


# -- merged Markdown --------------------------------------------------------------------------------------

def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read, migrate and validate result files (refusing, with the reason, those that cannot be)."""
    if not paths:
        raise InputError("give at least one result file written by `sdrt bench`")
    return [schema.load(p) for p in paths]


def _model_label(doc: dict[str, Any]) -> str:
    """The preset, with the workload when it is not plain txt2img (ControlNet, inpainting)."""
    workload = doc["config"].get("workload", "txt2img")
    return doc["model"]["preset"] + ("" if workload == "txt2img" else f" ({workload})")


def _precision(doc: dict[str, Any], m: dict[str, Any]) -> str | None:
    """The row's arithmetic: a baseline's own; sdrt's export precision, and where its backend computes in
    another (openvino's ``auto`` picks bf16 on a CPU that has it) that one too, with the graphs it keeps at f32:
    ``fp32 graphs, bf16 inference (text_encoder at f32)``."""
    backend = next((b["precision"] for b in doc["backends"] if b["name"] == m["backend"]), None)
    if m["role"] != "sdrt":
        return backend
    exported = doc["model"]["precision"]
    head, _, kept = (backend or "").partition(" (")
    inference = head.rsplit(", ", 1)[-1].removesuffix(" inference") if backend else None
    note = f" ({kept}" if kept else ""
    if inference is None or inference in (exported, "f32" if exported == "fp32" else exported):
        return exported + note
    return f"{exported} graphs, {inference} inference{note}"


def rows(docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per successful measurement of every run, sorted by model, shape, device and backend."""
    out = []
    for k, doc in enumerate(docs):
        for m in doc["measurements"]:
            if m["status"] != "ok":
                continue
            mem, mem_kind = _memory(m)
            out.append({
                "run": k + 1, "device": _device(doc, m["device"]), "backend": _backend(m), "role": m["role"],
                "preset": _model_label(doc), "precision": _precision(doc, m),
                "size": f"{m['height']}x{m['width']}", "batch": m["batch_size"], "sampler": m["sampler"],
                "steps": m["steps"], "unet_batch": m["unet_batch"], "its": m["its"], "its_x": _vs(m, "its"),
                "step_ms": m["unet_step_ms"]["p50"], "total_p50": m["total_ms"]["p50"],
                "total_p90": m["total_ms"]["p90"], "total_x": _vs(m, "total_ms_p50"),
                "images_per_s": m["images_per_s"], "memory": mem, "memory_kind": mem_kind,
                "memory_x": _vs(m, "peak_vram_bytes") if mem_kind == "VRAM" else _vs(m, "peak_rss_bytes"),
                "cold_ms": m["cold_start_ms"], "artifact_bytes": m.get("artifact_bytes"),
                "floor_unet": (m.get("of_floor") or {}).get("unet_step"),
                "floor_total": (m.get("of_floor") or {}).get("total"),
                "spread": spread_cell(m), "busy": bool(m.get("contended")), "image": image_cell(m),
            })
    out.sort(key=lambda r: (r["preset"], r["size"], r["batch"], r["sampler"], r["steps"], r["device"],
                            r["role"] != "baseline", r["backend"], r["run"]))
    return out


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _mem_cell(r: dict[str, Any]) -> str:
    if r["memory"] is None:
        return "-"
    kind = "" if r["memory_kind"] == "VRAM" else f" ({r['memory_kind']})"
    return _gb(r["memory"]) + kind


def markdown(docs: Sequence[dict[str, Any]]) -> str:
    """The merged report: measurements of every run, skipped backends with reasons, each run's environment."""
    rs = rows(docs)
    head = ["device", "backend", "model", "size", "batch", "sampler/steps", "it/s", "vs torch", "step ms",
            "image ms p50 / p90", "spread", "img/s", "image vs torch", "peak memory", "cold start s",
            "UNet of floor", "run"]
    body = [[r["device"], r["backend"] + (" (busy host)" if r["busy"] else ""), f"{r['preset']} {r['precision']}",
             r["size"], str(r["batch"]),
             f"{r['sampler']}/{r['steps']}", _num(r["its"], 2), _x(r["its_x"]), _num(r["step_ms"], 2),
             f"{_num(r['total_p50'])} / {_num(r['total_p90'])}", r["spread"], _num(r["images_per_s"], 2),
             r["image"], _mem_cell(r),
             _num(None if r["cold_ms"] is None else r["cold_ms"] / 1e3, 2), _pct(r["floor_unet"]), f"[{r['run']}]"]
            for r in rs]
    legend = ("it/s: denoising steps per second (1000 / median step time). With guidance each step runs the UNet "
              "once at batch 2 x batch (conditional and unconditional halves). \"vs torch\": this figure over "
              "diffusers on PyTorch measured in the same run, same weights and shapes (above 1 is faster). "
              "\"UNet of floor\": matrix FLOPs of one step over the measured matmul rate, divided by the step time. "
              "\"spread\": (slowest - fastest) / fastest of the median image times of a run's interleaved rounds "
              "(\"-\": one round); \"busy host\": other processes used more than a tenth of the machine while "
              "the row ran, so its figures are not comparable.")
    parts = [REPORT_HEADING.rstrip("\n"), "", legend, "",
             _md_table(head, body) if body else "(no successful measurements)", ""]
    skipped = []
    for k, doc in enumerate(docs):
        for b in doc["backends"]:
            if b["status"] != "ok":
                skipped.append(f"- [{k + 1}] {b['name']} ({_device(doc, b['device'])}): {b['status']}: {b['reason']}")
        for m in doc["measurements"]:
            if m["status"] != "ok":
                skipped.append(f"- [{k + 1}] {_backend(m)} {m['height']}x{m['width']} batch {m['batch_size']} "
                               f"{m['sampler']}/{m['steps']}: {m['status']}: {m['reason']}")
    cached = [line for k, doc in enumerate(docs) for line in cache_lines(doc["measurements"], f"- [{k + 1}] ")]
    if cached:
        intro = ("Each cached row against the uncached row of the same backend and configuration, measured in "
                 "the same run (speed-up: uncached time / cached time; UNet work: full steps + shallow steps x "
                 "shallow step ms / full step ms).")
        parts += ["## Feature caching", "", intro, "", *cached, ""]
    colds = [line for k, doc in enumerate(docs) for line in cold_start_lines(doc["measurements"], f"- [{k + 1}] ")]
    if colds:
        intro = ("Where each sdrt row's cold start went (a fresh process: loading the model, then the first "
                 "image), seconds: the load's parts as the pipeline timed them (\"backend\": the manifest and the "
                 "backend; each engine: reading and compiling or deserializing it; parts under 0.05 s left out).")
        parts += ["## Cold start", "", intro, "", *colds, ""]
    if skipped:
        parts += ["## Skipped or failed", "", *skipped, ""]
    parts += ["## Runs", ""]
    for k, doc in enumerate(docs):
        env, cfg = doc["env"], doc["config"]
        gpu = ", ".join(f"{g['name']} (cc {g['compute_capability']})" for g in env["gpus"]) or "no GPU"
        cuda = env["cuda"]
        v = env["versions"]
        vers = ", ".join(f"{n} {x}" for n, x in v.items()
                         if x and n.startswith(("onnxruntime", "tensorrt", "torch", "diffusers"))
                         and n != "onnxruntime_providers")
        ceil = "; ".join(f"{c['device']} {c['dtype']} matmul {c['tflops']:.3g} TFLOP/s" for c in doc["ceilings"]
                         if c["status"] == "ok")
        parts.append(
            f"- [{k + 1}] {_run_label(doc)}: {gpu}; driver {cuda.get('driver') or '-'}, CUDA "
            f"{cuda.get('driver_cuda') or '-'} (torch built with {cuda.get('torch_cuda') or '-'}); CPU "
            f"{env['cpu']['model']}, {cfg['threads']} CPU thread(s) per backend; {vers}; warm-up {cfg['warmup']}, "
            f"repeats {cfg['repeats']}; {ceil or 'no matmul rate'}"
            + (f"; host load average {env['load_avg'][0]:g} at the start" if env.get("load_avg") else "")
            + (f"; migrated from schema {doc['migrated_from']}" if "migrated_from" in doc else "")
        )
    return "\n".join(parts) + "\n"


# -- chart -----------------------------------------------------------------------------------------------------

def chart(docs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A PNG: it/s (left) and peak memory (right) of every measurement, grouped by device and backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rs = rows(docs)
    if not rs:
        raise InputError("the result files hold no successful measurement to chart")
    labels = [f"{r['device']} | {r['backend']} | {r['preset']} {r['size']} b{r['batch']} {r['steps']} st"
              for r in rs]
    palette = {"baseline": "#8c8c8c"}
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#17becf"]
    names = sorted({r["backend"] for r in rs if r["role"] != "baseline"})
    color_of = {n: colors[i % len(colors)] for i, n in enumerate(names)}
    bar_colors = [palette["baseline"] if r["role"] == "baseline" else color_of[r["backend"]] for r in rs]
    height = max(2.5, 0.38 * len(rs) + 1.2)
    fig = Figure(figsize=(13, height), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(len(rs)))
    its = [r["its"] for r in rs]
    ax1.barh(ys, its, color=bar_colors)
    ax1.set_yticks(ys, labels, fontsize=8)
    ax1.invert_yaxis()
    if max(its) / max(min(its), 1e-9) > 50:  # tiny presets beside real ones: a linear axis hides one kind
        ax1.set_xscale("log")
        ax1.set_xlim(min(its) / 2, max(its) * 4)
        ax1.set_xlabel("denoising it/s, log scale (higher is better)")
    else:
        ax1.set_xlim(0, max(its) * 1.3)
        ax1.set_xlabel("denoising it/s (higher is better)")
    for y, r in zip(ys, rs):
        ax1.text(r["its"], y, f" {r['its']:.3g}" + (f" ({r['its_x']:.2f}x)" if r["its_x"] else ""),
                 va="center", fontsize=7)
    mems = [(r["memory"] or 0) / 2**30 for r in rs]
    hatches = ["" if r["memory_kind"].startswith("VRAM") else "//" for r in rs]
    bars = ax2.barh(ys, mems, color=bar_colors)
    for bar, h in zip(bars, hatches):
        bar.set_hatch(h)
    ax2.set_xlabel("peak memory, GiB\n(VRAM; hatched: host RSS, no GPU)")
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("sdrt vs diffusers on PyTorch (grey), by device and backend", fontsize=10)
    fig.tight_layout()
    import io

    from sdrt.runtime.atomic import atomic_write_bytes

    buf = io.BytesIO()
    # the title marks the file as sdrt's, so a later report may replace it (see write_report)
    fig.savefig(buf, format="png", metadata={"Title": REPORT_TITLE})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _is_report_md(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(REPORT_HEADING)) == REPORT_HEADING.encode()
    except OSError:
        return False


def _is_report_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # matplotlib writes its text chunks before the image data
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and REPORT_TITLE.encode() in head


def check_report_dir(out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """``out_dir/bench.md`` and ``out_dir/bench.png``, refused (before any work) where one exists and is not a
    previous sdrt report, unless ``overwrite``. Other files in ``out_dir`` are never touched."""
    from sdrt.runtime.atomic import check_output_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; give a folder for bench.md and bench.png")
    md, png = out / "bench.md", out / "bench.png"
    ours = _is_report_md(md)  # the pair is written together: a report's own chart may predate the title tag
    check_output_file(md, is_previous=_is_report_md, overwrite=overwrite, what="an sdrt benchmark report")
    check_output_file(png, is_previous=lambda p: ours or _is_report_png(p), overwrite=overwrite,
                      what="an sdrt benchmark chart")
    return md, png


def write_report(paths: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """``out_dir/bench.md`` and ``out_dir/bench.png`` from result files (see ``check_report_dir``)."""
    from sdrt.runtime.atomic import atomic_write_text

    md, png = check_report_dir(out_dir, overwrite=overwrite)
    docs = load_results(paths)
    md.parent.mkdir(parents=True, exist_ok=True)
    chart(docs, png)
    atomic_write_text(md, markdown(docs).replace(REPORT_HEADING,
                                                 REPORT_HEADING + "\n![it/s and peak memory](bench.png)\n", 1))
    return md, png


# -- README -------------------------------------------------------------------------------------------------

def readme_section(docs: Sequence[dict[str, Any]], chart_link: str | None, sources: Sequence[str],
                   command: str) -> str:
    """The README's performance section: a compact table, the chart, and how it was made."""
    rs = rows(docs)
    head = ["device", "backend", "model", "size, batch", "steps", "it/s", "vs PyTorch", "image p50",
            "image vs PyTorch", "peak memory", "UNet of floor"]
    body = [[r["device"], r["backend"] + (" (busy host)" if r["busy"] else ""), f"{r['preset']} {r['precision']}",
             f"{r['size']}, {r['batch']}", f"{r['sampler']} {r['steps']}", _num(r["its"], 2), _x(r["its_x"]),
             f"{_num(r['total_p50'])} ms" + ("" if r["spread"] == "-" else f" (spread {r['spread']})"),
             r["image"], _mem_cell(r), _pct(r["floor_unet"])] for r in rs]
    intro = ("Measured with `sdrt bench`: every figure beside diffusers on PyTorch with the same weights, measured "
             "in the same run (fp16 + SDPA on a GPU, fp32 on CPU, same thread count; a CPU run that measures openvino "
             "also runs diffusers under bf16 autocast, torch-cpu-bf16, compared with the fp32 row). it/s counts "
             "denoising steps; "
             "with guidance each step runs the UNet at batch 2. \"UNet of floor\" is the step's matrix FLOPs over "
             "the matmul rate measured in the run, divided by the step time. \"image vs PyTorch\": the first "
             "image's difference from diffusers' on the same weights and latents, in levels of 255 (max / mean). "
             "Tiny presets measure overheads, not speed.")
    parts = [
        "<!-- generated by `" + command + "`; edit the results, not this text -->",
        "",
        intro,
        "",
        _md_table(head, body) if body else "(no measurements yet)",
        "",
    ]
    if chart_link:
        parts += [f"![it/s and peak memory by device and backend]({chart_link})", ""]
    parts.append("Sources: " + ", ".join(f"`{s}`" for s in sources) + ". Methods and the result schema: "
                 "[benchmarks/README.md](benchmarks/README.md).")
    return "\n".join(parts)


def replace_between_markers(text: str, section: str, where: str = "README") -> str:
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0 or end < start:
        raise InputError(f"{where} has no `{README_START}` ... `{README_END}` markers (in that order); add them "
                         "where the performance section belongs")
    return text[: start + len(README_START)] + "\n" + section.rstrip() + "\n" + text[end:]


def update_readme(readme: str | Path, paths: Sequence[str | Path], chart_path: str | Path | None = None) -> Path:
    """Replace the README's performance section with one generated from ``paths`` (and link the chart)."""
    from sdrt.runtime.atomic import atomic_write_text

    readme = Path(readme)
    try:
        text = readme.read_text()
    except OSError as e:
        raise InputError(f"cannot read {readme}: {e.strerror or e}") from e
    docs = load_results(paths)
    base = readme.resolve().parent
    link = Path(os.path.relpath(Path(chart_path).resolve(), base)).as_posix() if chart_path else None
    sources = sorted(Path(os.path.relpath(Path(p).resolve(), base)).as_posix() for p in paths)
    command = "sdrt bench report " + " ".join(sources) + (
        f" -o {Path(link).parent.as_posix()}" if link else "") + f" --readme {readme.name}"
    atomic_write_text(readme, replace_between_markers(text, readme_section(docs, link, sources, command), str(readme)))
    return readme
