"""The openvino backend's model cache: compiled-model blobs written off the load's path and mapped back in.

OpenVINO's own ``CACHE_DIR`` writes a graph's compiled blob inside ``compile_model``, so the first load of an
export pays for serializing and writing it (full SD 1.5's UNet in fp32: a 3.4 GB blob, which made that first
load about three times the plain compile). This cache instead compiles without it and hands the compiled model
back at once; a background thread then serializes the blob (``export_model``) and writes it to a temporary file
renamed into place when complete, so a crash never leaves half a blob under a real name. A later load of the same
graph maps the blob copy-on-write (no read of the whole file into memory) and imports it (``import_model``),
which skips the ONNX reader and the compile. ``BlobCache.wait`` (the backend's ``close``) joins pending writes.

A blob is keyed by everything that makes it valid: the ONNX file's and its weights files' paths, sizes and
modification times (or the graph's bytes, for graphs made in memory), the input shapes of a static compile, the
compile settings, OpenVINO's version and the device's name and capabilities (which weights files an ONNX file
reads is remembered beside the blobs per file path, size and time, so a filled cache never parses a graph). A blob
that fails to import (a changed CPU behind the same name, a damaged file) is compiled afresh and rewritten.

The cache is bounded (``max_gb``: ``SDRT_OPENVINO_CACHE_GB``, else 64 GB): a re-export, a changed setting or a
deleted export leaves blobs no load will ask for again, so after each blob write and when the backend closes the
least recently used files go (a load's hit marks its blob used) until the folder is back under the bound, never
one that a cache open in this process loaded or wrote: a model larger than the bound stays cached whole (each
later process's loads hit it again). A blob's key holds the compile settings it was made with, so a graph loaded
``exact`` (f32) on a bf16 backend shares its blob with the same graph on an f32 backend.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .errors import InputError

SUFFIX = ".sdrt-blob"  # apart from the <hash>.blob files OpenVINO's own CACHE_DIR writes
TMP = ".tmp"  # a blob being written: .<key>.<pid>.<random>.tmp
INDEX = "weights-"  # weights-<hash>.json: the weights files of one ONNX file
ENV_MAX = "SDRT_OPENVINO_CACHE_GB"
DEFAULT_MAX_GB = 64.0  # a model's blobs in use are never removed: one larger (FLUX.1 in fp32: about 68 GB) stays
_OPEN: weakref.WeakSet[BlobCache] = weakref.WeakSet()  # the caches open in this process: what they use is kept


def max_gb(value: float | None = None) -> float:
    """The cache's bound in GB (1e9 bytes): ``value``, else ``SDRT_OPENVINO_CACHE_GB``, else 64; ``inf``: none."""
    where = "cache_max_gb"
    if value is None:
        text = os.environ.get(ENV_MAX, "").strip()
        if not text:
            return DEFAULT_MAX_GB
        where = ENV_MAX
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
    if not value > 0:  # NaN too
        raise InputError(f"{where} must be a number of GB above 0 (inf: no bound), got {value!r}")
    return float(value)


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files of blob writes whose process has ended (killed mid-write); the removed."""
    removed = []
    for p in folder.glob(f".*{TMP}"):
        parts = p.name.split(".")
        try:
            pid = int(parts[2])
            os.kill(pid, 0)
        except (IndexError, ValueError):
            continue  # not ours
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(p)
        except PermissionError:
            pass  # another user's live process
    return removed


def weight_files(path: str) -> list[str]:
    """The files an ONNX file reads its weights from (external data), as absolute paths; the graph itself is
    read without them."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load_model(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for t in g.initializer:
            if uses_external_data(t):
                for entry in t.external_data:
                    if entry.key == "location":
                        found.add(os.path.normpath(os.path.join(base, entry.value)))
        for node in g.node:
            for attr in node.attribute:
                if attr.g is not None and attr.g.ByteSize():
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    return sorted(found)


