"""Ship wheels to the GPU machine in parts: pack here, stash and assemble there. Standard library only.

A call to the device machine carries at most 64 MiB (the working tree included), and the
onnxruntime-gpu wheel alone is about 256 MB. So the wheels travel as *streams*: each stream is a tar of
wheels, repacked without compression (ZIP_STORED, same members, same bytes) so that xz can squeeze the
CUDA libraries inside them, compressed with xz (an x86 BCJ filter before LZMA2; Python's ``lzma`` reads
it back on any machine), then cut into chunks that fill folders ``p1``, ``p2``, ... of at most ``--cap``
bytes, in stream order. Every folder gets a copy of ``MANIFEST.json``, which records every chunk's size
and sha256, every stream's sha256, every shipped file's sha256 and the original wheel's sha256.

    # here (benchmarks/gpu/prepare.sh does this)
    python3 parts.py pack --out .whl --cap 62914560 --stream pre=diffusers.whl --stream core=ort.whl ...
    # there, once per call that carried a folder .whl/pN
    python3 parts.py stash --src .whl --dest /tmp/sdrt-kit/parts
    # there, when every chunk of a stream has arrived: verified wheels, one path a line
    python3 parts.py assemble --dest /tmp/sdrt-kit/parts --stream core --out /tmp/sdrt-kit/wheels

Checks on the way: each chunk's size and sha256 when it is stashed; the joined stream's sha256; each
unpacked file's sha256; and every member of a wheel against the wheel's own RECORD (the hashes its
publisher wrote), so that the repacked wheel is proven to hold exactly the original's files.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import hashlib
import io
import json
import lzma
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FORMAT = "sdrt-gpu-kit-1"
MANIFEST = "MANIFEST.json"
MIB = 1 << 20
DEFAULT_CAP = 60 * MIB
# headroom in each folder for its copy of the manifest
MANIFEST_RESERVE = 256 * 1024
BUF = 4 * MIB


class KitError(Exception):
    """Something is missing or does not match: the message says what and what to do."""


# -- hashing -------------------------------------------------------------------------------------------


def _blocks(f: Any) -> Iterable[bytes]:
    while block := f.read(BUF):
        yield block


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in _blocks(f):
            h.update(block)
    return h.hexdigest()


def _record_digest(data_hash: Any) -> str:
    return "sha256=" + base64.urlsafe_b64encode(data_hash.digest()).rstrip(b"=").decode()


# -- wheels --------------------------------------------------------------------------------------------


def repack_stored(src: str | Path, dst: str | Path) -> None:
    """Copy the wheel ``src`` to ``dst`` with every member stored uncompressed (names, order, dates and
    permissions kept). pip installs it like the original; xz then compresses the raw contents."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.external_attr = info.external_attr
            new.create_system = info.create_system
            new.compress_type = zipfile.ZIP_STORED
            new.file_size = info.file_size
            with zin.open(info) as r, zout.open(new, "w", force_zip64=info.file_size > 0x7FFFFFFF) as w:
                shutil.copyfileobj(r, w, BUF)


def verify_wheel_record(path: str | Path) -> int:
    """Check every member of the wheel ``path`` against its ``*.dist-info/RECORD``; return how many
    were checked. Raises KitError on a missing, extra or different file."""
    with zipfile.ZipFile(path) as z:
        records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
        if len(records) != 1:
            raise KitError(f"{path}: expected one .dist-info/RECORD, found {records}")
        record = records[0]
        rows = list(csv.reader(io.StringIO(z.read(record).decode("utf-8"))))
        expected = {r[0]: (r[1] if len(r) > 1 else "", r[2] if len(r) > 2 else "") for r in rows if r}
        members = {i.filename: i for i in z.infolist() if not i.is_dir()}
        unlisted = sorted(set(members) - set(expected))
        if unlisted:
            raise KitError(f"{path}: members not listed in RECORD: {unlisted[:5]}")
        checked = 0
        for name, (digest, size) in expected.items():
            if not digest:  # RECORD itself, signatures
                continue
            if name not in members:
                raise KitError(f"{path}: RECORD lists {name}, which the wheel lacks")
            algo = digest.split("=", 1)[0]
            if algo != "sha256":
                raise KitError(f"{path}: {name} is recorded with {algo}, not sha256")
            h = hashlib.sha256()
            n = 0
            with z.open(members[name]) as f:
                for block in _blocks(f):
                    h.update(block)
                    n += len(block)
            if _record_digest(h) != digest or (size and int(size) != n):
                raise KitError(f"{path}: {name} does not match the wheel's RECORD (corrupt or altered)")
            checked += 1
        return checked


