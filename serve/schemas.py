"""The request and response bodies of the two APIs clients already speak: OpenAI's images API and
AUTOMATIC1111's ``/sdapi/v1``. Field ranges here are the schema's outer bounds (documented in
``/openapi.json``); a server may be started with tighter limits, and the model's own sizes apply too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdrt.runtime.feature_cache import DEFAULT_INTERVAL, INTERVAL_MAX, THRESHOLD_MAX
from sdrt.runtime.layer_skip import SCALE_MAX as SLG_SCALE_MAX
from sdrt.runtime.samplers import FLOW_SAMPLERS, SAMPLERS

MAX_SEED = 2**32 - 1  # A1111's seeds are 32-bit; per-image seeds are seed, seed + 1, ...
MAX_PROMPT_CHARS = 4000
MAX_STEPS = 150
MAX_N = 16
SIZE_MIN, SIZE_MAX = 64, 2048

# A1111 sampler names (and sdrt's own) -> sdrt's
SAMPLER_ALIASES: dict[str, str] = {
    "ddim": "ddim", "dpm++ 2m": "dpmpp-2m", "dpm++ 2m karras": "dpmpp-2m-karras", "euler": "euler",
    "euler a": "euler-a", "lcm": "lcm", **{s: s for s in (*SAMPLERS, *FLOW_SAMPLERS)},
}
# on a flow-matching model (SD 3.5) the UIs' Euler and DPM++ 2M run on its flow schedule
FLOW_EQUIVALENTS = {"euler": "flow-euler", "dpmpp-2m": "flow-dpmpp-2m"}


def sampler_name(name: str, scheduler: str | None = None, flow: bool = False) -> str:
    """An A1111 or sdrt sampler name -> sdrt's (``flow``: for a flow-matching model, where Euler and DPM++ 2M
    mean their flow forms); ValueError names the choices."""
    key = name.strip().lower()
    if scheduler and scheduler.strip().lower() == "karras" and key in ("dpm++ 2m", "dpmpp-2m"):
        key = "dpmpp-2m-karras"
    elif scheduler and scheduler.strip().lower() not in ("automatic", "uniform", "normal", ""):
        raise ValueError(f"scheduler {scheduler!r} is not supported; use Automatic or Karras")
    if key not in SAMPLER_ALIASES:
        raise ValueError(f"sampler {name!r} is not supported; choose one of: "
                         f"{', '.join(sorted(set(SAMPLER_ALIASES)))}")
    out = SAMPLER_ALIASES[key]
    return FLOW_EQUIVALENTS.get(out, out) if flow else out


Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
Steps = Field(default=None, ge=1, le=MAX_STEPS, description=f"denoising steps, 1..{MAX_STEPS}")
Guidance = Field(default=None, ge=0.0, le=50.0, allow_inf_nan=False,
                 description="classifier-free guidance scale, 0..50; <= 1 turns guidance off")
Seed = Field(default=None, ge=-1, le=MAX_SEED,
             description=f"0..{MAX_SEED}; -1 or absent: random. Image k of a request uses seed + k (mod 2**32)")

# feature caching's names as the schema's enums: runtime/feature_cache.py's CACHE_KINDS and SCHEDULES (a test
# holds them equal)
CacheKind = Literal["deepcache", "first-block"]
CacheSchedule = Literal["uniform", "nonuniform"]


class CacheKnobs(BaseModel):
    """Feature caching (``GenerationRequest.cache``, ``cache_interval``, ``cache_schedule``, ``cache_threshold``):
    sdrt's extra fields on both APIs. A model exported without ``--feature-cache``, or of a family without the
    kind, refuses ``cache`` (400, ``cache_unavailable``)."""

    cache: CacheKind | None = Field(default=None, description="'deepcache' (UNet models): reuse the UNet's deep "
                                                              "feature between full steps; 'first-block' (SD 3 / "
                                                              "3.5, FLUX.1): reuse what the transformer's blocks after the "
                                                              "first added (an export made with --feature-cache); "
                                                              "null: every step runs the full model")
    cache_interval: int = Field(default=DEFAULT_INTERVAL, ge=1, le=INTERVAL_MAX,
                                description=f"with cache: every Nth step runs the full UNet, 1..{INTERVAL_MAX}")
    cache_schedule: CacheSchedule = Field(default="uniform", description="with cache: 'uniform' (every Nth step "
                                                                         "full) or DeepCache's 'nonuniform'")
    cache_threshold: float | None = Field(default=None, gt=0.0, le=THRESHOLD_MAX, allow_inf_nan=False,
                                          description="with cache 'first-block', instead of a schedule: the full "
                                                      "transformer runs again where the first block's residual "
                                                      "changed by more than this (relative; diffusers' default "
                                                      "0.05); not on the tensorrt backend")


class TextKnobs(BaseModel):
    """T5's tokens per prompt (``GenerationRequest.max_sequence_length``): sdrt's extra field on both APIs, for
    the models with a T5 encoder (SD 3 / 3.5, FLUX.1); another model refuses it (422)."""

    max_sequence_length: int | None = Field(
        default=None, ge=2, le=512, description="SD 3 / 3.5 and FLUX.1: T5's tokens per prompt, 2..512 (diffusers' "
                                                "argument; null: the model's default, 256 and 512); longer prompts "
                                                "are cut there")


class SlgKnobs(BaseModel):
    """Skip-layer guidance (``GenerationRequest.skip_layer_guidance_scale``, ``_start``, ``_stop``, diffusers'
    arguments): sdrt's extra fields on both APIs, for an SD 3 / 3.5 export made with ``--skip-layers``; another
    export or family refuses them (400, ``skip_layers_unavailable``), as does an unguided request (422)."""

    skip_layer_guidance_scale: float | None = Field(
        default=None, gt=0.0, le=SLG_SCALE_MAX, allow_inf_nan=False,
        description="SD 3 / 3.5 exported with --skip-layers: move the guided prediction away from a pass with those "
                    "blocks skipped by this much (diffusers' default 2.8); null: no skip-layer guidance")
    skip_layer_guidance_start: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="with skip_layer_guidance_scale: the fraction of the steps where it starts (default 0.01)")
    skip_layer_guidance_stop: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="with skip_layer_guidance_scale: the fraction of the steps where it stops (default 0.2)")


LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$"  # a file's stem in the server's --lora-dir, never a path
MAX_LORAS = 8
MAX_LORA_FORM_CHARS = 2048  # the edits form's loras field: a JSON list of at most MAX_LORAS {name, scale}
PromptSyntax = Literal["plain", "a1111", "compel"]


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=LORA_NAME, description="a LoRA in the server's --lora-dir (GET /sdapi/v1/loras)")
    scale: float = Field(default=1.0, ge=-10.0, le=10.0, allow_inf_nan=False, description="its strength")


class LoraKnobs(BaseModel):
    """LoRA per request (``GenerationRequest.loras``): sdrt's extra field on both APIs, on an export made with
    ``--lora-slots`` and a server started with ``--lora-dir``."""

    loras: list[LoraRef] | None = Field(default=None, max_length=MAX_LORAS,
                                        description="LoRAs applied to this request, by name, with their scales")


MAX_CONTROL_IMAGES = 8  # control images per request (one per ControlNet of the export; a control model: one)
ControlPreprocess = str  # the Pipeline names its preprocessors when it refuses one (runtime/controlnet.PREPROCESSORS)
PerNet = float | list[float | None]


class ControlKnobs(BaseModel):
    """ControlNet and control models (FLUX.1 Depth / Canny) on the OpenAI API: sdrt's extra fields, named as diffusers'
    ControlNet pipelines' arguments (``GenerationRequest.control_images`` and the rest). A single value applies to
    every image; a list has one entry per ControlNet of the export, in its order (null leaves a net out or takes
    the default). The Pipeline checks them against the export before any work (422, or 400
    ``controlnet_unavailable`` on an export without ControlNets)."""

    control_image: str | list[str | None] | None = Field(
        default=None, description="a base64 PNG/JPEG/WebP (a data: URL prefix is accepted), or a list: one per "
                                  "ControlNet of the export, in order (null: that net does not run); a control "
                                  "model (FLUX.1 Depth / Canny) takes one")
    controlnet_conditioning_scale: PerNet | None = Field(
        default=None, description="each net's scale (default 1), a number or one per control image")
    control_guidance_start: PerNet | None = Field(
        default=None, description="the fraction of the steps where each net starts (default 0)")
    control_guidance_end: PerNet | None = Field(
        default=None, description="the fraction of the steps where each net stops (default 1)")
    guess_mode: bool = Field(default=False, description="diffusers' guess mode (UNet ControlNets)")
    control_mode: int | list[int | None] | None = Field(
        default=None, description="a Union ControlNet's control mode (diffusers' control_mode), an integer below its "
                                  "mode count, or one per control image (null for a net without modes)")
    control_preprocess: ControlPreprocess | list[ControlPreprocess | None] | None = Field(
        default=None, description="'canny': OpenCV's Canny edges (100, 200) of the image first, or one per image")

    @property
    def control_given(self) -> bool:
        return any(v not in (None, False) for v in (
            self.control_image, self.controlnet_conditioning_scale, self.control_guidance_start,
            self.control_guidance_end, self.guess_mode, self.control_mode, self.control_preprocess))


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every refusal: OpenAI's error shape (``param`` names the field)."""

    error: ErrorBody


