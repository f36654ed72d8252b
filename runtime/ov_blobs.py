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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text

SUFFIX = ".sdrt-blob"  # apart from the <hash>.blob files OpenVINO's own CACHE_DIR writes
TMP = ".tmp"  # a blob being written: .<key>.<pid>.<random>.tmp


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

    def __init__(self, folder: Path, ov: Any, core: Any, device: str, config: Mapping[str, Any]) -> None:
        self.folder = folder
        self.ov = ov
        self.core = core
        self.device = device
        self.config = dict(config)
        caps = sorted(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        self._context = json.dumps({
            "openvino": ov.__version__, "device": device,
            "device_name": str(core.get_property(device, "FULL_DEVICE_NAME")), "capabilities": caps,
            "config": {k: str(v) for k, v in sorted(self.config.items())},
        }, sort_keys=True)
        remove_orphans(folder)
        self._files: dict[str, str] = {}
        self._writers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def key(self, source: str | bytes, shapes: Any = (), config: Mapping[str, Any] | None = None) -> str:
        """The blob's name for a graph (a path, or serialized ONNX bytes) compiled at ``shapes`` (``()``: dynamic)
        with ``config`` (None: the cache's; another, an exact load's f32, keys its own blobs)."""
        h = hashlib.sha256(self._context.encode())
        if config is not None and dict(config) != self.config:
            h.update(json.dumps({k: str(v) for k, v in sorted(config.items())}, sort_keys=True).encode())
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
        index = self.folder / ("weights-" + hashlib.sha256(json.dumps(_stat(source)).encode()).hexdigest()[:40]
                               + ".json")
        try:
            names = json.loads(index.read_text())
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
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
        try:
            mapped = np.memmap(p, dtype=np.uint8, mode="c")  # copy-on-write: OpenVINO shares only writable memory
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
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except Exception as e:  # noqa: BLE001 - an unwritten blob costs the next load a compile, nothing more
            self.errors.append(f"{key}: {e}")

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