# -- pack (the CPU machine) ----------------------------------------------------------------------------


def _filters(preset: int, size: int) -> list[dict[str, Any]]:
    # the dictionary holds the biggest library whole (kernels repeat across SM targets), but no more
    # than the input: the encoder needs about ten times the dictionary in memory
    dict_size = max(MIB, min(384 * MIB, 1 << max(size - 1, 1).bit_length()))
    return [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size}]


def build_stream(files: Sequence[str | Path], out: str | Path, *, preset: int = 9 | lzma.PRESET_EXTREME,
                 work: str | Path | None = None) -> list[dict[str, Any]]:
    """Tar ``files`` (wheels repacked stored) into the xz file ``out``; return the files' records."""
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kit-", dir=work) as tmp:
        shipped: list[Path] = []
        for f in map(Path, files):
            rec: dict[str, Any] = {"name": f.name, "original_bytes": f.stat().st_size,
                                   "original_sha256": sha256_file(f)}
            if f.suffix == ".whl":
                dst = Path(tmp) / f.name
                repack_stored(f, dst)
                verify_wheel_record(dst)
                rec["repacked"] = "zip members stored uncompressed (same files; checked against RECORD)"
            else:
                dst = f
                rec["repacked"] = None
            rec["bytes"] = dst.stat().st_size
            rec["sha256"] = sha256_file(dst)
            records.append(rec)
            shipped.append(dst)
        size = sum(p.stat().st_size for p in shipped) + 4096 * (len(shipped) + 2)
        with (lzma.open(out, "wb", format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=_filters(preset, size)) as xz,
              tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar):
            for p in shipped:
                info = tarfile.TarInfo(p.name)
                info.size = p.stat().st_size
                info.mode = 0o644
                info.mtime = 0
                with open(p, "rb") as fh:
                    tar.addfile(info, fh)
    return records


def layout(sizes: Sequence[tuple[str, int]], cap: int) -> list[list[tuple[str, int, int]]]:
    """Cut streams (name, size), in order, into folders of at most ``cap`` bytes of chunks each.
    Returns, per folder, its chunks as (stream, offset, length). Pure arithmetic, for the tests."""
    room = cap - MANIFEST_RESERVE
    if room <= 0:
        raise KitError(f"cap {cap} leaves no room for data")
    folders: list[list[tuple[str, int, int]]] = [[]]
    free = room
    for name, size in sizes:
        off = 0
        while off < size:
            if free == 0:
                folders.append([])
                free = room
            n = min(free, size - off)
            folders[-1].append((name, off, n))
            off += n
            free -= n
    return [f for f in folders if f]


def split(streams: Sequence[tuple[str, str | Path]], out: str | Path, cap: int) -> dict[str, Any]:
    """Write the chunks of ``streams`` [(name, file)] into ``out``/p1, p2, ...; return their records."""
    out = Path(out)
    sizes = [(name, Path(p).stat().st_size) for name, p in streams]
    paths = dict(streams)
    plan = layout(sizes, cap)
    chunks: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in streams}
    for i, folder_chunks in enumerate(plan, start=1):
        folder = out / f"p{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, off, n in folder_chunks:
            index = len(chunks[name]) + 1
            fname = f"{name}.xz.{index:03d}"
            h = hashlib.sha256()
            with open(paths[name], "rb") as src, open(folder / fname, "wb") as dst:
                src.seek(off)
                left = n
                while left:
                    block = src.read(min(BUF, left))
                    if not block:
                        raise KitError(f"{paths[name]} ended early")
                    h.update(block)
                    dst.write(block)
                    left -= len(block)
            chunks[name].append({"folder": folder.name, "name": fname, "offset": off, "bytes": n,
                                 "sha256": h.hexdigest()})
    return {"folders": [f"p{i}" for i in range(1, len(plan) + 1)], "chunks": chunks}


