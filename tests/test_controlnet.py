"""ControlNet's runtime side without parity: the scale table against diffusers' rules, the control image's
preparation against diffusers' VaeImageProcessor, the canny preprocessor against a hand-computed edge, the
CLI flags, and every bad input refused before any engine runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdrt.cli import main
from sdrt.runtime import controlnet
from sdrt.runtime.errors import CompatibilityError, InputError
from sdrt.runtime.pipeline import Pipeline

HAS_CV2 = importlib.util.find_spec("cv2") is not None
needs_cv2 = pytest.mark.skipif(not HAS_CV2, reason="OpenCV (sdrt's 'control' extra) is not installed")


def _req(n: int = 1, **kw: Any) -> controlnet.ControlRequest:
    from PIL import Image

    images = kw.pop("images", [Image.new("RGB", (8, 8))] * n)
    r = controlnet.check_request([f"controlnet_{j}" for j in range(n)], "X", images, **kw)
    assert r is not None
    return r


# -- the scale table -------------------------------------------------------------------------------------

def test_keep_window_by_hand() -> None:
    # 10 steps, window [0.2, 0.7]: step i runs when i/10 >= 0.2 and (i+1)/10 <= 0.7, so i = 2..6
    assert controlnet.keep(10, 0.2, 0.7).tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert controlnet.keep(4, 0.0, 1.0).tolist() == [1, 1, 1, 1]
    # 3 steps, end 0.5: (0+1)/3 = 0.33 <= 0.5 keeps step 0 only
    assert controlnet.keep(3, 0.0, 0.5).tolist() == [1, 0, 0]


def test_scale_table_scales_windows_and_left_out_nets() -> None:
    from PIL import Image

    im = Image.new("RGB", (8, 8))
    r = _req(3, images=[im, None, im], control_scales=[0.5, 1.0, 2.0], control_start=[0, 0, 0.5],
             control_end=[1, 1, 1])
    t = controlnet.scale_table(r, 4, rows=2, residuals=3, guided=True)
    assert t.shape == (4, 3, 2, 3) and t.dtype == np.float32
    assert np.all(t[:, 0] == 0.5)  # every step, every row, every residual
    assert np.all(t[:, 1] == 0)  # left out
    assert np.all(t[:2, 2] == 0) and np.all(t[2:, 2] == 2.0)  # starts at half of 4 steps


def test_guess_mode_scales_match_torch_logspace_and_zero_the_unconditional_rows() -> None:
    r = _req(1, control_scales=[0.8], guess_mode=True)
    r_ = 13  # SD 1.5's ControlNet: 12 down residuals and the mid one
    ref = (torch.logspace(-1, 0, r_) * 0.8).numpy()
    guided = controlnet.scale_table(r, 2, rows=4, residuals=r_, guided=True)
    assert np.all(guided[:, 0, :2] == 0)  # batch 2, guided: rows 0-1 unconditional
    np.testing.assert_allclose(guided[:, 0, 2:], np.broadcast_to(ref, (2, 2, r_)), rtol=1e-6)
    unguided = controlnet.scale_table(r, 2, rows=2, residuals=r_, guided=False)
    np.testing.assert_allclose(unguided[:, 0], np.broadcast_to(ref, (2, 2, r_)), rtol=1e-6)
    assert unguided[0, 0, 0, 0] == pytest.approx(0.08) and unguided[0, 0, 0, -1] == pytest.approx(0.8)


# -- the control image -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "1"])
def test_control_pixels_match_diffusers_preprocess(mode: str) -> None:
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)
    if mode == "RGBA":  # a real alpha channel: PIL resizes RGBA premultiplied, so the order matters
        src.putalpha(Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)))
    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    ref = proc.preprocess(src, height=64, width=80).numpy()[0].transpose(1, 2, 0)  # [H, W, 3] floats
    got = controlnet.pixels(controlnet.check_image(src), 64, 80)
    assert got.shape == (64, 80, 3) and got.dtype == np.uint8
    # the exported graph divides the uint8 pixels by 255 in float32: exactly diffusers' floats
    assert np.array_equal(got.astype(np.float32) / np.float32(255.0), ref)


def test_default_size_is_the_control_image_rounded_down() -> None:
    from PIL import Image

    r = _req(1, images=[Image.new("RGB", (83, 71))])
    assert controlnet.default_size(r, 8) == (64, 80)


# -- canny -----------------------------------------------------------------------------------------------------

@needs_cv2
def test_canny_finds_exactly_the_border_of_a_black_square() -> None:
    from PIL import Image

    from sdrt.runtime.preprocess import canny

    img = np.full((40, 48), 255, np.uint8)
    top, left, size = 10, 14, 16
    img[top:top + size, left:left + size] = 0
    out = np.asarray(canny(Image.fromarray(img).convert("RGB"), 100, 200))
    assert out.shape == (40, 48, 3) and set(np.unique(out)) <= {0, 255}
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    edge = out[..., 0] > 0
    # by hand: the step from white to black lies between pixel rows/cols top-1|top and bottom-1|bottom;
    # a 3x3 gradient peaks on the two pixels beside it, so every edge pixel is within one pixel of the border
    yy, xx = np.mgrid[:40, :48]
    inside = (yy >= top) & (yy < top + size) & (xx >= left) & (xx < left + size)
    grown = (yy >= top - 1) & (yy < top + size + 1) & (xx >= left - 1) & (xx < left + size + 1)
    shrunk = (yy >= top + 1) & (yy < top + size - 1) & (xx >= left + 1) & (xx < left + size - 1)
    band = grown & ~shrunk
    assert edge.any() and not (edge & ~band).any()
    # ... and the contour is closed: every row and column the square spans has edge pixels on both sides
    for r in range(top + 1, top + size - 1):
        assert edge[r, left - 1:left + 1].any() and edge[r, left + size - 1:left + size + 1].any()
    for c in range(left + 1, left + size - 1):
        assert edge[top - 1:top + 1, c].any() and edge[top + size - 1:top + size + 1, c].any()
    assert not edge[inside & shrunk].any()
    # a flat image has no edges
    assert not np.asarray(canny(Image.new("RGB", (20, 20), (90, 90, 90)))).any()


def test_canny_thresholds_are_checked() -> None:
    from PIL import Image

    from sdrt.runtime.preprocess import canny

    for low, high in ((200, 100), (-1, 100), (100, 2000)):
        with pytest.raises(InputError, match="canny"):
            canny(Image.new("RGB", (8, 8)), low, high)


def test_canny_without_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from PIL import Image

    from sdrt.commands._extras import missing_extra
    from sdrt.runtime.preprocess import canny

    monkeypatch.setitem(sys.modules, "cv2", None)  # import raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError) as e:
        canny(Image.new("RGB", (8, 8)))
    assert e.value.name == "cv2" and 'pip install "sdrt[control]"' in str(e.value)
    msg = missing_extra("generate", e.value)
    assert msg is not None and "'control' extra" in msg and 'pip install "sdrt[control]"' in msg


# -- bad input, before any engine runs -------------------------------------------------------------------

def test_request_checks() -> None:
    from PIL import Image

    im = Image.new("RGB", (8, 8))
    nets = ["controlnet_0", "controlnet_1"]
    with pytest.raises(CompatibilityError, match="--controlnet"):
        controlnet.check_request([], "X", [im])
    with pytest.raises(InputError, match="3 control images for the 2"):
        controlnet.check_request(nets, "X", [im, im, im])
    with pytest.raises(InputError, match="mode I;16"):
        controlnet.check_request(nets, "X", [Image.new("I;16", (8, 8))])
    with pytest.raises(InputError, match="uint8"):
        controlnet.check_request(nets, "X", [np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match="uint8"):
        controlnet.check_request(nets, "X", [np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(InputError, match="PIL image"):
        controlnet.check_request(nets, "X", ["a.png"])
    with pytest.raises(InputError, match="control_scales has 3 entries"):
        controlnet.check_request(nets, "X", [im], control_scales=[1, 1, 1])
    with pytest.raises(InputError, match="from 0 to 10"):
        controlnet.check_request(nets, "X", [im], control_scales=[-0.5, 1])
    with pytest.raises(InputError, match="finite"):
        controlnet.check_request(nets, "X", [im], control_scales=[float("nan"), 1])
    with pytest.raises(InputError, match="start < end"):
        controlnet.check_request(nets, "X", [im], control_start=[0.6, 0], control_end=[0.4, 1])
    with pytest.raises(InputError, match="start < end"):
        controlnet.check_request(nets, "X", [im], control_end=[1.5, 1])
    with pytest.raises(InputError, match="guess_mode needs a control image"):
        controlnet.check_request(nets, "X", None, guess_mode=True)
    with pytest.raises(InputError, match="guess_mode needs a control image"):
        controlnet.check_request(nets, "X", [None, None], guess_mode=True)
    with pytest.raises(InputError, match="control_scales applies to control images"):
        controlnet.check_request(nets, "X", None, control_scales=[1.0])
    with pytest.raises(InputError, match="control_preprocess 'sobel'"):
        controlnet.check_request(nets, "X", [im], control_preprocess="sobel")
    with pytest.raises(InputError, match="a list"):
        controlnet.check_request(nets, "X", im)
    assert controlnet.check_request(nets, "X", [None]) is None  # every net left out: the plain UNet
    r = controlnet.check_request(nets, "X", [None, im], control_scales=0.5)
    assert r is not None and r.active == (1,) and r.scales == (0.5, 0.5) and len(r.images) == 2


def test_control_images_on_a_plain_export_are_refused_before_any_engine(tiny_export) -> None:
    from PIL import Image

    folder = tiny_export("sd15-tiny", "fp32")
    pipe = Pipeline.load(folder, backend="ort-cpu")
    calls: list[str] = []
    for name, e in pipe.engines.items():
        real = e.run
        e.run = lambda feeds, real=real, name=name: calls.append(name) or real(feeds)  # type: ignore[method-assign]
    with pytest.raises(CompatibilityError, match="re-export the model") as e:
        pipe("a fox", steps=2, control_images=[Image.new("RGB", (64, 64))])
    assert "--controlnet" in e.value.for_cli() and "--control-image" in e.value.for_cli()
    with pytest.raises(InputError, match="guess_mode needs a control image"):
        pipe("a fox", steps=2, guess_mode=True)
    with pytest.raises(InputError, match="guess_mode must be True or False"):
        pipe("a fox", steps=2, guess_mode="yes")
    assert calls == []
    pipe.close()


def test_cli_control_flags_without_an_image_are_errors(tiny_export, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tiny_export("sd15-tiny", "fp32")
    out = tmp_path / "o.png"
    assert main(["generate", str(folder), "--prompt", "x", "--guess-mode", "-o", str(out)]) == 1
    assert "--guess-mode applies to control images: pass --control-image" in capsys.readouterr().err
    from PIL import Image

    img = tmp_path / "c.png"
    Image.new("RGB", (64, 64)).save(img)
    assert main(["generate", str(folder), "--prompt", "x", "--control-image", str(img), "--steps", "1",
                 "--backend", "ort-cpu", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "exported without ControlNets, so --control-image cannot be used" in err and "--controlnet" in err
    assert not out.exists()



# -- the CLI and the stages on a ControlNet export ------------------------------------------------------------

def test_cli_control_flags_give_the_api_image(tiny_controlnet_export, tmp_path: Path) -> None:
    from PIL import Image

    from .helpers.inputs import control_image

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    paths = []
    for j in range(2):
        paths.append(tmp_path / f"c{j}.png")
        control_image(10 + j).save(paths[-1])
    out = tmp_path / "o.png"
    argv = ["generate", str(folder), "--prompt", "a fox", "--steps", "4", "--seed", "5", "--height", "64", "--width",
            "80", "--backend", "ort-cpu", "--control-image", str(paths[0]), "--control-image", str(paths[1]),
            "--control-scale", "0.8", "--control-scale", "1.1", "--control-end", "0.5", "--control-end", "1",
            "--guess-mode", "-o", str(out)]
    assert main(argv) == 0
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        want = pipe("a fox", steps=4, seed=5, height=64, width=80, guess_mode=True,
                    control_images=[Image.open(p) for p in paths], control_scales=[0.8, 1.1], control_end=[0.5, 1])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want.images[0]))
    # a scale given three times for two images: refused, no image written
    out.unlink()
    bad = argv[:-2] + ["--control-scale", "1", "-o", str(out)]
    assert main(bad) == 1 and not out.exists()


@needs_cv2
def test_cli_canny_preprocess_is_the_helper_then_the_call(tiny_controlnet_export, tmp_path: Path) -> None:
    from PIL import Image

    from sdrt.runtime.preprocess import canny

    from .helpers.inputs import control_image

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    src = tmp_path / "photo.png"
    control_image(12, 64, 64).save(src)
    out = tmp_path / "o.png"
    assert main(["generate", str(folder), "--prompt", "a fox", "--steps", "3", "--seed", "2", "--backend", "ort-cpu",
                 "--control-image", str(src), "--control-preprocess", "canny", "--canny-low", "50", "--canny-high",
                 "150", "-o", str(out)]) == 0
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        edges = canny(Image.open(src).convert("RGB"), 50, 150)
        want = pipe("a fox", steps=3, seed=2, control_images=[edges])
        # the API's control_preprocess="canny" is the helper at its default thresholds
        a = pipe("a fox", steps=3, seed=2, control_images=[Image.open(src)], control_preprocess="canny")
        b = pipe("a fox", steps=3, seed=2, control_images=[canny(Image.open(src).convert("RGB"))])
    # the size comes from the control image (64x64), as diffusers takes it
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want.images[0]))
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_stages_with_control_split_in_two_windows_equal_the_call(tiny_controlnet_export) -> None:
    from .helpers.inputs import control_image

    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    ctl: dict[str, Any] = {"control_images": [control_image(10), control_image(11)], "control_scales": [0.9, 0.6],
                           "control_start": [0.0, 0.4]}
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        whole = pipe("a fox", steps=6, seed=8, height=64, width=64, sampler="dpmpp-2m", guidance_scale=6.0, **ctl)
        emb = pipe.encode_prompt("a fox", guided=True)
        plan = pipe.plan("dpmpp-2m", 6)
        lat = pipe.prepare_latents(plan, 64, 64, seed=8)
        lat = pipe.denoise(emb, lat, plan, guidance_scale=6.0, end=0.5, **ctl)
        lat = pipe.denoise(emb, lat, plan, guidance_scale=6.0, **ctl)
        images, _ = pipe.decode(lat)
    diff = np.abs(np.asarray(images[0]).astype(int) - np.asarray(whole.images[0]).astype(int)).max()
    assert diff <= 1


def test_cli_canny_without_opencv_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from PIL import Image

    monkeypatch.setitem(sys.modules, "cv2", None)  # as if the 'control' extra were not installed
    img = tmp_path / "c.png"
    Image.new("RGB", (64, 64)).save(img)
    out = tmp_path / "o.png"
    code = main(["generate", str(tmp_path / "no-such-export"), "--prompt", "x", "--control-image", str(img),
                 "--control-preprocess", "canny", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err
    assert err.startswith("sdrt generate: error: OpenCV is not installed (No module named 'cv2')")
    assert "'control' extra" in err and 'pip install "sdrt[control]"' in err and not out.exists()
