"""Property-based fuzzing of the OpenAPI schema (Schemathesis, loopback, a bounded number of cases): no 5xx,
every 4xx a JSON error body, and the server stays ready."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, settings

from sdrt.runtime.pipeline import Pipeline
from sdrt.serve import create_app

from .helpers.serve_live import LiveServer


@pytest.fixture(scope="module")
def live(tiny_export):
    with Pipeline.load(tiny_export("sd15-tiny"), backend="ort-cpu") as pipe:
        # limits so that every valid request is cheap: 64x64, 1 step, 1 image
        app = create_app(pipe, max_steps=1, max_pixels=64 * 64, max_n=1, batch_window_ms=0, warmup=False,
                         max_upload_pixels=128 * 128)
        with LiveServer(app) as s:
            yield s


def test_fuzz_no_5xx_and_json_errors(live):
    # Schemathesis' pytest plugin does not load under this pytest: drive its strategies with hypothesis
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {"/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img"} <= {op.path for op in ops}
    seen: list[int] = []
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case) -> None:
            r = case.call(timeout=60)
            seen.append(r.status_code)
            assert r.status_code < 500, f"{case.method} {case.path}: {r.status_code} {r.text[:300]}"
            if r.status_code >= 400:
                assert isinstance(r.json().get("error", {}).get("message"), str), r.text[:300]

        check()
    assert httpx.get(f"{live.url}/readyz").status_code == 200
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
