"""ControlNet and FLUX.1 Depth through ``sdrt serve``: the OpenAI fields (the official client's ``extra_body``, the edits
form) and sd-webui-controlnet's A1111 units. Each served image is compared with a direct ``Pipeline`` call with the
same control images and settings (the Pipeline's ControlNet path is checked against diffusers in
tests/test_controlnet_parity.py, tests/test_flux_control.py); refusals are 4xx naming the field and the allowed
values, before any work."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sdrt.serve import create_app
from sdrt.serve.batcher import Batcher, Job

from .helpers.inputs import control_image
from .helpers.pipelines import shared_pipeline
from .helpers.serve_live import LiveServer, answers_while_held, metric, pixels

KEY = "test-key-cn"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"api_key": KEY, "max_batch": 8, "batch_window_ms": 300, "max_steps": 4, "max_upload_pixels": 200 * 200,
          "max_pixels": 128 * 128}


def b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def pipe(tiny_controlnet_export):
    return shared_pipeline(tiny_controlnet_export("sd15-tiny", nets=2))


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(create_app(pipe, **LIMITS)) as s:
        yield s


def batches(server) -> float:
    return metric(httpx.get(f"{server.url}/metrics", headers=AUTH).text, "sdrt_batch_requests_count")


def post(server, path: str, body: dict, timeout: float = 180):
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=timeout)


def ref(pipe, prompt: str, seed: int, **kw) -> np.ndarray:
    kw = {"height": 64, "width": 64, "steps": 2, "guidance_scale": 7.5, "sampler": "dpmpp-2m", **kw}
    return np.asarray(pipe(prompt, seed=seed, **kw).images[0])


# -- the OpenAI API ---------------------------------------------------------------------------------------------
def test_openai_client_two_nets_with_settings(server, pipe):
    openai = pytest.importorskip("openai")
    a, b = control_image(1), control_image(2, w=64, h=80)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=180)
    res = client.images.generate(prompt="a house", n=2, size="64x64", extra_body={
        "steps": 2, "seed": 7, "sampler": "dpmpp-2m", "control_image": [b64(a), b64(b)],
        "controlnet_conditioning_scale": [0.8, 0.5], "control_guidance_end": [1.0, 0.5], "guess_mode": True})
    for k, item in enumerate(res.data):
        want = ref(pipe, "a house", 7 + k, control_images=[a, b], control_scales=[0.8, 0.5], control_end=[1.0, 0.5],
                   guess_mode=True)
        np.testing.assert_array_equal(pixels(item.b64_json), want)


def test_openai_one_net_left_out_and_size_from_the_control_image(server, pipe):
    """null leaves net 0 out; without size the output takes the control image's, rounded down to 8 (72x64)."""
    b = control_image(3, w=77, h=64)
    r = post(server, "/v1/images/generations", {"prompt": "a tree", "steps": 2, "seed": 3, "sampler": "dpmpp-2m",
                                                "control_image": [None, b64(b)], "controlnet_conditioning_scale": 1.5})
    assert r.status_code == 200, r.text
    got = pixels(r.json()["data"][0]["b64_json"])
    assert got.shape == (64, 72, 3)
    want = np.asarray(pipe("a tree", seed=3, steps=2, guidance_scale=7.5, sampler="dpmpp-2m",
                           control_images=[None, b], control_scales=1.5).images[0])
    np.testing.assert_array_equal(got, want)


def test_without_control_is_the_pipeline_without_control(server, pipe):
    r = post(server, "/v1/images/generations", {"prompt": "a cat", "size": "64x64", "steps": 2, "seed": 4,
                                                "sampler": "dpmpp-2m"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), ref(pipe, "a cat", 4))


