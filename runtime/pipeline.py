"""``Pipeline``: text (and optionally an image) -> images, over engines on one backend.

The only module that knows both engines and samplers. The call is four public stages, each with data in
and out, which a caller may also run on their own::

    emb = pipe.encode_prompt("a cat", guided=True)            # -> PromptEmbeddings (or embeddings_from)
    plan = pipe.plan("dpmpp-2m", 30)                          # -> SamplerPlan
    lat = pipe.prepare_latents(plan, 512, 512, seed=1)        # -> Latents (txt2img noise, or img2img)
    lat = pipe.denoise(emb, lat, plan, guidance_scale=7.5)    # -> Latents (optionally a window: start/end)
    images, nonfinite = pipe.decode(lat)

What differs between model families (encoders, pooled embeddings, added time ids, the negatives rule) comes from
the manifest's family object (runtime/families); the text stage, inpainting and ControlNet live in modules of
their own (conditioning, inpaint_stage, control_stage); a request is a ``GenerationRequest`` (runtime/request).

Load once, call many times; calls from several threads at once are safe: they are serialized by a
lock, since one pipeline drives one device. ``close()`` (or ``with Pipeline.load(...) as pipe:``)
releases every engine and device buffer; a closed pipeline refuses further calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import control_latents, control_stage, controlnet, inpaint, inpaint_stage, loading, reference, samplers
from .backends import BACKENDS, make_backend
from .conditioning import TextConditioning
from .device_graphs import DeviceGraphs
from .engine import Array, Backend, Engine
from .errors import ArtifactError, DeviceMemoryError, InputError
from .families import Family
from .feature_cache import EXPORT_HINT, SHALLOW_UNET, CachePolicy, cache_policy, shallow_controlnet
from .images import nonfinite_message, to_pil, to_uint8
from .layer_skip import EXPORT_HINT as SKIP_EXPORT_HINT
from .layer_skip import SKIP_UNET, SkipGuidance, SkipGuided, skip_guidance
from .lora_adapters import AdapterLibrary, adapter_factors, check_loras, slots_of
from .manifest import ExportManifest
from .memory_advice import explain as explain_memory_error
from .noise import draw, generators, seeds
from .prompt_syntax import check_syntax, segment_starts, segments
from .refiner import carry_latents, refine
from .request import (
    DEFAULT_STRENGTH,
    GUIDANCE_MAX,
    OUTPUTS,
    SEED_MAX,
    GenerationRequest,
    call_size,
    check_guidance,
    check_latents,
    check_rescale,
    check_side,
    is_int,
    negatives_of,
    prompts_of,
    resolve_seed,
)
from .results import Latents, PromptEmbeddings, Result, call_timings
from .step_loop import Clock, StepLoop, residual_inputs
from .tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from typing_extensions import Self

CONTROL_UNET = control_stage.CONTROL_UNET
__all__ = ["BACKENDS", "CONTROL_UNET", "DEFAULT_STRENGTH", "GUIDANCE_MAX", "OUTPUTS", "SEED_MAX", "GenerationRequest",
           "Latents", "Pipeline", "PromptEmbeddings", "Result", "make_backend"]


class Pipeline:
    """A diffusion model (any family of runtime/families) over an sdrt ONNX export or engine folder."""

    def __init__(self, folder: Path, manifest: ExportManifest, backend: Backend,
                 engines: dict[str, Engine], tokenizers: list[PromptTokenizer],
                 scheduler_config: dict[str, Any], pending: Mapping[str, Engine] | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.family: Family = manifest.model_family
        self.backend = backend
        self.engines = engines  # the loaded ones
        # the components loaded on the first call that runs them (``loading.deferred``), as the manifest describes them
        self._pending: dict[str, Engine] = dict(pending or {})
        self.tokenizers = tokenizers
        self.scheduler_config = scheduler_config
        self.device_graphs = DeviceGraphs(backend)
        # where ``load`` went, in ms: "backend" (manifest and backend), each engine by component, "tokenizers"
        self.load_ms: dict[str, float] = {}
        self._loops: dict[tuple[Any, ...], StepLoop] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._text: TextConditioning | None = None
        # built on first use, also from threads that hold no pipeline lock (a server's batch key, its checks)
        self._text_lock = threading.Lock()
        self.loras = AdapterLibrary()  # Pipeline.load(..., lora_dir=) names a folder to find LoRAs by name in
        self._no_lora: dict[str, dict[str, Array]] | None = None
        self._skip: SkipGuided | None = None  # skip-layer guidance's denoiser, made on its first call

    # -- loading and lifecycle ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str | Backend = "auto", *, threads: int | None = None,
             cuda_graph: bool | None = None, device_id: int = 0, precision: str | None = None,
             share_with: Pipeline | None = None, lora_dir: str | Path | None = None,
             static_shapes: bool = False) -> Pipeline:
        """Load an export or engine folder (or an Optimum export) onto a backend: ``auto`` picks tensorrt for an
        engine folder, else ort-cuda with a GPU, else openvino, else ort-cpu. ``cuda_graph``: replay captured
        CUDA graphs (tensorrt: on by default, falling back to the engines one by one when capture fails;
        ort-cuda: only when asked, for fixed shapes; ``Result.loop`` says which ran). ``device_id``: the GPU.
        ``precision``: openvino's inference precision (``auto``, ``bf16``, ``fp32``). ``share_with``: a loaded
        pipeline on the same backend whose device memory plan this one joins (a refiner beside its base: on
        tensorrt one stream and one scratch block). ``backend`` may also be a ``Backend`` the caller configured
        (``OvBackend(cache_dir=...)``): once loaded, the pipeline owns and closes it, and the keywords that
        configure a backend are refused beside it. ``lora_dir``: a folder of LoRA ``.safetensors`` files that calls
        name in ``loras=`` (an export made with ``--lora-slots``). ``static_shapes`` (openvino): compile each graph
        for the exact shapes of its calls, once per new shape, instead of once with dynamic axes: measured 3% faster
        per SD 1.5 image at 512 on a 2-core AVX2 host, its first image at a size 10 s slower (the compile), so it
        pays where a service serves few sizes (docs/backends/openvino.md). See docs/backends for each backend's
        details."""
        folder = Path(path)
        library = AdapterLibrary(lora_dir)  # a missing folder is refused before anything loads
        share = None if share_with is None else share_with.backend
        if share_with is not None:
            share_with._ready()
        opened = loading.open_model(folder, backend, threads=threads, cuda_graph=cuda_graph, device_id=device_id,
                                    precision=precision, share=share, static_shapes=static_shapes)
        try:
            pipe = cls(folder, opened.manifest, opened.backend, opened.engines, opened.tokenizers,
                       opened.scheduler_config, opened.pending)
            pipe.loras = library
            pipe.load_ms = dict(opened.load_ms)
        except BaseException:
            opened.release()
            raise
        if share_with is not None and opened.backend.shares_memory_with(share_with.backend):
            # one device stream: a call of either would otherwise interleave with (or be captured into) the
            # other's, so the pair takes one lock
            pipe._lock = share_with._lock
        return pipe

    def close(self) -> None:
        """Release every engine, device buffer, stream and captured graph (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):  # free on the pipeline's device, whichever thread closes it
                self.backend.make_current()
            for loop in self._loops.values():
                loop.close()
            self._loops.clear()
            self.device_graphs.clear()
            with self._text_lock:  # a batch key building it in another thread finishes first, or finds it closed
                self._text = None
            self._no_lora = None
            self._skip = None
            self.engines = {}
            self._pending = {}
            self.backend.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ready(self) -> None:
        """Every public call starts here: refuse a closed pipeline; bind the device to this thread."""
        if self._closed:
            raise InputError(f"this pipeline ({self.folder}) was closed; load it again with Pipeline.load")
        self.backend.make_current()

    @contextlib.contextmanager
    def reserved(self) -> Iterator[Pipeline]:
        """Hold this pipeline (its lock, its device bound to this thread) across several stages, so another
        thread's call cannot run between them: ``with base.reserved(), refiner.reserved(): ...``."""
        with self._lock:
            self._ready()
            yield self

    @property
    def _described(self) -> dict[str, Engine]:
        """Every loaded engine, and each component loaded on the first call that runs it that is not loaded yet as the
        manifest describes it (``loading.Deferred``): what reads inputs and outputs (not running them) reads these, so
        that reading them loads nothing."""
        return {**self._pending, **self.engines}

    def _engine(self, name: str) -> Engine:
        """The engine of component ``name``, loaded here on the first call that runs it where the load deferred it (the
        backend's errors are those of a load with the model). Under the pipeline's lock: threads calling at once load
        it once."""
        with self._lock:
            engine = self.engines.get(name)
            if engine is None:
                comp = self.manifest.components[name]
                engine = self.backend.load(str(self.folder / self.backend.graph_for(comp)), name,
                                           exact=loading.exact(self.manifest, name))
                self.engines[name] = engine
            return engine

    @property
    def dtype(self) -> np.dtype[Any]:
        """The UNet's (so the latents') dtype."""
        self._ready()
        return self._described["unet"].inputs["sample"].dtype

    def uses_guidance(self, guidance_scale: float) -> bool:
        """Classifier-free guidance runs (2B UNet rows) above scale 1, except on a UNet that embeds the
        scale itself (``timestep_cond``: LCM-distilled models, as diffusers' LCM pipelines) and in a
        guidance-distilled family (FLUX.1)."""
        return (self.family.classifier_free and guidance_scale > 1.0
                and "timestep_cond" not in self._described["unet"].inputs)

    @property
    def takes_guidance(self) -> bool:
        """Whether ``guidance_scale`` changes the images at all: False for a family without classifier-free
        guidance whose denoiser has no embedded ``guidance`` input (FLUX.1 [schnell], distilled to run without
        any), which ignores it as diffusers' pipelines do."""
        self._ready()
        return self.family.classifier_free or "guidance" in self._described["unet"].inputs

    def check_request(self, height: int, width: int, batch: int, guided: bool | None) -> None:
        """Refuse a size or batch outside the export's limits (and, with ``guided`` known, the backend's
        engines' profiles), before any work."""
        lim = self.manifest.limits
        for label, v in (("height", height), ("width", width)):
            self._check_side(label, v)
        if not 1 <= batch <= lim.max_batch:
            raise InputError(f"batch_size {batch} is outside the supported range 1..{lim.max_batch}")
        if guided is not None:
            self.backend.check_request(batch, height, width, guided)

    def conditioning_key(self, prompts: Sequence[str], negatives: Sequence[str] | None,
                         guidance_scale: float, prompt_syntax: str = "plain",
                         max_sequence_length: int | None = None) -> tuple[Any, ...]:
        """What must agree for requests to share one UNet batch without changing any image: guidance on or
        off, the text chunks each encoder makes of the texts (in their prompt syntax), the family's
        negatives rule and T5's tokens per prompt."""
        if self._closed:
            raise InputError(f"this pipeline ({self.folder}) was closed; load it again with Pipeline.load")
        guided = self.uses_guidance(guidance_scale)
        texts = list(prompts) + (list(negatives or []) if guided else [])
        zero = guided and self.family.zero_negatives and negatives is None
        text = self._conditioning()
        return guided, text.chunks(texts, prompt_syntax), zero, text.check_sequence_length(max_sequence_length)

    def _conditioning(self) -> TextConditioning:
        """The text stage, built once: callers in several threads at once (a server's batch key runs outside the
        pipeline's lock) share one."""
        text = self._text
        if text is None:
            with self._text_lock:
                text = self._text
                if text is None:
                    # a live view (the loaded engines, then the descriptions of those not loaded yet), not a copy:
                    # the text stage outlives the call that builds it, and engines loaded or replaced later are its too
                    text = self._text = TextConditioning(self.manifest, self.backend,
                                                         ChainMap(self.engines, self._pending), self.tokenizers,
                                                         self.device_graphs, self.dtype)
        return text

    # -- stage 1: text ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      batch_size: int = 1, guided: bool | None = None,
                      prompt_syntax: str = "plain", max_sequence_length: int | None = None,
                      loras: Any = None) -> PromptEmbeddings:
        """Prompts -> embeddings for ``len(prompts) * batch_size`` images (negatives first when guided).

        Prompts over 77 tokens are encoded in 77-token chunks and concatenated along the sequence.
        Conditional and unconditional prompts are encoded in one call, so they get the same number of
        chunks (the tokenizer pads the batch to its longest prompt). ``negative_prompt``: one string for every
        image, or a list with one per prompt (or one per image). ``guided`` (default: the family's: guided
        unless it runs no classifier-free guidance, FLUX.1) encodes the negatives too. ``prompt_syntax``
        ``"a1111"``: A1111's emphasis, escapes and BREAK (runtime/prompt_syntax.py; ``<lora:...>`` tags and prompt
        editing are the call's business: see ``GenerationRequest``); ``"compel"``: compel's weights, ``.blend()``
        and ``.and()`` (runtime/compel_syntax.py, runtime/compel_prompts.py). ``max_sequence_length``: T5's tokens per
        prompt (SD 3 / 3.5, FLUX.1; None: the family's default). ``loras``: (name or path, scale) pairs, as the
        call's: on an export whose text encoders have LoRA slots, the adapters' text-encoder layers apply here.
        """
        with self._lock:
            self._ready()
            lora = self._text_lora(self._lora_on_device(self._lora_factors(loras)))
            return self._encode_prompts(prompt, negative_prompt, batch_size, guided, prompt_syntax,
                                        max_sequence_length, lora)

    def _encode_prompts(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None,
                        batch_size: int, guided: bool | None, prompt_syntax: str, max_sequence_length: int | None,
                        lora: dict[str, dict[str, Array]]) -> PromptEmbeddings:
        """``encode_prompt`` with the text encoders' LoRA inputs already on the device."""
        with self._lock:
            guided = self._guided_arg(guided)
            if not self.family.classifier_free:
                self.family.refuse_negative(negative_prompt)
            prompts = prompts_of(prompt, batch_size)
            b = len(prompts)
            text = self._conditioning()
            syntax = check_syntax(prompt_syntax)
            if not guided:
                return text.encode(prompts, b, False, syntax=syntax, max_sequence_length=max_sequence_length,
                                   lora=lora)
            negatives = negatives_of(negative_prompt, b, batch_size)
            return text.encode(negatives + prompts, b, True, zero_negatives=text.zero_negatives(negative_prompt),
                               syntax=syntax, max_sequence_length=max_sequence_length, lora=lora)

    @staticmethod
    def _text_lora(feeds: dict[str, dict[str, Array]]) -> dict[str, dict[str, Array]]:
        """The text encoders' share of every slotted component's LoRA inputs."""
        return {c: f for c, f in feeds.items() if c != "unet"}

    def embeddings_from(self, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray | None = None, *,
                        pooled_prompt_embeds: np.ndarray | None = None,
                        negative_pooled_prompt_embeds: np.ndarray | None = None,
                        guided: bool | None = None, batch_size: int = 1) -> PromptEmbeddings:
        """Precomputed embeddings (diffusers' ``prompt_embeds`` and friends: [B, tokens, C], pooled [B, P])
        -> PromptEmbeddings for ``B * batch_size`` images, each row repeated ``batch_size`` times in place
        (diffusers' ``num_images_per_prompt``). Guided without negatives: zeros where the family's rule says
        so (SDXL, as diffusers' default), else the caller must give them. ``guided``: as ``encode_prompt``."""
        with self._lock:
            self._ready()
            guided = self._guided_arg(guided)
            if not self.family.classifier_free:
                self.family.refuse_negative(negative_prompt_embeds)
            return self._conditioning().from_arrays(
                prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, guided=guided, batch_size=batch_size)

    def check_prompts(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None, steps: int,
                      prompt_syntax: str = "plain") -> None:
        """The prompts' syntax, checked as ``generate`` checks it, before any work (a server's 4xx): the syntax's
        name, A1111's weights and ``<lora:...>`` multipliers, what compel cannot read, and weights on a family that
        does not take them. Raises InputError."""
        req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                                prompt_syntax=prompt_syntax).checked()
        prompts = prompts_of(req.prompt if req.prompt is not None else "", 1)
        texts = [*prompts, *(negatives_of(negative_prompt, len(prompts), 1) if negative_prompt is not None else [])]
        self._conditioning().chunks(texts, req.prompt_syntax)

    def check_sequence_length(self, max_sequence_length: Any) -> int:
        """T5's tokens per prompt for a call (``max_sequence_length``; None: the family's default), checked as
        ``generate`` checks it, before any work: InputError on a family without T5, outside 2..512, or outside
        the T5 range the backend's engines were built for (TensorRT's build profile). It reads only what the load
        fixed, so it never waits for a call running in another thread (a server checks each request on its event
        loop while a batch runs: waiting there would stall every connection for the batch's length)."""
        if self._closed:
            raise InputError(f"this pipeline ({self.folder}) was closed; load it again with Pipeline.load")
        return self._conditioning().check_sequence_length(max_sequence_length)

    def _encode_request(self, req: GenerationRequest, guided: bool, lora: dict[str, dict[str, Array]]
                        ) -> tuple[PromptEmbeddings, list[tuple[int, PromptEmbeddings]]]:
        """A call's prompt embeddings, and with A1111's prompt editing or alternation the embeddings of each later
        segment with the loop step it starts at (every segment encoded alike: as many chunks). ``lora``: the text
        encoders' LoRA inputs."""
        assert req.prompt is not None
        sched: list[tuple[int, list[str]]] = []
        if req.prompt_syntax == "a1111":
            prompts = prompts_of(req.prompt, req.batch_size)
            b = len(prompts)
            sched = segments((negatives_of(req.negative_prompt, b, req.batch_size) if guided else []) + prompts,
                             req.steps)
        if len(sched) < 2:
            return self._encode_prompts(req.prompt, req.negative_prompt, req.batch_size, guided, req.prompt_syntax,
                                        req.max_sequence_length, lora), []
        text = self._conditioning()
        k = max(max(text.chunks(seg, "a1111")) for _, seg in sched)
        zero = guided and text.zero_negatives(req.negative_prompt)
        embs = [text.encode(seg, b, guided, zero_negatives=zero, syntax="a1111", chunks=k,
                            max_sequence_length=req.max_sequence_length, lora=lora) for _, seg in sched]
        starts = segment_starts([e for e, _ in sched])
        return embs[0], list(zip(starts[1:], embs[1:], strict=True))

    def _guided_arg(self, guided: bool | None) -> bool:
        """The text stage's ``guided``: the family's default where None; refused where it runs no guidance."""
        if guided is None:
            return self.family.classifier_free
        if guided and not self.family.classifier_free:
            raise InputError(f"{self.family.label} runs no classifier-free guidance: encode with guided=False "
                             "(or leave guided out)")
        return bool(guided)

    # -- stage 2: the sampler plan and the starting latents ----------------------------------------------
    def plan(self, sampler: str | None = None, steps: int = 30, *, strength: float = 1.0,
             timestep_spacing: str | None = None, fresh_from: int = 0, height: int | None = None,
             width: int | None = None) -> samplers.SamplerPlan:
        """The sampler's per-step coefficients for this model's scheduler (img2img when strength < 1).
        ``sampler`` None: the model's default (dpmpp-2m; flow-euler for a flow-matching model).
        ``timestep_spacing`` (leading, trailing, linspace) overrides the scheduler configuration's.
        ``fresh_from``: the row where a second model takes over with a sampler of its own (no multistep
        history), as diffusers' refiner at ``denoising_start`` (see ``samplers.make_plan``). ``height`` and
        ``width`` (default: the model's default size): the image's, for a family whose schedule depends on it
        (FLUX.1 [dev]'s shift grows with the image's token count); give the sizes ``prepare_latents`` gets."""
        self._ready()
        if sampler is None:
            sampler = samplers.default_sampler(self.manifest.prediction_type)
        m = self.manifest
        extra = self.family.schedule_options(sampler, steps, height or m.default_size, width or m.default_size,
                                             m.vae_scale_factor, self.scheduler_config) if is_int(steps) else {}
        return samplers.make_plan(sampler, steps, self.scheduler_config,
                                  prediction_type=self.manifest.prediction_type, strength=strength,
                                  timestep_spacing=timestep_spacing, fresh_from=fresh_from, **extra)

    def prepare_latents(self, plan: samplers.SamplerPlan, height: int, width: int, *, batch_size: int | None = None,
                        seed: int | Sequence[int] | None = None, latents: np.ndarray | None = None,
                        image: Any = None, mask_image: Any = None, strength: float = 1.0,
                        reference_image: Any = None, reference_resize: bool = True,
                        padding_mask_crop: int | None = None) -> Latents:
        """The starting latents: ``init_noise_sigma * noise`` (txt2img), or ``image`` encoded and noised to
        the plan's first step (img2img). ``seed`` a list: one generator per image, so image k of a batch
        equals the same seed generated alone (``batch_size`` defaults to the list's length, else 1).
        ``latents``: the initial noise itself (diffusers' ``latents``). ``mask_image`` (white = repaint):
        inpaint ``image``; the plan's ``strength`` (1: start from noise). ``reference_image`` (an editing model,
        FLUX.1 Kontext): the image to edit, encoded into the latents' ``reference`` (``reference_resize``: as the
        call's). ``padding_mask_crop`` (with ``mask_image``): as the call's, the latents are of the mask's box cut
        from the image and resized to ``height`` x ``width``; they carry the box (``Latents.crop``), and ``decode``
        pastes their pictures back into the original image (on an editing model: nothing pasted back, as the
        call)."""
        with self._lock:
            self._ready()
            if batch_size is None:
                batch_size = len(seed) if isinstance(seed, (list, tuple)) else 1
            self.check_request(height, width, batch_size, guided=None)
            pad = inpaint_stage.check_crop(padding_mask_crop, mask_image is not None)
            mask = None if mask_image is None else self._check_mask(image, mask_image)
            inpaint_stage.check_crop_mask(pad, mask)
            reference.check(self.folder, self._described, GenerationRequest(
                image=image, mask_image=mask_image, reference_image=reference_image,
                reference_resize=reference_resize))
            if image is not None:
                self._check_img2img()
            # as the call: the box cut and resized to the latents' size, pasted back at decode
            crop = None if pad is None or reference.inpaints(self._described, mask) \
                else inpaint_stage.mask_crop(image, mask, height, width, self.manifest.vae_scale_factor, pad)
            init: np.ndarray | None
            ref: np.ndarray | None
            if crop is not None:
                init, ref, mask = crop.init, None, crop.crop_mask
            else:
                init, ref, mask = self._call_images(image, mask, reference_image, reference_resize, height, width,
                                                    pad)
            lat = self._prepare(plan, height, width, batch_size, resolve_seed(seed, batch_size), latents, init,
                                mask, strength == 1.0, ref)
            return lat if crop is None else replace(lat, crop=crop)

    def _check_reference_size(self, ref: np.ndarray, batch: int, guided: bool) -> None:
        """The reference's sides within the backend's engines' image sizes (TensorRT's build profile bounds the
        reference as it bounds the image), before any work."""
        rh, rw = int(ref.shape[1]), int(ref.shape[2])
        try:
            self.backend.check_request(batch, rh, rw, guided)
        except InputError as e:
            raise InputError(f"the reference image is {rw}x{rh} once sized for the model, outside these engines' "
                             f"image sizes ({e}); give a smaller reference with reference_resize=False, or rebuild "
                             "the engines for its size",
                             cli=f"--reference is {rw}x{rh} once sized for the model, outside these engines' image "
                                 f"sizes ({e}); give a smaller one with --no-reference-resize, or rebuild the "
                                 "engines for its size") from e

    def _reference_pixels(self, image: Any, resize: bool) -> np.ndarray:
        lim = self.manifest.limits
        return reference.pixels(image, self.family, lim.multiple_of, resize, lim.max_size)

    def _call_images(self, image: Any, mask: Any, reference_image: Any, resize: bool, height: int | None,
                     width: int | None, pad: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None, Any]:
        """(the init image, the reference) as uint8 [1, H, W, 3], and the mask. Inpainting on an editing model
        (FLUX.1 Kontext, runtime/reference.py) sizes the image as a reference unless height and width are asked, and
        the image is the reference where ``reference_image`` is not given (FluxKontextInpaintPipeline's
        ``image_reference``); ``pad`` (its ``padding_mask_crop``): the image, the reference and the mask cut to the
        box around the mask (``reference.crop_pixels``)."""
        m = self.manifest
        edit_inpaint = reference.inpaints(self._described, mask)
        init = None
        if image is not None:
            init = reference.inpaint_pixels(image, self.family, m.limits, resize, height, width,
                                            m.vae_scale_factor) if edit_inpaint \
                else to_uint8(image, height, width, m.vae_scale_factor)
        ref = None if reference_image is None else self._reference_pixels(reference_image, resize)
        if edit_inpaint and pad is not None:
            assert init is not None  # a mask needs an image (inpaint_stage.check_call)
            return reference.crop_pixels(init, mask, ref, pad)
        return init, ref if ref is not None else init if edit_inpaint else None, mask

    def _prepare(self, plan: samplers.SamplerPlan, height: int, width: int, b: int,
                 seed: int | Sequence[int] | None, latents: np.ndarray | None, init: np.ndarray | None,
                 mask: Any = None, pure_noise: bool = False, ref: np.ndarray | None = None) -> Latents:
        # the image to inpaint that is its own reference (an editing model): encoded once, for both
        own = None if ref is None or ref is not init or mask is None else reference.latent(self.backend,
                                                                                            self.engines, ref)
        lat = self._prepare_latents(plan, height, width, b, seed, latents, init, mask, pure_noise, own)
        if ref is None:
            return lat
        return replace(lat, reference=reference.encode(self.backend, self.engines, self.device_graphs, self.dtype,
                                                       ref, own))

    def _prepare_latents(self, plan: samplers.SamplerPlan, height: int, width: int, b: int,
                         seed: int | Sequence[int] | None, latents: np.ndarray | None, init: np.ndarray | None,
                         mask: Any, pure_noise: bool, encoded: Array | None = None) -> Latents:
        m = self.manifest
        f = m.vae_scale_factor
        lat_shape = (b, m.latent_channels, height // f, width // f)
        gens = generators(seed, b)
        noise = draw(gens, lat_shape) if latents is None else check_latents(latents, lat_shape)
        if init is not None and mask is not None:
            return inpaint_stage.prepare(self.backend, self._described, self.device_graphs, self.dtype, f,
                                         self._inpaint_mode(), plan, height, width, b, gens, seed, noise, init, mask,
                                         pure_noise, encoded)
        if init is not None:  # img2img: the encoded image never leaves the device, noised there to the first step
            x_dev = inpaint_stage.img2img_latents(self.backend, self.engines, self.device_graphs, self.dtype, init,
                                                  noise, plan)
        else:
            x_dev = self.backend.to_device((noise.astype(np.float64) * plan.init_noise_sigma).astype(np.float32)
                                           .astype(self.dtype))
        # fresh noise of every ancestral step, drawn up front so the loop never waits on the host
        step_noise = draw(gens, (plan.steps, *lat_shape), axis=1) if plan.needs_noise else None
        return Latents(x_dev, height, width, 0, None, step_noise, seeds(seed))

    def latents_from(self, latents: Latents, source: Pipeline) -> Latents:
        """``source``'s denoising state on this pipeline's device, for this pipeline to continue (an SDXL
        refiner after its base): see ``refiner.carry_latents``."""
        with self._lock:
            self._ready()
            return carry_latents(self, latents, source)

    # -- inpainting (runtime/inpaint_stage.py) -------------------------------------------------------------
    @property
    def is_inpainting(self) -> bool:
        """An inpainting model (a 9-channel UNet, FLUX.1 Fill): every call needs ``image=`` and ``mask_image=``."""
        self._ready()
        return self._inpaint_mode() == "concat"

    def warmup_request(self) -> GenerationRequest:
        """A small call this pipeline can serve as loaded: two steps at its smallest size, inside the engines'
        build profile where they have one (its smallest batch and sizes, guided as it was built, T5's default
        length where the profile takes it, else its smallest), with a grey image and a full mask on an
        inpainting model, a grey reference on an editing one, a grey control image on a control model (FLUX.1
        Depth / Canny). A server runs it before reporting ready, so that the
        first request does not pay for lazy initialization."""
        lim = self.manifest.limits
        prof = self.backend.profile
        height = width = lim.min_size
        batch, guidance, tokens = 1, 7.5, None
        if prof is not None:
            height, width, batch = max(height, prof.height[0]), max(width, prof.width[0]), prof.batch[0]
            guidance = 7.5 if prof.cfg else 1.0
            t5 = prof.t5_tokens
            if self.family.takes_sequence_length and t5 is not None and not t5[0] <= self.family.text_tokens <= t5[2]:
                tokens = t5[0]
        extra: dict[str, Any] = {}
        if self.is_inpainting or self.takes_reference or self.takes_control_image:
            from PIL import Image

            grey = Image.new("RGB", (width, height), (127, 127, 127))
            # an inpainting model takes no call without an image and a mask; an editing one without a reference
            extra = {"image": grey, "mask_image": Image.new("L", (width, height), 255)} if self.is_inpainting \
                else {"reference_image": grey, "reference_resize": False} if self.takes_reference \
                else {"control_images": [grey]}
        return GenerationRequest("warm-up", height=height, width=width, steps=2, guidance_scale=guidance, seed=0,
                                 batch_size=batch, max_sequence_length=tokens, **extra)

    @property
    def takes_reference(self) -> bool:
        """An editing model (FLUX.1 Kontext): every call needs ``reference_image=``, the image to edit."""
        self._ready()
        return reference.takes_reference(self._described)

    @property
    def takes_control_image(self) -> bool:
        """A control model (FLUX.1 Depth / Canny): its denoiser reads a control image at every step, so every call
        needs ``control_images=[image]``."""
        self._ready()
        return control_latents.takes_control(self._described)

    def _inpaint_mode(self) -> str:
        m = self.manifest
        return inpaint_stage.mode_of(self._described, m.latent_channels,
                                     self.family.concat_mask_channels(m.vae_scale_factor))

    def _check_mask(self, image: Any, mask_image: Any) -> Any:
        return inpaint_stage.check_mask(self.folder, self.engines, self._inpaint_mode(), image, mask_image)

    # -- stage 3: the denoising loop -------------------------------------------------------------------
    def denoise(self, embeddings: PromptEmbeddings, latents: Latents, plan: samplers.SamplerPlan, *,
                guidance_scale: float = 7.5, start: float | None = None, end: float | None = None,
                callback: Callable[[int, int], None] | None = None, guidance_rescale: float = 0.0,
                control_images: Sequence[Any] | None = None, control_scales: Any = None, control_start: Any = None,
                control_end: Any = None, guess_mode: bool = False, control_preprocess: Any = None,
                control_modes: Any = None, aesthetic_score: float | None = None,
                negative_aesthetic_score: float | None = None,
                timings: dict[str, Any] | None = None, clock: Clock | None = None,
                own_buffers: bool = True, cache: CachePolicy | str | None = None,
                loras: Sequence[tuple[str, float]] | None = None, skip_layer_guidance_scale: float | None = None,
                skip_layer_guidance_start: float | None = None,
                skip_layer_guidance_stop: float | None = None) -> Latents:
        """Run the plan's steps from ``latents.step`` (or the ``start`` fraction of the schedule) up to the
        ``end`` fraction (default: the end), device-resident: UNet -> step graph -> UNet. The fractions
        follow diffusers' ``denoising_start`` / ``denoising_end``: a step of timestep t belongs to the part
        before fraction f when t >= round(T * (1 - f)). Running [0, f) then [f, 1] gives the full run.
        ``guidance_rescale``: diffusers' option of that name (0..1; guided only). ``control_images`` and the
        other control keywords: as the call's (ControlNet exports; a control model's one image, resized to the
        latents' size); ``control_start``/``control_end`` are
        fractions of the plan's steps, whichever window of them this call runs. ``aesthetic_score`` /
        ``negative_aesthetic_score``: an SDXL refiner's conditioning (default 6.0 / 2.5, as diffusers).
        ``timings``: receives the per-step milliseconds (``unet_steps_ms``) and how the loop ran (``loop``).
        ``clock``: a caller's clock for several stages on one timeline (marked once set up and after each step).
        ``own_buffers`` False: the loop's own buffers, valid until this pipeline's next ``denoise``. ``cache``:
        a ``feature_cache.CachePolicy`` (or ``"deepcache"``, every 3rd step full), applied to the steps this call
        runs, the first of them full. ``loras``: (name or path, scale) pairs for a slotted UNet (as the call's).
        ``skip_layer_guidance_scale`` / ``_start`` / ``_stop``: skip-layer guidance, as the call's (an export made with
        ``--skip-layers``); its window is a fraction of the plan's steps, whichever of them this call runs."""
        with self._lock:
            self._ready()
            self.check_request(latents.height, latents.width, embeddings.batch,
                               guided=self.uses_guidance(guidance_scale))
            own = control_latents.check(self.folder, self._described, control_images, control_scales, control_start,
                                        control_end, guess_mode, control_preprocess, control_modes)
            creq = None if own is not None else self._check_control(
                control_images, control_scales, control_start, control_end, guess_mode, control_preprocess,
                latents.inpaint is not None, control_modes)
            policy = cache_policy(cache)
            skip = skip_guidance(skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop)
            self.check_skip_guidance(skip, self.uses_guidance(guidance_scale), policy, creq, guidance_rescale)
            self.check_cache(policy, creq)
            lora = self.lora_inputs(loras)
            sink: dict[str, Any] = {} if timings is None else timings
            ctl = None if own is None else control_latents.encode(self.backend, self.engines, self.device_graphs,
                                                                  self.dtype, own, latents.height, latents.width)
            out, how = self._denoise(embeddings, latents, plan, guidance_scale, start, end, callback, sink, clock,
                                     rescale=guidance_rescale, control=creq,
                                     scores=(aesthetic_score, negative_aesthetic_score), cache=policy, lora=lora,
                                     control_lat=ctl, skip=skip)
            sink["loop"] = how
            if not own_buffers:
                return out
            # the loop's buffers are reused by its next run: hand the caller arrays of its own
            be = self.backend
            return replace(out, x=be.clone(out.x), x0=None if out.x0 is None else be.clone(out.x0))

    def handoff_row(self, plan_timesteps: Sequence[float] | np.ndarray, fraction: float) -> int:
        """How many of a plan's steps come before ``fraction`` of the schedule (``samplers.rows_before``)."""
        return samplers.rows_before(plan_timesteps, fraction, int(self.scheduler_config.get("num_train_timesteps",
                                                                                             1000)))

    def _denoise(self, emb: PromptEmbeddings, lat: Latents, plan: samplers.SamplerPlan, guidance_scale: float,
                 start: float | None, end: float | None, callback: Callable[[int, int], None] | None,
                 timings: dict[str, Any], clock: Clock | None = None, rescale: float = 0.0,
                 control: controlnet.ControlRequest | None = None,
                 scores: tuple[float | None, float | None] | None = None,
                 cache: CachePolicy | None = None, lora: Mapping[str, Array] | None = None,
                 edits: Sequence[tuple[int, PromptEmbeddings]] = (), control_lat: Array | None = None,
                 skip: SkipGuidance | None = None) -> tuple[Latents, str]:
        """The loop. With the caller's ``clock``, marks once the loop is set up and after every step (the
        caller reads the times); without one, the step times go into ``timings``. ``edits``: (loop step,
        embeddings) pairs, A1111's prompt editing: from that step on the denoiser reads those embeddings.
        ``control_lat``: the control image's latents of a denoiser that reads them (FLUX.1 Depth / Canny).
        ``skip``: skip-layer guidance (checked by ``check_skip_guidance``): the loop's denoiser is the transformer
        and the export's skip pass on the window's steps."""
        check_guidance(guidance_scale)
        guided = self.uses_guidance(guidance_scale)
        check_rescale(rescale)
        self.family.check_scores(scores)
        rescale = float(rescale) if guided else 0.0  # as diffusers: the rescale applies to guided steps only
        if guided != emb.guided:
            raise InputError(
                f"the embeddings were encoded {'with' if emb.guided else 'without'} guidance but guidance_scale "
                f"is {guidance_scale}; encode with guided={guided}")
        be, dt = self.backend, self.dtype
        train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        lo, hi = samplers.window(plan, lat.step, start, end, train)
        b = emb.batch
        rows = be.meta(lat.x)[1][0] if not isinstance(lat.x, np.ndarray) else lat.x.shape[0]
        if isinstance(rows, int) and rows != b:
            raise InputError(f"the embeddings are for {b} image{'s' if b != 1 else ''} but the latents hold {rows}: "
                             "encode as many prompts (times batch_size) as the latents have images")
        if plan.needs_noise and (lat.noise is None or lat.noise.shape[0] != plan.steps):
            raise InputError(f"the latents were not prepared for this plan ({plan.sampler}, {plan.steps} steps); "
                             "prepare them with prepare_latents(plan, ...)")
        to_dev = be.to_device
        text = self._conditioning()
        factors = self.lora_inputs(None) if lora is None else lora  # a slotted UNet's factors (zeros: none)
        if lat.reference is not None:  # an editing model's reference latents, read at every step as the text is
            factors = {**factors, reference.REFERENCE_INPUT: lat.reference}
        elif reference.takes_reference(self._described):
            raise InputError("this is an editing model (FLUX.1 Kontext): prepare the latents with reference_image=")
        if control_lat is not None:  # read at every step as the text is
            factors = {**factors, control_latents.CONTROL_INPUT: control_lat}
        cond = {**text.denoiser_inputs(emb, lat.height, lat.width, scores, guidance_scale), **factors}
        cond_steps = [(k, {**text.denoiser_inputs(e, lat.height, lat.width, scores, guidance_scale), **factors})
                      for k, e in edits if k < hi - lo] or None
        mode, table = None, plan.table
        step_inputs: dict[str, Array] = {}
        if lat.inpaint is not None:  # the mask work runs in the step graph's inpainting variant
            mode = lat.inpaint.mode
            step_inputs, table = inpaint_stage.loop_inputs(be, self.device_graphs, lat.inpaint, plan, guided, dt)
        elif self._inpaint_mode() == "concat":
            raise InputError("this is an inpainting model (its denoiser takes a mask): prepare the latents with "
                             "image= and mask_image=")
        if rescale and mode is not None:
            raise InputError("guidance_rescale with inpainting is not supported: leave guidance_rescale at 0")
        unet_in = self._first_input(plan, lo, lat, guided, dt, step_inputs.get("unet_extra"))
        active = control.active if control is not None else ()
        loop = self._loop(guided, dt, mode, rescale > 0.0, active, cache is not None, skip is not None)
        skipped = 0
        if skip is not None:
            on = skip.steps(plan.steps, lo, hi)
            skipped = sum(on)
            self._skip_guided().arm(on, to_dev(skip.skip_scale(guidance_scale)))
        full = None if cache is None else cache.full_steps(hi - lo)
        noise = lat.noise[lo:hi] if plan.needs_noise and lat.noise is not None else None
        g = np.array([guidance_scale, rescale] if rescale else guidance_scale, np.float32)
        control_in = None
        if control is not None:
            control_in = control_stage.feeds(be, self.engines, self.manifest.controlnets, control, plan, lo, hi,
                                             lat.height, lat.width, 2 * b if guided else b, guided)
        loop.start(latents=lat.x, unet_in=unet_in, x0_prev=lat.x0, cond=cond, guidance=to_dev(g) if guided else None,
                   timesteps=plan.timesteps[lo:hi], coeffs=table[lo:hi],
                   noise=None if noise is None else noise.astype(np.float32), step_inputs=step_inputs or None,
                   control=control_in, full=full, threshold=None if cache is None else cache.threshold,
                   cond_steps=cond_steps)
        own = clock is None
        clk = be.clock() if clock is None else clock
        clk.mark()
        for i in range(hi - lo):
            loop.step(i)
            clk.mark()
            if callback is not None:
                callback(lo + i + 1, plan.steps)
        if own:
            steps_ms = clk.intervals_ms()
            timings.update(unet_steps_ms=steps_ms, unet_step_ms=float(np.median(steps_ms)), clock=clk.kind)
            clk.close()
        # the final latents: the loop's own buffers (valid until its next start(); the public denoise() copies them)
        how = loop.describe() if cache is None else (f"{loop.describe()}; {cache.describe(loop.ran_full)}"
                                                     f"{loop.cheap_note()}")
        if skip is not None:
            how += f"; skip-layer guidance on {skipped} of {hi - lo} steps"
        return replace(lat, x=loop.latents, step=hi, x0=loop.x0 if hi < plan.steps else None), how

    def _first_input(self, plan: samplers.SamplerPlan, lo: int, lat: Latents, guided: bool, dt: np.dtype[Any],
                     extra: Array | None) -> Array:
        """The first UNet input, s_lo x, on the device by the first-input graph (one 4-byte upload)."""
        be = self.backend
        feeds = {"latents": lat.x, "scale": be.to_device(np.array([plan.table[lo, samplers.S]], np.float32))}
        if extra is not None:
            feeds["unet_extra"] = extra
        return self.device_graphs.first_input(guided, dt, extra is not None)(feeds)["unet_in"]

    def _loop(self, guided: bool, dt: np.dtype[Any], inpaint_mode: str | None = None,
              rescale: bool = False, active: tuple[int, ...] = (), cached: bool = False,
              skip: bool = False) -> StepLoop:
        """The loop per step-graph variant, set of active ControlNets (none: the plain ``unet``), feature
        caching (with the export's cheap step, DeepCache's shallow path or first-block caching's cached step, or
        without) and skip-layer guidance (its denoiser in the transformer's place; the loop and step graph are a
        call's without it)."""
        key = (guided, dt.name, inpaint_mode, rescale, active, cached, skip)
        if key not in self._loops:
            step = self.device_graphs.step(guided, dt, inpaint_mode, rescale)
            if skip:
                self._loops[key] = self.backend.step_loop(self._skip_guided(), step)
            elif active:  # with caching: the shallow path over the nets' residuals of the skips it reads
                nets = [self.engines[n] if j in active else None for j, n in enumerate(self.manifest.controlnets)]
                if cached:  # cheap steps run each net's small graph of the residual they read, where exported
                    small = [self.engines.get(shallow_controlnet(n)) if j in active else None
                             for j, n in enumerate(self.manifest.controlnets)]
                    self._loops[key] = self.backend.step_loop(self._engine(CONTROL_UNET), step, nets,
                                                              shallow=self.engines[SHALLOW_UNET], shallow_nets=small)
                else:
                    self._loops[key] = self.backend.step_loop(self._engine(CONTROL_UNET), step, nets)
            elif cached:
                self._loops[key] = self.backend.step_loop(self._engine("unet"), step, shallow=self.engines[SHALLOW_UNET])
            else:
                self._loops[key] = self.backend.step_loop(self._engine("unet"), step)
        return self._loops[key]

    def check_skip_guidance(self, skip: SkipGuidance | None, guided: bool, cache: CachePolicy | None = None,
                            control: controlnet.ControlRequest | None = None, rescale: float = 0.0) -> None:
        """Refuse skip-layer guidance on a family without it, unguided, on an export without its skip pass, or
        beside feature caching, ControlNets or guidance_rescale (none of which it combines with yet), before any
        work."""
        if skip is None:
            return
        fam = self.family
        if not fam.skip_layer_guidance:
            raise InputError(f"{fam.label} models have no skip-layer guidance (SD 3.5 Medium's): leave "
                             "skip_layer_guidance_scale out",
                             cli=f"{fam.label} models have no skip-layer guidance (SD 3.5 Medium's): leave --slg-scale "
                                 "out")
        if not guided:
            raise InputError("skip-layer guidance adds to classifier-free guidance, which this call does not run: "
                             "give a guidance_scale above 1, or leave skip_layer_guidance_scale out",
                             cli="--slg-scale adds to classifier-free guidance: give a --guidance above 1, or leave "
                                 "--slg-scale out")
        if SKIP_UNET not in self.manifest.components:
            if self.manifest.kind != "onnx":
                raise ArtifactError(f"{self.folder} is an engine folder without the skip pass ({SKIP_UNET}), which "
                                    "skip-layer guidance runs: build the engines (sdrt build) from an export made "
                                    "with --skip-layers, or leave skip_layer_guidance_scale out",
                                    cli=f"{self.folder} is an engine folder without the skip pass ({SKIP_UNET}), "
                                        "which --slg-scale runs: build the engines (sdrt build) from an export made "
                                        "with --skip-layers, or leave --slg-scale out")
            raise ArtifactError(f"{self.folder} has no skip pass ({SKIP_UNET}), which skip-layer guidance runs: "
                                f"{SKIP_EXPORT_HINT}, or leave skip_layer_guidance_scale out",
                                cli=f"{self.folder} has no skip pass ({SKIP_UNET}), which --slg-scale runs: "
                                    f"{SKIP_EXPORT_HINT}, or leave --slg-scale out")
        if cache is not None:
            raise InputError("skip-layer guidance does not combine with feature caching yet (the cached steps skip "
                             "the skip pass): leave cache or skip_layer_guidance_scale out",
                             cli="--slg-scale does not combine with --cache yet: leave one out")
        if control is not None and control.active:
            raise InputError("skip-layer guidance does not cover ControlNets yet (the skip pass takes no residuals): "
                             "leave control_images or skip_layer_guidance_scale out",
                             cli="--slg-scale does not cover --control-image yet: leave one out")
        if rescale:
            raise InputError("guidance_rescale with skip-layer guidance is not supported (diffusers' SD 3 pipeline "
                             "has no rescale): leave guidance_rescale at 0",
                             cli="--guidance-rescale with --slg-scale is not supported: leave --guidance-rescale out")

    def _skip_guided(self) -> SkipGuided:
        """Skip-layer guidance's denoiser; the skip pass is loaded on the first call that asks for it (a second
        copy of most of the transformer's weights in memory on most backends: a call without SLG never loads it)."""
        if self._skip is None:
            self._skip = SkipGuided(self._engine("unet"), self._engine(SKIP_UNET))
        return self._skip

    def check_loras(self, loras: Any) -> None:
        """Refuse a call's ``loras`` this export cannot run (no slots, an unknown name, a layer without a slot,
        ranks past the slots, another architecture's factors), reading each adapter; nothing is uploaded. Host work
        only (the adapter library has its own lock), so it never waits for a call running in another thread."""
        if self._closed:
            raise InputError(f"this pipeline ({self.folder}) was closed; load it again with Pipeline.load")
        self._lora_factors(loras)

    def _lora_slots(self) -> dict[str, dict[str, Any]]:
        """The slots of each slotted component (the UNet's, and the text encoders' where the export has them); none
        for an export whose UNet has none (its text encoders are not looked at)."""
        described = self._described
        unet = slots_of(described["unet"].inputs)
        if not unet:
            return {}
        names = self.manifest.encoder_names
        return {"unet": unet, **{c: s for c in names if c in described and (s := slots_of(described[c].inputs))}}

    def _lora_factors(self, loras: Any) -> dict[str, dict[str, np.ndarray]] | None:
        """The factors of ``loras`` on the host, per slotted component (None: no adapter, or an export without
        slots)."""
        pairs = check_loras(loras)
        slots = self._lora_slots()
        if "unet" not in slots:
            if pairs:
                raise ArtifactError(f"{self.folder} has no LoRA slots, which loras= needs: re-export it with `sdrt "
                                    "export ... --lora-slots RANK`, or merge the LoRA at export (`sdrt export --lora "
                                    "FILE:SCALE`)",
                                    cli=f"{self.folder} has no LoRA slots, which --lora needs: re-export it with "
                                        "`sdrt export ... --lora-slots RANK`, or merge the LoRA at export")
            return None
        if not pairs:
            return None
        inert = self.manifest.source.get("lora_slots", {}).get("inert", {})
        fam = self.family
        # the family's names for the denoiser's layers (SD 3's and FLUX.1's original layouts mapped to diffusers')
        adapters = []
        for name, scale in pairs:
            a = self.loras.get(name)
            adapters.append((replace(a, file=fam.lora_file(a.file)), scale))
        return adapter_factors(slots, adapters, inert=inert, labels=self._lora_labels())

    def _lora_labels(self) -> dict[str, str]:
        """The components' names in LoRA messages: the family's denoiser; a T5 encoder says it takes no LoRA."""
        t5 = [c for c in self.family.encoders if self.family.tokenizer_kind(c) == "t5"]
        return {"unet": self.family.denoiser_label,
                **{c: f"T5 encoder ({c}: sdrt gives T5 no LoRA slots, as common LoRAs do not adapt it)" for c in t5}}

    def lora_inputs(self, loras: Any) -> dict[str, Array]:
        """The UNet's LoRA factor inputs for a call's ``loras`` ((name or path, scale) pairs; None: no adapter),
        on the device; nothing for an export without slots. Every adapter is read and checked against the
        slots here, before any work (runtime/lora_adapters.py)."""
        return self._lora_on_device(self._lora_factors(loras)).get("unet", {})

    def _lora_on_device(self, factors: dict[str, dict[str, np.ndarray]] | None) -> dict[str, dict[str, Array]]:
        """Every slotted component's factor inputs on the device, each in its engine's input dtype (None: the
        zeros of no adapter, made once: nothing writes into a loop's conditioning inputs)."""
        to_dev = self.backend.to_device

        described = self._described

        def upload(f: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Array]]:
            return {c: {k: to_dev(v.astype(described[c].inputs[k].dtype)) for k, v in fc.items()}
                    for c, fc in f.items()}

        if factors is not None:
            return upload(factors)
        if self._no_lora is None:
            self._no_lora = upload(adapter_factors(self._lora_slots(), []))
        return self._no_lora

    def check_cache(self, cache: CachePolicy | None, control: controlnet.ControlRequest | None = None) -> None:
        """Refuse feature caching the family has not, on an export without its cheap step, by a threshold on a
        backend that cannot read one per step, or with ControlNets running where the cheap step takes none of their
        residuals (DeepCache's shallow path of an export made with ControlNets takes them)."""
        if cache is None:
            return
        if cache.kind not in self.family.feature_caches:
            raise InputError(f"{self.family.label} models have no {cache.kind} feature caching yet: leave cache out",
                             cli=f"{self.family.label} models have no {cache.kind} feature caching yet: leave --cache "
                                 "out")
        if SHALLOW_UNET not in self.engines:
            raise ArtifactError(f"{self.folder} has no cheap step for feature caching ({SHALLOW_UNET}), which cache="
                                f"{cache.kind!r} runs: {EXPORT_HINT}, or leave cache out",
                                cli=f"{self.folder} has no cheap step for feature caching ({SHALLOW_UNET}), which "
                                    f"--cache {cache.kind} runs: {EXPORT_HINT}, or leave --cache out")
        if cache.threshold is not None and not self.backend.per_step_reads:
            raise InputError(f"the {self.backend.name} backend runs feature caching on a fixed schedule (its loop is "
                             "captured whole), not by a threshold read every step: use cache_interval instead of "
                             "cache_threshold, or the onnxruntime or openvino backend",
                             cli=f"the {self.backend.name} backend runs feature caching on a fixed schedule: use "
                                 "--cache-interval instead of --cache-threshold")
        if control is not None and control.active and not residual_inputs(self.engines[SHALLOW_UNET]):
            raise InputError(f"this export's cheap step for {cache.kind} caching ({SHALLOW_UNET}) takes no ControlNet "
                             "residuals, so it does not run with ControlNets: leave cache out for a call with "
                             "control_images (DeepCache on a UNet model: re-export it with --controlnet and "
                             "--feature-cache together)",
                             cli=f"this export's cheap step for --cache {cache.kind} takes no ControlNet residuals: "
                                 "leave --cache out with --control-image (DeepCache on a UNet model: re-export it "
                                 "with --controlnet and --feature-cache together)")

    def check_control(self, request: GenerationRequest) -> None:
        """A request's control keywords (``control_images`` and the rest) checked against this export as ``generate``
        checks them, before any work (a server's 4xx): InputError, or CompatibilityError (an export without
        ControlNets) / ArtifactError (one missing their engines). Reads only the export's metadata: no device, no
        lock. ``control_preprocess`` runs here too, as in ``generate``; so do the checks of what ControlNets do not
        combine with (the request's feature caching and skip-layer guidance)."""
        if self._closed:
            raise InputError(f"this pipeline ({self.folder}) was closed; load it again with Pipeline.load")
        r = request
        masked = r.mask_image is not None
        own = control_latents.check(self.folder, self._described, r.control_images, r.control_scales, r.control_start,
                                    r.control_end, r.guess_mode, r.control_preprocess, r.control_modes)
        creq = None if own is not None else self._check_control(
            r.control_images, r.control_scales, r.control_start, r.control_end, r.guess_mode, r.control_preprocess,
            masked, r.control_modes)
        if creq is not None and creq.active:
            self.check_cache(r.cache_policy, creq)
            self.check_skip_guidance(r.skip_guidance, self.uses_guidance(r.guidance_scale), r.cache_policy, creq,
                                     r.guidance_rescale)

    def _check_control(self, control_images: Any, control_scales: Any, control_start: Any, control_end: Any,
                       guess_mode: Any, control_preprocess: Any, masked: bool,
                       control_modes: Any = None) -> controlnet.ControlRequest | None:
        records = self.manifest.source.get("controlnets") or []
        num_modes = tuple(r.get("num_mode") if isinstance(r, dict) else None for r in records)
        return control_stage.check(self.folder, self._described, self.manifest.controlnets,
                                   masked or self._inpaint_mode() == "concat", control_images, control_scales,
                                   control_start, control_end, guess_mode, control_preprocess, self.family,
                                   control_modes, num_modes)

    # -- stage 4: decode --------------------------------------------------------------------------------
    def decode(self, latents: Latents | Array) -> tuple[list[Any], list[bool]]:
        """Latents -> (PIL images, per image: NaN/inf in the decoded pixels). Latents prepared with
        ``padding_mask_crop``: each picture resized back into the box and pasted into the original image (the
        original's size), as the call; their bare array (``latents.x``) decodes to the box's pictures."""
        with self._lock:
            self._ready()
            if not isinstance(latents, Latents):
                return self._decode(latents)
            images, nonfinite = self._decode(latents.x)
            return self._pasted(images, latents), nonfinite

    @staticmethod
    def _pasted(images: list[Any], latents: Latents) -> list[Any]:
        """``padding_mask_crop``'s paste-back of decoded pictures (none for latents without a box)."""
        crop = latents.crop
        return images if crop is None else [inpaint.overlay(im, crop, None) for im in images]

    def _decode(self, x_dev: Array) -> tuple[list[Any], list[bool]]:
        be = self.backend
        dec = self.engines["vae_decoder"]
        dec_dt = dec.inputs["latent_sample"].dtype
        if isinstance(x_dev, np.ndarray):  # the caller's host latents: cast as they go up
            x_dev = be.to_device(x_dev.astype(dec_dt))
        src_dt = be.meta(x_dev)[0]
        if src_dt != dec_dt:  # an fp32 VAE after an fp16 UNet (SDXL): cast on the device
            x_dev = self.device_graphs.cast(src_dt, dec_dt)({"latents": x_dev})["latents_cast"]
        out = dec({"latent_sample": x_dev})
        pixels = be.to_host(out["images"])
        nonfinite = [not bool(v) for v in be.to_host(out["finite"])]
        if any(nonfinite):
            warnings.warn(nonfinite_message(nonfinite, dec_dt == np.float16), RuntimeWarning, stacklevel=4)
        return to_pil(pixels), nonfinite

    def finish(self, latents: Latents | Array, output: str) -> tuple[list[Any], list[bool], np.ndarray | None]:
        """A call's last stage: (images, their non-finite flags, None), or ([], [], the latents on the host)
        for ``output="latents"``; images of latents prepared with ``padding_mask_crop`` pasted back, as ``decode``."""
        with self._lock:
            self._ready()
            x = latents.x if isinstance(latents, Latents) else latents
            if output == "latents":
                return [], [], self.backend.to_host(x)
            images, nonfinite = self._decode(x)
            return (self._pasted(images, latents) if isinstance(latents, Latents) else images), nonfinite, None

    def memory_error(self, e: DeviceMemoryError, batch: int, guided: bool, height: int,
                     width: int) -> DeviceMemoryError:
        """The backend's allocation failure explained for this model and request: what to lower."""
        return explain_memory_error(e, self.manifest, self.backend.name, self.dtype.itemsize, batch, guided, height,
                                    width)

    # -- the call -----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        guidance_scale: float = 7.5,
        sampler: str | None = None,
        seed: int | Sequence[int] | None = None,
        batch_size: int = 1,
        latents: np.ndarray | None = None,
        image: Any = None,
        strength: float | None = None,
        callback: Callable[[int, int], None] | None = None,
        *,
        refiner: Pipeline | None = None,
        **options: Any,
    ) -> Result:
        """The whole call: encode_prompt -> prepare_latents -> denoise -> decode. The keywords are
        ``GenerationRequest``'s fields, documented there (``prompt_embeds``, ``mask_image``, ``control_images``,
        ``output``, ...); ``refiner``: an SDXL refiner Pipeline that takes over the latents at ``refiner_start``
        (default 0.8) of the schedule (runtime/refiner.py); ``callback(step, steps)`` after every step. Every
        argument is checked before any engine runs."""
        known = GenerationRequest.__dataclass_fields__
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            raise TypeError(f"Pipeline.__call__() got unexpected keyword argument(s) {', '.join(unknown)}")
        req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                                steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
                                batch_size=batch_size, latents=latents, image=image, strength=strength, **options)
        return self.generate(req, refiner=refiner, callback=callback)

    def generate(self, request: GenerationRequest, *, refiner: Pipeline | None = None,
                 callback: Callable[[int, int], None] | None = None) -> Result:
        """One request, checked in full before any engine runs, through the four stages (with ``refiner``: the
        base + refiner ensemble of runtime/refiner.py). ``callback(step, steps)`` after every step."""
        req = request
        if refiner is not None or req.refiner_start is not None:
            if refiner is None:
                raise InputError("refiner_start needs a refiner: pass refiner=Pipeline.load(REFINER_DIR)",
                                 cli="--refiner-start needs a refiner: pass --refiner REFINER_DIR")
            if req.loras:
                raise InputError("LoRAs per request do not cover the base + refiner ensemble yet: leave loras out, "
                                 "or generate with the base alone", cli="--lora does not cover --refiner yet")
            if req.max_sequence_length is not None:
                raise InputError("max_sequence_length sets T5's tokens per prompt; the base + refiner ensemble "
                                 "(SDXL) has no T5 encoder: leave it out",
                                 cli="--max-sequence-length is for models with a T5 encoder: leave it out")
            if req.reference_image is not None:
                raise InputError("reference_image conditions an editing model (FLUX.1 Kontext); the base + refiner "
                                 "ensemble (SDXL) takes none: leave it out",
                                 cli="--reference is for an editing model (FLUX.1 Kontext): leave it out with "
                                     "--refiner")
            if req.skip_layer_guidance_scale is not None:
                raise InputError("skip-layer guidance is SD 3.5's; the base + refiner ensemble (SDXL) has none: leave "
                                 "skip_layer_guidance_scale out", cli="--slg-scale is for SD 3 / 3.5 models: leave it "
                                                                      "out with --refiner")
            return refine(self, refiner, req, callback=callback)
        with self._lock:
            self._ready()
            t_start = time.perf_counter()
            m = self.manifest
            req = req.checked(m.limits.max_batch)
            b = req.images_count
            for label, v in (("height", req.height), ("width", req.width)):
                if v is not None:  # only None means the default: 0 is an error, not a request for the default
                    self._check_side(label, v)
            self.family.check_scores(req.scores)
            self.family.refuse_negative(req.negative_prompt if req.negative_prompt_embeds is None
                                        else req.negative_prompt_embeds)
            self._conditioning().check_sequence_length(req.max_sequence_length)
            if not self.family.generates and req.image is None:
                raise self.family.refuse_generation(self.folder)
            image = req.image
            mask, blur, pad = inpaint_stage.check_call(self.folder, self._described, self._inpaint_mode(), req)
            reference.check(self.folder, self._described, req)
            # a denoiser that reads the control image itself (FLUX.1 Depth / Canny), else the export's ControlNets
            own = control_latents.check(self.folder, self._described, req.control_images, req.control_scales,
                                        req.control_start, req.control_end, req.guess_mode, req.control_preprocess,
                                        req.control_modes)
            creq = None if own is not None else self._check_control(
                req.control_images, req.control_scales, req.control_start, req.control_end, req.guess_mode,
                req.control_preprocess, mask is not None, req.control_modes)
            policy = req.cache_policy
            skip = req.skip_guidance
            self.check_skip_guidance(skip, self.uses_guidance(req.guidance_scale), policy, creq, req.guidance_rescale)
            self.check_cache(policy, creq)
            lora_feeds = self._lora_on_device(self._lora_factors(req.loras))
            lora = lora_feeds.get("unet", {})
            if image is not None:
                self._check_img2img()
            # padding_mask_crop: the call generates from the mask's region, cut and resized to the call's size, and
            # pastes it back; on an editing model the image and its reference are cut once sized, and nothing is
            # pasted back (FluxKontextInpaintPipeline: _call_images)
            crop = None if pad is None or reference.inpaints(self._described, mask) \
                else inpaint_stage.mask_crop(image, mask, req.height, req.width, m.vae_scale_factor, pad)
            init: np.ndarray | None
            ref: np.ndarray | None
            if crop is not None:
                init, ref, mask = crop.init, None, crop.crop_mask
            else:
                init, ref, mask = self._call_images(image, mask, req.reference_image, req.reference_resize,
                                                    req.height, req.width, pad)
            # the image's size (img2img), else the control image's (as diffusers; rounded down to the export's
            # multiple: 16 px for a transformer's patches) or the reference's, else the model's default
            control_size = None if creq is None else controlnet.default_size(creq, m.limits.multiple_of)
            if own is not None and init is None:  # an init image gives its own size
                control_size = control_latents.call_size(own, m.limits, req.height, req.width)
            if ref is not None:
                control_size = int(ref.shape[1]), int(ref.shape[2])
            height, width = call_size(req.height, req.width, init, control_size, m.default_size)
            guided = self.uses_guidance(req.guidance_scale)
            self.check_request(height, width, b, guided=guided)
            if ref is not None:
                self._check_reference_size(ref, b, guided)
            default_strength = 1.0 if mask is not None else DEFAULT_STRENGTH
            strength = 1.0 if image is None else default_strength if req.strength is None else req.strength
            plan = self.plan(req.sampler, req.steps, strength=strength, timestep_spacing=req.timestep_spacing,
                             height=height, width=width)
            # one clock for every stage: device events on a GPU backend, the synchronized host clock on CPU
            clock = self.backend.clock()
            try:
                clock.mark()
                edits: list[tuple[int, PromptEmbeddings]] = []
                if req.prompt_embeds is not None:
                    emb = self.embeddings_from(req.prompt_embeds, req.negative_prompt_embeds, guided=guided,
                                               pooled_prompt_embeds=req.pooled_prompt_embeds,
                                               negative_pooled_prompt_embeds=req.negative_pooled_prompt_embeds,
                                               batch_size=req.batch_size)
                else:
                    emb, edits = self._encode_request(req, guided, self._text_lora(lora_feeds))
                clock.mark()
                lat = self._prepare(plan, height, width, b, req.seed, req.latents, init, mask, strength == 1.0, ref)
                ctl = None if own is None else control_latents.encode(self.backend, self.engines, self.device_graphs,
                                                                      self.dtype, own, height, width)
                clock.mark()
                lat, how = self._denoise(emb, lat, plan, req.guidance_scale, None, None, callback, {}, clock,
                                         rescale=req.guidance_rescale, control=creq, scores=req.scores,
                                         cache=policy, lora=lora, edits=edits, control_lat=ctl, skip=skip)
                images, nonfinite, final = self.finish(lat.x, req.output)
                if crop is not None:  # back into the original image, at its own size
                    images = [inpaint.overlay(im, crop, blur) for im in images]
                elif req.output == "images" and blur is not None:
                    assert init is not None  # paste_back is refused without an image
                    images = inpaint.paste_back_all(images, init, mask, blur)
                clock.mark()
                timings = call_timings(clock, image=init is not None or ref is not None or own is not None,
                                       decoded=req.output == "images", t_start=t_start)
                return Result(images, timings, nonfinite, how, final, lat.seed)
            except DeviceMemoryError as e:
                raise self.memory_error(e, b, guided, height, width) from e
            finally:
                clock.close()

    # -- checks -------------------------------------------------------------------------------------
    def _check_side(self, label: str, v: Any) -> None:
        check_side(label, v, self.manifest.limits, self.manifest.default_size)

    def _check_img2img(self) -> None:
        if "vae_encoder" not in self.engines:
            raise ArtifactError(f"{self.folder} has no VAE encoder, which img2img needs (the image is encoded to "
                                "latents); re-export the model with `sdrt export`, or generate without an image")

