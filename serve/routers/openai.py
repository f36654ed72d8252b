"""The OpenAI images API: ``/v1/models``, ``/v1/images/generations``, ``/v1/images/edits``, and the stored
images that ``response_format=url`` points at."""

from __future__ import annotations

import copy
import re
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.feature_cache import DEFAULT_INTERVAL, INTERVAL_MAX, THRESHOLD_MAX

from .. import images as imgs
from .. import masks
from .. import schemas as S
from ..batcher import Job, JobResult
from ..checks import (
    cache_of,
    check_common,
    check_mask_needed,
    check_negative,
    check_prompts,
    check_size,
    decode_upload,
    guidance_notes,
    lora_form,
    loras_of,
    prompt_loras,
    sampler_of,
    seeds_for,
    sequence_length_of,
    skip_guidance_of,
    snap,
)
from ..control import Loop, default_size, form_control, openai_control
from ..deps import Auth, ServeState, State, serve_state
from ..dispatch import run_job
from ..errors import ApiError


class FormRoute(APIRoute):
    """A route whose form is parsed with each text field allowed up to the server's body limit
    (``--max-body-bytes``, which the edge checks first) instead of Starlette's 1 MiB: a base64 control image in
    the edits form (the official client's ``extra_body``) is one text field. FastAPI then reads the parsed form."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
                await request.form(max_part_size=serve_state(request).config.max_body_bytes)
            return await handler(request)

        return handle


router = APIRouter(tags=["openai"], route_class=FormRoute)
EDITS = "/v1/images/edits"


@router.get("/images/{name}", include_in_schema=False)
async def image_file(name: str, st: State) -> FileResponse:
    image_dir = st.config.image_dir
    if image_dir is None or not re.fullmatch(r"[0-9a-f]{32}\.png", name):
        raise ApiError(404, "no such image", "name", "not_found")
    path = image_dir / name
    if not path.is_file():
        raise ApiError(404, "no such image", "name", "not_found")
    return FileResponse(path, media_type="image/png")


@router.get("/v1/models", dependencies=Auth, response_model=S.OpenAIModels)
async def models(st: State) -> S.OpenAIModels:
    return S.OpenAIModels(data=[S.OpenAIModel(id=st.model_id, created=st.created)])


@router.post("/v1/images/generations", dependencies=Auth, response_model=S.OpenAIImages)
async def generations(body: S.OpenAIGeneration, request: Request, st: State) -> Any:
    cfg = st.config
    check_model(st, body.model)
    check_url(st, body.response_format)
    if body.size is not None:
        parse_size(st, body.size)
    steps = body.steps or min(cfg.default_steps, cfg.max_steps)
    check_common(cfg, body.prompt, body.negative_prompt, steps, body.n, "n")
    check_negative(st, body.negative_prompt)
    cache = cache_of(st, body.cache, body.cache_interval, body.cache_schedule, steps, body.cache_threshold)
    prompt, tagged = prompt_loras(body.prompt) if body.prompt_syntax == "a1111" else (body.prompt, [])
    check_prompts(st, prompt, body.negative_prompt, steps, body.prompt_syntax)
    loras = await run_in_threadpool(loras_of, st, body.loras, tagged)  # reads LoRA files
    guidance = cfg.default_guidance if body.guidance_scale is None else body.guidance_scale
    t5_tokens = sequence_length_of(st, body.max_sequence_length)
    slg = skip_guidance_of(st, body, guidance, cache)
    control, control_images = await openai_control(st, body, Loop(guidance, cache, slg))
    sized = None if body.size is not None else default_size(control_images, st.pipeline().manifest.limits)
    w, h = parse_size(st, body.size) if sized is None else sized
    if sized is not None:  # the control image's size, as the Pipeline and diffusers' ControlNet pipelines take it
        check_size(st, w, h, "control_image", "control_image")
    job = Job.of([prompt] * body.n, None if body.negative_prompt is None else [body.negative_prompt] * body.n,
              seeds_for(body.seed, body.n), h, w, steps, sampler_of(st, body.sampler, "sampler"), guidance,
              cache=cache, loras=loras, prompt_syntax=body.prompt_syntax, max_sequence_length=t5_tokens, skip=slg,
              control=control)
    return await response(st, await run_job(st, request, job, "generations"), body.response_format, request,
                    guidance_notes(st, body.guidance_scale, "guidance_scale"))


@router.post(EDITS, dependencies=Auth, response_model=S.OpenAIImages)
async def edits(
    request: Request,
    st: State,
    image: Annotated[UploadFile, File(description="the starting image (PNG, JPEG or WebP)")],
    prompt: Annotated[str, Form(min_length=1, max_length=S.MAX_PROMPT_CHARS)],
    mask: Annotated[UploadFile | None, File(
        description="inpainting: a PNG of the image's size whose fully transparent pixels (alpha 0) mark the "
                    "region to edit; without it, the image's own fully transparent pixels do, if any (not on an "
                    "editing model, FLUX.1 Kontext, where the image is then the reference)")] = None,
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
    cache: Annotated[S.CacheKind | None, Form(description="'deepcache' (UNet models) or 'first-block' (SD 3 / 3.5, "
                                                          "FLUX.1): an export made with --feature-cache")] = None,
    cache_interval: Annotated[int, Form(ge=1, le=INTERVAL_MAX)] = DEFAULT_INTERVAL,
    cache_schedule: Annotated[S.CacheSchedule, Form()] = "uniform",
    cache_threshold: Annotated[float | None, Form(gt=0.0, le=THRESHOLD_MAX, allow_inf_nan=False)] = None,
    loras: Annotated[str | None, Form(max_length=S.MAX_LORA_FORM_CHARS, description=(
        "LoRAs for this request (an export made with --lora-slots, a server with --lora-dir): a JSON list, as "
        'the generations field, e.g. [{"name": "style", "scale": 0.8}]'))] = None,
    prompt_syntax: Annotated[S.PromptSyntax, Form(description=(
        "'plain' (diffusers: the text as it is), 'a1111' (emphasis, BREAK, prompt editing, <lora:name:w>) or "
        "'compel' (a+, (a b)1.3, .blend(), .and())"))]
    = "plain",
    max_sequence_length: Annotated[int | None, Form(ge=2, le=512, description=(
        "SD 3 / 3.5 and FLUX.1: T5's tokens per prompt, 2..512 (null: the model's default)"))] = None,
    padding_mask_crop: Annotated[int | None, Form(ge=0, le=4096, description=(
        "with a mask: edit only the mask's region at the full size (diffusers' padding_mask_crop): the box around "
        "the region, grown by this many pixels and widened to the output's aspect ratio, is cut out, generated at "
        "`size` and pasted back into the image through the mask (on an editing model, FLUX.1 Kontext, as "
        "FluxKontextInpaintPipeline: the region's picture itself, not pasted back)"))] = None,
) -> Any:
    cfg = st.config
    check_model(st, model)
    check_url(st, response_format)
    steps = steps or min(cfg.default_steps, cfg.max_steps)
    check_common(cfg, prompt, negative_prompt, steps, n, "n")
    check_negative(st, negative_prompt)
    policy = cache_of(st, cache, cache_interval, cache_schedule, threshold=cache_threshold)
    prompt, tagged = prompt_loras(prompt) if prompt_syntax == "a1111" else (prompt, [])
    check_prompts(st, prompt, negative_prompt, steps, prompt_syntax)
    lora_set = await run_in_threadpool(loras_of, st, lora_form(loras), tagged)  # reads LoRA files
    t5_tokens = sequence_length_of(st, max_sequence_length)
    knobs, control_uploads = await form_control(st, await request.form())
    guidance = cfg.default_guidance if guidance_scale is None else guidance_scale
    raw = await run_in_threadpool(decode_upload, await image.read(), "image", cfg.max_upload_pixels, True)
    pipe = st.pipeline()
    edits = getattr(pipe, "takes_reference", False)  # an editing model (FLUX.1 Kontext)
    if edits and mask is None:  # the image is its reference
        if strength is not None or padding_mask_crop is not None:
            field = "strength" if strength is not None else "padding_mask_crop"
            raise ApiError(422, f"{st.model_id} edits the image from the prompt (FLUX.1 Kontext: the image "
                                f"conditions, the output starts from noise): send no {field}, or send a mask to "
                                "inpaint the image", field, "unsupported_value")
        control, _ = await openai_control(st, knobs, Loop(guidance, policy), control_uploads)
        ref = await run_in_threadpool(raw.convert, "RGB")
        lim = pipe.manifest.limits
        w, h = parse_size(st, size) if size else pipe.family.reference_size(*ref.size, lim.multiple_of, True)
        if size is None:
            check_size(st, w, h, "image", "image")
        job = Job.of([prompt] * n, None if negative_prompt is None else [negative_prompt] * n, seeds_for(seed, n),
                     h, w, steps, sampler_of(st, sampler, "sampler"),
                     guidance, reference=ref, cache=policy, loras=lora_set, prompt_syntax=prompt_syntax,
                     max_sequence_length=t5_tokens, control=control)
        return await response(st, await run_job(st, request, job, "edits"), response_format, request,
                        guidance_notes(st, guidance_scale, "guidance_scale"))
    mask_data = None if mask is None else await mask.read()
    region = await run_in_threadpool(_edit_region, mask_data, raw, cfg.max_upload_pixels)
    check_mask_needed(st, region is not None, "send mask, or an image whose region to edit is transparent")
    if padding_mask_crop is not None and region is None:
        raise ApiError(422, "padding_mask_crop edits the masked region only: send a mask (or an image whose region "
                            "to edit is transparent), or leave padding_mask_crop out", "padding_mask_crop",
                       "unsupported_value")
    control, _ = await openai_control(st, knobs, Loop(guidance, policy, masked=region is not None), control_uploads)
    lim = pipe.manifest.limits
    # inpainting on an editing model paints at the image's size sized as a reference (FluxKontextInpaintPipeline)
    w, h = parse_size(st, size) if size else pipe.family.reference_size(*raw.size, lim.multiple_of, True) if edits \
        else snap(raw.size, lim)
    if size is None:
        check_size(st, w, h, "image", "image")
    init, mask_in = await run_in_threadpool(lambda: imgs.fit_all(w, h, raw.convert("RGB"), region))
    job = Job.of([prompt] * n, None if negative_prompt is None else [negative_prompt] * n, seeds_for(seed, n),
              h, w, steps, sampler_of(st, sampler, "sampler"),
              guidance, image=init, strength=strength, mask=mask_in, padding_mask_crop=padding_mask_crop,
              cache=policy, loras=lora_set, prompt_syntax=prompt_syntax, max_sequence_length=t5_tokens,
              control=control)
    return await response(st, await run_job(st, request, job, "edits"), response_format, request,
                    guidance_notes(st, guidance_scale, "guidance_scale"))


def edits_form_fields() -> dict[str, Any]:
    """The edits form's control fields as multipart properties: ``control.form_control`` reads them from the form
    itself (a list as ``name[]`` fields, ``control_image`` as text or file parts), so FastAPI's schema of the
    route's parameters leaves them out. ``ControlKnobs``' own schema, with ``control_image`` also as files."""
    props: dict[str, Any] = copy.deepcopy(S.ControlKnobs.model_json_schema()["properties"])
    file_part = {"type": "string", "contentMediaType": "application/octet-stream"}  # FastAPI's UploadFile in 3.1
    image = props["control_image"]
    image["anyOf"] = [{"type": "string"}, file_part,
                      {"type": "array", "items": {"anyOf": [{"type": "string"}, file_part, {"type": "null"}]}},
                      {"type": "null"}]
    image["description"] += ("; on this form also as file parts named control_image, one per net (every control "
                             "image as a file, or every one as base64 text)")
    for name, field in props.items():
        if any(alt.get("type") == "array" for alt in field.get("anyOf", ())):
            field["description"] += f"; a list as one form field per entry, each named {name} or {name}[]"
    return props


def document_edits_form(openapi: dict[str, Any]) -> None:
    """Add ``edits_form_fields`` to the edits operation's multipart schema in an app's OpenAPI document."""
    body = openapi["paths"][EDITS]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:  # FastAPI puts the form's schema under components
        body = openapi["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    for name, field in edits_form_fields().items():
        body["properties"].setdefault(name, field)


def _edit_region(mask_data: bytes | None, image: Any, max_pixels: int) -> Any:
    """The region to edit, white (None: plain img2img): the ``mask`` upload's transparent pixels, else the image's
    own (CPU work on the request's pixels: run off the event loop). 422 for a mask that does not decode, 400 for
    one that does not fit the image."""
    if mask_data is None:
        return masks.openai_image_mask(image)
    raw_mask = decode_upload(mask_data, "mask", max_pixels, True)
    try:
        return masks.openai_mask(raw_mask, image)
    except imgs.ImageRefused as e:
        raise ApiError(400, str(e), e.field, "invalid_mask") from e


def check_model(st: ServeState, model: str | None) -> None:
    if model not in (None, "", st.model_id):
        raise ApiError(404, f"model {model!r} is not served here; this server serves {st.model_id!r} "
                            "(GET /v1/models)", "model", "model_not_found")


def check_url(st: ServeState, response_format: str) -> None:
    if response_format == "url" and st.config.image_dir is None:
        raise ApiError(400, "response_format 'url' needs a place to keep images: start the server with "
                            "--image-dir DIR, or ask for b64_json", "response_format", "url_unavailable")


def parse_size(st: ServeState, size: str | None) -> tuple[int, int]:
    if size is None or size == "auto":
        d = st.pipeline().manifest.default_size
        return d, d
    m = re.fullmatch(S.OPENAI_SIZE.strip("^$"), size)
    if m is None:
        raise ApiError(422, f"size {size!r} must be 'WxH', e.g. '512x512'", "size", "invalid_size")
    w, h = (int(x) for x in size.split("x"))
    check_size(st, w, h, "size", "size")
    return w, h


async def response(st: ServeState, result: JobResult, response_format: str, request: Request,
                   notes: Sequence[str] = ()) -> dict[str, Any]:
    """The images' response; their base64 (or the files behind their URLs) made off the event loop: a batch of
    large images takes milliseconds per megabyte, which would stall every other connection."""
    base = str(request.base_url).rstrip("/")
    data = await run_in_threadpool(_data, st, result, response_format, base)
    return {"created": int(time.time()), "data": data, **({"notes": list(notes)} if notes else {})}


def _data(st: ServeState, result: JobResult, response_format: str, base: str) -> list[dict[str, Any]]:
    if response_format == "url":
        return [{"url": _store(st, p, base), "seed": s} for p, s in zip(result.png, result.seeds, strict=True)]
    return [{"b64_json": imgs.b64(p), "seed": s} for p, s in zip(result.png, result.seeds, strict=True)]


def _store(st: ServeState, png: bytes, base: str) -> str:
    """Keep one image in the image folder (written whole, then renamed); its URL under this server (``base``)."""
    image_dir = st.config.image_dir
    if image_dir is None:  # check_url refused such requests before they ran
        raise ApiError(400, "response_format 'url' is unavailable on this server", "response_format",
                       "url_unavailable")
    name = f"{uuid.uuid4().hex}.png"
    tmp = image_dir / f".{name}.tmp"
    tmp.write_bytes(png)
    tmp.rename(image_dir / name)
    return f"{base}/images/{name}"
