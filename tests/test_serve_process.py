"""``sdrt serve`` as a process: the CLI, the API key from the environment, SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from .helpers.serve_live import free_port, metric


def test_sigterm_finishes_queued_work_then_exits_0(tiny_export, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SDRT_API_KEY="env-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdrt", "serve", str(tiny_export("sd15-tiny")), "--backend", "ort-cpu",
         "--port", str(port), "--batch-window-ms", "1500", "--grace", "30"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    auth = {"Authorization": "Bearer env-key"}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server never became ready")
        body = {"prompt": "a tree", "steps": 2, "size": "64x64", "seed": 1}
        assert httpx.post(f"{url}/v1/images/generations", json=body).status_code == 401  # key from the env
        got: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
            f"{url}/v1/images/generations", json=body, headers=auth, timeout=60)))
        t.start()
        while metric(httpx.get(f"{url}/metrics", headers=auth).text, "sdrt_queue_depth") != 1:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the request is queued, its batch window still open
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{url}/healthz", timeout=2)
        t.join(60)
        assert got["r"].status_code == 200 and len(got["r"].json()["data"]) == 1
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    assert '"path": "/v1/images/generations", "status": 200' in log  # the structured access log


def test_serve_without_a_folder_is_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdrt", "serve", str(tmp_path / "missing")], capture_output=True, check=False,
                       text=True, timeout=60)
    assert r.returncode == 1 and "missing is not a folder" in r.stderr
