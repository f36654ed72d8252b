"""Assembling the app: its ``ServeState``, the routers, the JSON error handlers, the edge middleware, and
the lifespan that starts and drains the batcher."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from . import schemas as S
from .batcher import Batcher
from .config import ServeConfig
from .deps import ServeState
from .edge import Edge
from .errors import ApiError, install_error_handlers
from .routers import a1111, openai, ops

__all__ = ["ApiError", "create_app"]


def create_app(pipeline_or_dir: Any, config: ServeConfig | None = None, *, backend: str = "auto",
               devices: tuple[int, ...] = (0,), precision: str | None = None, **overrides: Any) -> FastAPI:
    """The ASGI app serving one model. ``pipeline_or_dir``: a loaded ``Pipeline`` (the caller keeps it and
    closes it), or an export / engine folder loaded on each of ``devices`` (one worker each) when the app
    starts, with ``backend`` and ``precision`` (openvino's, as ``Pipeline.load``). ``overrides``: ServeConfig
    fields (``max_batch=4``, ``api_key=...``). The app's ``state.serve`` is its ``ServeState``."""
    cfg = replace(config or ServeConfig(), **overrides)
    cfg.check()
    st = ServeState.create(pipeline_or_dir, cfg, backend=backend, devices=devices, precision=precision)
    app = FastAPI(title="sdrt serve", version=_version(), lifespan=_lifespan,
                  description="Stable Diffusion over sdrt: OpenAI images API, AUTOMATIC1111 API, batching. "
                              f"Model: {st.model_id}. Every refusal is a JSON body naming the field.",
                  responses={422: {"model": S.ErrorResponse}, 429: {"model": S.ErrorResponse},
                             503: {"model": S.ErrorResponse}, 504: {"model": S.ErrorResponse}})
    app.state.serve = st
    install_error_handlers(app)
    for r in (ops.router, openai.router, a1111.router):
        app.include_router(r)
    app.add_middleware(Edge, max_body_bytes=cfg.max_body_bytes)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, with the fields a route reads from its form itself (the edits form's control
    fields) listed beside the ones FastAPI knows."""
    if app.openapi_schema is None:
        openai.document_edits_form(FastAPI.openapi(app))
    return app.openapi_schema  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    st: ServeState = app.state.serve
    b = st.start_batcher()
    if st.config.load_before_serving:
        await run_in_threadpool(_wait_loaded, b)
    try:
        yield
    finally:
        # uvicorn has stopped accepting and waited for open requests: fail what is left, finish in-flight
        await run_in_threadpool(b.close, st.config.grace_s)


def _wait_loaded(b: Batcher) -> None:
    while not b.wait_ready(0.2):
        if b.failed is not None:
            raise b.failed


def _version() -> str:
    from sdrt import __version__

    return __version__
