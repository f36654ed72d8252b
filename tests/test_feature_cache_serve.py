"""Feature caching (DeepCache) over ``sdrt serve``: the ``cache`` fields on the OpenAI and A1111 APIs give the
images the bare ``Pipeline(..., cache=...)`` gives, bad values and a model exported without ``--deepcache`` are
refused before any work, and cached and uncached requests never share a UNet batch."""

from __future__ import annotations

import io
import json
import threading
from typing import Any, get_args

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.runtime.feature_cache import CACHE_KINDS, INTERVAL_MAX, SCHEDULES, CachePolicy
from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app
from sdrt.serve import schemas as S
from sdrt.serve.batcher import Job

from .helpers.serve_live import LiveServer, metric, pixels

STEPS = 6  # uniform, interval 3: steps 0 and 3 full, the other four shallow


@pytest.fixture(scope="module")
def pipe(deepcache_export):
    with Pipeline.load(deepcache_export("sd15-tiny"), backend="ort-cpu") as p:
        yield p


@pytest.fixture(scope="module")
def app(pipe):
    return create_app(pipe, max_batch=8, batch_window_ms=300, max_steps=8, max_pixels=128 * 128, warmup=False)


@pytest.fixture(scope="module")
def server(app):
    with LiveServer(app) as s:
        yield s


def ref(pipe, prompt, seed, **kw: Any) -> np.ndarray:
    out = pipe(prompt, height=64, width=64, steps=STEPS, guidance_scale=7.5, sampler="dpmpp-2m", seed=seed, **kw)
    return np.asarray(out.images[0])


def _post(server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def _openai(prompt: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "size": "64x64", "steps": STEPS, "seed": seed, "guidance_scale": 7.5,
            "sampler": "dpmpp-2m", **extra}


def test_schema_names_are_the_runtimes():
    assert get_args(S.CacheKind) == CACHE_KINDS and get_args(S.CacheSchedule) == SCHEDULES


# -- the images -------------------------------------------------------------------------------------------
def test_openai_client_cached_and_uncached_match_the_pipeline(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    extra = {"steps": STEPS, "seed": 5, "guidance_scale": 7.5, "sampler": "dpmpp-2m"}
    cached = client.images.generate(prompt="a red fox", size="64x64",
                                    extra_body={**extra, "cache": "deepcache", "cache_interval": 3})
    plain = client.images.generate(prompt="a red fox", size="64x64", extra_body=extra)
    direct = pipe("a red fox", height=64, width=64, steps=STEPS, guidance_scale=7.5, sampler="dpmpp-2m", seed=5,
                  cache="deepcache", cache_interval=3)
    assert "2 of 6 steps ran the full UNet" in direct.loop, direct.loop  # the reference did cache
    want_cached, want_plain = np.asarray(direct.images[0]), ref(pipe, "a red fox", 5)
    np.testing.assert_array_equal(pixels(cached.data[0].b64_json), want_cached)
    np.testing.assert_array_equal(pixels(plain.data[0].b64_json), want_plain)
    # the field reached the loop: caching changed the image (shallow steps are an approximation)
    assert not np.array_equal(want_cached, want_plain)


def test_a1111_txt2img_cache_matches_the_pipeline(server, pipe):
    body = {"prompt": "a lighthouse", "seed": 10, "sampler_name": "DPM++ 2M", "steps": STEPS, "cfg_scale": 7.5,
            "width": 64, "height": 64, "batch_size": 2, "cache": "deepcache", "cache_interval": 2}
    r = _post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["cache"] == "deepcache" and out["parameters"]["cache_interval"] == 2
    seeds = json.loads(out["info"])["all_seeds"]
    assert seeds == [10, 11]
    for seed, img in zip(seeds, out["images"], strict=True):
        want = ref(pipe, "a lighthouse", seed, cache="deepcache", cache_interval=2)
        np.testing.assert_array_equal(pixels(img), want)


def test_openai_edit_cache_matches_the_pipeline(server, pipe):
    from PIL import Image

    init = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(init).save(buf, format="PNG")
    r = httpx.post(f"{server.url}/v1/images/edits", files={"image": ("init.png", buf.getvalue(), "image/png")},
                   data={"prompt": "a castle", "size": "64x64", "steps": str(STEPS), "seed": "11", "strength": "1",
                         "sampler": "dpmpp-2m", "cache": "deepcache", "cache_interval": "2"}, timeout=120)
    assert r.status_code == 200, r.text
    want = ref(pipe, "a castle", 11, image=Image.fromarray(init), strength=1.0, cache="deepcache", cache_interval=2)
    np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)


# -- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, extra, param, says", [
    ("/v1/images/generations", {"cache": "fastcache"}, "cache", "'deepcache'"),
    ("/v1/images/generations", {"cache": "deepcache", "cache_interval": 0}, "cache_interval", "1"),
    ("/v1/images/generations", {"cache": "deepcache", "cache_interval": INTERVAL_MAX + 1}, "cache_interval",
     str(INTERVAL_MAX)),
    ("/v1/images/generations", {"cache": "deepcache", "cache_interval": 2.5}, "cache_interval", "integer"),
    ("/v1/images/generations", {"cache": "deepcache", "cache_schedule": "random"}, "cache_schedule",
     "'uniform' or 'nonuniform'"),
    ("/sdapi/v1/txt2img", {"cache": "DeepCache"}, "cache", "'deepcache'"),
    ("/sdapi/v1/txt2img", {"cache": "deepcache", "cache_interval": -3}, "cache_interval", "1"),
    ("/sdapi/v1/txt2img", {"cache": "deepcache", "cache_schedule": "Uniform"}, "cache_schedule",
     "'uniform' or 'nonuniform'"),
])
def test_bad_cache_fields_are_422_naming_the_allowed_values(server, path, extra, param, says):
    before = httpx.get(f"{server.url}/metrics").text
    r = _post(server, path, {"prompt": "x", "steps": 1, **extra})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert metric(httpx.get(f"{server.url}/metrics").text, "sdrt_images_total") == metric(before, "sdrt_images_total")