def cache_files(folder: Path) -> list[tuple[int, str, int]]:
    """The cache's own files in ``folder`` (blobs and weights indexes, not files written in progress): (modification
    time in ns, name, size in bytes) each; none where the folder does not exist."""
    entries = []
    try:
        paths = list(folder.iterdir())
    except OSError:  # missing, not a folder, unreadable: nothing of the cache's there
        return []
    for p in paths:
        if not (p.name.endswith(SUFFIX) or (p.name.startswith(INDEX) and p.name.endswith(".json"))):
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # trimmed by another process meanwhile
            continue
        entries.append((st.st_mtime_ns, p.name, st.st_size))
    return entries


def _touch(path: Path) -> None:
    """Mark a cache file used now (its modification time: access times are often not kept)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache: used as it is, never trimmed by time
        pass


def _stat(path: str) -> list[Any]:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


class FileStream(io.BytesIO):
    """A file behind the ``io.BytesIO`` that ``CompiledModel.export_model`` insists on: OpenVINO writes the blob
    through ``write`` in pieces (a tensor at most) and seeks back to fill in its header, so the blob goes to disk
    without ever being whole in memory."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f

    def write(self, b: Any) -> int:
        return int(self.f.write(b))

    def seek(self, pos: int, whence: int = 0) -> int:
        return int(self.f.seek(pos, whence))

    def tell(self) -> int:
        return int(self.f.tell())

    def read(self, size: int | None = -1) -> bytes:
        return bytes(self.f.read(size))

    def flush(self) -> None:
        self.f.flush()