# -- OpenAI --------------------------------------------------------------------------------------------
OPENAI_SIZE = r"^[1-9][0-9]{1,3}x[1-9][0-9]{1,3}$"
# OpenAI fields that would change the image, with the only values sdrt can honour
_OPENAI_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "quality": (None, "auto", "standard"), "style": (None, "natural"), "output_format": (None, "png"),
    "background": (None, "auto", "opaque"), "stream": (None, False), "partial_images": (None, 0),
    "output_compression": (None, 100), "moderation": (None, "auto", "low"),
}


def _refuse_non_neutral(data: Any, neutral: dict[str, tuple[Any, ...]], api: str) -> Any:
    if isinstance(data, dict):
        bad = sorted(k for k, v in data.items() if k in neutral and v not in neutral[k])
        if bad:
            raise ValueError(f"{', '.join(bad)}: not supported by sdrt's {api} API and would change the image; "
                             "leave them out")
        return {k: v for k, v in data.items() if k not in neutral}
    return data


class SdrtKnobs(CacheKnobs, LoraKnobs, TextKnobs, SlgKnobs):
    """sdrt's own fields, which the official client sends through ``extra_body``."""

    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int | None = Steps
    guidance_scale: float | None = Guidance
    sampler: str | None = Field(default=None, description=f"one of {', '.join(SAMPLERS)}")
    seed: int | None = Seed
    prompt_syntax: PromptSyntax = Field(
        default="plain", description="how the prompt is read: as it is, in A1111's language ((a:1.2), [a], "
                                     "BREAK, <lora:NAME:W>), or in compel's (a+, (a b)1.3, (\"a\", \"b\").blend(0.7, 0.3))")


