"""The result file: where a result may be written, its default name, and writing it, validated and atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import schema


def _is_result(path: Path) -> bool:
    """``path`` holds a result written by ``sdrt bench`` (any schema version), so replacing it loses nothing foreign."""
    try:
        if path.stat().st_size > 256 << 20:  # far above any result; not worth reading to find out
            return False
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("schema") == schema.SCHEMA_NAME


def check_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a result path that must not be replaced (a folder; a file not written by ``sdrt bench`` unless
    ``overwrite``), before the run."""
    from sdrt.runtime.atomic import check_output_file

    return check_output_file(path, is_previous=_is_result, overwrite=overwrite, what="an sdrt bench result")


def save(doc: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Validate ``doc`` and write it as JSON, atomically; see ``check_output`` for what is replaced."""
    from sdrt.runtime.atomic import atomic_write_text

    schema.validate(doc)
    p = check_output(path, overwrite=overwrite)
    atomic_write_text(p, json.dumps(doc, indent=1) + "\n")
    return p


def default_filename(doc: dict[str, Any]) -> str:
    """``bench-<device>-<preset>-<date>.json``: GPU name (or "cpu"), preset, UTC timestamp."""
    gpus = doc["env"]["gpus"]
    used_gpu = any(b["device"] == "cuda" and b["status"] == "ok" for b in doc["backends"])
    dev = gpus[0]["name"] if (gpus and used_gpu) else "cpu"
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in dev).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = doc["created"].replace(":", "").replace("-", "").replace("+0000", "")[:15]
    return f"bench-{slug}-{doc['model']['preset']}-{stamp}.json"