def test_a_nonuniform_schedule_without_a_plan_for_the_steps_is_422_before_work(pipe):
    from sdrt.runtime.errors import InputError

    with pytest.raises(InputError, match="no 15 distinct full steps in 30 steps") as direct:
        pipe("x", height=64, width=64, steps=30, cache="deepcache", cache_interval=2, cache_schedule="nonuniform")
    with LiveServer(create_app(pipe, max_steps=30, warmup=False, batch_window_ms=0)) as s:
        for path, body in (("/v1/images/generations", {"prompt": "x", "size": "64x64", "steps": 30}),
                           ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 30})):
            r = _post(s, path, {**body, "cache": "deepcache", "cache_interval": 2, "cache_schedule": "nonuniform"})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["message"] == str(direct.value)
            assert r.json()["error"]["param"] == "cache_schedule"
        assert metric(httpx.get(f"{s.url}/metrics").text, "sdrt_batch_requests_count") == 0


def test_edits_form_refuses_a_bad_cache_value(server):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(buf, format="PNG")
    r = httpx.post(f"{server.url}/v1/images/edits", files={"image": ("init.png", buf.getvalue(), "image/png")},
                   data={"prompt": "x", "steps": "1", "cache": "deep"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "cache", r.text
    assert "'deepcache'" in r.json()["error"]["message"]


def test_cache_on_an_export_without_the_shallow_path_is_400_before_work(tiny_export):
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as plain:
        app = create_app(plain, warmup=False, batch_window_ms=0)
        with LiveServer(app) as s:
            for path, body in (("/v1/images/generations", _openai("x", 1, cache="deepcache")),
                               ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                      "cache": "deepcache"})):
                r = _post(s, path, body)
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["param"] == "cache" and err["code"] == "cache_unavailable", err
                assert "sdrt export ... --feature-cache" in err["message"] and "leave cache out" in err["message"]
            m = httpx.get(f"{s.url}/metrics").text
            assert metric(m, "sdrt_images_total") == 0 and metric(m, "sdrt_batch_requests_count") == 0
            # the same request without cache runs on that export
            assert _post(s, "/v1/images/generations", _openai("x", 1)).status_code == 200