def pack(streams: Sequence[tuple[str, Sequence[str | Path]]], out: str | Path, cap: int = DEFAULT_CAP, *,
         preset: int = 9 | lzma.PRESET_EXTREME, log: Any = print) -> dict[str, Any]:
    """Build every stream, cut them into ``out``/pN folders, write the manifest into ``out`` and each pN."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("p[0-9]*"):
        if old.is_dir():
            shutil.rmtree(old)
    built: list[tuple[str, Path]] = []
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cap_bytes": cap,
        "compression": f"xz (x86 BCJ + LZMA2, preset {preset & 0xF}{'e' if preset & lzma.PRESET_EXTREME else ''}, "
                       "dictionary up to 384 MiB); a tar of the wheels, repacked stored",
        "streams": {},
        "folders": {},
    }
    for name, files in streams:
        if not files:
            continue
        dst = out / f"{name}.tar.xz"
        log(f"[pack] stream {name}: {', '.join(Path(f).name for f in files)}")
        records = build_stream(files, dst, preset=preset, work=out)
        manifest["streams"][name] = {"bytes": dst.stat().st_size, "sha256": sha256_file(dst), "files": records}
        orig = sum(r["original_bytes"] for r in records)
        log(f"[pack] stream {name}: {orig / MIB:.1f} MiB of wheels -> {dst.stat().st_size / MIB:.1f} MiB xz")
        built.append((name, dst))
    cut = split(built, out, cap)
    for name, chunk_list in cut["chunks"].items():
        manifest["streams"][name]["chunks"] = chunk_list
    for folder in cut["folders"]:
        size = sum((out / folder / c["name"]).stat().st_size
                   for chunks in cut["chunks"].values() for c in chunks if c["folder"] == folder)
        manifest["folders"][folder] = {"bytes": size}
    text = json.dumps(manifest, indent=1) + "\n"
    (out / MANIFEST).write_text(text)
    for folder in cut["folders"]:
        (out / folder / MANIFEST).write_text(text)
    for _, path in built:
        path.unlink()  # the chunks hold it all
    return manifest


# -- stash / status / assemble (the GPU machine) -------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise KitError(f"{path} is missing")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise KitError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
    return dict(m)


def _all_chunks(m: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for name, s in m["streams"].items():
        for c in s["chunks"]:
            yield name, c


def stash(src: str | Path, dest: str | Path) -> list[str]:
    """Verify the chunks in every ``src``/pN folder that arrived and copy them into ``dest``.
    Returns the chunk names stashed (or found there already). Raises KitError on a damaged chunk."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    folders = sorted((p for p in src.glob("p[0-9]*") if (p / MANIFEST).is_file()), key=lambda p: int(p.name[1:]))
    done: list[str] = []
    for folder in folders:
        m = read_manifest(folder)
        old = dest / MANIFEST
        if old.is_file() and read_manifest(dest)["created"] != m["created"]:
            raise KitError(f"{folder} belongs to another pack ({m['created']}) than the parts in {dest} "
                           f"({read_manifest(dest)['created']}); remove {dest} or carry parts of one pack")
        shutil.copyfile(folder / MANIFEST, old)
        for _, c in _all_chunks(m):
            if c["folder"] != folder.name:
                continue
            have = folder / c["name"]
            target = dest / c["name"]
            if target.is_file() and target.stat().st_size == c["bytes"] and sha256_file(target) == c["sha256"]:
                done.append(c["name"])
                continue
            if not have.is_file():
                raise KitError(f"{have} is missing: the folder {folder.name} arrived incomplete; carry it again")
            if have.stat().st_size != c["bytes"] or sha256_file(have) != c["sha256"]:
                raise KitError(f"{have} is damaged (size or sha256 differs from the manifest); carry it again")
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(have, tmp)
            os.replace(tmp, target)
            done.append(c["name"])
    return done


def status(dest: str | Path) -> dict[str, dict[str, Any]]:
    """Per stream: chunks present (by size) and the folders still to carry."""
    dest = Path(dest)
    m = read_manifest(dest)
    out: dict[str, dict[str, Any]] = {}
    for name, s in m["streams"].items():
        missing = [c["folder"] for c in s["chunks"]
                   if not ((dest / c["name"]).is_file() and (dest / c["name"]).stat().st_size == c["bytes"])]
        out[name] = {"chunks": len(s["chunks"]), "present": len(s["chunks"]) - len(missing),
                     "missing_folders": sorted(set(missing), key=lambda f: int(f[1:])),
                     "files": [f["name"] for f in s["files"]]}
    return out