class OpenAIGeneration(SdrtKnobs, ControlKnobs):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Prompt
    n: int = Field(default=1, ge=1, le=MAX_N, description=f"images, 1..{MAX_N} (and the server's --max-n)")
    size: str | None = Field(default=None, pattern=OPENAI_SIZE,
                             description="'WxH', multiples of 8 within the model's sizes; default its own")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        return _refuse_non_neutral(data, _OPENAI_NEUTRAL, "OpenAI images")


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(default=None, description="the seed this image was generated with (send it back as "
                                                        "`seed` with n=1 to reproduce the image)")


class OpenAIImages(BaseModel):
    created: int
    data: list[OpenAIImage]
    notes: list[str] | None = Field(default=None, description="what had no effect on the images (sdrt's field; "
                                                              "null when nothing): e.g. a guidance_scale the model "
                                                              "ignores")


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sdrt"


class OpenAIModels(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# -- AUTOMATIC1111 ----------------------------------------------------------------------------------
# A1111 fields that change the image, with the values that leave it as sdrt makes it (accepted, since
# clients send their defaults); anything else is refused, naming the field.
_A1111_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "enable_hr": (None, False), "script_name": (None, ""),
    "script_args": (None, []), "restore_faces": (None, False), "tiling": (None, False),
    "styles": (None, []), "subseed": (None, -1), "subseed_strength": (None, 0, 0.0),
    "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0), "eta": (None, 0, 0.0),
    "s_churn": (None, 0, 0.0), "s_noise": (None, 1, 1.0), "s_tmin": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0, None), "override_settings": (None, {}), "refiner_checkpoint": (None, ""),
    "refiner_switch_at": (None, 0, 0.0), "hr_scale": (None, 2, 2.0), "hr_upscaler": (None, "", "Latent"),
    "hr_second_pass_steps": (None, 0), "denoising_strength_hr": (None,), "image_cfg_scale": (None,),
    "initial_noise_multiplier": (None, 1, 1.0), "resize_mode": (None, 0),
    "include_init_images": (None, False), "firstpass_image": (None, ""),
}
# inpainting's fields: img2img's own (A1111Img2Img); txt2img takes them only at their neutral values
_A1111_MASK_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "mask_blur": (None, 4), "mask_blur_x": (None, 4), "mask_blur_y": (None, 4), "inpainting_fill": (None, 0, 1),
    "inpaint_full_res": (None, True, False), "inpaint_full_res_padding": (None, 0, 32),
    "inpainting_mask_invert": (None, 0),
}
# fields that only say what to do with the output, not what it is
_A1111_HARMLESS = ("send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
                   "override_settings_restore_afterwards", "disable_extra_networks", "comments",
                   "force_task_id", "infotext", "sampler_index")


