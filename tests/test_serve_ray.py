"""``sdrt.serve.ray_app`` on a local Ray cluster: two replicas, requests reach both, batched images equal the
bare Pipeline's, clean shutdown. Marked ``ray`` (deselect with -m 'not ray'); about 20 s and 1.3 GB."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from sdrt.runtime.pipeline import Pipeline

from .helpers.serve_live import free_port, pixels

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_cluster(monkeypatch):
    tmp = tempfile.mkdtemp(prefix="sdrt-ray-")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("HOME", tmp)
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_replicas_serve_batched_images_equal_unbatched(ray_cluster, tiny_export):
    from sdrt.serve.ray_app import build

    folder = tiny_export("sd15-tiny")
    serve.run(build({"path": str(folder), "backend": "ort-cpu", "num_replicas": 2, "max_batch": 4,
                     "batch_window_ms": 400, "warmup": False}), name="sdrt", route_prefix="/")
    url = ray_cluster
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the replicas never became ready"
        time.sleep(0.2)
    out: dict[int, httpx.Response] = {}

    def client(i: int) -> None:
        out[i] = httpx.post(f"{url}/v1/images/generations", timeout=120,
                            json={"prompt": f"harbour {i}", "seed": 20 + i, "steps": 2, "size": "64x64"})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in out.values()), [r.text for r in out.values()]
    assert len({r.headers["x-sdrt-instance"] for r in out.values()}) == 2  # both replicas answered
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        for i, r in out.items():
            want = pipe(f"harbour {i}", height=64, width=64, steps=2, seed=20 + i).images[0]
            np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), np.asarray(want))
    serve.delete("sdrt")
    assert serve.status().applications.get("sdrt") is None
