"""The FastAPI app: routes for both APIs, auth, limits, errors as JSON, health, metrics, the playground."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.runtime.errors import InputError, SdrtError

from . import images as imgs
from . import masks
from . import schemas as S
from .batcher import Batcher, DeadlineExceeded, Job, JobResult, QueueFull, ShuttingDown
from .config import ServeConfig
from .edge import Edge
from .metrics import Metrics

log = logging.getLogger("sdrt.serve")


class ApiError(Exception):
    """A refusal: HTTP status, message, and the field it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}, **extra},
                        status_code=status, headers=headers)


def create_app(pipeline_or_dir: Any, config: ServeConfig | None = None, *, backend: str = "auto",
               devices: tuple[int, ...] = (0,), precision: str | None = None, **overrides: Any) -> FastAPI:
    """The ASGI app serving one model. ``pipeline_or_dir``: a loaded ``Pipeline`` (the caller keeps it and
    closes it), or an export / engine folder loaded on each of ``devices`` (one worker each) when the app
    starts, with ``backend`` and ``precision`` (openvino's, as ``Pipeline.load``). ``overrides``: ServeConfig
    fields (``max_batch=4``, ``api_key=...``)."""
    cfg = replace(config or ServeConfig(), **overrides)
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        from sdrt.runtime.pipeline import Pipeline

        folder = Path(pipeline_or_dir)
        loaders: list[Callable[[], Any]] = [functools.partial(Pipeline.load, folder, backend, device_id=d,
                                                              precision=precision) for d in devices]
        owns = True
    else:
        folder = Path(pipeline_or_dir.folder)
        loaders = [lambda: pipeline_or_dir]
        owns = False
    model_id = cfg.model_id or folder.name
    created = int(time.time())
    if cfg.image_dir is not None:
        cfg.image_dir.mkdir(parents=True, exist_ok=True)

    batcher_holder: dict[str, Batcher] = {}

    def make_batcher() -> Batcher:
        return Batcher(loaders, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1e3,
                       max_queue=cfg.max_queue, batching=cfg.batching, warmup=cfg.warmup,
                       on_batch=lambda jobs, t: metrics.observe_batch(jobs, t), owns_pipelines=owns)

    metrics = Metrics(lambda: batcher_holder["b"].depth if "b" in batcher_holder else 0,
                      lambda: batcher_holder["b"].in_flight if "b" in batcher_holder else 0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        b = make_batcher()
        batcher_holder["b"] = b
        b.start()
        if cfg.load_before_serving:
            await run_in_threadpool(_wait_loaded, b)
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for open requests: fail what is left, finish in-flight
            await run_in_threadpool(b.close, cfg.grace_s)

    app = FastAPI(title="sdrt serve", version=_version(), lifespan=lifespan,
                  description="Stable Diffusion over sdrt: OpenAI images API, AUTOMATIC1111 API, batching. "
                              f"Model: {model_id}. Every refusal is a JSON body naming the field.",
                  responses={422: {"model": S.ErrorResponse}, 429: {"model": S.ErrorResponse},
                             503: {"model": S.ErrorResponse}, 504: {"model": S.ErrorResponse}})
    app.state.config = cfg
    app.state.metrics = metrics
    app.state.batcher = lambda: batcher_holder.get("b")

    # -- errors: always JSON, always naming the field --------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.code or str(e.status)).inc()
        return _error(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "form")]
        param = ".".join(loc) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ())[1:]) or 'body'}: {er.get('msg')}"
                        for er in errs[:5])
        # loc, msg and type only: the input itself may not be JSON (inf, NaN, bytes)
        detail = [{"loc": [str(x) for x in er.get("loc", ())], "msg": str(er.get("msg")), "type": er.get("type")}
                  for er in errs]
        return _error(422, msg, param, "invalid_value", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        metrics.errors.labels(str(e.status_code)).inc()
        return _error(e.status_code, str(e.detail), None, None, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        metrics.errors.labels("internal").inc()
        log.exception("request %s failed", request.scope.get("state", {}).get("request_id"))
        return _error(500, f"internal error ({type(e).__name__}); the server log has the details")

    # -- auth -----------------------------------------------------------------------------------------
    async def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), cfg.api_key.encode())
        if not ok:
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", "authorization",
                           "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    Auth = [Depends(auth)]

    # -- checks that depend on the model and the server's limits --------------------------------------
    def pipe0() -> Any:
        b = batcher_holder.get("b")
        if b is None or not b.ready:
            if b is not None and b.failed is not None:
                raise ApiError(503, f"the model failed to load: {b.failed}", None, "not_ready")
            raise ApiError(503, "the model is still loading; retry shortly (GET /readyz says when)", None,
                           "not_ready", {"Retry-After": "2"})
        return b.pipes[0]

    def check_size(w: int, h: int, field_w: str, field_h: str) -> None:
        lim = pipe0().manifest.limits
        for name, v in ((field_w, w), (field_h, h)):
            if v % lim.multiple_of or not lim.min_size <= v <= lim.max_size:
                raise ApiError(422, f"{name} {v} is outside this model's sizes: a multiple of {lim.multiple_of} "
                                    f"in {lim.min_size}..{lim.max_size}", name, "invalid_size")
        if w * h > cfg.max_pixels:
            raise ApiError(422, f"{w}x{h} = {w * h} pixels; this server allows at most {cfg.max_pixels}",
                           field_w, "too_many_pixels")

    def check_mask_needed(has_mask: bool, how: str) -> None:
        if not has_mask and getattr(pipe0(), "is_inpainting", False):
            raise ApiError(422, f"{model_id} is an inpainting model: every request needs an image and a mask "
                                f"({how})", "mask", "mask_required")

    def check_common(prompt: str, negative: str | None, steps: int, n: int, n_field: str,
                     steps_field: str = "steps") -> None:
        for name, text in (("prompt", prompt), ("negative_prompt", negative or "")):
            if len(text) > cfg.max_prompt_chars:
                raise ApiError(422, f"{name} has {len(text)} characters; at most {cfg.max_prompt_chars}", name,
                               "prompt_too_long")
        if not 1 <= steps <= cfg.max_steps:
            raise ApiError(422, f"{steps_field} {steps} is outside 1..{cfg.max_steps}", steps_field,
                           "invalid_steps")
        limit = cfg.images_per_request
        if not 1 <= n <= limit:
            raise ApiError(422, f"{n_field} {n} is outside 1..{limit} (images per request on this server)",
                           n_field, "too_many_images")

    def sampler_of(name: str | None, field: str, scheduler: str | None = None) -> str:
        try:
            return S.sampler_name(name or cfg.default_sampler, scheduler)
        except ValueError as e:
            raise ApiError(422, str(e), field, "invalid_sampler") from e

    def seeds_for(seed: int | None, n: int) -> list[int]:
        base = secrets.randbelow(S.MAX_SEED + 1) if seed is None or seed < 0 else seed
        return [(base + k) % (S.MAX_SEED + 1) for k in range(n)]  # 32-bit, wrapping as the seed range does

    async def run(request: Request, job: Job, route: str) -> JobResult:
        """Queue the job and wait for it, without blocking the loop; 504 past the deadline; a client
        that goes away has its queued job cancelled."""
        b = batcher_holder["b"]
        job.request_id = request.scope.get("state", {}).get("request_id", "")
        job.deadline = time.monotonic() + cfg.request_timeout_s
        t0 = time.perf_counter()
        try:
            fut = b.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), None, "queue_full", {"Retry-After": str(cfg.retry_after_s)}) from e
        except ShuttingDown as e:
            raise ApiError(503, str(e), None, "shutting_down") from e
        waiter: asyncio.Future[Any] = asyncio.wrap_future(fut)
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

    def store(png: bytes, request: Request) -> str:
        assert cfg.image_dir is not None
        name = f"{uuid.uuid4().hex}.png"
        tmp = cfg.image_dir / f".{name}.tmp"
        tmp.write_bytes(png)
        tmp.rename(cfg.image_dir / name)
        return f"{str(request.base_url).rstrip('/')}/images/{name}"

    def openai_response(result: JobResult, response_format: str, request: Request) -> dict[str, Any]:
        if response_format == "url":
            data = [{"url": store(p, request)} for p in result.png]
        else:
            data = [{"b64_json": imgs.b64(p)} for p in result.png]
        return {"created": int(time.time()), "data": data}

    def check_model(model: str | None) -> None:
        if model not in (None, "", model_id):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {model_id!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    def check_url(response_format: str) -> None:
        if response_format == "url" and cfg.image_dir is None:
            raise ApiError(400, "response_format 'url' needs a place to keep images: start the server with "
                                "--image-dir DIR, or ask for b64_json", "response_format", "url_unavailable")

    def parse_size(size: str | None) -> tuple[int, int]:
        if size is None or size == "auto":
            d = pipe0().manifest.default_size
            return d, d
        m = re.fullmatch(S.OPENAI_SIZE.strip("^$"), size)
        if m is None:
            raise ApiError(422, f"size {size!r} must be 'WxH', e.g. '512x512'", "size", "invalid_size")
        w, h = (int(x) for x in size.split("x"))
        check_size(w, h, "size", "size")
        return w, h

    # -- routes: operations ---------------------------------------------------------------------------
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": S.ErrorResponse}})
    async def readyz() -> Any:
        b = batcher_holder.get("b")
        if b is not None and b.ready:
            return {"status": "ready", "model": model_id, "workers": len(b.pipes)}
        why = "the model failed to load" if b is not None and b.failed else "loading and warming up"
        return _error(503, why, None, "not_ready")

    @app.get("/metrics", tags=["operations"], dependencies=Auth, response_class=Response)
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("sdrt.serve").joinpath("static/playground.html").read_text())

    @app.get("/images/{name}", tags=["openai"], include_in_schema=False)
    async def image_file(name: str) -> FileResponse:
        if cfg.image_dir is None or not re.fullmatch(r"[0-9a-f]{32}\.png", name):
            raise ApiError(404, "no such image", "name", "not_found")
        path = cfg.image_dir / name
        if not path.is_file():
            raise ApiError(404, "no such image", "name", "not_found")
        return FileResponse(path, media_type="image/png")

    # -- routes: OpenAI -------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["openai"], dependencies=Auth, response_model=S.OpenAIModels)
    async def models() -> S.OpenAIModels:
        return S.OpenAIModels(data=[S.OpenAIModel(id=model_id, created=created)])

    @app.post("/v1/images/generations", tags=["openai"], dependencies=Auth, response_model=S.OpenAIImages)
    async def generations(body: S.OpenAIGeneration, request: Request) -> Any:
        check_model(body.model)
        check_url(body.response_format)
        w, h = parse_size(body.size)
        steps = body.steps or min(cfg.default_steps, cfg.max_steps)
        check_common(body.prompt, body.negative_prompt, steps, body.n, "n")
        job = Job([body.prompt] * body.n, None if body.negative_prompt is None else [body.negative_prompt] * body.n,
                  seeds_for(body.seed, body.n), h, w, steps, sampler_of(body.sampler, "sampler"),
                  cfg.default_guidance if body.guidance_scale is None else body.guidance_scale)
        return openai_response(await run(request, job, "generations"), body.response_format, request)

    @app.post("/v1/images/edits", tags=["openai"], dependencies=Auth, response_model=S.OpenAIImages)
    async def edits(
        request: Request,
        image: Annotated[UploadFile, File(description="the starting image (PNG, JPEG or WebP)")],
        prompt: Annotated[str, Form(min_length=1, max_length=S.MAX_PROMPT_CHARS)],
        mask: Annotated[UploadFile | None, File(
            description="inpainting: a PNG of the image's size whose fully transparent pixels (alpha 0) mark the "
                        "region to edit; without it, the image's own fully transparent pixels do, if any")] = None,
        n: Annotated[int, Form(ge=1, le=S.MAX_N)] = 1,
        size: Annotated[str | None, Form(pattern=S.OPENAI_SIZE)] = None,
        response_format: Annotated[str, Form(pattern="^(b64_json|url)$")] = "b64_json",
        model: Annotated[str | None, Form()] = None,
        negative_prompt: Annotated[str | None, Form(max_length=S.MAX_PROMPT_CHARS)] = None,
        steps: Annotated[int | None, Form(ge=1, le=S.MAX_STEPS)] = None,
        guidance_scale: Annotated[float | None, Form(ge=0.0, le=50.0, allow_inf_nan=False)] = None,
        sampler: Annotated[str | None, Form()] = None,
        seed: Annotated[int | None, Form(ge=-1, le=S.MAX_SEED)] = None,
        strength: Annotated[float | None, Form(gt=0.0, le=1.0, allow_inf_nan=False,
                                               description="how much to change the image, (0, 1]; default 0.8, "
                                                           "with a mask 1")] = None,
    ) -> Any:
        check_model(model)
        check_url(response_format)
        steps = steps or min(cfg.default_steps, cfg.max_steps)
        check_common(prompt, negative_prompt, steps, n, "n")
        raw = await run_in_threadpool(_decode_upload, await image.read(), "image", cfg.max_upload_pixels, True)
        region = None
        if mask is not None:
            raw_mask = await run_in_threadpool(_decode_upload, await mask.read(), "mask", cfg.max_upload_pixels, True)
            try:
                region = masks.openai_mask(raw_mask, raw)
            except imgs.ImageRefused as e:
                raise ApiError(400, str(e), e.field, "invalid_mask") from e
        else:
            region = masks.openai_image_mask(raw)
        check_mask_needed(region is not None, "send mask, or an image whose region to edit is transparent")
        init = raw.convert("RGB")
        w, h = parse_size(size) if size else _snap(init.size, pipe0().manifest.limits)
        if size is None:
            check_size(w, h, "image", "image")
        job = Job([prompt] * n, None if negative_prompt is None else [negative_prompt] * n, seeds_for(seed, n),
                  h, w, steps, sampler_of(sampler, "sampler"),
                  cfg.default_guidance if guidance_scale is None else guidance_scale,
                  image=imgs.fit(init, w, h), strength=strength,
                  mask=None if region is None else imgs.fit(region, w, h))
        return openai_response(await run(request, job, "edits"), response_format, request)

    # -- routes: AUTOMATIC1111 ------------------------------------------------------------------------
    async def a1111(body: S.A1111Txt2Img, request: Request, init: Any, route: str, mask: Any = None,
                    blur: float | None = None) -> dict[str, Any]:
        if init is not None and body.width is None and body.height is None:
            w, h = _snap(init.size, pipe0().manifest.limits)
        else:
            d = pipe0().manifest.default_size
            w, h = body.width or d, body.height or d
        check_size(w, h, "width", "height")
        check_common(body.prompt, body.negative_prompt, body.steps, body.batch_size, "batch_size")
        sampler = sampler_of(body.sampler_name, "sampler_name", body.scheduler)
        seeds = seeds_for(body.seed, body.batch_size * body.n_iter)
        strength = getattr(body, "denoising_strength", 1.0)
        jobs = [Job([body.prompt] * body.batch_size, [body.negative_prompt] * body.batch_size,
                    seeds[i * body.batch_size:(i + 1) * body.batch_size], h, w, body.steps, sampler, body.cfg_scale,
                    image=None if init is None else imgs.fit(init, w, h), strength=strength,
                    mask=None if mask is None else imgs.fit(mask, w, h), paste_back=blur)
                for i in range(body.n_iter)]
        results = await asyncio.gather(*(run(request, j, route) for j in jobs))
        pngs = [p for r in results for p in r.png]
        params = body.model_dump()
        params.pop("init_images", None)
        params.pop("mask", None)
        info = {"prompt": body.prompt, "all_prompts": [body.prompt] * len(pngs),
                "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(pngs),
                "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(pngs),
                "width": w, "height": h, "sampler_name": body.sampler_name or sampler, "sdrt_sampler": sampler,
                "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
                "n_iter": body.n_iter, "denoising_strength": strength if init is not None else None,
                "mask_blur": blur, "inpainting_mask_invert": getattr(body, "inpainting_mask_invert", 0)
                if mask is not None else None,
                "sd_model_name": model_id, "timings": [_timings(r.timings) for r in results]}
        return {"images": [imgs.b64(p) for p in pngs], "parameters": params, "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img", tags=["a1111"], dependencies=Auth, response_model=S.A1111Response)
    async def txt2img(body: S.A1111Txt2Img, request: Request) -> Any:
        check_mask_needed(False, "POST /sdapi/v1/img2img with init_images and mask")
        return await a1111(body, request, None, "txt2img")

    @app.post("/sdapi/v1/img2img", tags=["a1111"], dependencies=Auth, response_model=S.A1111Response)
    async def img2img(body: S.A1111Img2Img, request: Request) -> Any:
        pipe0()
        init = await run_in_threadpool(_decode_b64, body.init_images[0], "init_images", cfg.max_upload_pixels)
        if body.mask in (None, ""):
            check_mask_needed(False, "send mask, white = repaint")
            return await a1111(body, request, init, "img2img")
        blur = _a1111_inpaint_options(body)
        raw = await run_in_threadpool(_decode_b64, body.mask, "mask", cfg.max_upload_pixels, True)
        mask = masks.a1111_mask(raw, invert=bool(body.inpainting_mask_invert))
        return await a1111(body, request, init, "img2img", mask, blur)

    @app.get("/sdapi/v1/samplers", tags=["a1111"], dependencies=Auth)
    async def samplers() -> list[dict[str, Any]]:
        names = {"DDIM": "ddim", "DPM++ 2M": "dpmpp-2m", "DPM++ 2M Karras": "dpmpp-2m-karras", "Euler": "euler",
                 "Euler a": "euler-a", "LCM": "lcm"}
        return [{"name": k, "aliases": [v], "options": {}} for k, v in names.items()]

    @app.get("/sdapi/v1/sd-models", tags=["a1111"], dependencies=Auth)
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": model_id, "model_name": model_id, "filename": str(folder)}]

    app.add_middleware(Edge, max_body_bytes=cfg.max_body_bytes)
    return app


