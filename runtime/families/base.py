"""The model-family interface: what a family adds to the shared pipeline, declared as data and a few hooks.

A family is one module under ``runtime/families/`` that makes a ``Family`` (or a subclass overriding its
hooks) and registers it in ``runtime/families/__init__.py``. Nothing outside the family modules compares family
names: the pipeline, the exporter, the server and the bench ask the family object instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..lora_files import LoraFile


@dataclass(frozen=True)
class Family:
    """A model family as the runtime, the exporter and the bench see it.

    ``key``: the manifest's ``family`` value; ``label``: its name in messages; ``encoders``: the text encoder
    components, in the order their hidden states are joined on the channel axis (the last with a projection
    gives the pooled embedding where ``pooled``); ``penultimate``: the denoiser is conditioned on the encoders'
    penultimate hidden states (SDXL) rather than the final, normed ones; ``pooled``: the denoiser takes the
    pooled text embedding (``text_embeds``); ``zero_negatives``: guided without a negative prompt, the
    unconditional rows are zeros (diffusers' ``force_zeros_for_empty_prompt``) instead of the empty prompt's
    encoding; ``generates``: it generates from noise (an SDXL refiner only continues latents);
    ``diffusers_pipeline``: the stem of diffusers' pipeline class names for it (``StableDiffusionXL`` ->
    ``StableDiffusionXLPipeline``, ``...Img2ImgPipeline``, ``...InpaintPipeline``, ``...ControlNetPipeline``);
    ``chunked``: prompts past a CLIP encoder's 77 tokens are encoded in chunks joined on the sequence (the UIs'
    way; False: cut at 77, as diffusers' pipelines for that family do); ``pooled_input``: the denoiser input
    that takes the pooled embedding; ``optional_encoders``: encoders an export may leave out (the family's
    ``join_on_host`` puts what stands in their place); ``host_join``: the family joins its encoders' outputs
    itself (``join_on_host``), on the host, instead of the shared device join; ``feature_caches``: the feature
    caching kinds its denoiser supports (runtime/feature_cache.py: ``deepcache`` for UNets);
    ``classifier_free``: guidance runs the denoiser on negative rows beside the positive ones (False: a
    guidance-distilled family, FLUX.1: one row per image, no negative prompt, the scale embedded where the
    denoiser has a ``guidance`` input); ``control_guess_mode``: its ControlNet pipeline has diffusers' ``guess_mode``
    (SD 3 / 3.5's has none); ``skip_layer_guidance``: its pipeline has diffusers' skip-layer guidance (SD 3.5
    Medium's ``skip_guidance_layers``: a pass with some denoiser blocks skipped; runtime/layer_skip.py).
    """

    key: str
    label: str
    encoders: tuple[str, ...]
    penultimate: bool = False
    pooled: bool = False
    zero_negatives: bool = False
    generates: bool = True
    diffusers_pipeline: str = "StableDiffusion"
    chunked: bool = True
    pooled_input: str = "text_embeds"
    optional_encoders: tuple[str, ...] = ()
    host_join: bool = False
    feature_caches: tuple[str, ...] = ("deepcache",)
    classifier_free: bool = True
    control_guess_mode: bool = True
    skip_layer_guidance: bool = False

    @property
    def denoiser_label(self) -> str:
        """The denoiser's name in messages: the UNet, or (SD 3, FLUX.1) the transformer."""
        return "UNet"

    def lora_targets(self, targets: str) -> tuple[str, ...] | None:
        """The denoiser's layers that get a LoRA slot for ``targets`` (``--lora-slots RANK:TARGETS``), as full-match
        patterns over its module names; None: the UNet's suffixes (export/lora_slots.py ``TARGETS``). InputError for
        a target set the family has not."""
        return None

    def lora_file(self, lora: LoraFile) -> LoraFile:
        """A LoRA file with its denoiser modules under the exported layers' (diffusers') names: the transformer
        families map their original layouts' keys (kohya's, split where those fuse layers); the UNet families'
        kohya and diffusers spellings resolve as they are (runtime/lora_files.py, runtime/lora_adapters.py)."""
        return lora

    def tokenizer_kind(self, encoder: str) -> str:
        """How ``encoder``'s prompts are tokenized: ``clip`` (CLIP's BPE, 77 tokens) or ``t5`` (SentencePiece,
        ``text_tokens`` of them)."""
        return "clip"

    @property
    def text_tokens(self) -> int:
        """Tokens per prompt of a ``t5`` encoder (diffusers' ``max_sequence_length``); CLIP's are 77."""
        return 77

    @property
    def takes_sequence_length(self) -> bool:
        """Whether a call may set the T5 tokens per prompt (diffusers' ``max_sequence_length``): the families
        with a ``t5`` encoder."""
        return any(self.tokenizer_kind(e) == "t5" for e in self.encoders)

    def join_on_host(self, hidden: dict[str, Any], pooled: dict[str, Any], width: int,
                     t5_tokens: int) -> tuple[Any, Any]:
        """Where ``host_join``: the family's join of its encoders' outputs (host arrays by encoder name; a
        left-out optional encoder is absent) into (denoiser text states [R, tokens, width], pooled [R, P] or
        None); ``t5_tokens``: the call's T5 tokens per prompt (what a left-out T5's zeros span). The other
        families are joined on the device (channels, then chunks; runtime/text_join.py)."""
        raise NotImplementedError(f"the {self.label} family is joined on the device (runtime/text_join.py)")

    def width_problem(self, widths: dict[str, int], wanted: int) -> str | None:
        """Why encoders of these hidden widths cannot condition a denoiser taking ``wanted`` (None: they can):
        the shared join concatenates channels, so they must sum to it."""
        produced = sum(widths.values())
        if produced != wanted:
            return f"the text encoders produce {produced}-wide embeddings but the UNet takes {wanted}"
        return None

    @property
    def denoiser_text_tokens(self) -> int:
        """The text tokens a transformer denoiser takes per row: 77 CLIP tokens and a T5 encoder's (SD3's join);
        FLUX.1's are T5's alone."""
        return 77 + self.text_tokens

    @property
    def pooled_encoder(self) -> str | None:
        """The encoder whose projection gives the pooled embedding (the last), or None."""
        return self.encoders[-1] if self.pooled else None

    @property
    def time_ids(self) -> int:
        """The length of the denoiser's added time ids per row (0: it takes none)."""
        return 0

    def check_scores(self, scores: tuple[float | None, float | None] | None) -> tuple[float, float] | None:
        """The conditioning scores a call gave (an SDXL refiner's aesthetic scores), checked and defaults filled;
        a family that takes none refuses any."""
        given = (None, None) if scores is None else scores
        if any(v is not None for v in given):
            raise InputError("aesthetic_score and negative_aesthetic_score condition an SDXL refiner; this model "
                             "takes none: leave them out",
                             cli="--aesthetic-score and --negative-aesthetic-score condition an SDXL refiner: pass "
                                 "it with --refiner, or leave them out")
        return None

    def extra_conditioning(self, height: int, width: int, batch: int, guided: bool,
                           scores: tuple[float | None, float | None] | None = None) -> dict[str, np.ndarray]:
        """The denoiser's conditioning beyond the text states and pooled embedding, per UNet row (float64; the
        caller casts): none for SD 1.x/2.x."""
        self.check_scores(scores)
        return {}

    def refuse_negative(self, negative: Any) -> None:
        """Raise InputError where this family takes no negative prompt (or negative embeddings) and one was
        given; the families with classifier-free guidance take any."""

    def schedule_options(self, sampler: str, steps: int, height: int, width: int, vae_factor: int,
                         scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
        """``samplers.make_plan``'s keywords this family's diffusers pipeline passes for a call of this size
        (``sigmas``, ``mu``: FLUX.1's own sigmas and resolution-dependent shift); none for the others."""
        return {}

    def concat_mask_channels(self, vae_factor: int) -> int:
        """The channels of the mask an inpainting denoiser takes beside the latents and the masked image's latents
        (sdrt's order: [latents, mask, masked latents]): SD's 9-channel inpainting UNets take the mask at latent
        size, one channel (diffusers' ``prepare_mask_latents``)."""
        return 1

    def reference_size(self, width: int, height: int, multiple: int, resize: bool) -> tuple[int, int]:
        """(width, height) a reference image of this size is encoded at, for a denoiser that takes one (an
        editing model): its own size rounded down to a multiple of ``multiple`` (the family's may pick a
        preferred resolution where ``resize``)."""
        return width - width % multiple, height - height % multiple

    def export_time_ids(self, size: int) -> list[float]:
        """Example time ids for tracing the denoiser at ``size`` (empty: none)."""
        return []

    def refuse_generation(self, folder: Path) -> InputError:
        """The error for generating from noise with a model that only continues latents (``generates`` False)."""
        return InputError(f"{folder} is an {self.label} model: it continues another model's latents and does not "
                          "generate from noise; give it an image to refine (image=..., strength=0.3)",
                          cli=f"{folder} is an {self.label} model: it does not generate from noise; give it an image "
                              "with --init-image (and --strength 0.3)")


def check_score(label: str, v: Any, default: float) -> float:
    """One aesthetic-style score: a finite number from 0 to 10, the default where None."""
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) \
            or not 0.0 <= v <= 10.0:
        raise InputError(f"{label} must be a number from 0 to 10 (the refiner's defaults: 6 and 2.5), got {v!r}",
                         cli=f"--{label.replace('_', '-')} must be a number from 0 to 10 (defaults 6 and 2.5), "
                             f"got {v!r}")
    return float(v)
