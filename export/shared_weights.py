"""One weights file for two graphs of one model: a graph whose initializers another graph's external weights file
already holds, byte for byte, is rewritten to read them from that file.

Skip-layer guidance's pass (``unet_skip``) is the transformer with a few blocks left out: every weight it reads is
one of the transformer's. Exported on its own it would hold a second copy of them on disk (4.5 GiB for SD 3.5 Medium
in fp16); :func:`share_weights` points each of its initializers at the same bytes in the transformer's
``model.onnx_data`` instead, so the two graphs sit in one folder over one weights file. Matching is by content
(dtype, shape and the bytes' SHA-256), not by name: the two exports name the constants they fold differently.
Only the graph's own bytes are read, one tensor at a time, and the donor's only where a dtype, shape and length
match; what matches nothing stays in the graph (inline) or, past ``INLINE_BYTES``, in a weights file of its own.

ONNX Runtime, OpenVINO and TensorRT's parser all resolve an external data location against the graph file's
folder, so the rewritten graph loads as any other. A tool that rewrites the donor's weights file (``sdrt refit``)
must rewrite or refuse the graphs that share it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from sdrt.runtime.atomic import give_default_mode
from sdrt.runtime.errors import ArtifactError

INLINE_BYTES = 1 << 30  # past this, what matches nothing goes to the graph's own weights file (protobuf: 2 GiB)


@dataclass(frozen=True)
class Sharing:
    """What ``share_weights`` did: initializers (and bytes) read from the donor's file, and those kept."""

    shared: int
    shared_bytes: int
    own: int
    own_bytes: int


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _read(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ArtifactError(f"{path} holds {len(data)} bytes at offset {offset}, not the {length} its graph names: "
                            "the export is incomplete; re-export it")
    return data


def _bytes_of(t: TensorProto, folder: Path) -> bytes | None:
    """The tensor's raw bytes: inline, or read from its external file (None: stored in typed fields)."""
    if t.data_location == TensorProto.EXTERNAL:
        info = _external(t)
        return _read(folder / info["location"], int(info.get("offset", 0)), int(info["length"]))
    return t.raw_data if t.HasField("raw_data") else None


def share_weights(graph: Path, donor: Path, dest: Path) -> Sharing:
    """Write ``graph`` (an ONNX file; its weights inline or external) as ``dest``, in ``donor``'s folder, with every
    initializer that ``donor``'s external weights file holds byte for byte read from that file. ``graph`` and its
    own weights file are left as they are (the caller removes them)."""
    if dest.parent != donor.parent:
        raise ValueError("the shared graph must sit beside its donor: external data resolves against its folder")
    index: dict[tuple[int, tuple[int, ...], int], list[tuple[str, int]]] = defaultdict(list)
    for t in onnx.load(str(donor), load_external_data=False).graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = _external(t)
            length = int(info["length"])
            index[(t.data_type, tuple(t.dims), length)].append((info["location"], int(info.get("offset", 0))))
    hashes: dict[tuple[str, int, int], str] = {}

    def donor_hash(location: str, offset: int, length: int) -> str:
        key = (location, offset, length)
        if key not in hashes:
            hashes[key] = hashlib.sha256(_read(donor.parent / location, offset, length)).hexdigest()
        return hashes[key]

    model = onnx.load(str(graph), load_external_data=False)
    own_data = dest.with_name(dest.name + "_data")
    own: list[tuple[TensorProto, bytes]] = []
    shared = shared_bytes = 0
    for t in model.graph.initializer:
        data = _bytes_of(t, graph.parent)
        if data is None:
            continue
        digest = hashlib.sha256(data).hexdigest()
        match = next(((loc, off) for loc, off in index.get((t.data_type, tuple(t.dims), len(data)), [])
                      if donor_hash(loc, off, len(data)) == digest), None)
        if match is None:
            own.append((t, data))
            continue
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", match[0]), ("offset", str(match[1])), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        shared, shared_bytes = shared + 1, shared_bytes + len(data)
    own_bytes = sum(len(d) for _, d in own)
    outside = own_bytes > INLINE_BYTES
    offset = 0
    with own_data.open("wb") if outside else contextlib.nullcontext() as f:
        for t, data in own:
            del t.external_data[:]
            if not outside:
                t.data_location = TensorProto.DEFAULT
                t.raw_data = data
                continue
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", own_data.name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            f.write(data)  # type: ignore[union-attr]
            offset += len(data)
    if outside:
        give_default_mode(own_data)
    onnx.save_model(model, str(dest))
    onnx.checker.check_model(str(dest))
    return Sharing(shared, shared_bytes, len(own), own_bytes)