def _a1111_before(data: Any, img2img: bool) -> Any:
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in _A1111_HARMLESS}
        if not img2img:
            if data.get("mask") not in (None, ""):
                raise ValueError("mask: txt2img takes no mask; inpaint with POST /sdapi/v1/img2img (init_images "
                                 "and mask)")
            data.pop("mask", None)
            data = _refuse_non_neutral(data, _A1111_MASK_NEUTRAL, "A1111 txt2img")
    return _refuse_non_neutral(data, _A1111_NEUTRAL, "A1111")


class A1111Txt2Img(CacheKnobs, LoraKnobs, TextKnobs, SlgKnobs):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED, description=f"-1: random; else 0..{MAX_SEED}")
    sampler_name: str | None = Field(default=None, description="DDIM, DPM++ 2M, DPM++ 2M Karras, Euler, "
                                                               "Euler a, LCM (or sdrt's names)")
    scheduler: str | None = Field(default=None, description="Automatic or Karras")
    batch_size: int = Field(default=1, ge=1, le=MAX_N, description=f"images per batch, 1..{MAX_N}")
    n_iter: int = Field(default=1, ge=1, le=MAX_N, description=f"batches, 1..{MAX_N}")
    steps: int = Field(default=20, ge=1, le=MAX_STEPS, description=f"1..{MAX_STEPS}")
    cfg_scale: float = Field(default=7.0, ge=0.0, le=50.0, allow_inf_nan=False, description="0..50")
    width: int | None = Field(default=None, ge=SIZE_MIN, le=SIZE_MAX, multiple_of=8,
                              description="a multiple of 8; default: the model's size")
    height: int | None = Field(default=None, ge=SIZE_MIN, le=SIZE_MAX, multiple_of=8,
                               description="a multiple of 8; default: the model's size")
    alwayson_scripts: dict[str, Any] | None = Field(
        default=None, description="the controlnet script only (sd-webui-controlnet's request shape): "
                                  '{"controlnet": {"args": [{"image": b64, "model": NAME, "module": "none" or '
                                  '"canny", "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0}, ...]}}; '
                                  "GET /controlnet/model_list names the export's nets")

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        return _a1111_before(data, img2img=False)


MaskBlur = Field(default=None, ge=0, le=256, description="pixels, 0..256")


class A1111Img2Img(A1111Txt2Img):
    init_images: list[str] = Field(min_length=1, max_length=1,
                                   description="one base64 image (a data: URL prefix is accepted)")
    denoising_strength: float = Field(default=0.75, gt=0.0, le=1.0, allow_inf_nan=False,
                                      description="how much to change the image, (0, 1]")
    mask: str | None = Field(default=None, description="inpainting: a base64 image, white = repaint (an image "
                                                       "with transparency: its opaque pixels); resized to the "
                                                       "output size")
    mask_blur: int | None = Field(default=None, ge=0, le=256,
                                  description="the blur radius (pixels, 0..256) of the mask through which the "
                                              "original is pasted back over the result; default 4")
    mask_blur_x: int | None = MaskBlur
    mask_blur_y: int | None = MaskBlur
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1, description="1: repaint the black region instead")
    inpainting_fill: int = Field(default=1, ge=0, le=3,
                                 description="with a mask only 1 (original: start from the image) is supported")
    inpaint_full_res: bool = Field(default=False, description="with a mask, true inpaints only the masked region "
                                                              "at the full output size (A1111's 'only masked'; "
                                                              "the pipeline's padding_mask_crop); false: the whole "
                                                              "picture")
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=2048, description="pixels kept around the mask's box "
                                                                                "with inpaint_full_res only")

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        return _a1111_before(data, img2img=True)


class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str  # a JSON string, as A1111's: all_seeds, all_prompts, timings ...