def assemble(dest: str | Path, stream: str, out: str | Path) -> list[Path]:
    """Join the chunks of ``stream``, check it, unpack its files into ``out`` and check each (wheels
    against their RECORD too). Returns the unpacked files' paths."""
    dest, out = Path(dest), Path(out)
    m = read_manifest(dest)
    if stream not in m["streams"]:
        raise KitError(f"no stream {stream!r} in {dest / MANIFEST} (streams: {', '.join(m['streams'])})")
    s = m["streams"][stream]
    st = status(dest)[stream]
    if st["missing_folders"]:
        raise KitError(f"stream {stream}: {st['present']}/{st['chunks']} chunks here; carry and stash "
                       f"{', '.join('.whl/' + f for f in st['missing_folders'])} first")
    out.mkdir(parents=True, exist_ok=True)
    joined = out / f"{stream}.tar.xz"
    h = hashlib.sha256()
    with open(joined, "wb") as w:
        for c in s["chunks"]:
            ch = hashlib.sha256()
            with open(dest / c["name"], "rb") as r:
                for block in _blocks(r):
                    ch.update(block)
                    h.update(block)
                    w.write(block)
            if ch.hexdigest() != c["sha256"]:
                raise KitError(f"{dest / c['name']} is damaged (sha256 differs); carry {c['folder']} again")
    if h.hexdigest() != s["sha256"]:
        raise KitError(f"stream {stream}: the joined file's sha256 differs from the manifest")
    names = {f["name"]: f for f in s["files"]}
    paths: list[Path] = []
    with tarfile.open(joined, "r:xz") as tar:
        for member in tar:
            if member.name not in names or not member.isfile():
                raise KitError(f"stream {stream}: unexpected entry {member.name!r}")
            target = out / member.name
            src = tar.extractfile(member)
            assert src is not None
            with src, open(target, "wb") as w:
                shutil.copyfileobj(src, w, BUF)
            paths.append(target)
    joined.unlink()
    for p in paths:
        rec = names[p.name]
        if sha256_file(p) != rec["sha256"]:
            raise KitError(f"{p}: sha256 differs from the manifest")
        if p.suffix == ".whl":
            verify_wheel_record(p)
    if sorted(p.name for p in paths) != sorted(names):
        raise KitError(f"stream {stream}: expected {sorted(names)}, unpacked {sorted(p.name for p in paths)}")
    return paths


# -- command line --------------------------------------------------------------------------------------


def _stream_arg(text: str) -> tuple[str, list[str]]:
    name, sep, files = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE[,FILE...], got {text!r}")
    return name, [f for f in files.split(",") if f]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="parts.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="build the streams and cut them into OUT/p1, p2, ...")
    a.add_argument("--out", required=True)
    a.add_argument("--cap", type=int, default=DEFAULT_CAP, help="bytes per folder (default 60 MiB)")
    a.add_argument("--stream", type=_stream_arg, action="append", required=True, help="NAME=FILE[,FILE...]")
    a.add_argument("--preset", type=int, default=9, help="xz preset 0-9 (default 9, extreme)")
    b = sub.add_parser("stash", help="verify the carried SRC/pN folders and copy their chunks into DEST")
    b.add_argument("--src", required=True)
    b.add_argument("--dest", required=True)
    c = sub.add_parser("status", help="which chunks of each stream are in DEST")
    c.add_argument("--dest", required=True)
    d = sub.add_parser("assemble", help="join, check and unpack a stream; print its files' paths")
    d.add_argument("--dest", required=True)
    d.add_argument("--stream", required=True)
    d.add_argument("--out", required=True)
    e = sub.add_parser("verify-wheel", help="check a wheel's members against its RECORD")
    e.add_argument("wheels", nargs="+")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            m = pack(args.stream, args.out, args.cap, preset=args.preset | lzma.PRESET_EXTREME)
            for folder, info in m["folders"].items():
                print(f"{folder}: {info['bytes'] / MIB:.2f} MiB")
        elif args.cmd == "stash":
            got = stash(args.src, args.dest)
            print(f"stashed or already there: {', '.join(got) or '(nothing carried)'}")
            _print_status(args.dest)
        elif args.cmd == "status":
            _print_status(args.dest)
        elif args.cmd == "assemble":
            for path in assemble(args.dest, args.stream, args.out):
                print(path)
        elif args.cmd == "verify-wheel":
            for w in args.wheels:
                print(f"{w}: {verify_wheel_record(w)} files match RECORD")
    except KitError as e:
        print(f"parts.py: error: {e}", file=sys.stderr)
        return 1
    return 0


def _print_status(dest: str | Path) -> None:
    for name, st in status(dest).items():
        left = ", ".join(st["missing_folders"]) or "none"
        print(f"stream {name}: {st['present']}/{st['chunks']} chunks here; folders still to carry: {left}")


if __name__ == "__main__":
    sys.exit(main())
