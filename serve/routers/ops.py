"""Operations: liveness, readiness, Prometheus metrics, and the browser playground."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from .. import schemas as S
from ..deps import Auth, State
from ..errors import error_response

router = APIRouter()


@router.get("/healthz", tags=["operations"], responses={503: {"model": S.ErrorResponse}})
async def healthz(st: State) -> Any:
    """Alive, unless the model failed to load: then 503, so a process manager restarts the server."""
    b = st.batcher
    failed = b.failed if b is not None else None
    if failed is not None:
        return error_response(503, f"the model failed to load ({type(failed).__name__}: {failed}); the server "
                                   "log has the details", None, "load_failed")
    return {"status": "alive"}


@router.get("/readyz", tags=["operations"], responses={503: {"model": S.ErrorResponse}})
async def readyz(st: State) -> Any:
    b = st.batcher
    if b is not None and b.ready:
        return {"status": "ready", "model": st.model_id, "workers": len(b.pipes)}
    why = "the model failed to load" if b is not None and b.failed else "loading and warming up"
    return error_response(503, why, None, "not_ready")


@router.get("/metrics", tags=["operations"], dependencies=Auth, response_class=Response)
async def metrics_route(st: State) -> Response:
    return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(resources.files("sdrt.serve").joinpath("static/playground.html").read_text())
