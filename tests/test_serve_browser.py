"""The playground page in a real headless browser (Debian's Chromium): it submits a prompt and shows the
image, which must be the bare Pipeline's image for that prompt and seed."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("fastapi")

from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app

from .helpers.serve_live import LiveServer, pixels

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                       reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)"),
]


def test_playground_submits_a_prompt_and_shows_the_image(tiny_export, tmp_path):
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as pipe, \
            LiveServer(create_app(pipe, batch_window_ms=0, warmup=False)) as s:
        q = urllib.parse.urlencode({"prompt": "a green hill", "width": 64, "height": 64, "steps": 2, "seed": 42,
                                    "cfg_scale": 7.5, "sampler_name": "Euler", "autorun": 1})
        r = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=60000", "--dump-dom",
             f"{s.url}/?{q}"],
            capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r'<img id="result"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', r.stdout)
        assert m is not None, r.stdout[-3000:]
        assert "total_ms" in r.stdout and "seed 42" in r.stdout  # the timings table and the status line
        want = pipe("a green hill", height=64, width=64, steps=2, guidance_scale=7.5, sampler="euler", seed=42)
        np.testing.assert_array_equal(pixels(m.group(1)), np.asarray(want.images[0]))
