"""An SDXL base and refiner as an ensemble of expert denoisers: the base denoises the first part of the
schedule, the refiner the rest, from the base's latents (never pixels).

This is diffusers' ``StableDiffusionXLPipeline(denoising_end=f, output_type="latent")`` followed by
``StableDiffusionXLImg2ImgPipeline(denoising_start=f, image=latents)``, built from the pipeline's public
stages (no loop of its own)::

    emb = base.encode_prompt(prompt, guided=True)
    plan = base.plan("euler", 40)
    lat = base.denoise(emb, base.prepare_latents(plan, 1024, 1024, seed=1), plan, end=0.8)
    rplan = refiner.plan("euler", 40)
    rplan = refiner.plan("euler", 40, fresh_from=refiner.handoff_row(rplan.timesteps, 0.8))
    rlat = refiner.latents_from(lat, base)           # the same state, on the refiner's device, no history
    rlat = refiner.denoise(refiner.encode_prompt(prompt, guided=True), rlat, rplan, start=0.8)
    images, _ = refiner.decode(rlat)

Each model keeps its own scheduler configuration: the refiner's plan comes from its own scheduler. The cut
is diffusers' discrete one (the base runs the steps with t >= round(T (1 - f)), the refiner the others), no
noise is added at the hand-off, and the refiner's sampler starts fresh there (a multistep sampler's history
is not carried over), as diffusers' refiner starts its own scheduler at ``denoising_start``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .engine import Backend
from .errors import DeviceMemoryError, InputError
from .families import Family
from .manifest import ExportManifest
from .request import GenerationRequest
from .results import Latents, PromptEmbeddings, Result
from .samplers import SamplerPlan
from .step_loop import Clock


class Pipeline(Protocol):
    """The public stages of ``runtime.pipeline.Pipeline`` that the ensemble uses (and nothing else)."""

    folder: Path
    manifest: ExportManifest
    family: Family
    backend: Backend
    scheduler_config: dict[str, Any]

    def reserved(self) -> AbstractContextManager[Any]: ...
    def uses_guidance(self, guidance_scale: float) -> bool: ...
    def check_request(self, height: int, width: int, batch: int, guided: bool | None) -> None: ...
    def plan(self, sampler: str | None = ..., steps: int = ..., *, strength: float = ..., timestep_spacing: str | None = ...,
             fresh_from: int = ...) -> SamplerPlan: ...
    def handoff_row(self, plan_timesteps: Any, fraction: float) -> int: ...
    def encode_prompt(self, prompt: Any, negative_prompt: Any = ..., *, batch_size: int = ...,
                      guided: bool = ..., prompt_syntax: str = ...) -> PromptEmbeddings: ...
    def prepare_latents(self, plan: SamplerPlan, height: int, width: int, *, batch_size: int | None = ...,
                        seed: Any = ..., latents: Any = ...) -> Latents: ...
    def denoise(self, embeddings: PromptEmbeddings, latents: Latents, plan: SamplerPlan, *,
                guidance_scale: float = ..., start: float | None = ..., end: float | None = ...,
                callback: Callable[[int, int], None] | None = ..., aesthetic_score: float | None = ...,
                negative_aesthetic_score: float | None = ..., timings: dict[str, Any] | None = ...,
                clock: Clock | None = ..., own_buffers: bool = ..., cache: Any = ...) -> Latents: ...
    def check_cache(self, cache: Any, control: Any = ...) -> None: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    def latents_from(self, latents: Latents, source: Any) -> Latents: ...
    def finish(self, latents: Any, output: str) -> tuple[list[Any], list[bool], np.ndarray | None]: ...
    def memory_error(self, e: DeviceMemoryError, batch: int, guided: bool, height: int,
                     width: int) -> DeviceMemoryError: ...

DEFAULT_REFINER_START = 0.8


def check_refiner_start(f: Any) -> float:
    if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or not math.isfinite(f) \
            or not 0.0 < f < 1.0:
        raise InputError(f"refiner_start {f!r} is outside (0, 1): give the fraction of the schedule the base runs "
                         "before the refiner takes over (0.8 is typical)",
                         cli=f"--refiner-start {f!r} is outside (0, 1): give the fraction of the schedule the base "
                             "runs before the refiner takes over (0.8 is typical)")
    return float(f)


def _width(pipe: Pipeline, output: str) -> int | None:
    comp = pipe.manifest.components.get("text_encoder_2")
    if comp is None:
        return None
    spec = next((t for t in comp.outputs if t.name == output), None)
    dim = None if spec is None else spec.shape[-1]
    return dim if isinstance(dim, int) else None


def check_pair(base: Pipeline, refiner: Pipeline) -> None:
    """Refuse, before any work, a pair whose latents cannot be handed from one to the other."""
    bm, rm = base.manifest, refiner.manifest
    if bm.refiner:
        raise InputError(
            f"{base.folder} is an SDXL refiner, passed as the base model: it continues a base model's latents. "
            "Pass an SDXL base export as the model and this folder as the refiner",
            cli=f"{base.folder} is an SDXL refiner, passed as the base model: pass an SDXL base export as the "
                f"model and this folder as --refiner")
    formats = [(m.latent_channels, m.vae_scale_factor) for m in (bm, rm)]
    scalings = [m.latent_scaling for m in (bm, rm)]
    if formats[0] != formats[1] or (None not in scalings and not math.isclose(scalings[0], scalings[1])):  # type: ignore[arg-type]
        raise InputError(
            f"the refiner {refiner.folder} ({rm.preset}) uses another latent format than the base {base.folder} "
            f"({bm.preset}): {formats[1][0]} channels at 1/{formats[1][1]} scale, scaling {scalings[1]}, against "
            f"{formats[0][0]} at 1/{formats[0][1]}, scaling {scalings[0]}. A refiner continues the base's latents, "
            "so both must share the VAE: use the SDXL refiner with an SDXL base")
    if not rm.refiner:
        raise InputError(
            f"{refiner.folder} ({rm.preset}) is not an SDXL refiner (its export does not say so); pass a refiner "
            "export (e.g. of stabilityai/stable-diffusion-xl-refiner-1.0), or generate with the base alone",
            cli=f"--refiner {refiner.folder} ({rm.preset}) is not an SDXL refiner; pass a refiner export, or leave "
                "--refiner out")
    for output, what in (("hidden_states", "text encoder width"), ("text_embeds", "pooled embedding width")):
        b, r = _width(base, output), _width(refiner, output)
        if b is not None and r is not None and b != r:
            raise InputError(
                f"the refiner {refiner.folder} ({rm.preset}) has a {what} of {r}, the base {base.folder} "
                f"({bm.preset}) {b} on its second encoder: they are of different model families (sizes). Use the "
                "refiner made for this base (sdxl with sdxl-refiner, sdxl-tiny with sdxl-refiner-tiny)")


def carry_latents(target: Pipeline, latents: Latents, source: Pipeline) -> Latents:
    """``source``'s denoising state on ``target``'s device, for ``target`` to continue: the latents themselves,
    the step, the ancestral noise and ``padding_mask_crop``'s box (the target's ``decode`` pastes back); not the
    multistep history (``x0``), as a second model's sampler starts fresh (diffusers' refiner at
    ``denoising_start``). On one device (a base and its refiner) a device copy."""
    m, be = target.manifest, target.backend
    on_device = not isinstance(latents.x, np.ndarray)
    dtype, shape = source.backend.meta(latents.x) if on_device else (latents.x.dtype, latents.x.shape)
    want = (m.latent_channels, latents.height // m.vae_scale_factor, latents.width // m.vae_scale_factor)
    if tuple(shape[1:]) != want:
        raise InputError(f"the latents are {list(shape)}, this model's latents for {latents.width}x{latents.height} "
                         f"are [B, {', '.join(map(str, want))}]: they come from a model of another latent format")
    if on_device and dtype == target.dtype and be.shares_memory_with(source.backend):
        x = be.clone(latents.x)  # one device (a base and its refiner): no host trip
    else:
        host = source.backend.to_host(latents.x) if on_device else latents.x
        x = be.to_device(np.asarray(host).astype(target.dtype))
    return Latents(x, latents.height, latents.width, latents.step, None, latents.noise, latents.seed,
                   crop=latents.crop)


def refine(base: Pipeline, refiner: Pipeline, request: GenerationRequest, *,
           callback: Callable[[int, int], None] | None = None) -> Result:
    """The base denoises to ``refiner_start`` (default 0.8) of the schedule, the refiner the rest from its
    latents; the refiner's VAE decodes. ``steps`` counts the whole schedule, as diffusers'
    ``num_inference_steps`` on both pipelines. ``aesthetic_score`` / ``negative_aesthetic_score``: the
    refiner's conditioning (6.0 / 2.5). Every argument is checked before any engine runs.

    ``Result.timings``: ``base_text_encoder_ms``, ``refiner_text_encoder_ms``, ``base_steps_ms``,
    ``refiner_steps_ms`` (per step), ``unet_steps_ms`` (both), ``vae_decoder_ms`` on one clock, ``clock``
    says which: the base backend's (device events on TensorRT) where both models share its device, else
    the host clock synchronizing both; ``total_ms`` on the host clock. ``Result.loop`` says how each
    model's loop ran."""
    req = request
    t0 = time.perf_counter()
    single = [name for name, v in (("image", req.image), ("strength", req.strength), ("mask_image", req.mask_image),
                                   ("paste_back", req.paste_back), ("padding_mask_crop", req.padding_mask_crop),
                                   ("prompt_embeds", req.prompt_embeds),
                                   ("control_images", req.control_images)) if v is not None]
    if single:
        raise InputError("a base + refiner call generates from a prompt: image, strength, mask_image, "
                         "paste_back, padding_mask_crop, prompt_embeds and control_images are for a single model; "
                         "leave them out")
    if req.guidance_rescale or req.timestep_spacing is not None:
        raise InputError("guidance_rescale and timestep_spacing are not supported with a refiner: leave them "
                         "out")
    if req.prompt is None:
        raise InputError("a base + refiner call needs a prompt")
    fraction = DEFAULT_REFINER_START if req.refiner_start is None else check_refiner_start(req.refiner_start)
    with base.reserved(), refiner.reserved():
        check_pair(base, refiner)
        req = req.checked()
        refiner.family.check_scores(req.scores)
        cache = req.cache_policy  # each model's loop caches its own window, its first step full
        for pipe in (base, refiner):
            pipe.check_cache(cache)
        b = req.images_count
        height = base.manifest.default_size if req.height is None else req.height
        width = base.manifest.default_size if req.width is None else req.width
        guided = base.uses_guidance(req.guidance_scale)
        for pipe in (base, refiner):
            pipe.check_request(height, width, b, guided=guided)
        steps, sampler = req.steps, req.sampler
        plan_b = base.plan(sampler, steps)
        k_base = base.handoff_row(plan_b.timesteps, fraction)
        plan_r = refiner.plan(sampler, steps)
        k_ref = refiner.handoff_row(plan_r.timesteps, fraction)
        if not 0 < k_base < plan_b.steps or not 0 < k_ref < plan_r.steps:
            raise InputError(
                f"refiner_start {fraction} leaves the base {k_base} and the refiner {plan_r.steps - k_ref} of the "
                f"{steps} steps; each needs at least one: move refiner_start toward the middle, or use more steps",
                cli=f"--refiner-start {fraction} leaves the base {k_base} and the refiner {plan_r.steps - k_ref} of "
                    f"the {steps} steps; each needs at least one: move it toward the middle, or raise --steps")
        if k_ref:
            plan_r = refiner.plan(sampler, steps, fresh_from=k_ref)

        # compel's syntax is read by both models alike (it has no schedule); A1111's is not applied by this call
        syntax = req.prompt_syntax if req.prompt_syntax == "compel" else "plain"
        # one clock for every stage and both models, as Pipeline.__call__: the base backend's (device events on
        # TensorRT) where the refiner runs on its stream, else the host clock synchronizing both devices
        clock = (base.backend.clock() if refiner.backend.shares_memory_with(base.backend)
                 else Clock(base.backend, refiner.backend))
        running = base  # the model whose stage runs: an allocation failure is reported with its sizes
        loop_b: dict[str, Any] = {}
        loop_r: dict[str, Any] = {}
        try:
            clock.mark()
            emb_b = base.encode_prompt(req.prompt, req.negative_prompt, batch_size=req.batch_size, guided=guided,
                                       prompt_syntax=syntax)
            clock.mark()
            lat = base.prepare_latents(plan_b, height, width, batch_size=b, seed=req.seed, latents=req.latents)
            clock.mark()
            lat = base.denoise(emb_b, lat, plan_b, guidance_scale=req.guidance_scale, end=fraction,
                               callback=callback, timings=loop_b, clock=clock, own_buffers=False, cache=cache)
            running = refiner
            emb_r = refiner.encode_prompt(req.prompt, req.negative_prompt, batch_size=req.batch_size,
                                          guided=guided, prompt_syntax=syntax)
            clock.mark()
            rlat = refiner.denoise(emb_r, refiner.latents_from(lat, base), plan_r, guidance_scale=req.guidance_scale,
                                   start=fraction, callback=callback, timings=loop_r, clock=clock,
                                   aesthetic_score=req.aesthetic_score,
                                   negative_aesthetic_score=req.negative_aesthetic_score, own_buffers=False,
                                   cache=cache)
            images, nonfinite, final = refiner.finish(rlat, req.output)
            clock.mark()
            # base text, latents, base loop set-up, base steps, refiner text, hand-off + refiner set-up,
            # refiner steps, decode (or the copy of the latents to the host)
            ms = clock.intervals_ms()
        except DeviceMemoryError as e:
            raise running.memory_error(e, b, guided, height, width) from e
        finally:
            clock.close()
        kb = k_base  # the base's steps: the window [0, k_base) of its plan
        steps_b, steps_r = ms[3:3 + kb], ms[5 + kb:-1]
        timings: dict[str, Any] = {
            "base_text_encoder_ms": ms[0], "refiner_text_encoder_ms": ms[3 + kb], "text_encoder_ms": ms[0] + ms[3 + kb],
            "base_steps_ms": steps_b, "refiner_steps_ms": steps_r, "unet_steps_ms": steps_b + steps_r,
            "unet_step_ms": float(np.median(steps_b + steps_r)), "clock": clock.kind}
        if req.output == "images":
            timings["vae_decoder_ms"] = ms[-1]
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        how = (f"base {len(steps_b)} steps: {loop_b['loop']}; refiner {len(steps_r)} steps (from {fraction} of the "
               f"schedule): {loop_r['loop']}")
        return Result(images, timings, nonfinite, how, final, rlat.seed)
