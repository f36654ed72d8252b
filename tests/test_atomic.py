"""Atomic writes: all or nothing, with the permissions a plain write would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdrt.runtime.atomic import atomic_dir, atomic_write_text


def test_new_file_gets_umask_mode_and_existing_mode_is_kept(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        new = tmp_path / "new.txt"
        atomic_write_text(new, "a")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write_text(kept, "new")
        assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_atomic_dir_mode_and_rollback(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out", marker="f") as d:
            (d / "f").write_text("1")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    finally:
        os.umask(umask)
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", marker="f") as d:
        (d / "f").write_text("2")
        raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "f").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left behind
