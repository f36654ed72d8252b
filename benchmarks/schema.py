"""The bench result file: one JSON document per run, versioned, checked on write and on read.

``benchmarks/README.md`` documents every field. Readers accept the current version, migrate older
versions for which a migration is registered in ``MIGRATIONS`` (version n -> n + 1, applied in order),
and refuse anything else with the reason: a newer version (upgrade sdrt), an older one with no
migration (re-run the bench), or a file that is not a bench result at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import CompatibilityError, InputError

SCHEMA_NAME = "sdrt-bench"
SCHEMA_VERSION = 5


def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 2 records ``config.cuda_graph``; version 1 runs never asked for CUDA graphs."""
    doc["config"]["cuda_graph"] = False
    return doc


def _v2_to_v3(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 3 records ``config.workload``; a version 2 run without one was txt2img."""
    doc["config"].setdefault("workload", "txt2img")
    return doc


def _v3_to_v4(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 4 records feature caching (``config.caches``; each measurement's ``cache``, ``full_steps``, its
    full/shallow step split and ``vs_uncached``); a version 3 run cached nothing: every step ran the full UNet.
    Its step split is left unknown (null), as its per-step times were never split."""
    doc["config"].setdefault("caches", [])
    for m in doc["measurements"]:
        if isinstance(m, dict):
            m.setdefault("cache", None)
            m.setdefault("full_steps", m.get("steps"))
            for key in ("unet_full_step_ms", "unet_shallow_step_ms", "unet_equivalent_steps", "vs_uncached",
                        "image_vs_uncached"):
                m.setdefault(key, None)
    return doc


def _v4_to_v5(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 5 records rounds (``config.rounds``, ``config.quiet``; each measurement's ``rounds``, ``spread``
    and ``contended``); a version 4 run measured each row in one process, and did not watch the host."""
    doc["config"].setdefault("rounds", 1)
    doc["config"].setdefault("quiet", None)
    for m in doc["measurements"]:
        if isinstance(m, dict):
            for key in ("rounds", "spread", "contended"):
                m.setdefault(key, None)
    return doc


# version n -> a function taking a version-n document and returning a version n+1 document.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4,
                                                                     4: _v4_to_v5}

STATUSES = ("ok", "skipped", "failed")
ROLES = ("sdrt", "baseline")
STAGES = ("text_encoder", "unet_step", "vae_decoder", "total")
# Figures compared with the baseline: key in ``vs_baseline`` -> how to read it from a measurement
RATIO_METRICS: dict[str, tuple[str, ...]] = {
    "its": ("its",),
    "images_per_s": ("images_per_s",),
    "text_encoder_ms_p50": ("text_encoder_ms", "p50"),
    "unet_step_ms_p50": ("unet_step_ms", "p50"),
    "unet_step_ms_p90": ("unet_step_ms", "p90"),
    "vae_decoder_ms_p50": ("vae_decoder_ms", "p50"),
    "total_ms_p50": ("total_ms", "p50"),
    "total_ms_p90": ("total_ms", "p90"),
    "cold_start_ms": ("cold_start_ms",),
    "peak_vram_bytes": ("peak_vram_bytes",),
    "device_mem_delta_bytes": ("device_mem_delta_bytes",),
    "peak_rss_bytes": ("peak_rss_bytes",),
    "artifact_bytes": ("artifact_bytes",),
}

# A cached measurement against the uncached one of its configuration (``vs_uncached``): cached / uncached,
# beside speedup_total_ms_p50 and speedup_unet_ms_per_image (uncached / cached)
UNCACHED_METRICS: dict[str, tuple[str, ...]] = {
    "its": ("its",),
    "images_per_s": ("images_per_s",),
    "unet_step_ms_mean": ("unet_step_ms", "mean"),
    "unet_step_ms_p50": ("unet_step_ms", "p50"),
    "total_ms_p50": ("total_ms", "p50"),
    "total_ms_p90": ("total_ms", "p90"),
    "peak_vram_bytes": ("peak_vram_bytes",),
    "peak_rss_bytes": ("peak_rss_bytes",),
}
SPEEDUPS = ("speedup_total_ms_p50", "speedup_unet_ms_per_image")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_STR = (str,)
_OPT_STR = (str, type(None))
_DICT = (dict,)
_OPT_DICT = (dict, type(None))
_LIST = (list,)
_BOOL = (bool,)

_TOP: dict[str, tuple[type, ...]] = {
    "schema": _STR, "schema_version": (int,), "created": _STR, "env": _DICT, "config": _DICT, "model": _DICT,
    "ceilings": _LIST, "backends": _LIST, "measurements": _LIST, "notes": _LIST, "device_labels": _DICT,
}
_ENV: dict[str, tuple[type, ...]] = {
    "sdrt_version": _STR, "sdrt_commit": _OPT_STR, "sdrt_dirty": (bool, type(None)), "date": _STR,
    "python": _STR, "os": _STR, "cpu": _DICT, "gpus": _LIST, "cuda": _DICT, "versions": _DICT,
    "load_avg": (list, type(None)),
}
_CONFIG: dict[str, tuple[type, ...]] = {
    "preset": _OPT_STR, "artifact": _OPT_STR, "engines": _OPT_STR, "resolutions": _LIST, "steps": _LIST,
    "batch_sizes": _LIST, "samplers": _LIST, "backends": _LIST, "baseline": _STR, "compile": _BOOL,
    "warmup": (int,), "repeats": (int,), "threads": (int,), "guidance_scale": _NUM, "prompt": _STR,
    "seed": (int,), "isolation": _STR, "cuda_graph": _BOOL, "workload": _STR, "caches": _LIST,
    "rounds": (int,), "quiet": _OPT_NUM,
}
_MODEL: dict[str, tuple[type, ...]] = {
    "family": _STR, "preset": _STR, "precision": _STR, "folder": _STR, "export_s": _OPT_NUM,
    "components": _DICT, "artifact_bytes": (int,), "source": _DICT, "flops": _DICT,
}
_CEILING: dict[str, tuple[type, ...]] = {
    "device": _STR, "dtype": _STR, "n": (int,), "tflops": _OPT_NUM, "ms_p50": _OPT_NUM, "method": _STR,
    "status": _STR, "reason": _OPT_STR,
}
_BACKEND: dict[str, tuple[type, ...]] = {
    "name": _STR, "role": _STR, "device": _STR, "status": _STR, "reason": _OPT_STR, "precision": _OPT_STR,
    "threads": _OPT_DICT, "versions": _DICT, "timing_method": _OPT_STR, "build_s": _OPT_NUM,
    "artifact_bytes": (int, type(None)),
}
_MEASUREMENT: dict[str, tuple[type, ...]] = {
    "backend": _STR, "role": _STR, "device": _STR, "status": _STR, "reason": _OPT_STR,
    "height": (int,), "width": (int,), "batch_size": (int,), "sampler": _STR, "steps": (int,),
    "guidance_scale": _NUM, "guided": _BOOL, "unet_batch": (int,), "warmup": (int,), "repeats": (int,),
    "import_ms": _OPT_NUM, "load_ms": _OPT_NUM, "first_image_ms": _OPT_NUM, "cold_start_ms": _OPT_NUM,
    "text_encoder_ms": _OPT_DICT, "unet_step_ms": _OPT_DICT, "vae_decoder_ms": _OPT_DICT, "total_ms": _OPT_DICT,
    "its": _OPT_NUM, "images_per_s": _OPT_NUM,
    "peak_vram_bytes": (int, type(None)), "device_mem_delta_bytes": (int, type(None)),
    "torch_peak_allocated_bytes": (int, type(None)), "peak_rss_bytes": (int, type(None)),
    "rss_sampled_peak_bytes": (int, type(None)), "memory_notes": _LIST, "artifact_bytes": (int, type(None)),
    "raw": _OPT_DICT, "flops": _OPT_DICT, "floor_ms": _OPT_DICT, "of_floor": _OPT_DICT,
    "baseline": _OPT_STR, "vs_baseline": _OPT_DICT, "image_vs_baseline": _OPT_DICT,
    "host_load_avg": (list, type(None)),
    "cache": _OPT_DICT, "full_steps": (int,), "unet_full_step_ms": _OPT_NUM, "unet_shallow_step_ms": _OPT_NUM,
    "unet_equivalent_steps": _OPT_NUM, "vs_uncached": _OPT_DICT, "image_vs_uncached": _OPT_DICT,
    "rounds": (list, type(None)), "spread": _OPT_DICT, "contended": (bool, type(None)),
}
_SUMMARY_KEYS = ("p50", "p90", "min", "max", "mean", "n")


def _check_fields(where: str, doc: Any, spec: Mapping[str, tuple[type, ...]], problems: list[str]) -> None:
    if not isinstance(doc, dict):
        problems.append(f"{where} is {type(doc).__name__}, expected an object")
        return
    for key, types in spec.items():
        if key not in doc:
            problems.append(f"{where}.{key} is missing")
        elif not isinstance(doc[key], types) or (isinstance(doc[key], bool) and bool not in types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{where}.{key} is {type(doc[key]).__name__}, expected {names}")


def _check_load_breakdown(where: str, m: dict[str, Any], problems: list[str]) -> None:
    """``load_breakdown_ms`` {part: ms}: optional (sdrt's rows; files written before it have none)."""
    parts = m.get("load_breakdown_ms")
    if parts is not None and (not isinstance(parts, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in parts.values())):
        problems.append(f"{where}.load_breakdown_ms is not an object of non-negative milliseconds")


def _check_clocks(where: str, m: dict[str, Any], problems: list[str]) -> None:
    """``clocks`` {figure: clock} and ``raw.clocks`` {raw key: [clock per repeat]}: optional (files written
    before them do not say which clock each figure used; their backends' ``timing_method`` does)."""
    clocks = m.get("clocks")
    if clocks is not None and (not isinstance(clocks, dict)
                               or not all(isinstance(v, str) for v in clocks.values())):
        problems.append(f"{where}.clocks is not an object of clock names")
    raw = m.get("raw")
    per_run = raw.get("clocks") if isinstance(raw, dict) else None
    if per_run is not None and (not isinstance(per_run, dict) or not all(
            isinstance(v, list) and all(isinstance(k, str) for k in v) for v in per_run.values())):
        problems.append(f"{where}.raw.clocks is not an object of clock-name lists")


def _check_cache(where: str, c: Any, problems: list[str]) -> None:
    """A cache record: null (uncached) or {kind, interval, schedule} a ``feature_cache.cache_policy`` accepts."""
    if c is None:
        return
    from sdrt.runtime.feature_cache import cache_policy

    if not isinstance(c, dict) or set(c) != {"kind", "interval", "schedule"}:
        problems.append(f"{where} is not null or an object of kind, interval and schedule")
        return
    try:
        cache_policy(c["kind"], c["interval"], c["schedule"])
    except InputError as e:
        problems.append(f"{where}: {e}")


def _check_cached(where: str, m: dict[str, Any], problems: list[str]) -> None:
    """A measurement's cache, its full steps (1..steps, all of them uncached) and, where compared with its
    uncached row, every ratio of ``vs_uncached``."""
    _check_cache(f"{where}.cache", m.get("cache"), problems)
    steps, full = m.get("steps"), m.get("full_steps")
    if isinstance(steps, int) and isinstance(full, int):
        if m.get("cache") is None and full != steps:
            problems.append(f"{where}.full_steps is {full} in an uncached run of {steps} steps")
        elif not 1 <= full <= steps:
            problems.append(f"{where}.full_steps {full} is not from 1 to steps ({steps})")
    vs = m.get("vs_uncached")
    if vs is not None:
        if m.get("cache") is None:
            problems.append(f"{where}.vs_uncached is set on an uncached measurement")
        elif any(k not in vs for k in (*UNCACHED_METRICS, *SPEEDUPS)):
            problems.append(f"{where}.vs_uncached lacks some of {', '.join((*UNCACHED_METRICS, *SPEEDUPS))}")


def problems(doc: Any) -> list[str]:
    """Everything wrong with ``doc`` as a current-version result (empty: valid)."""
    out: list[str] = []
    _check_fields("result", doc, _TOP, out)
    if out:
        return out
    _check_fields("env", doc["env"], _ENV, out)
    _check_fields("config", doc["config"], _CONFIG, out)
    for i, c in enumerate(doc["config"].get("caches") or []):
        _check_cache(f"config.caches[{i}]", c, out)
    _check_fields("model", doc["model"], _MODEL, out)
    for i, c in enumerate(doc["ceilings"]):
        _check_fields(f"ceilings[{i}]", c, _CEILING, out)
    for i, b in enumerate(doc["backends"]):
        _check_fields(f"backends[{i}]", b, _BACKEND, out)
        if isinstance(b, dict):
            if b.get("status") not in STATUSES:
                out.append(f"backends[{i}].status {b.get('status')!r} is not one of {STATUSES}")
            if b.get("role") not in ROLES:
                out.append(f"backends[{i}].role {b.get('role')!r} is not one of {ROLES}")
            if b.get("status") != "ok" and not b.get("reason"):
                out.append(f"backends[{i}] is {b.get('status')} without a reason")
    for i, m in enumerate(doc["measurements"]):
        where = f"measurements[{i}]"
        _check_fields(where, m, _MEASUREMENT, out)
        if not isinstance(m, dict):
            continue
        _check_cached(where, m, out)
        if m.get("status") not in STATUSES:
            out.append(f"{where}.status {m.get('status')!r} is not one of {STATUSES}")
        if m.get("status") != "ok":
            if not m.get("reason"):
                out.append(f"{where} is {m.get('status')} without a reason")
            continue
        _check_clocks(where, m, out)
        _check_load_breakdown(where, m, out)
        for stage in STAGES:
            s = m.get(f"{stage}_ms")
            if not isinstance(s, dict) or any(k not in s for k in _SUMMARY_KEYS):
                out.append(f"{where}.{stage}_ms lacks {', '.join(_SUMMARY_KEYS)}")
        if m.get("role") == "sdrt" and m.get("baseline") is not None:
            vs = m.get("vs_baseline")
            if not isinstance(vs, dict) or any(k not in vs for k in RATIO_METRICS):
                out.append(f"{where}.vs_baseline lacks some of {', '.join(RATIO_METRICS)}")
    return out


def validate(doc: Any) -> None:
    """Raise CompatibilityError listing every problem when ``doc`` is not a valid current result."""
    found = problems(doc)
    if found:
        raise CompatibilityError("not a valid sdrt bench result:\n  - " + "\n  - ".join(found[:20])
                                 + (f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""))


def upgrade(doc: Any, source: str = "result") -> dict[str, Any]:
    """A current-version copy of ``doc``: migrated if older, refused with the reason otherwise."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_NAME:
        raise CompatibilityError(
            f"{source} is not an sdrt bench result (no \"schema\": \"{SCHEMA_NAME}\" field); "
            "pass files written by `sdrt bench`"
        )
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CompatibilityError(f"{source} has no integer schema_version; re-run `sdrt bench` to record it again")
    if version > SCHEMA_VERSION:
        raise CompatibilityError(
            f"{source} uses bench schema {version}, newer than this sdrt reads ({SCHEMA_VERSION}); "
            "upgrade sdrt (pip install -U sdrt) to read it"
        )
    missing = [v for v in range(version, SCHEMA_VERSION) if v not in MIGRATIONS]
    if missing:
        raise CompatibilityError(
            f"{source} uses bench schema {version}, which this sdrt ({SCHEMA_VERSION}) cannot migrate "
            f"(no migration from version {missing[0]}); re-run `sdrt bench` to record it in the current schema"
        )
    out = json.loads(json.dumps(doc))  # a deep copy: migrations may edit freely
    for v in range(version, SCHEMA_VERSION):
        out = MIGRATIONS[v](out)
        out["schema_version"] = v + 1
    if version != SCHEMA_VERSION:
        out.setdefault("notes", []).append(f"migrated from bench schema {version} to {SCHEMA_VERSION}")
        out["migrated_from"] = version
    try:
        validate(out)
    except CompatibilityError as e:
        raise CompatibilityError(f"{source}: {e}") from None
    return out


def load(path: str | Path) -> dict[str, Any]:
    """Read, migrate and validate one result file."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not JSON ({e}); pass files written by `sdrt bench`") from e
    return upgrade(doc, str(p))
