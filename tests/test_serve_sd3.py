"""``sdrt serve`` over an SD 3 / 3.5 export: both APIs, driven by the official openai client and A1111's JSON,
give the pipeline's own images; the UIs' Euler and DPM++ 2M run on the model's flow schedule, and a sampler
that does not fit flow matching is refused with the choices."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app

from .helpers.serve_live import LiveServer, pixels

KEY = "test-key-sd3"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pipe(sd3_export):
    with Pipeline.load(sd3_export("sd3-tiny"), backend="ort-cpu") as p:
        yield p


@pytest.fixture(scope="module")
def server(pipe):
    app = create_app(pipe, api_key=KEY, max_batch=4, batch_window_ms=50, max_steps=4, max_pixels=128 * 128)
    with LiveServer(app) as s:
        yield s


def ref(pipe, prompt, seed, sampler, *, steps=2, guidance=5.0, neg=None):
    out = pipe(prompt, negative_prompt=neg, height=64, width=64, steps=steps, guidance_scale=guidance,
               sampler=sampler, seed=seed)
    return np.asarray(out.images[0])


def test_openai_client_gets_the_models_default_sampler(server, pipe) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    res = client.images.generate(prompt="a red fox", n=1, size="64x64", response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 7, "guidance_scale": 5.0})
    np.testing.assert_array_equal(pixels(res.data[0].b64_json), ref(pipe, "a red fox", 7, "flow-euler"))


@pytest.mark.parametrize("ui_name, sampler", [("Euler", "flow-euler"), ("DPM++ 2M", "flow-dpmpp-2m")])
def test_a1111_samplers_run_on_the_flow_schedule(server, pipe, ui_name: str, sampler: str) -> None:
    body = {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 10, "sampler_name": ui_name,
            "batch_size": 1, "steps": 2, "cfg_scale": 4.0, "width": 64, "height": 64}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [10]
    np.testing.assert_array_equal(pixels(r.json()["images"][0]),
                                  ref(pipe, "a lighthouse", 10, sampler, guidance=4.0, neg="fog"))


def test_a_sampler_that_does_not_fit_flow_matching_is_refused(server) -> None:
    body = {"prompt": "x", "sampler_name": "Euler a", "steps": 2, "width": 64, "height": 64}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=60)
    assert r.status_code in (400, 422), r.text
    assert "flow-euler" in r.text


def test_max_sequence_length_on_both_apis(server, pipe) -> None:
    """sdrt's ``max_sequence_length`` field (T5's tokens per prompt) gives the pipeline's images with it, on the
    OpenAI endpoint (the client's extra body) and A1111's; outside 2..512 a 422 naming the field; requests with
    different lengths never share a batch."""
    from sdrt.serve.batcher import Job

    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    want = np.asarray(pipe("a red fox", height=64, width=64, steps=2, guidance_scale=5.0, seed=3,
                           max_sequence_length=16).images[0])
    assert not np.array_equal(want, ref(pipe, "a red fox", 3, "flow-euler"))
    res = client.images.generate(prompt="a red fox", size="64x64",
                                 extra_body={"steps": 2, "seed": 3, "guidance_scale": 5.0, "max_sequence_length": 16})
    np.testing.assert_array_equal(pixels(res.data[0].b64_json), want)
    body = {"prompt": "a red fox", "seed": 3, "steps": 2, "cfg_scale": 5.0, "width": 64, "height": 64,
            "sampler_name": "Euler", "max_sequence_length": 16}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
    for bad in (1, 513):
        r = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH, timeout=60,
                       json={"prompt": "x", "size": "64x64", "steps": 1, "max_sequence_length": bad})
        assert r.status_code == 422 and "max_sequence_length" in r.text, r.text
    batcher = server.server.config.app.state.serve.batcher  # started with the server
    keys = {n: batcher.key(Job.of(["a red fox"], None, [1], 64, 64, 2, "flow-euler", 5.0, max_sequence_length=n))
            for n in (None, 16, 256)}
    assert keys[None] == keys[256] != keys[16]  # None is the default 256: one batch; 16 runs apart


def test_a1111_img2img_with_a_mask_inpaints(server, pipe) -> None:
    """A1111's img2img with a mask (white = repaint, mask_blur as the paste-back blur) on an SD 3 export: the
    pipeline's inpainting images (which tests/test_sd3_inpaint.py checks against diffusers)."""
    import base64
    import io

    from PIL import Image

    def b64png(a: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    init = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    body = {"prompt": "a harbour", "init_images": [b64png(init)], "mask": b64png(mask), "mask_blur": 0,
            "denoising_strength": 0.75, "steps": 4, "seed": 3, "cfg_scale": 4.0, "sampler_name": "Euler",
            "inpainting_fill": 1}
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", headers=AUTH, json=body, timeout=120)
    assert r.status_code == 200, r.text
    want = np.asarray(pipe("a harbour", height=64, width=64, steps=4, guidance_scale=4.0, seed=3,
                           sampler="flow-euler", image=Image.fromarray(init), mask_image=Image.fromarray(mask),
                           strength=0.75, paste_back=0.0).images[0])
    got = pixels(r.json()["images"][0])
    np.testing.assert_array_equal(got, want)
    region = mask > 0
    np.testing.assert_array_equal(got[~region], init[~region])  # a hard-edged paste-back keeps the rest
    assert not np.array_equal(got[region], init[region])
