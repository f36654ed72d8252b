"""The AUTOMATIC1111 API: ``/sdapi/v1/txt2img``, ``img2img`` (with inpainting), ``samplers``, ``sd-models``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .. import images as imgs
from .. import masks
from .. import schemas as S
from ..batcher import Job
from ..checks import (
    cache_of,
    check_common,
    check_mask_needed,
    check_negative,
    check_prompts,
    check_size,
    decode_b64,
    guidance_notes,
    loras_of,
    prompt_loras,
    sampler_of,
    seeds_for,
    sequence_length_of,
    skip_guidance_of,
    snap,
)
from ..control import A1111_MODULES, Loop, a1111_control, default_size, model_list
from ..deps import Auth, ServeState, State
from ..dispatch import run_job
from ..errors import ApiError

router = APIRouter(tags=["a1111"], dependencies=Auth)


@router.post("/sdapi/v1/txt2img", response_model=S.A1111Response)
async def txt2img(body: S.A1111Txt2Img, request: Request, st: State) -> Any:
    check_mask_needed(st, False, "POST /sdapi/v1/img2img with init_images and mask")
    return await generate(st, body, request, None, "txt2img")


@router.post("/sdapi/v1/img2img", response_model=S.A1111Response)
async def img2img(body: S.A1111Img2Img, request: Request, st: State) -> Any:
    st.pipeline()
    max_pixels = st.config.max_upload_pixels
    init = await run_in_threadpool(decode_b64, body.init_images[0], "init_images", max_pixels)
    if body.mask in (None, ""):
        check_mask_needed(st, False, "send mask, white = repaint")
        return await generate(st, body, request, init, "img2img")
    blur = inpaint_options(body)
    mask = await run_in_threadpool(_a1111_mask, body.mask, max_pixels, bool(body.inpainting_mask_invert))
    # "only masked": the mask's region, padded, generated at the output size and pasted back (padding_mask_crop)
    pad = body.inpaint_full_res_padding if body.inpaint_full_res else None
    if pad is not None and getattr(st.pipeline(), "takes_reference", False):
        raise ApiError(422, f"{st.model_id} is an editing model (FLUX.1 Kontext), whose inpainting of the masked "
                            "region alone returns that region's picture, not the whole image pasted back as A1111's "
                            "inpaint_full_res does: send inpaint_full_res false (the whole picture), or use "
                            "/v1/images/edits with padding_mask_crop", "inpaint_full_res", "unsupported_value")
    if pad is not None and mask.getbbox() is None:
        raise ApiError(422, "inpaint_full_res inpaints around the mask's white region, but the mask is all black"
                            f"{' once inverted' if body.inpainting_mask_invert else ''}: send a mask with a white "
                            "region to repaint, or inpaint_full_res false", "mask", "invalid_mask")
    return await generate(st, body, request, init, "img2img", mask, blur, pad)


def _a1111_mask(text: str, max_pixels: int, invert: bool) -> Any:
    """The ``mask`` field decoded and read as A1111 reads it (CPU work on its pixels: run off the event loop)."""
    return masks.a1111_mask(decode_b64(text, "mask", max_pixels, True), invert=invert)


@router.get("/sdapi/v1/samplers")
async def samplers() -> list[dict[str, Any]]:
    names = {"DDIM": "ddim", "DPM++ 2M": "dpmpp-2m", "DPM++ 2M Karras": "dpmpp-2m-karras", "Euler": "euler",
             "Euler a": "euler-a", "LCM": "lcm"}
    return [{"name": k, "aliases": [v], "options": {}} for k, v in names.items()]


@router.get("/sdapi/v1/loras")
async def loras(st: State) -> list[dict[str, Any]]:
    """The LoRAs requests may name (``<lora:NAME:SCALE>`` in a prompt, or the ``loras`` field): the server's
    ``--lora-dir``, as A1111 lists them (no server path: the file's name)."""
    if st.config.lora_dir is None:
        return []
    return [{"name": n, "alias": n, "path": f"{n}.safetensors", "metadata": {}} for n in st.pipeline().loras.names()]


@router.get("/controlnet/model_list")
async def controlnet_models(st: State) -> dict[str, list[str]]:
    """sd-webui-controlnet's model list: the export's ControlNets, by the names a unit's ``model`` may give (the
    component name, then the name of what it was exported from); empty for an export without ControlNets."""
    return {"model_list": model_list(st)}


@router.get("/controlnet/module_list")
async def controlnet_modules() -> dict[str, list[str]]:
    """sd-webui-controlnet's preprocessors that sdrt runs (a unit's ``module``)."""
    return {"module_list": list(A1111_MODULES)}


@router.get("/sdapi/v1/sd-models")
async def sd_models(st: State) -> list[dict[str, Any]]:
    return [{"title": st.model_id, "model_name": st.model_id, "filename": str(st.folder)}]


async def generate(st: ServeState, body: S.A1111Txt2Img, request: Request, init: Any, route: str,
                   mask: Any = None, blur: float | None = None, pad: int | None = None) -> dict[str, Any]:
    """Run a txt2img or img2img request as ``n_iter`` jobs of ``batch_size`` images; A1111's response. ``pad``:
    inpaint only the mask's region, padded by this many pixels (``inpaint_full_res``)."""
    cfg = st.config
    lim = st.pipeline().manifest.limits
    if init is not None and body.width is None and body.height is None:
        size: tuple[int, int] | None = snap(init.size, lim)
    elif body.width is None and body.height is None:
        size = None  # the first control image's, else the model's
    else:
        d = st.pipeline().manifest.default_size
        size = body.width or d, body.height or d
    check_common(cfg, body.prompt, body.negative_prompt, body.steps, body.batch_size, "batch_size")
    check_negative(st, body.negative_prompt)
    sampler = sampler_of(st, body.sampler_name, "sampler_name", body.scheduler)
    # img2img's loop runs only the steps its strength leaves: the pipeline checks that plan
    cache = cache_of(st, body.cache, body.cache_interval, body.cache_schedule, body.steps if init is None else None,
                     body.cache_threshold)
    prompt, tagged = prompt_loras(body.prompt)  # A1111 takes <lora:...> out of the text it encodes
    check_prompts(st, prompt, body.negative_prompt, body.steps, "a1111")  # A1111's clients write A1111's language
    lora_set = await run_in_threadpool(loras_of, st, body.loras, tagged)  # reads LoRA files
    t5_tokens = sequence_length_of(st, body.max_sequence_length)
    slg = skip_guidance_of(st, body, body.cfg_scale, cache)
    control, control_images = await a1111_control(st, body.alwayson_scripts, size,
                                                  Loop(body.cfg_scale, cache, slg, mask is not None), init)
    if size is None:
        d = st.pipeline().manifest.default_size
        size = default_size(control_images, lim) or (d, d)
    w, h = size
    check_size(st, w, h, "width", "height")
    seeds = seeds_for(body.seed, body.batch_size * body.n_iter)
    strength = getattr(body, "denoising_strength", 1.0)
    image_in, mask_in = await run_in_threadpool(imgs.fit_all, w, h, init, mask)
    jobs = [Job.of([prompt] * body.batch_size, [body.negative_prompt] * body.batch_size,
                seeds[i * body.batch_size:(i + 1) * body.batch_size], h, w, body.steps, sampler, body.cfg_scale,
                image=image_in, strength=strength, mask=mask_in, paste_back=blur, padding_mask_crop=pad,
                cache=cache, loras=lora_set,
                prompt_syntax="a1111", max_sequence_length=t5_tokens, skip=slg, control=control)
            for i in range(body.n_iter)]
    results = await asyncio.gather(*(run_job(st, request, j, route) for j in jobs))
    pngs = [p for r in results for p in r.png]
    params = body.model_dump()
    params.pop("init_images", None)
    params.pop("mask", None)
    params.pop("alwayson_scripts", None)  # its images; the units' settings are in info's sdrt_control
    info = {"prompt": body.prompt, "all_prompts": [body.prompt] * len(pngs),
            "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(pngs),
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(pngs),
            "width": w, "height": h, "sampler_name": body.sampler_name or sampler, "sdrt_sampler": sampler,
            "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size,
            "n_iter": body.n_iter, "denoising_strength": strength if init is not None else None,
            "mask_blur": blur, "inpaint_full_res": pad is not None if mask is not None else None,
            "inpaint_full_res_padding": pad, "inpainting_mask_invert": getattr(body, "inpainting_mask_invert", 0)
            if mask is not None else None,
            "sd_model_name": st.model_id, "timings": [_timings(r.timings) for r in results],
            "sdrt_notes": guidance_notes(st, body.cfg_scale, "cfg_scale"),
            "sdrt_control": {k: v for k, v in control.items() if k != "control_images"} or None}
    # base64 of large images takes milliseconds per megabyte: off the event loop, which serves every connection
    images = await run_in_threadpool(lambda: [imgs.b64(p) for p in pngs])
    return {"images": images, "parameters": params, "info": json.dumps(info)}


def inpaint_options(body: S.A1111Img2Img) -> float:
    """The paste-back blur of an A1111 inpainting request; 422 for the options sdrt does not implement."""
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


def _timings(t: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items() if k != "unet_steps_ms"}
