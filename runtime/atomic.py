"""Atomic artifact writes: build in a temporary sibling, rename when complete.

An interrupted export or build therefore leaves the previous good artifact untouched, and a reader
never sees a half-written folder. Only a previous artifact of the same kind is replaced: a folder or
file that sdrt did not write is refused unless the caller asks to overwrite it, and the check runs
before any work so a refused request costs nothing and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from .errors import ArtifactError, InputError


def _umask() -> int:
    # Linux reports it without changing it; setting and restoring it is racy with other threads' writes
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode a plain ``mkdir`` gives a new folder under the current umask."""
    return 0o777 & ~_umask()


def give_default_mode(*paths: str | os.PathLike[str]) -> None:
    """Give files written by tools that make them private (0600) the mode of a plain write."""
    mode = default_file_mode()
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, mode)


def _refuse(message: str, consequence: str) -> InputError:
    """``message`` ends with "or"; the fix follows in the API's and the CLI's words."""
    return InputError(f"{message} pass overwrite=True to replace it{consequence}",
                      cli=f"{message} pass --overwrite to replace it{consequence}")


def _check_not_cwd(target: Path) -> None:
    # Replacing the current folder (or one above it) would pull it from under this process and the
    # user's shell; the rename fails only after all the work is done, so refuse it first.
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        where = "the current folder" if resolved == cwd else "a folder above the current one"
        raise InputError(f"{target} is {where} ({resolved}); sdrt replaces an output folder whole, so give a new "
                         "folder for it (e.g. ./out) or run from another folder")


def _check_parent_can_be_written(target: Path) -> None:
    """The nearest existing folder above ``target`` is a writable folder (nothing is created yet)."""
    parent = target.resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {target}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent} is not writable; choose an output path you can write to")


def check_output_dir(
    target: str | os.PathLike[str],
    *,
    marker: str | None,
    overwrite: bool = False,
    what: str = "an sdrt artifact",
    owned: Callable[[Path], Collection[str]] | None = None,
) -> Path:
    """Refuse an output folder that :func:`atomic_dir` must not replace; return it as a ``Path``.

    Allowed: a path that does not exist, an empty folder, a folder holding ``marker`` (a previous
    artifact of the same kind: ``sdrt.json`` for an export, ``sdrt-engines.json`` for engines), or any
    folder when ``overwrite``. Always refused: a path that is not a folder (a file), and the current
    folder or one above it. ``what`` names the artifact kind in the message ("an sdrt export").
    ``owned(folder)``: the top-level names a previous artifact's manifest accounts for (e.g.
    ``manifest.export_entries``); given, a previous artifact that holds anything else is refused too (unless
    ``overwrite``), naming what it holds.
    """
    target = Path(target)
    _check_not_cwd(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise InputError(f"{target} exists and is not a folder; give a folder path for the output (the file "
                             "is left as it is)")
        is_previous = marker is not None and (target / marker).is_file()
        if not is_previous and not overwrite and any(target.iterdir()):
            mark = f" (no {marker})" if marker else ""
            raise _refuse(f"{target} is a folder that is not {what}{mark} and holds files, which replacing it "
                          "would delete; choose a new or empty folder, or", ", deleting what it holds")
        if is_previous and not overwrite and owned is not None:
            _check_only_owned(target, marker, owned, what)
    _check_parent_can_be_written(target)
    return target


def _check_only_owned(target: Path, marker: str | None, owned: Callable[[Path], Collection[str]], what: str) -> None:
    # A previous artifact is replaced whole, so anything its manifest does not name (a user's notes, a
    # LoRA put beside the model) would go with it: refused rather than merged, which is simpler to trust.
    try:
        names = set(owned(target))
    except (OSError, ValueError, LookupError, TypeError, AttributeError):  # an unreadable one names nothing
        names = set()
    names.add(str(marker))
    others = sorted(p.name for p in target.iterdir() if p.name not in names)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise _refuse(f"{target} is {what}, but it also holds {shown}, which its {marker} does not name: sdrt "
                      "replaces the whole folder, so replacing it would delete them. Move them out of the folder, "
                      "choose another folder, or", ", deleting them too")


def check_output_file(
    target: str | os.PathLike[str],
    *,
    is_previous: Callable[[Path], bool],
    overwrite: bool = False,
    what: str = "an sdrt file",
) -> Path:
    """Refuse an output file that must not be replaced; return it as a ``Path``.

    Allowed: a path that does not exist, a file ``is_previous`` recognises as one sdrt wrote, or any
    file when ``overwrite``. Always refused: a folder.
    """
    target = Path(target)
    if target.is_dir():
        raise InputError(f"{target} is a folder; give a file path for {what}")
    if target.exists() and not overwrite and not is_previous(target):
        raise _refuse(f"{target} exists and is not {what}; choose another path, or", "")
    _check_parent_can_be_written(target)
    return target


def _check_parent_writable(target: Path) -> Path:
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {parent}: {e.strerror}; choose an output path you can write to") from e
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"{parent} is not writable; choose an output path you can write to")
    return parent


@contextlib.contextmanager
def atomic_dir(
    target: str | os.PathLike[str],
    *,
    marker: str | None,
    overwrite: bool = False,
    what: str = "an sdrt artifact",
    owned: Callable[[Path], Collection[str]] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole.

    ``target`` must pass :func:`check_output_dir` (same ``marker``, ``overwrite``, ``what``, ``owned``): callers
    check it before their work too, this is the last line. On any exception the temporary folder is
    removed and ``target`` is left as it was.
    """
    target = Path(check_output_dir(target, marker=marker, overwrite=overwrite, what=what, owned=owned)).resolve()
    parent = _check_parent_writable(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    os.chmod(tmp, default_dir_mode())  # mkdtemp makes the folder private (0700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    parent = _check_parent_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would have
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_new_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a new file ``path`` through a temporary file; never replaces a file: raises
    FileExistsError when ``path`` exists, even if it appeared a moment ago (the link is the test)."""
    path = Path(path)
    parent = _check_parent_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=parent)
    try:
        os.chmod(tmp, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails rather than replace
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: reserve the name, then fill it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _mode_for(path: Path) -> int:
    """The replaced file's mode, or the umask's default for a new file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return default_file_mode()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
