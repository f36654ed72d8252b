"""Control images on both APIs: the OpenAI fields and sd-webui-controlnet's A1111 units read into the Pipeline's
control keywords (``GenerationRequest.control_images`` and the rest), decoded under the server's upload limits and
checked by the Pipeline itself before any work.

An A1111 unit names its net by ``model`` (the export's component name, ``controlnet_0`` ..., or the stem of the file
or folder it was exported from; A1111's `` [hash]`` suffix is ignored), or, without one, takes the net of its
position. What the extension does that sdrt does not (another preprocessor, "Resize and Fill", its own control
weighting, a preprocessor resolution) is refused by name with the values sdrt takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from starlette.concurrency import run_in_threadpool

from sdrt.runtime.controlnet import PREPROCESSORS

from . import images as imgs
from . import schemas as S
from .batcher import loop_fields
from .deps import ServeState
from .errors import ApiError

# the GenerationRequest keywords each OpenAI field fills (diffusers' names -> sdrt's)
OPENAI_FIELDS = {"controlnet_conditioning_scale": "control_scales", "control_guidance_start": "control_start",
                 "control_guidance_end": "control_end", "guess_mode": "guess_mode", "control_mode": "control_modes",
                 "control_preprocess": "control_preprocess"}
# sd-webui-controlnet's modules sdrt runs: "none" (the image is the control image) and its preprocessors
A1111_MODULES = ("none", *PREPROCESSORS)
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                  "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}
CONTROL_MODES = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}
# the extension's canny thresholds (its sliders' defaults), which sdrt's canny uses; -1 means the default
CANNY_THRESHOLDS = {"threshold_a": 100.0, "threshold_b": 200.0}
# unit fields that do not change the image here: the UI's, a detected map's saving, a hires-fix or inpaint-area
# option (sdrt refuses hires fix itself; inpaint_full_res is img2img's own field)
A1111_UNIT_HARMLESS = ("is_ui", "input_mode", "batch_images", "output_dir", "loopback", "low_vram", "lowvram",
                       "save_detected_map", "hr_option", "inpaint_crop_input_image", "pulid_mode")
A1111_UNIT_FIELDS = ("enabled", "image", "input_image", "module", "model", "weight", "guidance_start", "guidance_end",
                     "guidance", "resize_mode", "control_mode", "processor_res", "threshold_a", "threshold_b",
                     "pixel_perfect", "union_control_type", "mask", "mask_image", "advanced_weighting",
                     "effective_region_mask", "ipadapter_input", *A1111_UNIT_HARMLESS)


def net_names(st: ServeState) -> list[list[str]]:
    """Each ControlNet of the export (in order), by the names a request may give it: its component name, then the
    stem of the file or folder it was exported from, where recorded."""
    m = st.pipeline().manifest
    records = m.source.get("controlnets") or []
    out = []
    for j, comp in enumerate(m.controlnets):
        rec = records[j] if j < len(records) and isinstance(records[j], dict) else {}
        path = rec.get("path")
        stem = PurePath(str(path)).stem if path else None
        out.append([comp, *([stem] if stem and stem != comp else [])])
    return out


def model_list(st: ServeState) -> list[str]:
    """sd-webui-controlnet's ``GET /controlnet/model_list``: the export's nets, by the names units may give."""
    return [n for names in net_names(st) for n in names]


# -- decoding and checking --------------------------------------------------------------------------------------
def _decode_all(texts: list[str | None], field: str, max_pixels: int) -> list[Any]:
    out: list[Any] = []
    for j, t in enumerate(texts):
        if t is None or t == "":
            out.append(None)
            continue
        name = field if len(texts) == 1 else f"{field}[{j}]"
        try:
            out.append(imgs.decode_b64_image(t, field=name, max_pixels=max_pixels))
        except imgs.ImageRefused as e:
            raise ApiError(422, str(e), e.field, "invalid_image") from e
    return out


async def decode_images(st: ServeState, texts: list[str | None], field: str) -> list[Any]:
    """Base64 control images -> PIL images (None kept: a net left out), under the server's upload limits."""
    if len(texts) > S.MAX_CONTROL_IMAGES:
        raise ApiError(422, f"{len(texts)} control images in one request; at most {S.MAX_CONTROL_IMAGES} (one per "
                            f"ControlNet of the export: {_nets_in_words(st)})", field, "too_many_images")
    return await run_in_threadpool(_decode_all, texts, field, st.config.max_upload_pixels)


