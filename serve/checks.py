"""Request checks that the schemas cannot make: the model's sizes, the server's limits, samplers, seeds,
uploaded images. Each refuses with an ``ApiError`` naming the field."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

from . import images as imgs
from . import schemas as S
from .config import ServeConfig
from .deps import ServeState
from .errors import ApiError


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:name:multiplier>`` tags taken out of a prompt, as A1111 does (``prompt_syntax.lora_tags``):
    (the prompt without them, (name, scale) pairs); a multiplier that is no number is a 422."""
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.prompt_syntax import lora_tags

    try:
        return lora_tags(prompt)
    except InputError as e:
        raise ApiError(422, str(e), "prompt", "invalid_lora") from e


def lora_form(text: str | None) -> list[S.LoraRef] | None:
    """The edits form's ``loras`` field (a JSON list of ``{"name", "scale"}``, as the generations field), parsed;
    422 naming the field when it is not."""
    if text is None or not text.strip():
        return None
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(list[S.LoraRef]).validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(422, f"loras must be a JSON list of {{\"name\": ..., \"scale\": ...}} objects: "
                            f"{first['msg']} at {list(first['loc'])}", "loras", "invalid_lora") from e


def loras_of(st: ServeState, refs: list[S.LoraRef] | None,
             from_prompt: Sequence[tuple[str, float]] = ()) -> list[tuple[str, float]] | None:
    """A request's LoRAs (the ``loras`` field, then a prompt's tags), checked against this server before any
    work: 400 (``lora_unavailable``) without ``--lora-dir`` or on an export without slots, 422 for an unknown
    name (naming the ones there are), a rank past the slots or an adapter of another architecture."""
    from sdrt.runtime.errors import ArtifactError, InputError

    pairs = [(r.name, r.scale) for r in refs or []] + list(from_prompt)
    if not pairs:
        return None
    if len(pairs) > S.MAX_LORAS:
        raise ApiError(422, f"{len(pairs)} LoRAs in one request; at most {S.MAX_LORAS}", "loras", "too_many_loras")
    if st.config.lora_dir is None:
        raise ApiError(400, "this server serves no LoRAs: start it with --lora-dir DIR (on an export made with "
                            "--lora-slots)", "loras", "lora_unavailable")
    pipe = st.pipeline()
    known = set(pipe.loras.names())
    for name, scale in pairs:
        if name not in known or not re.fullmatch(S.LORA_NAME, name):
            raise ApiError(422, f"unknown LoRA {name!r}: this server has {', '.join(sorted(known)) or 'none'}",
                           "loras", "unknown_lora")
        if not -10.0 <= scale <= 10.0:
            raise ApiError(422, f"LoRA {name!r}: scale {scale} is outside -10..10", "loras", "invalid_lora")
    try:
        pipe.check_loras(pairs)
    except ArtifactError as e:  # an export without slots
        raise ApiError(400, str(e), "loras", "lora_unavailable") from e
    except InputError as e:
        raise ApiError(422, str(e), "loras", "invalid_lora") from e
    return pairs


def check_size(st: ServeState, w: int, h: int, field_w: str, field_h: str) -> None:
    lim = st.pipeline().manifest.limits
    for name, v in ((field_w, w), (field_h, h)):
        if v % lim.multiple_of or not lim.min_size <= v <= lim.max_size:
            raise ApiError(422, f"{name} {v} is outside this model's sizes: a multiple of {lim.multiple_of} "
                                f"in {lim.min_size}..{lim.max_size}", name, "invalid_size")
    if w * h > st.config.max_pixels:
        raise ApiError(422, f"{w}x{h} = {w * h} pixels; this server allows at most {st.config.max_pixels}",
                       field_w, "too_many_pixels")


def check_mask_needed(st: ServeState, has_mask: bool, how: str) -> None:
    if not has_mask and getattr(st.pipeline(), "is_inpainting", False):
        raise ApiError(422, f"{st.model_id} is an inpainting model: every request needs an image and a mask "
                            f"({how})", "mask", "mask_required")