# -- batching -------------------------------------------------------------------------------------------
def test_batch_key_separates_cache_policies(app, server):
    b = app.state.serve.batcher  # started with the server, its pipeline loaded

    def key(cache: CachePolicy | None) -> tuple[Any, ...]:
        return b.key(Job.of(["a cat"], [""], [1], 64, 64, STEPS, "dpmpp-2m", 7.5, cache=cache))

    plain, every3 = key(None), key(CachePolicy("deepcache", 3, "uniform"))
    assert key(None) == plain and key(CachePolicy("deepcache", 3, "uniform")) == every3
    assert len({plain, every3, key(CachePolicy("deepcache", 2, "uniform")),
                key(CachePolicy("deepcache", 3, "nonuniform"))}) == 4


def _concurrently(server, bodies: list[dict[str, Any]]) -> tuple[list[httpx.Response], float, float]:
    """Send the bodies at once; the responses and how many batches / requests ran meanwhile."""
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
    return (out, metric(after, "sdrt_batch_requests_count") - metric(before, "sdrt_batch_requests_count"),
            metric(after, "sdrt_batch_requests_sum") - metric(before, "sdrt_batch_requests_sum"))


def test_cached_and_uncached_requests_run_in_separate_batches(pipe):
    # a long window: two clients sent at once certainly arrive within it, on a busy machine too
    with LiveServer(create_app(pipe, max_batch=8, batch_window_ms=2000, max_steps=8, warmup=False)) as server:
        # two compatible requests at once share one batch ...
        both_plain, batches, requests = _concurrently(server, [_openai("a cat", 1), _openai("a dog", 2)])
        assert (batches, requests) == (1, 2)
        # ... while a cached one beside an uncached one runs on its own
        bodies = [_openai("a cat", 1, cache="deepcache"), _openai("a dog", 2)]
        mixed, batches, requests = _concurrently(server, bodies)
        assert (batches, requests) == (2, 2)
    for r in (*both_plain, *mixed):
        assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(mixed[0].json()["data"][0]["b64_json"]),
                                  ref(pipe, "a cat", 1, cache="deepcache"))
    np.testing.assert_array_equal(pixels(mixed[1].json()["data"][0]["b64_json"]), ref(pipe, "a dog", 2))
    np.testing.assert_array_equal(pixels(both_plain[0].json()["data"][0]["b64_json"]), ref(pipe, "a cat", 1))


def test_cached_and_controlled_request_matches_the_pipeline(tiny_controlnet_export):
    """A request with both a control image and ``cache`` on an export made with ControlNets and ``--deepcache``:
    the bare call's image (which tests/test_feature_cache_controlnet.py holds against DeepCache's own)."""
    import base64

    from .helpers.inputs import control_image

    pipe = Pipeline.load(tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True), backend="ort-cpu")
    app = create_app(pipe, max_batch=8, batch_window_ms=300, max_steps=8, max_pixels=128 * 128, warmup=False)
    edges = control_image(12)
    buf = io.BytesIO()
    edges.save(buf, format="PNG")
    with pipe, LiveServer(app) as server:
        r = _post(server, "/v1/images/generations",
                  _openai("a house", 4, cache="deepcache", cache_interval=3,
                          control_image=[base64.b64encode(buf.getvalue()).decode()]))
        assert r.status_code == 200, r.text
        direct = pipe("a house", height=64, width=64, steps=STEPS, guidance_scale=7.5, sampler="dpmpp-2m", seed=4,
                      cache="deepcache", cache_interval=3, control_images=[edges])
        assert "2 of 6 steps ran the full UNet" in direct.loop
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), np.asarray(direct.images[0]))
        uncached = ref(pipe, "a house", 4, control_images=[edges])
        assert not np.array_equal(np.asarray(direct.images[0]), uncached)