def _wait_loaded(b: Batcher) -> None:
    while not b.wait_ready(0.2):
        if b.failed is not None:
            raise b.failed


def _a1111_inpaint_options(body: S.A1111Img2Img) -> float:
    """The paste-back blur of an A1111 inpainting request; 422 for the options sdrt does not implement."""
    if body.inpaint_full_res:
        raise ApiError(422, "inpaint_full_res: inpainting only the masked region at full resolution is not "
                            "supported; send inpaint_full_res false (the whole picture)", "inpaint_full_res",
                       "unsupported_value")
    if body.inpainting_fill != 1:
        kind = {0: "fill", 2: "latent noise", 3: "latent nothing"}[body.inpainting_fill]
        raise ApiError(422, f"inpainting_fill {body.inpainting_fill} ({kind}) is not supported: sdrt inpaints "
                            "from the original image; send inpainting_fill 1 (original)", "inpainting_fill",
                       "unsupported_value")
    if body.mask_blur is not None:  # A1111: mask_blur sets both axes
        return float(body.mask_blur)
    x, y = body.mask_blur_x, body.mask_blur_y
    if x is not None and y is not None and x != y:
        raise ApiError(422, f"mask_blur_x {x} and mask_blur_y {y} differ: sdrt blurs the mask by one radius; "
                            "send mask_blur", "mask_blur_x", "unsupported_value")
    return float(next((v for v in (x, y) if v is not None), 4))


def _decode_upload(data: bytes, field: str, max_pixels: int, keep_alpha: bool = False) -> Any:
    try:
        return imgs.decode_image(data, field=field, max_pixels=max_pixels, keep_alpha=keep_alpha)
    except imgs.ImageRefused as e:
        raise ApiError(422, str(e), e.field, "invalid_image") from e


def _decode_b64(text: str, field: str, max_pixels: int, keep_alpha: bool = False) -> Any:
    try:
        return imgs.decode_b64_image(text, field=field, max_pixels=max_pixels, keep_alpha=keep_alpha)
    except imgs.ImageRefused as e:
        raise ApiError(422, str(e), e.field, "invalid_image") from e


def _snap(size: tuple[int, int], lim: Any) -> tuple[int, int]:
    """An upload's size rounded down to the model's multiple (the size img2img then runs at)."""
    w, h = size
    return w - w % lim.multiple_of, h - h % lim.multiple_of


def _timings(t: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items() if k != "unet_steps_ms"}


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _version() -> str:
    from sdrt import __version__

    return __version__
