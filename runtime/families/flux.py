"""FLUX.1 ([schnell] and [dev]): the family as diffusers' ``FluxPipeline`` runs it.

Two text encoders: CLIP ViT-L (``text_encoder``, no projection), whose pooled output (the end token's final
state) is the transformer's ``pooled_projections``, each prompt cut at 77 tokens; and T5-XXL (``text_encoder_2``,
``text_tokens`` = 512 SentencePiece tokens, diffusers' ``max_sequence_length`` default), whose states are the
transformer's ``encoder_hidden_states`` as they are (no CLIP states join them). Both are needed (diffusers has no
T5-less FLUX mode).

FLUX.1 Fill (diffusers' ``FluxFillPipeline``) inpaints with a transformer that also takes the masked image's
latents and the mask, each latent pixel's 8 x 8 mask pixels as 64 channels (``concat_mask_channels``).

FLUX.1 Kontext (``FluxKontextPipeline``) edits a reference image: [dev]'s transformer reads the reference's
tokens beside the image's (the export's ``reference_latents`` input; runtime/reference.py), the reference
resized to Kontext's preferred resolution nearest its aspect ratio (``reference_size``).

No classifier-free guidance: [dev] is guidance-distilled (the scale is the transformer's embedded ``guidance``
input, one row per image), [schnell] takes no guidance at all; a negative prompt is refused. The transformer is
the export's ``unet`` component (at ``transformer/``); its graph takes and returns NCHW latents [B, 16, h, w] and
packs them into 2x2-patch tokens itself, with the rotary position ids made in the graph from h and w, so the
pipeline's loop runs it as any other denoiser. Sides are multiples of 16 pixels (2 latent pixels per patch).

The schedule is diffusers' for FLUX: flow-euler over ``linspace(1, 1/steps, steps)`` sigmas, shifted by ``mu``
from the image's token count where the scheduler config has ``use_dynamic_shifting`` ([dev]); [schnell]'s config
has a fixed shift of 1.

ControlNets (``FluxControlNetPipeline``): the control image enters as its VAE latents (runtime/control_stage.py
encodes it once per call; the graphs pack them), a Union net's mode as ``control_modes``; no ``guess_mode``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..lora_files import LoraModule
from .flux_lora import flux_lora_modules
from .transformer_lora import TransformerLoraFamily

CLIP = "text_encoder"
T5 = "text_encoder_2"
PATCH = 2  # latent pixels per token side (FluxPipeline packs 2x2 patches)
# FLUX.1 Kontext's preferred (width, height) for a reference image (diffusers' PREFERRED_KONTEXT_RESOLUTIONS)
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


@dataclass(frozen=True)
class FluxFamily(TransformerLoraFamily):
    def lora_modules(self, modules: Sequence[LoraModule]) -> list[LoraModule]:
        return flux_lora_modules(modules)

    @property
    def pooled_encoder(self) -> str | None:
        return CLIP  # the CLIP encoder's pooled output, not the last encoder's

    def tokenizer_kind(self, encoder: str) -> str:
        return "t5" if encoder == T5 else "clip"

    @property
    def text_tokens(self) -> int:
        return 512

    @property
    def denoiser_text_tokens(self) -> int:
        return self.text_tokens  # T5's states alone (no CLIP states join them)

    def join_on_host(self, hidden: dict[str, Any], pooled: dict[str, Any], width: int,
                     t5_tokens: int) -> tuple[Any, Any]:
        return np.asarray(hidden[T5], np.float32), np.asarray(pooled[CLIP], np.float32)

    def width_problem(self, widths: dict[str, int], wanted: int) -> str | None:
        if widths.get(T5, wanted) != wanted:
            return f"T5 produces {widths[T5]}-wide embeddings but the transformer takes {wanted}"
        return None

    def refuse_negative(self, negative: Any) -> None:
        # an empty negative prompt asks for nothing (A1111's clients send "" by default)
        empty = negative is None or (isinstance(negative, str) and not negative.strip()) or (
            isinstance(negative, (list, tuple)) and all(isinstance(n, str) and not n.strip() for n in negative))
        if not empty:
            raise InputError(
                "FLUX.1 is guidance-distilled and runs no classifier-free guidance, so it takes no negative prompt: "
                "leave negative_prompt out ([dev]'s guidance_scale is embedded in the model; [schnell] takes none)",
                cli="FLUX.1 takes no --negative-prompt (it runs no classifier-free guidance): leave it out")

    def concat_mask_channels(self, vae_factor: int) -> int:
        # FLUX.1 Fill (FluxFillPipeline.prepare_mask_latents): the pixel mask, each latent pixel's f x f pixels as
        # f^2 channels (64 for FLUX.1's VAE), packed with the latents and the masked image's latents
        return vae_factor * vae_factor

    def reference_size(self, width: int, height: int, multiple: int, resize: bool) -> tuple[int, int]:
        # FluxKontextPipeline: the size rounded down to whole patches, then (_auto_resize) the preferred resolution
        # of the nearest aspect ratio (ties: the narrower), rounded down again
        w, h = width - width % multiple, height - height % multiple
        if resize and w > 0 and h > 0:
            _, w, h = min((abs(w / h - rw / rh), rw, rh) for rw, rh in KONTEXT_RESOLUTIONS)
        return w - w % multiple, h - h % multiple

    def schedule_options(self, sampler: str, steps: int, height: int, width: int, vae_factor: int,
                         scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
        # FluxPipeline: flow-euler over sigmas = linspace(1, 1/steps, steps) (a scheduler with flow sigmas of its
        # own keeps them); mu from the packed latents' token count
        opts: dict[str, Any] = {}
        if sampler == "flow-euler":
            opts["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        if scheduler_config.get("use_dynamic_shifting"):
            from ..samplers import flow_mu

            tokens = (height // vae_factor // PATCH) * (width // vae_factor // PATCH)
            opts["mu"] = flow_mu(tokens, scheduler_config)
        return opts


FLUX = FluxFamily(key="flux", label="FLUX.1", encoders=(CLIP, T5), penultimate=False, pooled=True,
                  zero_negatives=False, diffusers_pipeline="Flux", chunked=False,
                  pooled_input="pooled_projections", host_join=True, feature_caches=("first-block",),
                  classifier_free=False, control_guess_mode=False)
