"""``sdrt serve`` against real clients: the official openai client, A1111 requests over httpx, 16 concurrent
clients, backpressure, deadlines, disconnects, limits. Every image is compared with the bare Pipeline."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app

from .helpers.serve_live import LiveServer, metric, pixels

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def pipe(tiny_export):
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as p:
        yield p


@pytest.fixture(scope="module")
def server(pipe):
    app = create_app(pipe, api_key=KEY, max_batch=8, batch_window_ms=300, max_steps=4, max_body_bytes=1_000_000,
                     max_upload_pixels=512 * 512, max_pixels=128 * 128)
    with LiveServer(app) as s:
        yield s


def ref(pipe, prompt, seed, *, steps=2, guidance=7.5, neg=None, sampler="dpmpp-2m", image=None, strength=None):
    out = pipe(prompt, negative_prompt=neg, height=64, width=64, steps=steps, guidance_scale=guidance,
               sampler=sampler, seed=seed, image=image, strength=strength)
    return np.asarray(out.images[0])


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- the APIs clients speak -------------------------------------------------------------------------------
def test_openai_client_generate(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [pipe.folder.name]
    res = client.images.generate(prompt="a red fox", n=2, size="64x64", response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 7, "guidance_scale": 5.0,
                                             "negative_prompt": "blurry", "sampler": "euler"})
    assert len(res.data) == 2
    for k, item in enumerate(res.data):
        want = ref(pipe, "a red fox", 7 + k, guidance=5.0, neg="blurry", sampler="euler")
        np.testing.assert_array_equal(pixels(item.b64_json), want)


def test_openai_client_wrong_key_is_401(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="x", size="64x64", extra_body={"steps": 1})
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"


def test_openai_client_edit_is_img2img(server, pipe):
    openai = pytest.importorskip("openai")
    from PIL import Image

    init = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    res = client.images.edit(image=("init.png", png_bytes(init), "image/png"), prompt="a castle", size="64x64",
                             extra_body={"steps": 3, "seed": 11, "strength": 0.6})
    want = ref(pipe, "a castle", 11, steps=3, image=Image.fromarray(init), strength=0.6)
    np.testing.assert_array_equal(pixels(res.data[0].b64_json), want)


def test_a1111_txt2img(server, pipe):
    body = {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 10, "sampler_name": "Euler a",
            "batch_size": 2, "n_iter": 2, "steps": 2, "cfg_scale": 6.0, "width": 64, "height": 64,
            "enable_hr": False, "send_images": True, "restore_faces": False}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [10, 11, 12, 13]
    assert out["parameters"]["sampler_name"] == "Euler a"
    assert len(out["images"]) == 4
    for seed, img in zip(info["all_seeds"], out["images"]):
        np.testing.assert_array_equal(pixels(img), ref(pipe, "a lighthouse", seed, guidance=6.0, neg="fog",
                                                       sampler="euler-a"))


def test_a1111_img2img_with_data_url(server, pipe):
    from PIL import Image

    init = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = "data:image/png;base64," + base64.b64encode(png_bytes(init)).decode()
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", headers=AUTH, timeout=120,
                   json={"prompt": "a boat", "init_images": [data], "denoising_strength": 0.5, "steps": 4,
                         "seed": 2, "cfg_scale": 7.5, "sampler_name": "DPM++ 2M"})
    assert r.status_code == 200, r.text
    want = ref(pipe, "a boat", 2, steps=4, image=Image.fromarray(init), strength=0.5)
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)


@pytest.mark.parametrize("extra, named", [
    ({"enable_hr": True}, "enable_hr"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
    ({"restore_faces": True, "tiling": True}, "restore_faces, tiling"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"mask": "aGVsbG8="}, "mask"),
])
def test_a1111_refuses_image_changing_fields(server, extra, named):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", headers=AUTH, json={"prompt": "x", "steps": 1, **extra})
    assert r.status_code == 422
    assert named in r.json()["error"]["message"]


# -- limits: every refusal a JSON 4xx naming the field and the range ---------------------------------------
@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/images/generations", {"prompt": "x", "steps": 9}, 422, "steps", "1..4"),
    ("/v1/images/generations", {"prompt": "x", "steps": 151}, 422, "steps", "150"),
    ("/v1/images/generations", {"prompt": "x", "size": "60x64"}, 422, "size", "multiple of 8"),
    ("/v1/images/generations", {"prompt": "x", "size": "256x256"}, 422, "size", "16384"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, 422, "n", "1..8"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": 1e309}, 422, "guidance_scale", "finite"),
    ("/v1/images/generations", {"prompt": "x", "seed": 2**40}, 422, "seed", "4294967295"),
    ("/v1/images/generations", {"prompt": "x" * 2001}, 422, "prompt", "2000"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, "model", "GET /v1/models"),
    ("/v1/images/generations", {"prompt": "x", "quality": "hd"}, 422, None, "quality"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "response_format", "--image-dir"),
    ("/v1/images/generations", {"prompt": "x", "sampler": "heun"}, 422, "sampler", "dpmpp-2m"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 100}, 422, "width", "multiple of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -1}, 422, "cfg_scale", "0"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images", "base64"),
])
def test_refusals_name_the_field_and_range(server, path, body, status, param, says):
    raw = json.dumps(body).replace("1e+309", "1e309")
    r = httpx.post(f"{server.url}{path}", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param
    assert says in err["message"], err["message"]


def test_body_size_and_decompression_bombs_are_refused(server):
    r = httpx.post(f"{server.url}/v1/images/generations", headers={**AUTH, "content-type": "application/json"},
                   content=b"{" + b" " * 1_000_001 + b"}")
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # a few KB that decode to 9 MP
    assert len(buf.getvalue()) < 100_000
    r = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH,
                   files={"image": ("bomb.png", buf.getvalue(), "image/png")}, data={"prompt": "x", "steps": "1"})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "image" and "262144" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH,
                   files={"image": ("x.png", b"not an image", "image/png")}, data={"prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"


def test_refusals_are_words_not_parser_output(server):
    """Malformed JSON, a size that is not WIDTHxHEIGHT, an upload past Pillow's own limit: each refusal names
    the field, what was wrong and what is allowed, in words (no "JSON decode error", no regular expression,
    no Pillow limit)."""
    url, headers = f"{server.url}/v1/images/generations", {**AUTH, "content-type": "application/json"}
    r = httpx.post(url, headers=headers, content=b'{"prompt": "x",}')
    msg = r.json()["error"]["message"]
    assert r.status_code == 422 and "the request body is not valid JSON" in msg and "decode" not in msg, msg
    for size in ("big", "64X64"):
        r = httpx.post(url, headers=AUTH, json={"prompt": "x", "size": size})
        err = r.json()["error"]
        assert r.status_code == 422 and err["param"] == "size", err
        assert f"size {size!r} is not valid: give WIDTHxHEIGHT in pixels" in err["message"], err["message"]
        assert "^[" not in err["message"]
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buf, format="PNG")  # 90 MP: past Pillow's own bomb limit (89 MP)
    assert len(buf.getvalue()) < 1_000_000
    r = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH,
                   files={"image": ("bomb.png", buf.getvalue(), "image/png")}, data={"prompt": "x", "steps": "1"})
    err = r.json()["error"]
    assert r.status_code == 422 and err["param"] == "image", err
    assert "more than 262144 pixels" in err["message"] and "--max-upload-pixels" in err["message"], err["message"]
    assert "decompression" not in err["message"].lower()


def test_openai_responses_say_each_images_seed(server, pipe):
    """A request without a seed gets random ones; the response says which, and sending one back with n=1
    reproduces that image."""
    r = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                   json={"prompt": "a lake", "n": 2, "size": "64x64", "steps": 2}).json()["data"]
    assert [type(d["seed"]) for d in r] == [int, int] and r[1]["seed"] == (r[0]["seed"] + 1) % 2**32
    again = httpx.post(f"{server.url}/v1/images/generations", headers=AUTH,
                       json={"prompt": "a lake", "n": 1, "size": "64x64", "steps": 2, "seed": r[1]["seed"]}).json()
    assert again["data"][0]["b64_json"] == r[1]["b64_json"]


# -- operations ---------------------------------------------------------------------------------------------
def test_health_metrics_request_id_and_schema(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # the key guards metrics too
    m = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert "sdrt_queue_depth 0.0" in m.text and "sdrt_batch_images_bucket" in m.text
    r = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(f"{server.url}/healthz").headers["x-request-id"]) == 32
    spec = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    steps = spec["OpenAIGeneration"]["properties"]["steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (1, 150)
    width = spec["A1111Txt2Img"]["properties"]["width"]["anyOf"][0]
    assert width["multipleOf"] == 8 and width["maximum"] == 2048


def test_playground_page_is_served(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and "/sdapi/v1/txt2img" in r.text and 'id="prompt"' in r.text


# -- batching ------------------------------------------------------------------------------------------
def test_16_concurrent_clients_form_batches_and_match_unbatched(server, pipe):
    long_prompt = " ".join(["a very detailed painting of a mountain lake"] * 12)  # > 77 tokens: 2 chunks
    reqs = [{"prompt": long_prompt if i == 5 else f"scene number {i}", "seed": 100 + i, "steps": 2,
             "guidance_scale": 7.5 if i % 4 else 3.0, "negative_prompt": f"neg {i % 3}", "size": "64x64"}
            for i in range(16)]
    before = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    out: dict[int, httpx.Response] = {}
    barrier = threading.Barrier(16)

    def client(i: int) -> None:
        barrier.wait()
        out[i] = httpx.post(f"{server.url}/v1/images/generations", json=reqs[i], headers=AUTH, timeout=300)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    batches = metric(after, "sdrt_batch_requests_count") - metric(before, "sdrt_batch_requests_count")
    requests = metric(after, "sdrt_batch_requests_sum") - metric(before, "sdrt_batch_requests_sum")
    assert requests == 16
    # 3 compatibility groups at least (two guidance scales, one long prompt); far fewer batches than requests
    assert 3 <= batches <= 8, (batches, requests)
    for i, r in out.items():
        assert r.status_code == 200, r.text
        q = reqs[i]
        want = ref(pipe, q["prompt"], q["seed"], guidance=q["guidance_scale"], neg=q["negative_prompt"])
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want, err_msg=f"request {i}")


# -- backpressure, deadlines, disconnects ------------------------------------------------------------------
def _wait_depth(url: str, want: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(httpx.get(f"{url}/metrics").text, "sdrt_queue_depth") == want:
            return
        time.sleep(0.02)
    raise AssertionError(f"queue depth never reached {want}")


def test_queue_full_is_429_with_retry_after(pipe):
    app = create_app(pipe, max_queue=1, batch_window_ms=1500, warmup=False)
    with LiveServer(app) as s:
        first: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: first.setdefault("r", httpx.post(
            f"{s.url}/v1/images/generations", json={"prompt": "a", "steps": 1, "size": "64x64"}, timeout=60)))
        t.start()
        _wait_depth(s.url, 1)
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "b", "steps": 1, "size": "64x64"})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        t.join()
        assert first["r"].status_code == 200


def test_deadline_is_504(pipe):
    app = create_app(pipe, request_timeout_s=0.3, batch_window_ms=3000, warmup=False)
    with LiveServer(app) as s:
        t0 = time.monotonic()
        r = httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "a", "steps": 1, "size": "64x64"},
                       timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - t0 < 2.5  # answered at its deadline, not after the window
        _wait_depth(s.url, 0)


def test_disconnect_cancels_queued_request(pipe):
    app = create_app(pipe, batch_window_ms=2500, warmup=False)
    with LiveServer(app) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/images/generations", json={"prompt": "a", "steps": 1, "size": "64x64"},
                       timeout=0.4)
        _wait_depth(s.url, 0, timeout=1.5)  # cancelled well before its batch window would have closed
        m = httpx.get(f"{s.url}/metrics").text
        assert metric(m, "sdrt_errors_total", 'kind="client_disconnected"') == 1
        time.sleep(2.5)
        m = httpx.get(f"{s.url}/metrics").text
        assert metric(m, "sdrt_images_total") == 0 and metric(m, "sdrt_batch_requests_count") == 0


def test_a_request_arriving_during_a_batch_does_not_stall_the_server(pipe):
    """A request's checks run on the event loop; none may wait for the pipeline a batch holds, or every other
    connection (its own batch's responses included) would wait for the batch too. The batch is played by a thread
    holding the pipeline (``reserved()``, as a running call holds it)."""
    app = create_app(pipe, batch_window_ms=3000, warmup=False)  # the request stays queued, where depth shows it
    with LiveServer(app) as s:
        held, release = threading.Event(), threading.Event()

        def batch() -> None:
            with pipe.reserved():
                held.set()
                release.wait(30)

        holder = threading.Thread(target=batch)
        holder.start()
        held.wait(10)
        got: dict[str, httpx.Response] = {}
        late = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
            f"{s.url}/v1/images/generations", json={"prompt": "a", "steps": 1, "size": "64x64"}, timeout=60)))
        late.start()
        try:
            _wait_depth(s.url, 1)  # checked and queued while the pipeline is held
            t0 = time.monotonic()
            assert httpx.get(f"{s.url}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 2
        finally:
            release.set()
            holder.join()
            late.join()
        assert got["r"].status_code == 200


def test_serve_refuses_precision_off_openvino(tiny_export, capsys):
    from sdrt.cli import main

    assert main(["serve", str(tiny_export("sd15-tiny")), "--backend", "ort-cpu", "--precision", "bf16"]) == 1
    assert "--precision sets the openvino backend's inference precision" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--max-batch", "0"], "--max-batch 0 must be at least 1"),
    (["--max-queue", "-1"], "--max-queue -1 must be at least 1"),
    (["--request-timeout", "0"], "--request-timeout 0.0 must be above 0 seconds"),
    (["--devices", "gpu0"], "--devices 'gpu0' must be GPU numbers"),
])
def test_serve_startup_refusals_are_one_line_before_binding(tiny_export, capsys, monkeypatch, flags, says):
    """A bad setting exits non-zero with one clear line, before anything is loaded or a port is bound."""
    from sdrt.cli import main

    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server was started"))
    assert main(["serve", str(tiny_export("sd15-tiny")), "--backend", "ort-cpu", *flags]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_serve_of_an_export_missing_a_component_refuses_before_binding(tiny_export, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    from sdrt.cli import main

    folder = tmp_path / "broken"
    shutil.copytree(tiny_export("sd15-tiny"), folder)
    manifest = json.loads((folder / "sdrt.json").read_text())
    del manifest["components"]["vae_decoder"]
    (folder / "sdrt.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server was started"))
    assert main(["serve", str(folder), "--backend", "ort-cpu"]) == 1
    err = capsys.readouterr().err
    assert "lacks vae_decoder" in err and "Traceback" not in err, err


def test_healthz_fails_when_the_model_failed_to_load(tiny_export, tmp_path):
    """Loading in the worker failed (here: a UNet graph that is not ONNX): /healthz answers 503 so that a
    process manager restarts the server, and /readyz says why it is not ready."""
    import shutil

    from fastapi.testclient import TestClient

    from sdrt.serve.app import create_app

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_export("sd15-tiny"), folder)
    (folder / "unet" / "model.onnx").write_bytes(b"not onnx")
    app = create_app(folder, backend="ort-cpu", warmup=False)
    with TestClient(app) as client:
        b = app.state.serve.batcher
        b.wait_ready(30)
        deadline = time.monotonic() + 30
        while b.failed is None and time.monotonic() < deadline:
            time.sleep(0.05)
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed", r.text
        assert client.get("/readyz").json()["error"]["message"] == "the model failed to load"