def check_common(cfg: ServeConfig, prompt: str, negative: str | None, steps: int, n: int, n_field: str,
                 steps_field: str = "steps") -> None:
    """Prompt lengths, steps and images per request against the server's limits."""
    for name, text in (("prompt", prompt), ("negative_prompt", negative or "")):
        if len(text) > cfg.max_prompt_chars:
            raise ApiError(422, f"{name} has {len(text)} characters; at most {cfg.max_prompt_chars}", name,
                           "prompt_too_long")
    if not 1 <= steps <= cfg.max_steps:
        raise ApiError(422, f"{steps_field} {steps} is outside 1..{cfg.max_steps}", steps_field, "invalid_steps")
    limit = cfg.images_per_request
    if not 1 <= n <= limit:
        raise ApiError(422, f"{n_field} {n} is outside 1..{limit} (images per request on this server)",
                       n_field, "too_many_images")


def check_prompts(st: ServeState, prompt: str, negative: str | None, steps: int, syntax: str) -> None:
    """The prompts in their syntax, as the pipeline reads them, before any work: 422 ``invalid_prompt`` for what
    it refuses (A1111's prompt editing for now, a weight that is no number, emphasis on a family without it)."""
    from sdrt.runtime.errors import InputError

    try:
        st.pipeline().check_prompts(prompt, negative, steps, syntax)
    except InputError as e:
        raise ApiError(422, str(e), "prompt", "invalid_prompt") from e


def check_negative(st: ServeState, negative: str | None, field: str = "negative_prompt") -> None:
    """A negative prompt the model takes (422 ``negative_prompt_unsupported`` for a guidance-distilled family,
    FLUX.1, given a non-empty one)."""
    from sdrt.runtime.errors import InputError

    try:
        st.pipeline().family.refuse_negative(negative)
    except InputError as e:
        raise ApiError(422, str(e), field, "negative_prompt_unsupported") from e


def sequence_length_of(st: ServeState, max_sequence_length: int | None) -> int | None:
    """The request's ``max_sequence_length``, checked against the model (422 naming the field on a model
    without a T5 encoder, past its tokenizer's limit, or outside the T5 range of TensorRT engines; without one,
    the model's default is checked against that range)."""
    from sdrt.runtime.errors import InputError

    try:
        tokens = st.pipeline().check_sequence_length(max_sequence_length)
    except InputError as e:
        raise ApiError(422, str(e), "max_sequence_length", "invalid_max_sequence_length") from e
    return None if max_sequence_length is None else tokens


def guidance_notes(st: ServeState, scale: float | None, field: str) -> list[str]:
    """What the response says of a guidance scale the model ignores (FLUX.1 [schnell] takes none; diffusers
    ignores it too, so the request is not refused, but the client learns it had no effect)."""
    pipe = st.pipeline()
    if scale is None or pipe.takes_guidance:
        return []
    return [f"{field} {scale:g} had no effect: {st.model_id} ({pipe.family.label}) takes no guidance scale"]


def sampler_of(st: ServeState, name: str | None, field: str, scheduler: str | None = None) -> str:
    """The request's sampler (else the server's default, else the model's) in sdrt's names, for this model."""
    from sdrt.runtime.samplers import FLOW, default_sampler

    prediction = st.pipeline().manifest.prediction_type
    name = name or st.config.default_sampler
    if name is None:
        return default_sampler(prediction)
    try:
        return S.sampler_name(name, scheduler, flow=prediction == FLOW)
    except ValueError as e:
        raise ApiError(422, str(e), field, "invalid_sampler") from e


