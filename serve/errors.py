"""Refusals as JSON: ``ApiError``, the error body, and the handlers that turn every failure into one."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("sdrt.serve")


class ApiError(Exception):
    """A refusal: HTTP status, message, and the field it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The OpenAI-style error body: ``{"error": {message, type, param, code}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}, **extra},
                        status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal and failure as a JSON body naming the field, counted in the app's metrics by kind."""
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)


def _count(request: Request, kind: str) -> None:
    request.app.state.serve.metrics.errors.labels(kind).inc()


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    _count(request, e.code or str(e.status))
    return error_response(e.status, e.message, e.param, e.code, e.headers)


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    _count(request, "invalid_request")
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "form")]
    param = ".".join(loc) or None
    msg = "; ".join(_in_words(er) for er in errs[:5])
    # loc, msg and type only: the input itself may not be JSON (inf, NaN, bytes)
    detail = [{"loc": [str(x) for x in er.get("loc", ())], "msg": str(er.get("msg")), "type": er.get("type")}
              for er in errs]
    return error_response(422, msg, param, "invalid_value", detail=detail)


# what a field with a pattern takes, in words (a regular expression is no answer for a client's user)
_PATTERNS = {"size": "WIDTHxHEIGHT in pixels with a lowercase x, such as 512x512 or 768x512"}


def _in_words(er: Any) -> str:
    """One validation error as a sentence that names the field, what was wrong and what is allowed."""
    loc = [str(x) for x in er.get("loc", ())]
    field = ".".join(x for x in loc if x not in ("body", "query", "path", "form")) or "body"
    kind, ctx = er.get("type", ""), er.get("ctx") or {}
    if kind == "json_invalid":
        where = f" ({ctx['error']})" if ctx.get("error") else ""
        return f"the request body is not valid JSON{where}: send one JSON object with the request's fields"
    if kind == "string_pattern_mismatch":
        name = loc[-1] if loc else field
        allowed = _PATTERNS.get(name, f"text matching {ctx.get('pattern')}")
        return f"{field} {er.get('input')!r} is not valid: give {allowed}"
    if kind == "missing":
        return f"{field} is required"
    return f"{field}: {er.get('msg')}"


async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
    _count(request, str(e.status_code))
    return error_response(e.status_code, str(e.detail), None, None, getattr(e, "headers", None))


async def _crash(request: Request, e: Exception) -> JSONResponse:
    _count(request, "internal")
    log.exception("request %s failed", request.scope.get("state", {}).get("request_id"))
    return error_response(500, f"internal error ({type(e).__name__}); the server log has the details")
