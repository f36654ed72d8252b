"""Output paths: a user's folder or file is never replaced unless asked, and every refusal comes before any work.

Each CLI case asserts the exit code, the message, and the file system afterwards (the user's files intact,
nothing hidden left beside them). "Before any work" is checked by making the first piece of work (loading
weights, the measurement run, binding TensorRT) fail loudly if it is reached.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from sdrt.cli import main
from sdrt.runtime.atomic import atomic_dir, check_output_dir
from sdrt.runtime.errors import InputError

from .helpers.bench_results import synthetic_results


def _no_work(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("work started before the output path was checked")


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The export command may not load weights: it must refuse first."""
    monkeypatch.setattr("sdrt.export.loading.load_model", _no_work)


def _user_folder(parent: Path, name: str = "mine") -> Path:
    d = parent / name
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    return d


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- export -----------------------------------------------------------------------------------------------

def test_export_refuses_a_user_folder(tmp_path: Path, no_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    d = _user_folder(tmp_path)
    assert main(["export", "--random", "sd15-tiny", "--fp32", "--out", str(d)]) == 1
    err = capsys.readouterr().err
    assert str(d) in err and "--overwrite" in err and "sdrt.json" in err and "overwrite=True" not in err
    assert (d / "notes.txt").read_text() == "my notes"
    assert _listing(tmp_path) == ["mine"]  # no .partial-* / .old-* beside it


def test_export_refuses_a_file_even_with_overwrite(tmp_path: Path, no_load: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "report.txt"
    f.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--random", "sd15-tiny", "--out", str(f), *extra]) == 1
        err = capsys.readouterr().err
        assert str(f) in err and "not a folder" in err
        assert f.is_file() and f.read_text() == "keep me"
        assert _listing(tmp_path) == ["report.txt"]


def test_export_refuses_the_current_folder_and_its_ancestors(tmp_path: Path, no_load: None,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    top = _user_folder(tmp_path, "top")
    here = top / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    for out, where in ((".", "the current folder"), ("..", "a folder above"), (str(top), "a folder above")):
        for extra in ([], ["--overwrite"]):
            assert main(["export", "--random", "sd15-tiny", "--out", out, *extra]) == 1
            err = capsys.readouterr().err
            assert where in err and out in err, err
    assert _listing(tmp_path) == ["top"] and _listing(top) == ["a", "notes.txt"] and _listing(here) == []


def test_export_overwrite_then_reexport_replaces_whole_with_umask_modes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _user_folder(tmp_path)
    old_umask = os.umask(0o027)  # not the usual 022, so a mode that ignores the umask shows
    try:
        assert main(["export", "--random", "sd15-tiny", "--fp32", "--out", str(d), "--overwrite"]) == 0
    finally:
        os.umask(old_umask)
    assert not (d / "notes.txt").exists() and (d / "sdrt.json").is_file()
    assert _listing(tmp_path) == ["mine"]
    files = [p for p in d.rglob("*") if p.is_file()]
    assert (d / "unet" / "model.onnx_data") in files  # the file onnx writes with its own mode
    assert {str(p.relative_to(d)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        str(p.relative_to(d)): oct(0o666 & ~0o027) for p in files}
    dirs = [d, *(p for p in d.rglob("*") if p.is_dir())]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {str(p): oct(0o777 & ~0o027) for p in dirs}

    # a previous export is replaced without the flag, whole: what only the old folder held (here a component
    # its manifest names, as an export with a ControlNet has) is gone
    manifest = json.loads((d / "sdrt.json").read_text())
    manifest["components"]["controlnet_0"] = {**manifest["components"]["unet"], "path": "controlnet_0/model.onnx"}
    (d / "sdrt.json").write_text(json.dumps(manifest))
    (d / "controlnet_0").mkdir()
    (d / "controlnet_0" / "model.onnx").write_bytes(b"from the previous export")
    capsys.readouterr()
    assert main(["export", "--random", "sd15-tiny", "--fp32", "--seed", "1", "--out", str(d)]) == 0
    assert not (d / "controlnet_0").exists()
    assert json.loads((d / "sdrt.json").read_text())["source"]["seed"] == 1
    assert _listing(tmp_path) == ["mine"]

    # a file the manifest does not name is the user's: refused, named, and kept; --overwrite replaces it all
    (d / "stale.bin").write_bytes(b"put here by hand")
    assert main(["export", "--random", "sd15-tiny", "--fp32", "--seed", "2", "--out", str(d)]) == 1
    err = capsys.readouterr().err
    assert "stale.bin" in err and "sdrt.json does not name" in err and "--overwrite" in err
    assert (d / "stale.bin").read_bytes() == b"put here by hand"
    assert json.loads((d / "sdrt.json").read_text())["source"]["seed"] == 1
    assert main(["export", "--random", "sd15-tiny", "--fp32", "--seed", "2", "--out", str(d), "--overwrite"]) == 0
    assert not (d / "stale.bin").exists() and json.loads((d / "sdrt.json").read_text())["source"]["seed"] == 2
    assert _listing(tmp_path) == ["mine"]


def test_export_into_an_empty_folder_needs_no_flag(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", marker="sdrt.json") == tmp_path / "empty"


def test_export_api_refuses_before_exporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdrt.export import exporter

    monkeypatch.setattr(exporter, "component_specs", _no_work)
    d = _user_folder(tmp_path)
    with pytest.raises(InputError, match="overwrite=True") as e:
        exporter.export_model(object(), d)  # type: ignore[arg-type]
    assert "--overwrite" not in str(e.value) and "--overwrite" in e.value.for_cli()
    assert _listing(d) == ["notes.txt"]


# -- atomic_dir: the last line ----------------------------------------------------------------------------

def test_atomic_dir_refuses_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _user_folder(tmp_path)
    with pytest.raises(InputError, match="no sdrt.json"), atomic_dir(d, marker="sdrt.json"):
        raise AssertionError("the body must not run")
    with atomic_dir(d, marker="sdrt.json", overwrite=True) as tmp:
        (tmp / "sdrt.json").write_text("{}")
    assert _listing(d) == ["sdrt.json"] and _listing(tmp_path) == ["mine"]
    monkeypatch.chdir(d)
    with pytest.raises(InputError, match="current folder"), atomic_dir(".", marker="sdrt.json"):
        raise AssertionError("the body must not run")
    assert _listing(tmp_path) == ["mine"]


# -- build --------------------------------------------------------------------------------------------------

def test_build_refuses_a_user_folder_a_file_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sdrt.runtime.manifest.ExportManifest.read", _no_work)
    d = _user_folder(tmp_path)
    assert main(["build", str(tmp_path / "onnx"), "--out", str(d)]) == 1
    err = capsys.readouterr().err
    assert str(d) in err and "--overwrite" in err and "sdrt-engines.json" in err
    f = tmp_path / "engines"
    f.write_text("a file")
    assert main(["build", str(tmp_path / "onnx"), "--out", str(f), "--overwrite"]) == 1
    assert "not a folder" in capsys.readouterr().err
    monkeypatch.chdir(d)
    assert main(["build", str(tmp_path / "onnx"), "--out", ".", "--overwrite"]) == 1
    assert "current folder" in capsys.readouterr().err
    assert _listing(d) == ["notes.txt"] and f.read_text() == "a file"
    assert _listing(tmp_path) == ["engines", "mine"]


def test_build_engines_checks_before_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdrt.export import trt_build
    from sdrt.export.profiles import custom_profile

    monkeypatch.setattr(trt_build, "load_tensorrt", _no_work)
    d = _user_folder(tmp_path)
    with pytest.raises(InputError, match="not an sdrt engine folder"):
        trt_build.build_engines(tmp_path / "onnx", d, custom_profile(batch=1))
    # a previous engine folder, and any folder with overwrite, get past the check (to TensorRT)
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "sdrt-engines.json").write_text(json.dumps({"engines": [{"file": "unet.engine"}]}))
    (prev / "unet.engine").write_bytes(b"x")
    for out, overwrite in ((prev, False), (d, True)):
        with pytest.raises(AssertionError, match="work started"):
            trt_build.build_engines(tmp_path / "onnx", out, custom_profile(batch=1), overwrite=overwrite)
    assert _listing(d) == ["notes.txt"]
    # a previous engine folder that also holds a file its manifests do not name is refused before TensorRT
    (prev / "notes.txt").write_text("my notes")
    with pytest.raises(InputError, match="notes.txt, which its sdrt-engines.json does not name"):
        trt_build.build_engines(tmp_path / "onnx", prev, custom_profile(batch=1))
    assert _listing(prev) == ["notes.txt", "sdrt-engines.json", "unet.engine"]


# -- refit --------------------------------------------------------------------------------------------------

def test_refit_out_refuses_a_user_folder_before_loading_weights(tiny_export, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.export import refit

    monkeypatch.setattr(refit, "new_weights", _no_work)
    d = _user_folder(tmp_path)
    assert main(["refit", str(tiny_export("sd15-tiny")), "--base", "--out", str(d)]) == 1
    err = capsys.readouterr().err
    assert str(d) in err and "--overwrite" in err
    assert _listing(d) == ["notes.txt"] and _listing(tmp_path) == ["mine"]


def test_refit_in_place_refuses_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sdrt.runtime.engine_manifest.EngineManifest.read", _no_work)
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "sdrt-engines.json").write_text("{}")
    monkeypatch.chdir(engines)
    assert main(["refit", ".", "--base"]) == 1
    assert "current folder" in capsys.readouterr().err
    assert _listing(engines) == ["sdrt-engines.json"] and _listing(tmp_path) == ["engines"]


# -- bench -o and bench report -o -------------------------------------------------------------------------

BENCH = ["bench", "--preset", "sd15-tiny", "--backends", "ort-cpu", "--baseline", "none"]


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the measurement with a hand-written result; count the runs."""
    runs: list[int] = []

    def run_bench(cfg: Any, progress: Any = None) -> dict[str, Any]:
        runs.append(1)
        return synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 3 * 2**30)

    monkeypatch.setattr("sdrt.benchmarks.bench.run_bench", run_bench)
    return runs


def test_bench_output_refuses_a_user_file_and_a_folder(tmp_path: Path, fake_run: list[int],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "results.json"
    f.write_text('{"mine": true}')
    assert main([*BENCH, "-o", str(f)]) == 1
    err = capsys.readouterr().err
    assert str(f) in err and "--overwrite" in err and "not an sdrt bench result" in err
    assert f.read_text() == '{"mine": true}'
    d = _user_folder(tmp_path)
    assert main([*BENCH, "-o", str(d), "--overwrite"]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert fake_run == []  # refused before the run
    assert _listing(tmp_path) == ["mine", "results.json"] and _listing(d) == ["notes.txt"]


def test_bench_output_replaces_a_previous_result_or_with_overwrite(tmp_path: Path, fake_run: list[int]) -> None:
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"schema": "sdrt-bench", "schema_version": 1, "old": True}))
    assert main([*BENCH, "-o", str(prev)]) == 0
    assert "old" not in json.loads(prev.read_text()) and json.loads(prev.read_text())["schema"] == "sdrt-bench"
    user = tmp_path / "user.json"
    user.write_text("not json at all")
    assert main([*BENCH, "-o", str(user), "--overwrite"]) == 0
    assert json.loads(user.read_text())["schema"] == "sdrt-bench"
    assert fake_run == [1, 1]
    assert _listing(tmp_path) == ["prev.json", "user.json"]


def test_bench_report_keeps_unrelated_files_and_refuses_a_user_bench_md(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = tmp_path / "a.json"
    res.write_text(json.dumps(synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 3 * 2**30)))
    out = _user_folder(tmp_path, "out")
    assert main(["bench", "report", str(res), "-o", str(out)]) == 0
    assert _listing(out) == ["bench.md", "bench.png", "notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    # a report over a previous report needs no flag
    assert main(["bench", "report", str(res), "-o", str(out)]) == 0
    capsys.readouterr()

    mine = _user_folder(tmp_path, "mine")
    (mine / "bench.md").write_text("# my own benchmark notes\n")
    assert main(["bench", "report", str(res), "-o", str(mine)]) == 1
    err = capsys.readouterr().err
    assert str(mine / "bench.md") in err and "--overwrite" in err
    assert (mine / "bench.md").read_text() == "# my own benchmark notes\n" and _listing(mine) == ["bench.md", "notes.txt"]
    (mine / "bench.md").unlink()
    (mine / "bench.png").write_bytes(b"\x89PNG\r\n\x1a\n my holiday photo")
    assert main(["bench", "report", str(res), "-o", str(mine)]) == 1
    assert str(mine / "bench.png") in capsys.readouterr().err
    assert (mine / "bench.png").read_bytes().endswith(b"my holiday photo") and _listing(mine) == ["bench.png",
                                                                                                   "notes.txt"]
    assert main(["bench", "report", str(res), "-o", str(mine), "--overwrite"]) == 0
    assert (mine / "bench.md").read_text().startswith("# sdrt benchmark report")
    assert not (mine / "bench.png").read_bytes().endswith(b"my holiday photo")
    assert _listing(mine) == ["bench.md", "bench.png", "notes.txt"]


# -- modes of ONNX weights files written outside the export -------------------------------------------------

def test_onnx_weights_files_get_the_umask_mode(tmp_path: Path) -> None:
    """The refit copy and the ort-cuda variant save graphs themselves; onnx writes their weights 0600."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from sdrt.export import ort_fusion, refit

    w = numpy_helper.from_array(np.ones((32, 32), np.float32), "w")  # 4 KB: above the external-data threshold
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])], [w])
    model = helper.make_model(graph)
    old_umask = os.umask(0o027)
    try:
        refit.save_graph(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "a" / "model.onnx", True)
        ort_fusion.save_graph(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "b" / "v.onnx",
                              external=True)
    finally:
        os.umask(old_umask)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["a/model.onnx", "a/model.onnx_data", "b/v.onnx", "b/v.onnx_data"]
    assert {p: oct(stat.S_IMODE((tmp_path / p).stat().st_mode)) for p in written} == {p: "0o640" for p in written}