def _nets_in_words(st: ServeState) -> str:
    pipe = st.pipeline()
    if getattr(pipe, "takes_control_image", False):
        return "a control model (FLUX.1 Depth / Canny), which takes one"
    names = [n[0] for n in net_names(st)]
    return ", ".join(names) if names else "none"


def _field_of(message: str, fields: dict[str, str]) -> str | None:
    """The API field a Pipeline message is about (the first of sdrt's keywords it names)."""
    found = [(m.start(), api) for api, kw in fields.items() if (m := re.search(rf"\b{re.escape(kw)}\b", message))]
    return min(found)[1] if found else None


async def check(st: ServeState, control: dict[str, Any], loop: Loop, *, image_field: str,
                fields: dict[str, str]) -> None:
    """The control keywords checked by the Pipeline as ``generate`` checks them, beside the request's loop settings,
    before the job is queued (canny runs here, off the event loop): 400 ``controlnet_unavailable`` for an export
    without ControlNets (or without their engines), 422 naming the field for the rest (or a loop setting that does
    not combine with ControlNets). ``fields``: this API's names of the keywords."""
    from sdrt.runtime.errors import ArtifactError, CompatibilityError, InputError
    from sdrt.runtime.request import GenerationRequest

    pipe = st.pipeline()
    # the check asks only whether a mask is there (ControlNets refuse one), not what it is
    req = GenerationRequest(prompt="", mask_image=True if loop.masked else None, guidance_scale=loop.guidance,
                            **loop_fields(loop.cache, loop.skip), **control)
    try:
        await run_in_threadpool(pipe.check_control, req)
    except (CompatibilityError, ArtifactError) as e:
        raise ApiError(400, str(e), image_field, "controlnet_unavailable") from e
    except InputError as e:
        raise ApiError(422, str(e), _field_of(str(e), {image_field: "control_images", **fields}) or image_field,
                       "invalid_control") from e


@dataclass(frozen=True)
class Loop:
    """What else of a request the control inputs are checked beside: its guidance scale, feature caching and
    skip-layer guidance (checked already: ``checks.cache_of``, ``checks.skip_guidance_of``), and whether it has a
    mask."""

    guidance: float
    cache: Any = None
    skip: Any = None
    masked: bool = False


def default_size(images: list[Any], lim: Any) -> tuple[int, int] | None:
    """(width, height) of a request that gives none: the first control image's, rounded down to the model's
    multiple (as the Pipeline and diffusers' ControlNet pipelines)."""
    first = next((im for im in images if im is not None), None)
    if first is None:
        return None
    w, h = first.size
    return w - w % lim.multiple_of, h - h % lim.multiple_of