def test_openai_client_edit_with_control_and_canny(server, pipe):
    """The edits form: control_image as base64 text (the client's extra_body) or as a file part."""
    openai = pytest.importorskip("openai")
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ctl = control_image(4, w=64, h=64)
    want = ref(pipe, "a castle", 11, steps=3, image=init, strength=0.6, control_images=[ctl],
               control_preprocess="canny")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=180)
    res = client.images.edit(image=("init.png", base64.b64decode(b64(init)), "image/png"), prompt="a castle",
                             size="64x64", extra_body={"steps": 3, "seed": 11, "strength": 0.6, "sampler": "dpmpp-2m",
                                                       "control_image": [b64(ctl)], "control_preprocess": "canny"})
    np.testing.assert_array_equal(pixels(res.data[0].b64_json), want)
    r = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=180,
                   files=[("image", ("init.png", base64.b64decode(b64(init)), "image/png")),
                          ("control_image", ("ctl.png", base64.b64decode(b64(ctl)), "image/png"))],
                   data={"prompt": "a castle", "size": "64x64", "steps": "3", "seed": "11", "strength": "0.6",
                         "sampler": "dpmpp-2m", "control_preprocess": "canny"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)


def test_openapi_lists_the_edits_form_control_fields(server):
    """The edits route reads its control fields from the form itself; /openapi.json still lists them, as the
    generations body does, with control_image also as file parts."""
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    props = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]["properties"]
    generation = spec["components"]["schemas"]["OpenAIGeneration"]["properties"]
    names = ["control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
             "guess_mode", "control_mode", "control_preprocess"]
    for name in names:
        assert name in props and name in generation, name
        assert props[name]["description"].startswith(generation[name]["description"]), name
    for name in names[1:]:  # the same types as the JSON body's
        assert (props[name].get("anyOf"), props[name].get("type")) == (
            generation[name].get("anyOf"), generation[name].get("type")), name
    alternatives = props["control_image"]["anyOf"]
    assert {"type": "string", "contentMediaType": "application/octet-stream"} in alternatives
    assert props["image"]["contentMediaType"] == "application/octet-stream" and "prompt" in props  # FastAPI's own


