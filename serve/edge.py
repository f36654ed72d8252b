"""The ASGI layer in front of the app: request ids, the body-size limit, structured access logs.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so that the app still sees client disconnects.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

access_log = logging.getLogger("sdrt.serve.access")
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REQUEST_ID = "x-request-id"
INSTANCE = "x-sdrt-instance"  # which server (replica) answered: an id per app, nothing about the host


class Edge:
    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.instance = uuid.uuid4().hex[:12]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get(REQUEST_ID, "")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = [0]

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=[*message.get("headers", []),
                                                 (REQUEST_ID.encode(), rid.encode()),
                                                 (INSTANCE.encode(), self.instance.encode())])
            await send(message)

        try:
            body_receive = await self._bounded_body(headers, receive, send_with_id)
            if body_receive is not None:
                await self.app(scope, body_receive, send_with_id)
        finally:
            client = scope.get("client") or ("", 0)
            access_log.info(json.dumps({
                "ts": round(time.time(), 3), "request_id": rid, "method": scope.get("method"),
                "path": scope.get("path"), "status": status[0], "ms": round((time.perf_counter() - t0) * 1e3, 2),
                "client": client[0],
            }))

    async def _bounded_body(self, headers: dict[str, str], receive: Any, send: Any) -> Any:
        """Read the body up to the limit (refusing with 413 past it), then replay it to the app."""
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > self.max_body:
            await _too_large(send, self.max_body)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before its body ended: nothing to answer
            size += len(message.get("body", b""))
            if size > self.max_body:
                await _too_large(send, self.max_body)
                return None
            chunks.append(message)
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in chunks)
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> dict[str, Any]:
            if pending:
                return pending.pop()
            return await receive()

        return replay


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps({"error": {"message": f"the request body is larger than {limit} bytes, the limit",
                                 "type": "invalid_request_error", "param": "body",
                                 "code": "body_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
