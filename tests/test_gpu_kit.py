"""The GPU measurement kit (benchmarks/gpu): wheels cut into parts and put back together, checked at
every step; the device script's syntax and its stash/install glue, rehearsed on tiny fake wheels.

No network, no GPU: the real kit (prepare.sh) downloads, and device.sh's measure step runs, elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu"


def _load_parts():
    spec = importlib.util.spec_from_file_location("sdrt_gpu_kit_parts", KIT / "parts.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


parts = _load_parts()


def _fake_wheel(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (deflated, like PyPI's), its RECORD holding every member's sha256."""
    dist = f"{name}-1.0.dist-info"
    members = dict(files)
    members[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()
    members[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    rows = []
    for n, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{n},sha256={digest},{len(data)}")
    rows.append(f"{dist}/RECORD,,")
    members[f"{dist}/RECORD"] = ("\n".join(rows) + "\n").encode()
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    return path


@pytest.fixture()
def wheels(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    rng = __import__("random").Random(7)
    blob = bytes(rng.getrandbits(8) for _ in range(40_000))  # incompressible: several parts
    return {
        "pre": _fake_wheel(src, "fakediff", {"fakediff/__init__.py": b"VERSION = '1.0'\n" * 50}),
        # the CPU onnxruntime of the background export: installed for it, left out of the measurement's site
        "pre-ort": _fake_wheel(src, "onnxruntime", {"onnxruntime_cpu_marker.py": b"CPU = True\n"}),
        "core": _fake_wheel(src, "fakeort", {"fakeort/__init__.py": b"X = 1\n", "fakeort/lib.so": blob}),
    }


def test_layout_fills_folders_in_stream_order() -> None:
    cap = parts.MANIFEST_RESERVE + 100
    plan = parts.layout([("pre", 30), ("core", 250), ("rtx", 60)], cap)
    assert plan == [
        [("pre", 0, 30), ("core", 0, 70)],
        [("core", 70, 100)],
        [("core", 170, 80), ("rtx", 0, 20)],
        [("rtx", 20, 40)],
    ]
    assert all(sum(n for _, _, n in f) <= 100 for f in plan)
    with pytest.raises(parts.KitError):
        parts.layout([("x", 1)], parts.MANIFEST_RESERVE)


def test_repack_keeps_the_files_and_record(wheels: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "stored.whl"
    parts.repack_stored(wheels["core"], out)
    with zipfile.ZipFile(wheels["core"]) as a, zipfile.ZipFile(out) as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist())
        assert {i.compress_type for i in b.infolist()} == {zipfile.ZIP_STORED}
    assert parts.verify_wheel_record(out) == 4  # two files, METADATA, WHEEL (RECORD has no hash)


def test_record_check_catches_an_altered_member(wheels: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheels["core"]) as a, zipfile.ZipFile(bad, "w") as b:
        for info in a.infolist():
            data = a.read(info)
            b.writestr(info.filename, data.replace(b"X = 1", b"X = 2"))
    with pytest.raises(parts.KitError, match="does not match"):
        parts.verify_wheel_record(bad)


def _pack(wheels: dict[str, Path], out: Path) -> dict:
    cap = parts.MANIFEST_RESERVE + 16_000
    streams = [("pre", [wheels["pre"], wheels["pre-ort"]]), ("core", [wheels["core"]])]
    return parts.pack(streams, out, cap, preset=1, log=lambda m: None)


def test_pack_stash_assemble_round_trip(wheels: dict[str, Path], tmp_path: Path) -> None:
    whl, dest = tmp_path / "whl", tmp_path / "device-parts"
    m = _pack(wheels, whl)
    folders = list(m["folders"])
    assert len(folders) >= 3, folders  # 40 kB of random bytes in 16 kB folders
    for f in folders:
        assert sum(p.stat().st_size for p in (whl / f).iterdir()) <= m["cap_bytes"]
        assert (whl / f / parts.MANIFEST).is_file()
    for name, s in m["streams"].items():
        rec = s["files"][0]
        assert rec["name"] == wheels[name].name and rec["original_sha256"] == parts.sha256_file(wheels[name])
    # the device: one folder per call, the earlier ones gone from the checkout
    arrived = tmp_path / "checkout-whl"
    for i, f in enumerate(folders):
        if arrived.exists():
            shutil.rmtree(arrived)
        shutil.copytree(whl / f, arrived / f)
        parts.stash(arrived, dest)
        st = parts.status(dest)
        if i < len(folders) - 1:
            assert st["core"]["missing_folders"], st
            with pytest.raises(parts.KitError, match="carry and stash"):
                parts.assemble(dest, "core", tmp_path / "early")
    assert all(not s["missing_folders"] for s in parts.status(dest).values())
    got = parts.assemble(dest, "pre", tmp_path / "wheels") + parts.assemble(dest, "core", tmp_path / "wheels")
    assert [p.name for p in got] == [wheels[k].name for k in ("pre", "pre-ort", "core")]
    for path, key in zip(got, ("pre", "pre-ort", "core")):
        with zipfile.ZipFile(wheels[key]) as a, zipfile.ZipFile(path) as b:
            assert all(a.read(n) == b.read(n) for n in a.namelist())


def test_stash_refuses_a_damaged_chunk_and_a_foreign_pack(wheels: dict[str, Path], tmp_path: Path) -> None:
    whl = tmp_path / "whl"
    m = _pack(wheels, whl)
    chunk = whl / "p2" / m["streams"]["core"]["chunks"][1]["name"]
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(parts.KitError, match="damaged"):
        parts.stash(whl, tmp_path / "dest")
    other = tmp_path / "other"
    m2 = _pack(wheels, other)
    m2["created"] = "another pack"
    (other / "p1" / parts.MANIFEST).write_text(__import__("json").dumps(m2))
    dest = tmp_path / "dest2"
    shutil.copytree(whl / "p1", tmp_path / "one" / "p1")
    parts.stash(tmp_path / "one", dest)
    with pytest.raises(parts.KitError, match="another pack"):
        parts.stash(other, dest)


@pytest.mark.parametrize("script", ["device.sh", "prepare.sh", "rehearse.sh"])
def test_scripts_parse(script: str) -> None:
    r = subprocess.run(["bash", "-n", str(KIT / script)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_device_script_rehearses_stash_and_install(wheels: dict[str, Path], tmp_path: Path) -> None:
    """device.sh's glue on this machine: stash two calls' folders, then install (pip --target, sdrt
    linked from the tree, an onnxruntime session on the CPU EP in a rehearsal, `sdrt info`)."""
    whl = tmp_path / "whl"
    m = _pack(wheels, whl)
    env = dict(os.environ, SDRT_GPU_KIT_REHEARSAL="1", SDRT_KIT=str(tmp_path / "kit"), PYTHON=sys.executable,
               SDRT_KIT_WHL=str(tmp_path / "carried"), OUT=str(tmp_path / "out"))

    def device(*args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(KIT / "device.sh"), *args], env=env, check=False, capture_output=True,
                              text=True, cwd=ROOT, timeout=timeout)

    carried = tmp_path / "carried"
    for f in m["folders"]:
        if carried.exists():
            shutil.rmtree(carried)
        shutil.copytree(whl / f, carried / f)
        r = device("stash")
        assert r.returncode == 0, r.stdout + r.stderr
    assert "stream core: " in r.stdout and "folders still to carry: none" in r.stdout, r.stdout
    r = device("install", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    site = tmp_path / "kit" / "site"
    assert (site / "fakeort" / "lib.so").is_file() and (site / "fakediff" / "__init__.py").is_file()
    assert not (site / "onnxruntime_cpu_marker.py").exists()  # pre's CPU onnxruntime stays out
    assert (site / "sdrt" / "export").resolve() == (ROOT / "export").resolve()
    assert "CPUExecutionProvider: a Conv + MatMul session ran" in r.stdout
    assert "backends:" in r.stdout  # sdrt info, run from the linked tree
    log = (tmp_path / "out" / "log").read_text()
    assert "step install: ok" in log and "step stash: ok" in log
    r = device("measure", "nonsense")
    assert r.returncode != 0 and "unknown preset" in r.stdout