# -- OpenAI -----------------------------------------------------------------------------------------------------
async def openai_control(st: ServeState, body: S.ControlKnobs, loop: Loop,
                         uploads: list[Any] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """The OpenAI fields as the Pipeline's control keywords, checked ({} without any), and the decoded images
    (``uploads``: the edits form's control images, decoded already, instead of ``body.control_image``)."""
    if not body.control_given and not uploads:  # a control model (FLUX.1 Depth / Canny) refuses a request without one
        if getattr(st.pipeline(), "takes_control_image", False):
            await check(st, {}, loop, image_field="control_image", fields=OPENAI_FIELDS)
        return {}, []
    texts: list[str | None] = list(body.control_image) if isinstance(body.control_image, list) else (
        [] if body.control_image is None else [body.control_image])
    images = uploads or await decode_images(st, texts, "control_image")
    control: dict[str, Any] = {"control_images": images or None}
    for api, kw in OPENAI_FIELDS.items():
        v = getattr(body, api)
        if v is not None and v is not False:
            control[kw] = v
    await check(st, control, loop, image_field="control_image", fields=OPENAI_FIELDS)
    return control, images


async def form_control(st: ServeState, form: Any) -> tuple[S.ControlKnobs, list[Any]]:
    """The edits form's control fields: each as a form field (the official client sends a list in ``extra_body`` as
    ``name[]`` fields, one per entry; ``null`` or an empty field: None), ``control_image`` also as file parts
    (decoded here, under the upload limits) or base64 text. 422 naming the field for what does not parse."""
    from pydantic import ValidationError
    from starlette.datastructures import UploadFile

    values: dict[str, Any] = {}
    uploads: list[Any] = []
    for name in S.ControlKnobs.model_fields:
        got = [*form.getlist(name), *form.getlist(f"{name}[]")]
        if not got:
            continue
        if name == "control_image" and any(isinstance(v, UploadFile) for v in got):
            if not all(isinstance(v, UploadFile) for v in got):
                raise ApiError(422, "control_image: send every control image as a file, or every one as base64 text, "
                                    "not a mix", name, "invalid_image")
            if len(got) > S.MAX_CONTROL_IMAGES:
                raise ApiError(422, f"{len(got)} control images in one request; at most {S.MAX_CONTROL_IMAGES}",
                               name, "too_many_images")
            for j, f in enumerate(got):
                field = name if len(got) == 1 else f"{name}[{j}]"
                uploads.append(await run_in_threadpool(_decode_upload, await f.read(), field,
                                                       st.config.max_upload_pixels))
            continue
        entries = [None if v in ("", "null", "None") else v for v in got]
        values[name] = entries if len(entries) > 1 or form.getlist(f"{name}[]") else entries[0]
    try:
        knobs = S.ControlKnobs.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "control_image"
        raise ApiError(422, f"{field}: {first['msg']}", field, "invalid_value") from e
    return knobs, uploads


def _decode_upload(data: bytes, field: str, max_pixels: int) -> Any:
    try:
        return imgs.decode_image(data, field=field, max_pixels=max_pixels)
    except imgs.ImageRefused as e:
        raise ApiError(422, str(e), e.field, "invalid_image") from e


# -- A1111 (sd-webui-controlnet) --------------------------------------------------------------------------------
def _refuse(field: str, message: str) -> ApiError:
    return ApiError(422, message, field, "unsupported_value")


def _enum(value: Any, table: dict[int, str], aliases: dict[str, str], field: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value in table:
        return table[value]
    if isinstance(value, str) and aliases.get(value, value) in table.values():
        return aliases.get(value, value)
    allowed = ", ".join(f"{k} / {v!r}" for k, v in table.items())
    raise _refuse(field, f"{field} {value!r} is not one of sd-webui-controlnet's values: {allowed}")


def _unit_image(unit: dict[str, Any], field: str) -> str | None:
    """A unit's base64 image: ``image`` (or its old name ``input_image``) as a string, ``{"image": ...}`` or
    ``[image, mask]``; a mask with it is refused (sdrt's nets take no inpainting mask)."""
    if "image" in unit and "input_image" in unit:
        raise _refuse(field, f"{field}: give image or input_image (its old name), not both")
    raw = unit.get("image", unit.get("input_image"))
    value: Any = raw
    mask: Any = None
    if isinstance(raw, dict):
        value, mask = raw.get("image"), raw.get("mask")
    elif isinstance(raw, (list, tuple)):
        if len(raw) != 2 or isinstance(raw[0], dict):
            raise _refuse(field, f"{field}.image: one image per unit (a base64 string, {{\"image\": ...}} or "
                                 "[image, mask]); sdrt takes no batch of images per unit")
        value, mask = raw
    for name in ("mask", "mask_image"):
        mask = mask if mask not in (None, "") else unit.get(name)
    if mask not in (None, ""):
        raise _refuse(f"{field}.mask", f"{field}.mask: sdrt's ControlNets take no mask (an inpainting or masked "
                                       "control): leave it out")
    if value is not None and not isinstance(value, str):
        raise _refuse(f"{field}.image", f"{field}.image must be a base64 image string")
    return value or None


def _unit_net(unit: dict[str, Any], position: int, names: list[list[str]], field: str) -> int:
    model = unit.get("model")
    if model in (None, "", "None", "none"):
        if position >= len(names):
            raise _refuse(f"{field}.model", f"{field}: unit {position} names no model and this export has "
                                            f"{len(names)} ControlNet(s) ({', '.join(n[0] for n in names)}): name "
                                            "one in model (GET /controlnet/model_list)")
        return position
    key = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(model))  # A1111 writes a hash after the name
    for j, alias in enumerate(names):
        if key in alias:
            return j
    listed = ", ".join(n for alias in names for n in alias) or "none"
    raise _refuse(f"{field}.model", f"{field}.model {model!r} is not a ControlNet of this export; it has: {listed} "
                                    "(GET /controlnet/model_list)")


def _unit_settings(unit: dict[str, Any], field: str) -> tuple[str | None, str]:
    """A unit's preprocessor (None or sdrt's name) and resize mode, refusing what sdrt does not do."""
    unknown = sorted(k for k in unit if k not in A1111_UNIT_FIELDS)
    if unknown:
        raise _refuse(field, f"{field}: {', '.join(unknown)}: not a field sdrt knows of sd-webui-controlnet's units "
                             f"(it takes {', '.join(A1111_UNIT_FIELDS[:16])})")
    for name in ("advanced_weighting", "effective_region_mask", "ipadapter_input"):
        if unit.get(name) not in (None, [], ""):
            raise _refuse(f"{field}.{name}", f"{field}.{name}: not supported by sdrt (it would change the image); "
                                             "leave it out")
    module = str(unit.get("module") or "none")
    prep = None if module.lower() == "none" else module
    if prep is not None and prep not in PREPROCESSORS:
        raise _refuse(f"{field}.module", f"{field}.module {module!r}: sdrt runs the preprocessors "
                                         f"{', '.join(A1111_MODULES)} (GET /controlnet/module_list); send the "
                                         "preprocessed control image with module none")
    resize = _enum(unit.get("resize_mode", 1), RESIZE_MODES, RESIZE_ALIASES, f"{field}.resize_mode")
    if resize == "Resize and Fill":
        raise _refuse(f"{field}.resize_mode", f"{field}.resize_mode 'Resize and Fill' is not supported: sdrt takes "
                                              "'Just Resize' (0) or 'Crop and Resize' (1)")
    mode = _enum(unit.get("control_mode", 0), CONTROL_MODES, {}, f"{field}.control_mode")
    if mode != "Balanced":
        raise _refuse(f"{field}.control_mode", f"{field}.control_mode {mode!r}: sdrt weighs ControlNets as diffusers "
                                               "does, sd-webui-controlnet's 'Balanced' (0); send 0")
    if prep is not None:  # a preprocessor's own settings: sdrt's canny runs at the image's size, thresholds 100, 200
        if unit.get("pixel_perfect"):
            raise _refuse(f"{field}.pixel_perfect", f"{field}.pixel_perfect: sdrt runs {prep} at the control "
                                                    "image's own resolution; send pixel_perfect false")
        res = unit.get("processor_res", -1)
        if res not in (-1, None):
            to = f"{res} pixels" if isinstance(res, int) and not isinstance(res, bool) else "that size"
            raise _refuse(f"{field}.processor_res", f"{field}.processor_res {res!r}: sdrt runs {prep} at the control "
                                                    "image's own resolution, so it takes -1 (or null) only; to run "
                                                    f"{prep} at {to}, resize the image so its shorter side is {to} "
                                                    "and send -1")
        for name, value in CANNY_THRESHOLDS.items():
            got = unit.get(name, -1)
            if got not in (-1, None, value):
                raise _refuse(f"{field}.{name}", f"{field}.{name} {got!r}: sdrt's canny takes thresholds "
                                                 f"{CANNY_THRESHOLDS['threshold_a']:g} and "
                                                 f"{CANNY_THRESHOLDS['threshold_b']:g}; send -1 or {value:g}")
    return prep, resize


def crop_to(image: Any, width: int, height: int) -> Any:
    """sd-webui-controlnet's "Crop and Resize": the centred part of the image with the output's aspect ratio (the
    extension scales the image to cover the output, then crops the middle; sdrt crops, and the Pipeline resizes)."""
    ow, oh = image.size
    k = max(width / ow, height / oh)
    cw, ch = min(ow, round(width / k)), min(oh, round(height / k))
    left, top = (ow - cw) // 2, (oh - ch) // 2
    return image if (cw, ch) == (ow, oh) else image.crop((left, top, left + cw, top + ch))


A1111_FIELDS = {"weight": "control_scales", "guidance_start": "control_start", "guidance_end": "control_end",
                "module": "control_preprocess", "union_control_type": "control_modes"}


def a1111_units(st: ServeState, scripts: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
    """The enabled units of ``alwayson_scripts.controlnet.args``, each with its position; other scripts refused."""
    if not scripts:
        return []
    units: list[tuple[int, dict[str, Any]]] = []
    for name, script in scripts.items():
        if name.lower() != "controlnet":
            raise _refuse("alwayson_scripts", f"alwayson_scripts.{name}: not supported by sdrt's A1111 API and would "
                                              "change the image; sdrt runs the controlnet script only")
        args = script.get("args") if isinstance(script, dict) else None
        if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
            raise _refuse("alwayson_scripts", "alwayson_scripts.controlnet must be {\"args\": [unit, ...]}, each unit "
                                              "an object of sd-webui-controlnet's fields")
        units += [(i, a) for i, a in enumerate(args) if a.get("enabled", True)]
    return units


async def a1111_control(st: ServeState, scripts: dict[str, Any] | None, size: tuple[int, int] | None, loop: Loop,
                        init: Any = None) -> tuple[dict[str, Any], list[Any]]:
    """sd-webui-controlnet's units as the Pipeline's control keywords (one entry per net of the export, in its order),
    checked ({} without an enabled unit), and the control images (for the default size). ``size``: the output's
    (width, height), None to take the first control image's; ``init``: img2img's image, which a unit without an image
    takes (as the extension)."""
    units = a1111_units(st, scripts)
    pipe = st.pipeline()
    if not units:
        if getattr(pipe, "takes_control_image", False):
            await check(st, {}, loop, image_field="alwayson_scripts", fields=A1111_FIELDS)
        return {}, []
    # a control model (FLUX.1 Depth / Canny) reads one control image itself: its one "net" is the model
    names = [[st.model_id]] if getattr(pipe, "takes_control_image", False) else net_names(st)
    if not names:
        raise ApiError(400, f"{st.model_id} was exported without ControlNets, so alwayson_scripts.controlnet cannot be "
                            "used: re-export the model with its ControlNet(s) (sdrt export ... --controlnet), or "
                            "leave the controlnet script out", "alwayson_scripts", "controlnet_unavailable")
    n = len(names)
    per: dict[int, dict[str, Any]] = {}
    texts: dict[int, str | None] = {}
    for position, unit in units:
        field = f"alwayson_scripts.controlnet.args[{position}]"
        prep, resize = _unit_settings(unit, field)
        j = _unit_net(unit, position, names, field)
        if j in per:
            raise _refuse(f"{field}.model", f"{field}: two units use ControlNet {j} ({names[j][0]}); give each net "
                                            "one unit")
        texts[j] = _unit_image(unit, field)
        if texts[j] is None and init is None:
            raise _refuse(f"{field}.image", f"{field} has no image: send image (base64); only img2img's units take "
                                            "the init image")
        mode = unit.get("union_control_type")
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int)):
            raise _refuse(f"{field}.union_control_type", f"{field}.union_control_type {mode!r}: give the Union "
                                                         "ControlNet's mode as an integer (diffusers' control_mode)")
        guidance_end = unit.get("guidance_end", unit.get("guidance", 1.0))
        per[j] = {"weight": unit.get("weight", 1.0), "start": unit.get("guidance_start", 0.0), "end": guidance_end,
                  "prep": prep, "resize": resize, "mode": mode}
    order = sorted(per)
    decoded = await decode_images(st, [texts[j] for j in order], "alwayson_scripts.controlnet.image")
    images: list[Any] = [None] * n
    for j, im in zip(order, decoded, strict=True):
        images[j] = init if im is None else im
    if size is None:
        size = default_size(images, pipe.manifest.limits)
    assert size is not None  # every enabled unit has an image
    crops = [j for j in order if per[j]["resize"] == "Crop and Resize"]
    cropped = await run_in_threadpool(lambda: [crop_to(images[j], *size) for j in crops])  # pixels: off the loop
    for j, im in zip(crops, cropped, strict=True):
        images[j] = im
    last = order[-1] + 1  # the nets after the last unit's: left out
    control: dict[str, Any] = {"control_images": images[:last]}
    for key, kw, default in (("weight", "control_scales", 1.0), ("start", "control_start", 0.0),
                             ("end", "control_end", 1.0), ("prep", "control_preprocess", None),
                             ("mode", "control_modes", None)):
        values = [per[j][key] if j in per else default for j in range(last)]
        if any(v != default for v in values):
            control[kw] = values
    await check(st, control, loop, image_field="alwayson_scripts", fields=A1111_FIELDS)
    return control, images
