"""LoRA per request over ``sdrt serve --lora-dir``: the ``loras`` field (OpenAI's extra body, A1111's body) and
A1111's ``<lora:NAME:SCALE>`` prompt tags give the images the bare ``Pipeline(..., loras=...)`` gives (which
tests/test_lora_slots.py checks against diffusers); two concurrent requests with different LoRAs each get their
own; a request without LoRA gets the plain image; bad names and servers without LoRAs are refused before work."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app
from sdrt.serve.batcher import Job
from sdrt.serve.checks import prompt_loras

from .helpers.models import make_lora
from .helpers.serve_live import LiveServer, metric, pixels

STEPS = 4
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdrt.export.loading import random_model

    m = random_model("sd15-tiny")
    d = tmp_path_factory.mktemp("loras")
    make_lora(d / "watercolor.safetensors", m.unet, None, "kohya", seed=1, rank=2, alpha=2.0, unet_targets=ATTN)
    make_lora(d / "ink.safetensors", m.unet, None, "diffusers", seed=2, rank=4, unet_targets=ATTN)
    return d


@pytest.fixture(scope="module")
def pipe(slotted_export, lora_dir: Path):
    with Pipeline.load(slotted_export("sd15-tiny"), backend="ort-cpu", lora_dir=lora_dir) as p:
        yield p


@pytest.fixture(scope="module")
def app(pipe, lora_dir: Path):
    return create_app(pipe, max_batch=8, batch_window_ms=2000, max_steps=8, max_pixels=128 * 128, warmup=False,
                      lora_dir=lora_dir)


@pytest.fixture(scope="module")
def server(app):
    with LiveServer(app) as s:
        yield s


def ref(pipe: Pipeline, prompt: str, seed: int, loras: list[tuple[str, float]] | None = None) -> np.ndarray:
    out = pipe(prompt, height=64, width=64, steps=STEPS, guidance_scale=7.5, sampler="dpmpp-2m", seed=seed,
               loras=loras)
    return np.asarray(out.images[0])


def _openai(prompt: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "size": "64x64", "steps": STEPS, "seed": seed, "guidance_scale": 7.5,
            "sampler": "dpmpp-2m", **extra}


def _post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_two_concurrent_requests_with_different_loras_each_get_their_own(server, pipe) -> None:
    bodies = [_openai("a red fox", 3, loras=[{"name": "watercolor", "scale": 0.8}]),
              _openai("a red fox", 3, loras=[{"name": "ink", "scale": 0.5}, {"name": "watercolor", "scale": 0.3}]),
              _openai("a red fox", 3)]
    wants = [ref(pipe, "a red fox", 3, [("watercolor", 0.8)]),
             ref(pipe, "a red fox", 3, [("ink", 0.5), ("watercolor", 0.3)]), ref(pipe, "a red fox", 3)]
    assert len({w.tobytes() for w in wants}) == 3  # three different images: the LoRAs reach the UNet
    before = httpx.get(f"{server.url}/metrics").text
    out: list[Any] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        barrier.wait()
        out[i] = _post(server, "/v1/images/generations", bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{server.url}/metrics").text
    for r, want in zip(out, wants):
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
    # three LoRA sets: three UNet batches (the factors are the whole batch's inputs)
    assert metric(after, "sdrt_batch_requests_count") - metric(before, "sdrt_batch_requests_count") == 3


def test_the_openai_client_sends_loras_as_an_extra_field(server, pipe) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    got = client.images.generate(prompt="a lighthouse", size="64x64",
                                 extra_body={"steps": STEPS, "seed": 7, "guidance_scale": 7.5, "sampler": "dpmpp-2m",
                                             "loras": [{"name": "ink", "scale": 0.9}]})
    np.testing.assert_array_equal(pixels(got.data[0].b64_json), ref(pipe, "a lighthouse", 7, [("ink", 0.9)]))


def test_a1111_prompt_tags_are_taken_out_and_applied(server, pipe) -> None:
    body = {"prompt": "a lighthouse <lora:watercolor:0.7>, at dawn", "steps": STEPS, "seed": 9, "width": 64,
            "height": 64, "cfg_scale": 7.5, "sampler_name": "DPM++ 2M"}
    r = _post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    want = ref(pipe, "a lighthouse , at dawn", 9, [("watercolor", 0.7)])
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
    listed = httpx.get(f"{server.url}/sdapi/v1/loras").json()
    assert [x["name"] for x in listed] == ["ink", "watercolor"] and listed[0]["path"] == "ink.safetensors"


def test_the_edits_form_takes_loras_and_a1111_tags(server, pipe) -> None:
    """OpenAI's edits endpoint (a multipart form, sent by the official client): ``loras`` as a JSON list in a form
    field, and, with ``prompt_syntax`` a1111, a prompt's tags; the bare pipeline's img2img images. A field that is
    no such list is a 422 naming it, before any work."""
    openai = pytest.importorskip("openai")
    from PIL import Image

    init = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(init).save(buf, format="PNG")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"steps": STEPS, "seed": 5, "guidance_scale": 7.5, "sampler": "dpmpp-2m", "strength": 1.0}

    def want(prompt: str, loras: list[tuple[str, float]]) -> np.ndarray:
        out = pipe(prompt, height=64, width=64, steps=STEPS, guidance_scale=7.5, sampler="dpmpp-2m", seed=5,
                   image=Image.fromarray(init), strength=1.0, loras=loras)
        return np.asarray(out.images[0])

    got = client.images.edit(image=("init.png", buf.getvalue(), "image/png"), prompt="a harbour", size="64x64",
                             extra_body={**extra, "loras": json.dumps([{"name": "ink", "scale": 0.9}])})
    with_ink = want("a harbour", [("ink", 0.9)])
    np.testing.assert_array_equal(pixels(got.data[0].b64_json), with_ink)
    assert not np.array_equal(with_ink, want("a harbour", []))
    got = client.images.edit(image=("init.png", buf.getvalue(), "image/png"), prompt="a harbour <lora:ink:0.9>",
                             size="64x64", extra_body={**extra, "prompt_syntax": "a1111"})
    np.testing.assert_array_equal(pixels(got.data[0].b64_json), want("a harbour ", [("ink", 0.9)]))
    before = httpx.get(f"{server.url}/metrics").text
    for bad in ('{"name": "ink"}', '[{"name": "ink", "weight": 1}]', "not json"):
        r = httpx.post(f"{server.url}/v1/images/edits", files={"image": ("init.png", buf.getvalue(), "image/png")},
                       data={"prompt": "x", "steps": "1", "loras": bad}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["param"] == "loras", r.text
        assert "JSON list" in r.json()["error"]["message"], r.text
    assert metric(httpx.get(f"{server.url}/metrics").text, "sdrt_images_total") == metric(before, "sdrt_images_total")


def test_prompt_tags_parse_as_a1111_writes_them() -> None:
    assert prompt_loras("a <lora:ink> b") == ("a  b", [("ink", 1.0)])
    assert prompt_loras("<lora:ink:0.5><lora:watercolor:0.2:0.8> a") == ("a", [("ink", 0.5), ("watercolor", 0.8)])
    assert prompt_loras("no tags") == ("no tags", [])


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/v1/images/generations", _openai("a", 1, loras=[{"name": "sketch"}]), 422,
     "unknown LoRA 'sketch': this server has ink, watercolor"),
    ("/v1/images/generations", _openai("a", 1, loras=[{"name": "../ink"}]), 422, "loras"),
    ("/v1/images/generations", _openai("a", 1, loras=[{"name": "ink", "scale": 20}]), 422, "loras"),
    ("/v1/images/generations", _openai("a", 1, loras=[{"name": "ink", "scale": 1.0}] * 3), 422, "over this export"),
    ("/sdapi/v1/txt2img", {"prompt": "a <lora:ink:x>", "steps": 2}, 422, "multiplier must be a number"),
])
def test_bad_loras_are_refused_before_work(server, path: str, body: dict[str, Any], status: int, says: str) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    r = _post(server, path, body)
    assert r.status_code == status and says in r.text, r.text[:300]
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "sdrt_images_total") == metric(before, "sdrt_images_total")


def test_servers_without_loras_refuse_them(pipe, slotted_export, tiny_export, lora_dir: Path) -> None:
    with LiveServer(create_app(pipe, max_steps=8, warmup=False)) as s:  # no --lora-dir
        r = _post(s, "/v1/images/generations", _openai("a", 1, loras=[{"name": "ink"}]))
        assert r.status_code == 400 and "--lora-dir" in r.text
        assert httpx.get(f"{s.url}/sdapi/v1/loras").json() == []
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu", lora_dir=lora_dir) as plain, \
            LiveServer(create_app(plain, max_steps=8, warmup=False, lora_dir=lora_dir)) as s:
        r = _post(s, "/v1/images/generations", _openai("a", 1, loras=[{"name": "ink"}]))
        assert r.status_code == 400 and "--lora-slots" in r.text


def test_the_batch_key_holds_the_lora_set(app, server) -> None:
    b = app.state.serve.batcher  # started with the server

    def key(loras: list[tuple[str, float]] | None) -> tuple[Any, ...]:
        return b.key(Job.of(["a cat"], [""], [1], 64, 64, STEPS, "dpmpp-2m", 7.5, loras=loras))

    assert key(None) == key(None) and key([("ink", 0.5)]) == key([("ink", 0.5)])
    assert len({key(None), key([("ink", 0.5)]), key([("ink", 0.6)]), key([("watercolor", 0.5)])}) == 4
