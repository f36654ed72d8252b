"""``sdrt generate --cache deepcache``: the image the bare ``Pipeline(..., cache="deepcache")`` makes, the loop
line saying how many steps ran the full UNet, and refusals of bad cache flags before the model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.runtime.feature_cache import INTERVAL_MAX
from sdrt.runtime.pipeline import Pipeline


def _generate(folder: Path, out: Path, *extra: str) -> int:
    return main(["generate", str(folder), "--prompt", "a cat", "--steps", "6", "--seed", "1", "--backend", "ort-cpu",
                 "-o", str(out), *extra])


def _no_work(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded before the flags were checked")


@pytest.mark.parametrize("extra, full", [
    (["--cache-interval", "3"], "2 of 6 steps ran the full UNet"),
    ([], "2 of 6 steps ran the full UNet"),  # the default interval, 3
    (["--cache-interval", "2"], "3 of 6 steps ran the full UNet"),
])
def test_generate_with_cache_makes_the_pipelines_image(deepcache_export, tmp_path: Path, extra: list[str],
                                                       full: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = deepcache_export("sd15-tiny")
    out = tmp_path / "cat.png"
    assert _generate(folder, out, "--cache", "deepcache", *extra) == 0
    printed = capsys.readouterr().out
    assert f"feature cache deepcache (every {extra[1] if extra else 3}): {full}" in printed, printed
    interval = int(extra[1]) if extra else 3
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        direct = pipe("a cat", steps=6, seed=1, cache="deepcache", cache_interval=interval)
        plain = pipe("a cat", steps=6, seed=1)
    got = np.asarray(Image.open(out).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(direct.images[0]))
    assert not np.array_equal(got, np.asarray(plain.images[0]))  # the flag reached the loop


@pytest.mark.parametrize("flags, says", [
    (["--cache", "deepcache", "--cache-interval", "0"],
     f"--cache-interval must be an integer from 1 to {INTERVAL_MAX}, got 0"),
    (["--cache", "deepcache", "--cache-interval", str(INTERVAL_MAX + 1)],
     f"--cache-interval must be an integer from 1 to {INTERVAL_MAX}, got {INTERVAL_MAX + 1}"),
    (["--cache", "deepcache", "--cache-schedule", "nonuniform", "--cache-interval", "2", "--steps", "30"],
     "--cache-schedule nonuniform has no plan for --steps 30 at --cache-interval 2: pass --cache-schedule uniform"),
    (["--cache-interval", "4"], "--cache-interval applies to feature caching: pass --cache deepcache"),
    (["--cache-schedule", "nonuniform"], "--cache-schedule applies to feature caching: pass --cache deepcache"),
])
def test_bad_cache_flags_are_refused_before_loading(deepcache_export, tmp_path: Path, flags: list[str],
                                                    says: str, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Pipeline, "load", _no_work)
    assert _generate(deepcache_export("sd15-tiny"), tmp_path / "x.png", *flags) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_unknown_cache_kind_names_the_choices(deepcache_export, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _generate(deepcache_export("sd15-tiny"), tmp_path / "x.png", "--cache", "fastcache")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --cache: invalid choice: 'fastcache'" in err and "deepcache" in err, err


def test_cache_on_an_export_without_the_shallow_path_names_the_fix(tiny_export, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert _generate(tiny_export("sd15-tiny"), tmp_path / "x.png", "--cache", "deepcache") == 1
    err = capsys.readouterr().err
    assert "has no cheap step for feature caching" in err and "sdrt export ... --feature-cache" in err, err
    assert "leave --cache out" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_generate_with_cache_and_control_images_makes_the_pipelines_image(tiny_controlnet_export, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--cache deepcache`` with ``--control-image`` on an export made with both: the bare call's image (that the
    cached, controlled loop matches DeepCache's own: tests/test_feature_cache_controlnet.py)."""
    from .helpers.inputs import control_image

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True)
    edges, out = tmp_path / "edges.png", tmp_path / "house.png"
    control_image(10).save(edges)
    assert _generate(folder, out, "--cache", "deepcache", "--control-image", str(edges),
                     "--control-scale", "0.8") == 0
    printed = capsys.readouterr().out
    assert "feature cache deepcache (every 3): 2 of 6 steps ran the full UNet" in printed, printed
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        direct = pipe("a cat", steps=6, seed=1, cache="deepcache", control_images=[Image.open(edges)],
                      control_scales=[0.8])
        uncached = pipe("a cat", steps=6, seed=1, control_images=[Image.open(edges)], control_scales=[0.8])
    got = np.asarray(Image.open(out).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(direct.images[0]))
    assert not np.array_equal(got, np.asarray(uncached.images[0]))  # the cache reached the controlled loop
