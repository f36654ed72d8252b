"""Declarative TensorRT build profiles (``profiles/*.toml``); built engines land beside them, untracked.

The arithmetic that turns a profile into per-tensor shapes lives in ``sdrt.export.profiles``.
"""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def profile_names() -> list[str]:
    """Names of the shipped profiles (the file stems), sorted."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
