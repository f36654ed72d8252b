"""Masks in ``sdrt serve``: OpenAI's edits (alpha 0 = edit, the mask or the image's own transparency) and
A1111's img2img (white = repaint, invert, mask_blur as the paste-back blur, inpaint_full_res as the pipeline's
padding_mask_crop), on an inpainting model
(9-channel UNet) and an ordinary one (the blend path). Every image is compared with a direct Pipeline
call given the mask the test builds itself."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image

from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app

from .helpers.serve_live import LiveServer, pixels

KEY = "test-key-inpaint"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"api_key": KEY, "max_steps": 4, "max_body_bytes": 1_000_000, "max_upload_pixels": 512 * 512,
          "max_pixels": 128 * 128, "batch_window_ms": 5}


@pytest.fixture(scope="module")
def pipe_inp(tiny_export):
    with Pipeline.load(tiny_export("sd15-inpaint-tiny"), backend="ort-cpu") as p:
        yield p


@pytest.fixture(scope="module")
def pipe_blend(tiny_export):
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as p:
        yield p


@pytest.fixture(scope="module")
def server_inp(pipe_inp):
    # its warm-up (which needs an image and a mask on this model) must pass for the server to become ready
    with LiveServer(create_app(pipe_inp, **LIMITS)) as s:
        yield s


@pytest.fixture(scope="module")
def server_blend(pipe_blend):
    with LiveServer(create_app(pipe_blend, **LIMITS)) as s:
        yield s


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64png(arr: np.ndarray) -> str:
    return base64.b64encode(png(arr)).decode()


INIT = np.random.default_rng(21).integers(0, 256, (64, 64, 3), dtype=np.uint8)
REGION = np.zeros((64, 64), dtype=bool)  # the region to repaint
REGION[8:40, 16:56] = True


def ref(pipe, prompt, seed, mask_l, *, image=INIT, steps=2, strength=None, paste_back=None, padding_mask_crop=None):
    out = pipe(prompt, height=64, width=64, steps=steps, guidance_scale=7.5, sampler="dpmpp-2m", seed=seed,
               image=Image.fromarray(image), mask_image=Image.fromarray(mask_l), strength=strength,
               paste_back=paste_back, padding_mask_crop=padding_mask_crop)
    return np.asarray(out.images[0])


def white_where(region: np.ndarray) -> np.ndarray:
    return np.where(region, 255, 0).astype(np.uint8)


def rgba_mask(region: np.ndarray) -> np.ndarray:
    """OpenAI's mask: transparent (alpha 0) where to edit, opaque elsewhere."""
    out = np.full((*region.shape, 4), 255, dtype=np.uint8)
    out[..., 3] = np.where(region, 0, 255)
    return out


# -- OpenAI ---------------------------------------------------------------------------------------------
def test_openai_client_edit_with_mask_inpaints(server_inp, pipe_inp):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server_inp.url}/v1", api_key=KEY, max_retries=0)
    res = client.images.edit(image=("init.png", png(INIT), "image/png"),
                             mask=("mask.png", png(rgba_mask(REGION)), "image/png"), prompt="a castle",
                             size="64x64", extra_body={"steps": 3, "seed": 11})
    want = ref(pipe_inp, "a castle", 11, white_where(REGION), steps=3)  # strength: the pipeline's default, 1
    np.testing.assert_array_equal(pixels(res.data[0].b64_json), want)


def test_openai_image_transparency_is_the_mask_on_the_blend_path(server_blend, pipe_blend):
    openai = pytest.importorskip("openai")
    rgba = np.dstack([INIT, np.where(REGION, 0, 255).astype(np.uint8)])
    client = openai.OpenAI(base_url=f"{server_blend.url}/v1", api_key=KEY, max_retries=0)
    res = client.images.edit(image=("init.png", png(rgba), "image/png"), prompt="a tower", size="64x64",
                             extra_body={"steps": 2, "seed": 4, "strength": 0.7})
    want = ref(pipe_blend, "a tower", 4, white_where(REGION), strength=0.7)
    got = pixels(res.data[0].b64_json)
    np.testing.assert_array_equal(got, want)
    # and it is not the plain img2img image: the mask was applied
    plain = np.asarray(pipe_blend("a tower", height=64, width=64, steps=2, seed=4, image=Image.fromarray(INIT),
                                  strength=0.7).images[0])
    assert not np.array_equal(got, plain)