def test_edits_form_takes_a_control_image_field_over_a_mebibyte_up_to_the_body_limit(pipe):
    """Starlette caps a form's text field at 1 MiB; the edits form allows one up to --max-body-bytes (a photo-sized
    base64 control image, the client's ``extra_body``), and past that the edge's 413 names the limit."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big = Image.fromarray(np.random.default_rng(6).integers(0, 256, (640, 640, 3), dtype=np.uint8))
    text = b64(big)
    assert 1024 * 1024 < len(text) < 2 * 1024 * 1024
    limit = 3 * 1024 * 1024
    want = ref(pipe, "a dog", 9, image=init, strength=1.0, control_images=[big])
    files = [("image", ("init.png", base64.b64decode(b64(init)), "image/png"))]
    form = {"prompt": "a dog", "size": "64x64", "steps": "2", "seed": "9", "strength": "1", "sampler": "dpmpp-2m"}
    app = create_app(pipe, **{**LIMITS, "max_upload_pixels": 640 * 640, "max_body_bytes": limit})
    with LiveServer(app) as s:
        r = httpx.post(f"{s.url}/v1/images/edits", headers=AUTH, timeout=180, files=files,
                       data={**form, "control_image": text})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        r = httpx.post(f"{s.url}/v1/images/edits", headers=AUTH, timeout=60, files=files,
                       data={**form, "control_image": text + "A" * (limit - len(text))})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "body_too_large" and f"larger than {limit} bytes" in err["message"], err


# -- the A1111 API (sd-webui-controlnet's units) ----------------------------------------------------------------
def test_a1111_units_by_model_name_and_crop_and_resize(server, pipe):
    """Unit 0 names net 1 (A1111's hash suffix ignored), unit 1 net 0 (by ``input_image``, the old name); a disabled
    unit is not read. "Crop and Resize" (the extension's default) of a 96x64 image to 64x64 is its middle 64
    columns."""
    wide = control_image(5, w=96, h=64)
    b = control_image(6, w=64, h=64)
    units = [{"enabled": True, "image": b64(b), "model": "controlnet_1 [0123abcd]", "module": "none", "weight": 0.7,
              "guidance_start": 0.0, "guidance_end": 0.5, "resize_mode": "Just Resize", "control_mode": "Balanced",
              "pixel_perfect": False, "processor_res": 512, "low_vram": False},
             {"input_image": b64(wide), "model": "controlnet_0", "weight": 1.2},
             {"enabled": False, "image": "not even base64", "module": "openpose"}]
    body = {"prompt": "a road", "seed": 21, "steps": 2, "cfg_scale": 6.0, "width": 64, "height": 64,
            "sampler_name": "DPM++ 2M", "batch_size": 2, "alwayson_scripts": {"ControlNet": {"args": units}}}
    r = post(server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["sdrt_control"]["control_scales"] == [1.2, 0.7]
    middle = wide.crop((16, 0, 80, 64))
    for seed, img in zip(info["all_seeds"], out["images"], strict=True):
        want = ref(pipe, "a road", seed, guidance_scale=6.0, control_images=[middle, b], control_scales=[1.2, 0.7],
                   control_end=[1.0, 0.5])
        np.testing.assert_array_equal(pixels(img), want)


def test_a1111_img2img_unit_without_image_takes_the_init_image(server, pipe):
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    unit = {"enabled": True, "module": "canny", "model": "None", "threshold_a": 100, "threshold_b": 200,
            "processor_res": -1}
    r = post(server, "/sdapi/v1/img2img", {"prompt": "a boat", "init_images": [b64(init)], "denoising_strength": 0.5,
                                           "steps": 4, "seed": 2, "cfg_scale": 7.5, "sampler_name": "DPM++ 2M",
                                           "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    want = ref(pipe, "a boat", 2, steps=4, image=init, strength=0.5, control_images=[init], control_preprocess="canny")
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)


def test_model_and_module_lists(server):
    assert httpx.get(f"{server.url}/controlnet/model_list", headers=AUTH).json() == {
        "model_list": ["controlnet_0", "controlnet_1"]}
    assert httpx.get(f"{server.url}/controlnet/module_list", headers=AUTH).json() == {"module_list": ["none", "canny"]}


# -- batching -----------------------------------------------------------------------------------------------------
def test_batch_key_holds_the_control_images_and_settings():
    a, b = control_image(1), control_image(2)
    batcher = Batcher([], warmup=False)

    def key(**control):
        return batcher.key(Job.of(["p"], None, [1], 64, 64, 2, "ddim", 7.5, control=control or None))

    assert key(control_images=[a]) == key(control_images=[control_image(1)])  # the same pixels
    assert key(control_images=[a]) != key(control_images=[b])
    assert key(control_images=[a]) != key(control_images=[a], control_scales=0.5)
    assert key(control_images=[a]) != key(control_images=[None, a])
    assert key(control_images=[a]) != key()
    pal, other = a.convert("P"), a.convert("P")
    other.putpalette(bytes(255 - v for v in pal.getpalette()))  # the same indices, other colours
    assert key(control_images=[pal]) != key(control_images=[other])
    batcher.close(0)


def test_concurrent_requests_with_other_control_images_each_get_their_own(server, pipe):
    """Four clients inside one batch window, two control images: each image equals its own Pipeline call, and the
    server ran them as two batches of two (same control image: one batch)."""
    imgs = [control_image(10), control_image(11)]
    before = batches(server)
    out: dict[int, np.ndarray] = {}

    barrier = threading.Barrier(4)

    def client(k: int) -> None:
        barrier.wait()
        r = post(server, "/v1/images/generations", {"prompt": "a hill", "size": "64x64", "steps": 2, "seed": 30 + k,
                                                    "sampler": "dpmpp-2m", "control_image": [b64(imgs[k % 2])]})
        assert r.status_code == 200, r.text
        out[k] = pixels(r.json()["data"][0]["b64_json"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = batches(server)
    assert after - before == 2
    for k in range(4):
        np.testing.assert_array_equal(out[k], ref(pipe, "a hill", 30 + k, control_images=[imgs[k % 2]]))


# -- the event loop ----------------------------------------------------------------------------------------------
def _edit(mask: bool) -> dict:
    from PIL import Image

    init = b64(Image.fromarray(np.full((64, 64, 3), 120, np.uint8)))
    alpha = np.full((64, 64, 4), 255, np.uint8)
    alpha[16:48, 16:48, 3] = 0  # transparent: the region to edit
    files = [("image", ("init.png", base64.b64decode(init), "image/png"))]
    if mask:
        files.append(("mask", ("mask.png", base64.b64decode(b64(Image.fromarray(alpha, "RGBA"))), "image/png")))
    return {"files": files, "data": {"prompt": "x", "size": "64x64", "steps": "2"}}


@pytest.mark.parametrize("module, name, path, body", [
    # the batch key digests each control image's pixels
    ("batcher", "control_identity", "/v1/images/generations",
     {"json": {"prompt": "x", "size": "64x64", "steps": 1, "control_image": b64(control_image(1))}}),
    ("control", "crop_to", "/sdapi/v1/txt2img",  # A1111's "Crop and Resize", the units' default
     {"json": {"prompt": "x", "width": 64, "height": 64, "steps": 1, "alwayson_scripts": {"controlnet": {
         "args": [{"image": b64(control_image(1, w=96, h=64))}]}}}}),
    ("masks", "openai_mask", "/v1/images/edits", _edit(mask=True)),
    ("images", "fit", "/v1/images/edits", _edit(mask=False)),
])
def test_cpu_work_on_a_request_image_does_not_stall_the_server(server, monkeypatch, module, name, path, body):
    """Each step over a request's pixels (decoding is threaded already) runs off the event loop: while one is slow
    (as on a large image), the server still answers others at once."""
    import importlib

    mod = importlib.import_module(f"sdrt.serve.{module}")
    inside, release = threading.Event(), threading.Event()
    real = getattr(mod, name)

    def slow(*args, **kw):
        inside.set()
        release.wait(20)
        return real(*args, **kw)

    monkeypatch.setattr(mod, name, slow)
    r = answers_while_held(server.url, path, body, AUTH, inside, release)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path, body, url", [
    ("/v1/images/generations", {"json": {"prompt": "x", "size": "64x64", "steps": 1}}, False),
    ("/v1/images/generations", {"json": {"prompt": "x", "size": "64x64", "steps": 1, "response_format": "url"}}, True),
    ("/v1/images/edits", _edit(mask=True), False),
    ("/sdapi/v1/txt2img", {"json": {"prompt": "x", "width": 64, "height": 64, "steps": 1}}, False),
])
def test_encoding_the_response_images_does_not_stall_the_server(server, pipe, tmp_path, monkeypatch, path, body,
                                                                url):
    """The response's images are encoded (base64, or written to the image folder behind their URLs) off the event
    loop: while that is slow (as for a batch of large images), the server still answers others at once."""
    import contextlib

    from sdrt.serve import images as serve_images

    inside, release = threading.Event(), threading.Event()

    def slow(real):
        def wait(*args, **kw):
            inside.set()
            release.wait(20)
            return real(*args, **kw)
        return wait

    monkeypatch.setattr(serve_images, "b64", slow(serve_images.b64))
    if url:  # the image's file behind its URL
        monkeypatch.setattr(type(tmp_path), "write_bytes", slow(type(tmp_path).write_bytes))
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(LiveServer(create_app(pipe, **LIMITS, image_dir=tmp_path))) if url else server
        r = answers_while_held(live.url, path, body, AUTH, inside, release)
    assert r.status_code == 200, r.text
    if url:
        assert [p.suffix for p in tmp_path.iterdir()] == [".png"]
        assert r.json()["data"][0]["url"].endswith(next(tmp_path.iterdir()).name)
    else:
        b = (r.json()["images"] if path.startswith("/sdapi") else [d["b64_json"] for d in r.json()["data"]])[0]
        from PIL import Image

        assert Image.open(io.BytesIO(base64.b64decode(b))).size == (64, 64)


# -- refusals, before any work -------------------------------------------------------------------------------------
def unit(**kw):
    return {"alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "image": b64(control_image(1)), **kw}]}}}


GEN = {"prompt": "x", "size": "64x64", "steps": 1}
T2I = {"prompt": "x", "width": 64, "height": 64, "steps": 1}


@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/images/generations", {**GEN, "control_image": [b64(control_image(1))] * 3}, 422, "control_image",
     "3 control images for the 2 ControlNet(s) of this export (controlnet_0, controlnet_1)"),
    ("/v1/images/generations", {**GEN, "control_image": b64(control_image(1)),
                                "controlnet_conditioning_scale": [1.0, 0.5, 0.2]}, 422,
     "controlnet_conditioning_scale", "control_scales has 3 entries for the 1 control image(s) and 2 ControlNet(s)"),
    ("/v1/images/generations", {**GEN, "control_image": b64(control_image(1)), "control_mode": 1}, 422,
     "control_mode", "no ControlNet of this export takes a control mode"),
    ("/v1/images/generations", {**GEN, "control_image": b64(control_image(1)), "controlnet_conditioning_scale": 11},
     422, "controlnet_conditioning_scale", "give a number from 0 to 10"),
    ("/v1/images/generations", {**GEN, "control_image": b64(control_image(1)), "control_guidance_start": 0.6,
                                "control_guidance_end": 0.4}, 422, "control_guidance_start", "0 <= start < end <= 1"),
    ("/v1/images/generations", {**GEN, "control_image": b64(control_image(1)), "control_preprocess": "depth"}, 422,
     "control_preprocess", "control_preprocess 'depth' is not one of canny"),
    ("/v1/images/generations", {**GEN, "controlnet_conditioning_scale": 0.5}, 422, "controlnet_conditioning_scale",
     "applies to control images"),
    ("/v1/images/generations", {**GEN, "control_image": "bm90IGFuIGltYWdl"}, 422, "control_image",
     "not a readable PNG"),
    ("/v1/images/generations", {**GEN, "control_image": b64(control_image(1, w=300, h=300))}, 422, "control_image",
     "at most 40000 are accepted"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(module="depth_midas")}, 422, "alwayson_scripts.controlnet.args[0].module",
     "sdrt runs the preprocessors none, canny"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(model="control_v11p_sd15_openpose [cab727d4]")}, 422,
     "alwayson_scripts.controlnet.args[0].model", "it has: controlnet_0, controlnet_1"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(resize_mode=2)}, 422, "alwayson_scripts.controlnet.args[0].resize_mode",
     "'Just Resize' (0) or 'Crop and Resize' (1)"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(control_mode="ControlNet is more important")}, 422,
     "alwayson_scripts.controlnet.args[0].control_mode", "'Balanced' (0)"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(module="canny", pixel_perfect=True)}, 422,
     "alwayson_scripts.controlnet.args[0].pixel_perfect", "own resolution"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(module="canny", processor_res=512)}, 422,
     "alwayson_scripts.controlnet.args[0].processor_res",
     "takes -1 (or null) only; to run canny at 512 pixels, resize the image so its shorter side is 512 pixels"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(module="canny", threshold_a=50)}, 422,
     "alwayson_scripts.controlnet.args[0].threshold_a", "thresholds 100 and 200"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(weight=0.5, union_control_type="OpenPose")}, 422,
     "alwayson_scripts.controlnet.args[0].union_control_type", "an integer"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(advanced_weighting=[1.0] * 13)}, 422,
     "alwayson_scripts.controlnet.args[0].advanced_weighting", "leave it out"),
    ("/sdapi/v1/txt2img", {**T2I, "alwayson_scripts": {"ADetailer": {"args": [True]}}}, 422, "alwayson_scripts",
     "controlnet script only"),
    ("/sdapi/v1/txt2img", {**T2I, **unit(image=None)}, 422, "alwayson_scripts.controlnet.args[0].image",
     "has no image"),
])
def test_refusals_name_the_field_and_the_allowed_values(server, path, body, status, param, says):
    before = batches(server)
    r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert batches(server) == before  # no work ran


def test_control_with_an_inpainting_mask_is_refused_before_work(server):
    from PIL import Image

    init = np.full((64, 64, 4), 200, np.uint8)
    init[16:48, 16:48, 3] = 0  # transparent: the region to edit
    png = base64.b64decode(b64(Image.fromarray(init, "RGBA")))
    r = httpx.post(f"{server.url}/v1/images/edits", headers=AUTH, timeout=60,
                   files=[("image", ("init.png", png, "image/png"))],
                   data={"prompt": "x", "size": "64x64", "steps": "1", "control_image": b64(control_image(1))})
    assert r.status_code == 422 and "ControlNet with inpainting is not supported" in r.json()["error"]["message"]


def test_an_export_without_controlnets_refuses_control(tiny_export):
    with LiveServer(create_app(shared_pipeline(tiny_export("sd15-tiny")), **LIMITS)) as s:
        r = post(s, "/v1/images/generations", {**GEN, "control_image": b64(control_image(1))})
        assert r.status_code == 400 and r.json()["error"]["code"] == "controlnet_unavailable"
        assert "exported without ControlNets" in r.json()["error"]["message"]
        r = post(s, "/sdapi/v1/txt2img", {**T2I, **unit()})
        assert r.status_code == 400 and r.json()["error"]["param"] == "alwayson_scripts"
        assert httpx.get(f"{s.url}/controlnet/model_list", headers=AUTH).json() == {"model_list": []}


# -- FLUX.1 Depth: a control model --------------------------------------------------------------------------------
def test_flux_depth_over_both_apis(flux_export):
    fpipe = shared_pipeline(flux_export("flux-depth-dev-tiny"))
    depth = control_image(12, w=64, h=64)
    want = np.asarray(fpipe("a boat", height=64, width=64, steps=2, guidance_scale=10.0, seed=5,
                            control_images=[depth]).images[0])
    with LiveServer(create_app(fpipe, **LIMITS)) as s:
        r = post(s, "/v1/images/generations", {"prompt": "a boat", "size": "64x64", "steps": 2, "seed": 5,
                                               "guidance_scale": 10.0, "control_image": b64(depth)})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        r = post(s, "/sdapi/v1/txt2img", {"prompt": "a boat", "width": 64, "height": 64, "steps": 2, "seed": 5,
                                          "cfg_scale": 10.0, "sampler_name": "Euler", **unit(image=b64(depth))})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
        r = post(s, "/v1/images/generations", {"prompt": "a boat", "size": "64x64", "steps": 1})
        assert r.status_code == 422 and "control_images=[image]" in r.json()["error"]["message"]
        r = post(s, "/sdapi/v1/txt2img", {"prompt": "a boat", "width": 64, "height": 64, "steps": 1})
        assert r.status_code == 422 and r.json()["error"]["param"] == "alwayson_scripts"
        r = post(s, "/v1/images/generations", {"prompt": "a boat", "size": "64x64", "steps": 1,
                                               "control_image": b64(depth), "controlnet_conditioning_scale": 0.5})
        assert r.status_code == 422 and r.json()["error"]["param"] == "controlnet_conditioning_scale"
        assert "applies to ControlNets" in r.json()["error"]["message"]


def test_flux_depth_inpaint_over_both_apis(flux_export):
    """A control image with a mask: the edits form (an image whose transparent pixels mark the region to edit) and
    A1111's img2img (a mask, white = repaint, and a unit; A1111 pastes the original back outside the blurred mask)
    give the Pipeline's images with that mask (FluxControlInpaintPipeline's, tests/test_flux_control.py)."""
    from PIL import Image

    fpipe = shared_pipeline(flux_export("flux-depth-dev-tiny"))
    rgb = np.random.default_rng(8).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[16:48, 24:80] = 0  # transparent: the region to edit
    region = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")
    depth = control_image(13, w=90, h=60)
    call = {"image": Image.fromarray(rgb), "mask_image": region, "control_images": [depth], "strength": 0.8,
            "height": 64, "width": 96, "steps": 3, "guidance_scale": 10.0, "seed": 5}
    want = np.asarray(fpipe("a boat", **call).images[0])
    pasted = np.asarray(fpipe("a boat", paste_back=2.0, **call).images[0])
    png = base64.b64decode(b64(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")))
    with LiveServer(create_app(fpipe, **LIMITS)) as s:
        r = httpx.post(f"{s.url}/v1/images/edits", headers=AUTH, timeout=180,
                       files=[("image", ("init.png", png, "image/png"))],
                       data={"prompt": "a boat", "size": "96x64", "steps": "3", "seed": "5", "strength": "0.8",
                             "guidance_scale": "10", "control_image": b64(depth)})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        r = post(s, "/sdapi/v1/img2img", {"prompt": "a boat", "width": 96, "height": 64, "steps": 3, "seed": 5,
                                          "cfg_scale": 10.0, "sampler_name": "Euler", "denoising_strength": 0.8,
                                          "init_images": [b64(Image.fromarray(rgb))], "mask": b64(region),
                                          "mask_blur": 2, **unit(image=b64(depth))})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), pasted)


# -- FLUX.1 with a Union ControlNet: a control mode per request -------------------------------------------------------
@pytest.fixture(scope="module")
def union_export(tmp_path_factory, export_cache):
    """flux-dev-tiny with one Union ControlNet (``flux-controlnet-union-tiny``, seed 2)."""
    key = ("flux-dev-tiny+union-controlnet", "fp32")
    if key not in export_cache:
        from sdrt.export.controlnet_loading import random_controlnet
        from sdrt.export.flux_export import export_flux
        from sdrt.export.flux_loading import load_flux

        out = tmp_path_factory.mktemp("exports") / key[0]
        export_flux(load_flux(random_preset="flux-dev-tiny"), out,
                    controlnets=[random_controlnet("flux-controlnet-union-tiny", seed=2)])
        export_cache[key] = out
    return export_cache[key]


def test_flux_union_controlnet_mode_over_both_apis(union_export):
    upipe = shared_pipeline(union_export)
    ctl = control_image(13, w=64, h=64)
    base = {"prompt": "a fox", "steps": 2, "seed": 9}
    want = np.asarray(upipe("a fox", height=64, width=64, steps=2, guidance_scale=3.5, seed=9, control_images=[ctl],
                            control_modes=[1], control_scales=[0.7]).images[0])
    with LiveServer(create_app(upipe, **LIMITS)) as s:
        r = post(s, "/v1/images/generations", {**base, "size": "64x64", "guidance_scale": 3.5, "control_image": b64(ctl),
                                               "control_mode": 1, "controlnet_conditioning_scale": 0.7})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        r = post(s, "/sdapi/v1/txt2img", {**base, "width": 64, "height": 64, "cfg_scale": 3.5, "sampler_name": "Euler",
                                          **unit(image=b64(ctl), model="controlnet_0", weight=0.7,
                                                 union_control_type=1)})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
        r = post(s, "/v1/images/generations", {**base, "size": "64x64", "control_image": b64(ctl)})
        assert r.status_code == 422 and r.json()["error"]["param"] == "control_mode"
        assert "is a Union ControlNet of 3 control modes" in r.json()["error"]["message"]
        r = post(s, "/v1/images/generations", {**base, "size": "64x64", "control_image": b64(ctl), "control_mode": 7})
        assert r.status_code == 422 and "give an integer from 0 to 2" in r.json()["error"]["message"]
