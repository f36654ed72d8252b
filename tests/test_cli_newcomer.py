"""A newcomer's first hour: the CLI never destroys a file it was not asked to replace, and every refusal names
what the user gave (the image, the flag, the folder), not a flag they never passed; refusals come before any
work. CLI cases run in-process (``sdrt.cli.main``) and check the exit code, the message and the files after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.runtime.pipeline import Pipeline

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sd15(tiny_export) -> Path:
    return tiny_export("sd15-tiny", "fp32")


def _no_work(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("work started before the request was checked")


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate may not load the model, export may not load weights: they must refuse first."""
    monkeypatch.setattr(Pipeline, "load", _no_work)
    monkeypatch.setattr("sdrt.export.loading.load_model", _no_work)


def _generate(sd15: Path, *extra: str) -> int:
    return main(["generate", str(sd15), "--prompt", "a cat", "--steps", "1", "--seed", "1", "--backend", "ort-cpu",
                 *extra])


def _image(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    Image.new("RGB", size, (90, 120, 150)).save(path)
    return path


# -- generate: output files ------------------------------------------------------------------------------

def test_generate_without_o_takes_the_first_free_name(sd15: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.png").write_bytes(b"my picture")
    (tmp_path / "out-0001.png").write_bytes(b"an earlier run, kept")
    assert _generate(sd15) == 0
    assert (tmp_path / "out.png").read_bytes() == b"my picture"
    assert (tmp_path / "out-0001.png").read_bytes() == b"an earlier run, kept"
    assert (tmp_path / "out-0002.png").read_bytes()[:8] == PNG
    assert "wrote out-0002.png" in capsys.readouterr().out
    # a batch takes one free name per image, skipping the taken ones
    (tmp_path / "out-0004.png").write_bytes(b"taken")
    assert _generate(sd15, "--batch-size", "2") == 0
    assert (tmp_path / "out-0004.png").read_bytes() == b"taken"
    assert sorted(os.listdir(tmp_path)) == ["out-0001.png", "out-0002.png", "out-0003.png", "out-0004.png",
                                            "out-0005.png", "out.png"]  # no temporary left behind
    assert all((tmp_path / f"out-000{i}.png").read_bytes()[:8] == PNG for i in (3, 5))


def test_generate_help_says_the_default_output_and_overwrite(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "out-0001.png" in text and "--overwrite" in text and "first free" in text


def test_generate_refuses_an_existing_o_before_any_work(sd15: Path, tmp_path: Path, no_load: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    assert _generate(sd15, "-o", str(mine)) == 1
    err = capsys.readouterr().err
    assert str(mine) in err and "already exists" in err and "--overwrite" in err
    # a batch: each file it would write follows the rule
    (tmp_path / "mine_2.png").write_bytes(b"mine too")
    assert _generate(sd15, "--batch-size", "3", "-o", str(mine)) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "mine_2.png") in err and "mine_1.png" not in err and "--overwrite" in err
    assert mine.read_bytes() == b"my picture" and (tmp_path / "mine_2.png").read_bytes() == b"mine too"
    assert sorted(os.listdir(tmp_path)) == ["mine.png", "mine_2.png"]


@pytest.mark.parametrize("flag", ["--init-image", "--mask", "--control-image"])
def test_generate_refuses_o_that_is_an_input_even_with_overwrite(sd15: Path, tmp_path: Path, no_load: None,
                                                                 monkeypatch: pytest.MonkeyPatch, flag: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "in.png")
    before = img.read_bytes()
    (tmp_path / "link.png").symlink_to(img)
    monkeypatch.chdir(tmp_path)
    extra = ["--init-image", str(_image(tmp_path / "init.png"))] if flag == "--mask" else []
    for out in ("in.png", str(img), "./sub/../in.png", "link.png"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        for overwrite in ([], ["--overwrite"]):
            assert _generate(sd15, *extra, flag, "in.png", "-o", out, *overwrite) == 1
            err = capsys.readouterr().err
            assert f"is the same file as {flag} in.png" in err and "even with --overwrite" in err, err
    assert img.read_bytes() == before


def test_generate_o_in_a_folder_that_takes_no_files_says_so(sd15: Path, no_load: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    assert _generate(sd15, "-o", "/proc/out.png") == 1
    err = capsys.readouterr().err
    assert "cannot write to the folder /proc: it is not writable" in err and "does not exist" not in err, err


def test_write_output_moves_on_when_a_default_name_appears_meanwhile(tmp_path: Path) -> None:
    from sdrt.commands.generate import _write_output
    from sdrt.runtime.atomic import atomic_write_new_bytes
    from sdrt.runtime.errors import InputError

    img = Image.new("RGB", (8, 8))
    (tmp_path / "out-0001.png").write_bytes(b"appeared")
    (tmp_path / "out-0002.png").write_bytes(b"appeared too")
    assert _write_output(img, tmp_path / "out-0001.png", fresh=True, overwrite=False) == tmp_path / "out-0003.png"
    with pytest.raises(InputError, match="appeared while generating"):
        _write_output(img, tmp_path / "out-0001.png", fresh=False, overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write_new_bytes(tmp_path / "out-0002.png", b"new")
    assert (tmp_path / "out-0001.png").read_bytes() == b"appeared"
    assert (tmp_path / "out-0002.png").read_bytes() == b"appeared too"
    assert sorted(os.listdir(tmp_path)) == ["out-0001.png", "out-0002.png", "out-0003.png"]


# -- generate: image sizes --------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [4, 16, 4000])
@pytest.mark.parametrize("flag", ["--init-image", "--control-image"])
def test_generate_image_size_is_named_with_the_image(sd15: Path, tmp_path: Path, no_load: None, side: int, flag: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / f"img{side}.png", (side, side))
    assert _generate(sd15, flag, str(img), "-o", str(tmp_path / "o.png")) == 1
    err = capsys.readouterr().err
    assert f"{flag} {img} is {side}x{side} pixels" in err and "64 to 2048" in err, err
    assert "--height and --width" in err and f"--height {side}" not in err and "8x8" not in err
    assert sorted(os.listdir(tmp_path)) == [img.name]


def test_generate_image_size_names_only_the_missing_flag(sd15: Path, tmp_path: Path, no_load: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "wide.png", (16, 128))
    assert _generate(sd15, "--init-image", str(img), "--height", "64", "-o", str(tmp_path / "o.png")) == 1
    err = capsys.readouterr().err
    assert f"--init-image {img} is 16x128 pixels: without --width" in err and "--height and" not in err, err
    # both sides given: the image is resized to them, so its own size is no objection (the load is reached)
    with pytest.raises(AssertionError, match="work started"):
        _generate(sd15, "--init-image", str(img), "--height", "64", "--width", "64", "-o", str(tmp_path / "o.png"))
    # an image inside the range, rounded down as the pipeline does (70 -> 64), is no objection either
    with pytest.raises(AssertionError, match="work started"):
        _generate(sd15, "--init-image", str(_image(tmp_path / "ok.png", (70, 64))), "-o", str(tmp_path / "o.png"))


# -- export ------------------------------------------------------------------------------------------------

def test_export_lora_with_a_bad_scale_says_the_scale(tmp_path: Path, no_load: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not read: refused first")
    out = tmp_path / "onnx"
    assert main(["export", "--random", "sd15-tiny", "--out", str(out), "--lora", f"{lora}:abc"]) == 1
    err = capsys.readouterr().err
    assert "the scale 'abc' is not a number" in err and f"{lora}:0.8" in err and "does not exist" not in err, err
    assert main(["export", "--random", "sd15-tiny", "--out", str(out), "--lora", str(tmp_path / "no.safetensors")]) == 1
    assert "no.safetensors does not exist" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["style.safetensors"]


def _fake_export(folder: Path) -> Path:
    folder.mkdir()
    comps = {name: {"path": f"{name}/model.onnx", "variants": {}} for name in ("text_encoder", "unet", "vae_decoder")}
    comps["unet"]["variants"] = {"ort-cuda": "unet_ort_cuda/model.onnx"}
    (folder / "sdrt.json").write_text(json.dumps({"components": comps}))
    for name in ("text_encoder", "unet", "vae_decoder", "unet_ort_cuda", "tokenizer", "scheduler"):
        (folder / name).mkdir()
        (folder / name / "model.onnx").write_bytes(b"x")
    (folder / "model_index.json").write_text("{}")
    return folder


def test_reexport_refuses_a_previous_export_holding_user_files(tmp_path: Path, no_load: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.runtime.atomic import check_output_dir
    from sdrt.runtime.manifest import export_entries

    d = _fake_export(tmp_path / "onnx")
    # all of it named by its manifest: replaceable without the flag
    assert check_output_dir(d, marker="sdrt.json", owned=export_entries) == d
    (d / "notes.txt").write_text("my notes")
    (d / "lora.safetensors").write_bytes(b"mine")
    assert main(["export", "--random", "sd15-tiny", "--out", str(d)]) == 1
    err = capsys.readouterr().err
    assert "lora.safetensors, notes.txt, which its sdrt.json does not name" in err and "--overwrite" in err, err
    assert "would delete them" in err and "Move them out" in err
    assert (d / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["onnx"]
    # an unreadable manifest names nothing but itself
    (d / "notes.txt").unlink()
    (d / "lora.safetensors").unlink()
    (d / "sdrt.json").write_text("{not json")
    assert main(["export", "--random", "sd15-tiny", "--out", str(d)]) == 1
    assert "model_index.json, scheduler, text_encoder" in capsys.readouterr().err


def test_refit_out_refuses_a_previous_export_holding_user_files(tiny_export, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.export import refit

    monkeypatch.setattr(refit, "new_weights", _no_work)
    d = _fake_export(tmp_path / "refitted")
    (d / "notes.txt").write_text("my notes")
    assert main(["refit", str(tiny_export("sd15-tiny")), "--base", "--out", str(d)]) == 1
    assert "notes.txt, which its sdrt.json does not name" in capsys.readouterr().err
    assert (d / "notes.txt").read_text() == "my notes"


# -- info, bench report, demo, --version -------------------------------------------------------------------

def test_info_checks_the_path_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.commands import info

    monkeypatch.setattr(info, "_tensorrt_lines", _no_work)  # the slow environment survey
    assert main(["info", str(tmp_path / "nonexistent")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"{tmp_path / 'nonexistent'} does not exist" in err
    (tmp_path / "file").write_text("x")
    assert main(["info", str(tmp_path / "file")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "is not a folder" in err


def test_info_says_what_auto_picks(sd15: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.runtime.pipeline import make_backend

    picked = make_backend("auto", sd15).name  # the runtime's own choice is the reference
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("auto"))
    assert f"an ONNX export: {picked} " in line and "an engine folder: tensorrt" in line, line


def test_demo_help_knows_openvino(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "openvino" in text and "else openvino when it is installed" in text


def test_demo_size_is_checked_before_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sdrt.export.exporter.export_model", _no_work)
    monkeypatch.setattr("sdrt.export.loading.load_model", _no_work)
    for size in ("65", "32", "4096"):
        assert main(["demo", "--out", str(tmp_path / "demo"), "--size", size]) == 1
        err = capsys.readouterr().err
        assert f"--size {size} is not supported" in err and "from 64 to 2048" in err
        assert "default (64 for the shapes model, 256 for a --preset)" in err
        assert "--height" not in err
    assert os.listdir(tmp_path) == []


def test_bench_report_refuses_a_readme_without_markers_before_writing(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from .helpers.bench_results import synthetic_results

    res = tmp_path / "a.json"
    res.write_text(json.dumps(synthetic_results("NVIDIA H100", "ort-cuda", 40.0, 3 * 2**30)))
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    out = tmp_path / "report"
    assert main(["bench", "report", str(res), "-o", str(out), "--readme", str(readme)]) == 1
    err = capsys.readouterr().err
    assert "bench:start" in err and str(readme) in err
    assert not out.exists() and readme.read_text() == "# no markers here\n"
    assert main(["bench", "report", str(res), "-o", str(out), "--readme", str(tmp_path / "NOPE.md")]) == 1
    assert "cannot read --readme" in capsys.readouterr().err and not out.exists()


def test_version_comes_from_the_installed_distribution(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    import sdrt

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.8.7" if name == "sdrt" else "?")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == "sdrt 9.8.7\n"

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)  # a checkout on sys.path, not installed
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"sdrt {sdrt.__version__}\n"


def test_changelog_lists_these_fixes() -> None:
    text = (Path(__file__).resolve().parent.parent / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog") and "## [Unreleased]" in text
    unreleased = text.split("## [Unreleased]")[1].split("\n## ")[0]
    for words in ("out-0001.png", "--overwrite", "--init-image", "--version", "sdrt info", "--size"):
        assert words in unreleased, words