def cache_of(st: ServeState, cache: str | None, interval: int, schedule: str, steps: int | None = None,
             threshold: float | None = None) -> Any:
    """The request's feature-caching policy (None: off), checked against this model before any work: 422 for
    a value outside the choices (or, given the loop's ``steps``, a schedule that has no plan for them; a
    threshold without first-block caching), 400 (``cache_unavailable``) for a model exported without
    ``--feature-cache``, a family without the kind, or a threshold on a backend that cannot read one per step."""
    from sdrt.runtime.errors import ArtifactError, InputError
    from sdrt.runtime.feature_cache import cache_policy

    try:
        policy = cache_policy(cache, interval, schedule, threshold)
    except InputError as e:
        field = next((f for f in ("cache_interval", "cache_schedule", "cache_threshold") if str(e).startswith(f)),
                     "cache")
        raise ApiError(422, str(e), field, "invalid_value") from e
    try:
        if policy is not None and steps is not None:
            policy.full_steps(steps)  # the non-uniform schedule has no plan for some step counts
    except InputError as e:
        raise ApiError(422, str(e), "cache_schedule", "invalid_value") from e
    if policy is None:
        return None
    try:
        st.pipeline().check_cache(policy)
    except (ArtifactError, InputError) as e:  # no shallow path in this export; a family without this cache
        raise ApiError(400, str(e), "cache", "cache_unavailable") from e
    return policy


def skip_guidance_of(st: ServeState, body: S.SlgKnobs, guidance: float, cache: Any = None) -> Any:
    """The request's skip-layer guidance (None: off), checked against this model before any work: 422 for settings
    that do not go together (a window without a scale, start not below stop, an unguided request, feature caching
    beside it), 400 (``skip_layers_unavailable``) for a family without it or an export without its pass."""
    from sdrt.runtime.errors import ArtifactError, InputError
    from sdrt.runtime.layer_skip import skip_guidance

    try:
        slg = skip_guidance(body.skip_layer_guidance_scale, body.skip_layer_guidance_start,
                            body.skip_layer_guidance_stop)
    except InputError as e:
        field = next((f for f in ("skip_layer_guidance_start", "skip_layer_guidance_stop") if str(e).startswith(f)),
                     "skip_layer_guidance_scale")
        raise ApiError(422, str(e), field, "invalid_value") from e
    if slg is None:
        return None
    pipe = st.pipeline()
    try:
        pipe.check_skip_guidance(slg, pipe.uses_guidance(guidance), cache)
    except ArtifactError as e:  # an export without the pass
        raise ApiError(400, str(e), "skip_layer_guidance_scale", "skip_layers_unavailable") from e
    except InputError as e:
        if not pipe.family.skip_layer_guidance:
            raise ApiError(400, str(e), "skip_layer_guidance_scale", "skip_layers_unavailable") from e
        raise ApiError(422, str(e), "skip_layer_guidance_scale", "invalid_value") from e
    return slg


def seeds_for(seed: int | None, n: int) -> list[int]:
    base = secrets.randbelow(S.MAX_SEED + 1) if seed is None or seed < 0 else seed
    return [(base + k) % (S.MAX_SEED + 1) for k in range(n)]  # 32-bit, wrapping as the seed range does


def snap(size: tuple[int, int], lim: Any) -> tuple[int, int]:
    """An upload's size rounded down to the model's multiple (the size img2img then runs at)."""
    w, h = size
    return w - w % lim.multiple_of, h - h % lim.multiple_of


def decode_upload(data: bytes, field: str, max_pixels: int, keep_alpha: bool = False) -> Any:
    try:
        return imgs.decode_image(data, field=field, max_pixels=max_pixels, keep_alpha=keep_alpha)
    except imgs.ImageRefused as e:
        raise ApiError(422, str(e), e.field, "invalid_image") from e


def decode_b64(text: str, field: str, max_pixels: int, keep_alpha: bool = False) -> Any:
    try:
        return imgs.decode_b64_image(text, field=field, max_pixels=max_pixels, keep_alpha=keep_alpha)
    except imgs.ImageRefused as e:
        raise ApiError(422, str(e), e.field, "invalid_image") from e
