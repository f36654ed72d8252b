"""Prepare a mypy-readable copy of ``tensorrt-stubs`` (the TensorRT 10 Python API's type stubs).

The stubs cannot be used as published: a few parameters are named ``in`` (a Python keyword),
``add_scale_nd`` has a parameter without a default after defaulted ones, and both ``__init__.pyi``
import the absent ``tensorrt_libs``. This script installs the pinned stubs with ``--no-deps`` (their
dependency is the TensorRT library itself, which is not on PyPI) into a target folder, patches that copy,
and prints the folder to put on ``MYPYPATH``. The installed site-packages are never touched.

    python tests/typecheck/patch_trt_stubs.py [DEST]      # default DEST: .stubs/tensorrt-stubs

`make install-test` runs it; the tests only look for the result (``prepared``) and never download.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STUBS = "tensorrt-stubs==10.13.0.35.1"
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = ROOT / ".stubs" / "tensorrt-stubs"
MARKER = ".sdrt-patched"

# (file, pattern, replacement, expected minimum number of substitutions)
PATCHES: list[tuple[str, str, str, int]] = [
    # a parameter named `in` is a syntax error: rename it (callers pass these positionally)
    ("tensorrt_bindings/tensorrt.pyi", r"(?<=[(,] )in(?=: )", "in_", 4),
    # a defaultless parameter after defaulted ones is a syntax error: give it a stub default
    ("tensorrt_bindings/tensorrt.pyi", r"channel_axis: int\) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer", 1),
    # tensorrt_libs is a runtime-only package of shared libraries with no stubs
    ("tensorrt_bindings/__init__.pyi", r"(?m)^import tensorrt_libs as tensorrt_libs\n", "", 1),
    ("tensorrt/__init__.pyi", r"(?m)^import tensorrt_libs as tensorrt_libs\n", "", 1),
]


def install(target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--no-compile", "--target", str(target), STUBS]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


def patch(folder: Path) -> None:
    for rel, pattern, repl, least in PATCHES:
        path = folder / rel
        text, n = re.subn(pattern, repl, path.read_text())
        if n < least:
            raise RuntimeError(f"{rel}: expected at least {least} matches of {pattern!r}, found {n}; the stubs changed")
        path.write_text(text)
    # only the stub packages belong on MYPYPATH
    for extra in folder.iterdir():
        if extra.name not in ("tensorrt", "tensorrt_bindings"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    (folder / MARKER).write_text(STUBS + "\n")


def prepared(dest: Path = DEFAULT_DEST) -> Path | None:
    """The patched stubs folder if it is already there (this version, patched); None otherwise."""
    marker = dest / MARKER
    return dest if marker.is_file() and marker.read_text().strip() == STUBS else None


def prepare(dest: Path = DEFAULT_DEST) -> Path:
    """The patched stubs folder, installing and patching it on first use (from PyPI: `make install-test`)."""
    if prepared(dest) is not None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tensorrt-stubs-", dir=dest.parent))
    try:
        install(tmp)
        patch(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DEST))
