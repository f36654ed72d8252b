"""A request's job to the batcher and back: its deadline, its client leaving, the batcher's refusals as
``ApiError``s, and the request's metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.errors import InputError, SdrtError

from .batcher import DeadlineExceeded, Job, JobResult, QueueFull, ShuttingDown
from .deps import ServeState, still_loading
from .errors import ApiError


async def run_job(st: ServeState, request: Request, job: Job, route: str) -> JobResult:
    """Queue the job and wait for it, without blocking the loop; 504 past the deadline; a client
    that goes away has its queued job cancelled."""
    cfg, metrics = st.config, st.metrics
    b = st.batcher
    if b is None:  # routes ask st.pipeline() first; this only guards a route that did not
        raise still_loading()
    job.request_id = request.scope.get("state", {}).get("request_id", "")
    job.deadline = time.monotonic() + cfg.request_timeout_s
    t0 = time.perf_counter()
    # the batch key digests the control images' pixels and reads the prompts' tokens: off the event loop
    job.key = await run_in_threadpool(b.key, job)
    try:
        fut = b.submit(job)
    except QueueFull as e:
        raise ApiError(429, str(e), None, "queue_full", {"Retry-After": str(cfg.retry_after_s)}) from e
    except ShuttingDown as e:
        raise ApiError(503, str(e), None, "shutting_down") from e
    waiter: asyncio.Future[JobResult] = asyncio.wrap_future(fut)
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
    gone: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait([waiter, gone], timeout=max(0.0, job.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiter not in done:
        b.cancel(job)
        if gone in done:  # counted under its code by the error handler
            raise ApiError(499, "the client closed the connection; its queued request was cancelled",
                           None, "client_disconnected")
        raise ApiError(504, f"the request did not finish within {cfg.request_timeout_s:g} s; retry, or "
                            "start the server with a longer --request-timeout", None, "deadline_exceeded")
    try:
        result = waiter.result()
    except DeadlineExceeded as e:
        raise ApiError(504, str(e), None, "deadline_exceeded") from e
    except ShuttingDown as e:
        raise ApiError(503, str(e), None, "shutting_down") from e
    except InputError as e:
        raise ApiError(422, str(e), None, "invalid_value") from e
    except SdrtError as e:
        raise ApiError(500, str(e), None, type(e).__name__) from e
    metrics.request.labels(route).observe(time.perf_counter() - t0)
    metrics.queue_wait.observe(result.timings.get("queue_ms", 0.0) / 1e3)
    metrics.images.inc(len(result.png))
    return result


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)