def test_openai_client_bad_mask_is_400(server_inp):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server_inp.url}/v1", api_key=KEY, max_retries=0)
    small = rgba_mask(REGION[:32, :32])
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("init.png", png(INIT), "image/png"), mask=("m.png", png(small), "image/png"),
                           prompt="x", extra_body={"steps": 1})
    assert e.value.status_code == 400
    assert e.value.body["param"] == "mask" and "mask is 32x32 but image is 64x64" in e.value.body["message"]


@pytest.mark.parametrize("mask, status, says", [
    (png(white_where(REGION)), 400, "no alpha channel"),  # a white-is-repaint mask, as A1111's
    (png(np.dstack([INIT, np.full((64, 64), 255, np.uint8)])), 400, "no fully transparent pixel"),
    (png(np.zeros((600, 600, 4), np.uint8)), 422, "262144"),  # the upload limit applies to the mask too
    (b"not an image", 422, "not a readable"),
])
def test_openai_mask_refusals(server_inp, mask, status, says):
    r = httpx.post(f"{server_inp.url}/v1/images/edits", headers=AUTH,
                   files={"image": ("i.png", png(INIT), "image/png"), "mask": ("m.png", mask, "image/png")},
                   data={"prompt": "x", "steps": "1"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == "mask" and says in err["message"], err


def test_inpainting_model_needs_a_mask(server_inp):
    r = httpx.post(f"{server_inp.url}/v1/images/edits", headers=AUTH,
                   files={"image": ("i.png", png(INIT), "image/png")}, data={"prompt": "x", "steps": "1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "mask_required"
    r = httpx.post(f"{server_inp.url}/sdapi/v1/txt2img", headers=AUTH, json={"prompt": "x", "steps": 1})
    assert r.status_code == 422 and "/sdapi/v1/img2img" in r.json()["error"]["message"]


# -- AUTOMATIC1111 ------------------------------------------------------------------------------------
def a1111(server, **fields):
    body = {"prompt": "a harbour", "init_images": [b64png(INIT)], "steps": 2, "seed": 3, "cfg_scale": 7.5,
            "sampler_name": "DPM++ 2M", **fields}
    return httpx.post(f"{server.url}/sdapi/v1/img2img", headers=AUTH, json=body, timeout=120)


def test_a1111_mask_with_default_blur_on_inpainting_model(server_inp, pipe_inp):
    r = a1111(server_inp, mask="data:image/png;base64," + b64png(white_where(REGION)), denoising_strength=0.9,
              inpainting_fill=1, inpaint_full_res=False)
    assert r.status_code == 200, r.text
    want = ref(pipe_inp, "a harbour", 3, white_where(REGION), strength=0.9, paste_back=4.0)
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
    assert "mask" not in r.json()["parameters"]


def test_a1111_inverted_mask_hard_edge_on_blend_path(server_blend, pipe_blend):
    r = a1111(server_blend, mask=b64png(white_where(REGION)), inpainting_mask_invert=1, mask_blur=0,
              denoising_strength=0.8)
    assert r.status_code == 200, r.text
    got = pixels(r.json()["images"][0])
    np.testing.assert_array_equal(got, ref(pipe_blend, "a harbour", 3, white_where(~REGION), strength=0.8,
                                           paste_back=0.0))
    # inverted: the white region of the mask sent is kept, pixel for pixel (a hard-edged paste-back)
    np.testing.assert_array_equal(got[REGION], INIT[REGION])
    assert not np.array_equal(got[~REGION], INIT[~REGION])


SMALL = np.zeros((64, 64), dtype=bool)  # a small region off the centre: its padded box is a quarter of the image
SMALL[6:22, 36:54] = True


@pytest.mark.parametrize("which", ["inp", "blend"])
def test_a1111_inpaint_full_res_is_padding_mask_crop(request, which: str) -> None:
    """A1111's "only masked" (inpaint_full_res, with its padding): the pipeline's padding_mask_crop, the original
    pasted back through the mask blurred by mask_blur; not the whole-picture image."""
    server, pipe = request.getfixturevalue(f"server_{which}"), request.getfixturevalue(f"pipe_{which}")
    r = a1111(server, mask=b64png(white_where(SMALL)), inpaint_full_res=True, inpaint_full_res_padding=6,
              mask_blur=2, denoising_strength=0.9)
    assert r.status_code == 200, r.text
    got = pixels(r.json()["images"][0])
    want = ref(pipe, "a harbour", 3, white_where(SMALL), strength=0.9, paste_back=2.0, padding_mask_crop=6)
    np.testing.assert_array_equal(got, want)
    whole = ref(pipe, "a harbour", 3, white_where(SMALL), strength=0.9, paste_back=2.0)
    assert np.abs(got[SMALL].astype(int) - whole[SMALL]).mean() > 5
    np.testing.assert_array_equal(got[40:], INIT[40:])  # far from the box: the original
    info = json.loads(r.json()["info"])
    assert info["inpaint_full_res"] is True and info["inpaint_full_res_padding"] == 6


def test_openai_edit_with_padding_mask_crop(server_blend, pipe_blend) -> None:
    data = {"prompt": "a tower", "steps": "2", "seed": "4", "strength": "0.7", "size": "64x64",
            "padding_mask_crop": "6", "sampler": "dpmpp-2m"}
    files = {"image": ("i.png", png(INIT), "image/png"), "mask": ("m.png", png(rgba_mask(SMALL)), "image/png")}
    r = httpx.post(f"{server_blend.url}/v1/images/edits", headers=AUTH, files=files, data=data, timeout=120)
    assert r.status_code == 200, r.text
    want = ref(pipe_blend, "a tower", 4, white_where(SMALL), strength=0.7, padding_mask_crop=6)
    np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
    r = httpx.post(f"{server_blend.url}/v1/images/edits", headers=AUTH, files={"image": files["image"]}, data=data)
    assert r.status_code == 422 and r.json()["error"]["param"] == "padding_mask_crop", r.text


@pytest.mark.parametrize("fields, param, says", [
    ({"inpaint_full_res": True, "mask": b64png(np.zeros((64, 64), np.uint8))}, "mask", "all black"),
    ({"inpaint_full_res": True, "inpaint_full_res_padding": -1}, "inpaint_full_res_padding", "0"),
    ({"inpainting_fill": 0}, "inpainting_fill", "inpainting_fill 0 (fill) is not supported"),
    ({"inpainting_fill": 2}, "inpainting_fill", "(latent noise) is not supported"),
    ({"mask_blur_x": 2, "mask_blur_y": 6}, "mask_blur_x", "differ"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "1"),
    ({"mask": "not base64!"}, "mask", "base64"),
    ({"mask": b64png(np.zeros((600, 600), np.uint8))}, "mask", "262144"),
])
def test_a1111_mask_refusals(server_inp, fields, param, says):
    r = a1111(server_inp, **{"mask": b64png(white_where(REGION)), **fields})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


def test_a1111_inpaint_options_without_a_mask_change_nothing(server_blend, pipe_blend):
    # A1111 clients send their defaults (fill 0, only-masked on): without a mask they mean nothing
    r = a1111(server_blend, inpainting_fill=0, inpaint_full_res=True, mask_blur=4, denoising_strength=0.5)
    assert r.status_code == 200, r.text
    want = np.asarray(pipe_blend("a harbour", height=64, width=64, steps=2, seed=3, image=Image.fromarray(INIT),
                                 strength=0.5).images[0])
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