class BlobCache:
    """Compiled blobs in ``folder`` for one core, device and compile configuration."""

    def __init__(self, folder: Path, ov: Any, core: Any, device: str, config: Mapping[str, Any],
                 max_gb: float = DEFAULT_MAX_GB) -> None:
        self.folder = folder
        self._real = os.path.realpath(folder)  # what a trim compares with the other open caches' folders
        self.max_bytes = max_gb * 1e9
        self.ov = ov
        self.core = core
        self.device = device
        self.config = dict(config)
        caps = sorted(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        self._context = json.dumps({
            "openvino": ov.__version__, "device": device,
            "device_name": str(core.get_property(device, "FULL_DEVICE_NAME")), "capabilities": caps,
        }, sort_keys=True)
        remove_orphans(folder)
        self._files: dict[str, str] = {}
        self._writers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []
        self._used: set[str] = set()  # the file names this cache loaded or wrote: kept while it is open
        self.removed: list[Path] = []  # what trimming removed, oldest first
        _OPEN.add(self)

    def key(self, source: str | bytes, shapes: Any = (), config: Mapping[str, Any] | None = None) -> str:
        """The blob's name for a graph (a path, or serialized ONNX bytes) compiled at ``shapes`` (``()``: dynamic)
        with ``config`` (None: the cache's)."""
        h = hashlib.sha256(self._context.encode())
        settings = self.config if config is None else dict(config)
        h.update(json.dumps({k: str(v) for k, v in sorted(settings.items())}, sort_keys=True).encode())
        if isinstance(source, bytes):
            h.update(b"bytes:" + hashlib.sha256(source).digest())
        else:
            files = self._files.get(source)
            if files is None:  # once per graph: a static compile asks again for each new shape
                files = self._files[source] = json.dumps(
                    [_stat(source)] + [_stat(f) for f in self._weight_files(source) if os.path.isfile(f)])
            h.update(files.encode())
        h.update(repr(shapes).encode())
        return h.hexdigest()[:40]

    def _weight_files(self, source: str) -> list[str]:
        """:func:`weight_files`, remembered in the cache folder per ONNX file (path, size, time): reading a graph
        with its weights inline (a text encoder's 0.5 GB) would cost a filled cache's load more than its import."""
        index = self.folder / (INDEX + hashlib.sha256(json.dumps(_stat(source)).encode()).hexdigest()[:40]
                               + ".json")
        self._used.add(index.name)
        try:
            names = json.loads(index.read_text())
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                _touch(index)
                return names
        except (OSError, ValueError):
            pass
        names = weight_files(source)
        atomic_write_text(index, json.dumps(names))
        return names

    def path(self, key: str) -> Path:
        return self.folder / (key + SUFFIX)

    def load(self, key: str, config: Mapping[str, Any] | None = None) -> tuple[Any, Any] | None:
        """(compiled model, the mapped blob it was imported from: keep it alive as long as the model), or None
        when there is no usable blob. ``config``: the compile settings the blob was keyed with (None: the cache's)."""
        p = self.path(key)
        if not p.is_file():
            return None
        self._used.add(p.name)
        _touch(p)  # used now: the last to go when the cache is trimmed
        try:
            mapped = np.memmap(p, dtype=np.uint8, mode="c")  # copy-on-write: OpenVINO shares only writable memory
        except FileNotFoundError:  # trimmed by another process since: compiled as if never cached
            return None
        try:
            compiled = self.core.import_model(self.ov.Tensor(mapped, shared_memory=True), self.device,
                                              self.config if config is None else dict(config))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own untyped RuntimeErrors
            warnings.warn(f"the OpenVINO model cache's {p.name} did not import ({str(e).strip()[:200]}); compiling "
                          "again and replacing it", stacklevel=3)
            return None
        return compiled, mapped

    def store(self, compiled: Any, key: str) -> None:
        """Write ``compiled``'s blob on a background thread (at the lowest scheduling priority the OS gives a
        thread), to a temporary file renamed into place when complete."""
        # not a daemon: a process that ends without closing its backend still finishes the blob first
        t = threading.Thread(target=self._write, args=(compiled, key), name=f"sdrt-ov-blob-{key[:8]}")
        with self._lock:
            self._writers = [w for w in self._writers if w.is_alive()] + [t]
        t.start()

    def _write(self, compiled: Any, key: str) -> None:
        try:
            if hasattr(os, "setpriority"):
                try:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
                except OSError:
                    pass
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.{os.getpid()}.", suffix=TMP)
            try:
                with os.fdopen(fd, "w+b") as f:
                    compiled.export_model(FileStream(f))
                self._used.add(self.path(key).name)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except Exception as e:  # noqa: BLE001 - an unwritten blob costs the next load a compile, nothing more
            self.errors.append(f"{key}: {e}")
            return
        try:
            self.trim()
        except OSError as e:  # an unreadable folder: the cache stays over its bound, nothing worse
            self.errors.append(f"trimming {self.folder}: {e}")

    def trim(self) -> list[Path]:
        """Remove the least recently used blobs and weights indexes (by modification time, which a hit renews) until
        the folder holds at most the bound, skipping what a cache open in this process over the same folder used;
        the files removed."""
        entries = cache_files(self.folder)
        total = sum(size for _, _, size in entries)
        removed = []
        with self._lock:
            kept = set(self._used).union(*(c._used for c in list(_OPEN) if c._real == self._real))
            for _, name, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if name in kept:
                    continue
                try:
                    (self.folder / name).unlink()
                except FileNotFoundError:  # removed by another process meanwhile
                    total -= size
                    continue
                except OSError:  # (a blob another process has mapped, on Windows): kept
                    continue
                total -= size
                removed.append(self.folder / name)
            self.removed += removed
        return removed

    def close(self) -> None:
        """After the pending writes: trim the cache to its bound, then stop keeping what this cache used."""
        self.wait()
        try:
            self.trim()
        except OSError as e:
            self.errors.append(f"trimming {self.folder}: {e}")
        _OPEN.discard(self)

    def pending(self) -> int:
        """How many blob writes are still running."""
        with self._lock:
            return sum(w.is_alive() for w in self._writers)

    def wait(self) -> None:
        """Return when every blob write has finished."""
        with self._lock:
            writers = list(self._writers)
        for w in writers:
            w.join()
