"""Stable Diffusion 3 / 3.5 (an MMDiT denoiser): the family as diffusers' ``StableDiffusion3Pipeline`` runs it.

Three text encoders: two CLIP with projection (``text_encoder``: ViT-L, ``text_encoder_2``: OpenCLIP bigG),
conditioning with their penultimate hidden states, each prompt cut at 77 tokens (diffusers warns and cuts; no
chunks), and T5-XXL (``text_encoder_3``, ``text_tokens`` = 256 SentencePiece tokens, diffusers'
``max_sequence_length``), which an export may leave out (diffusers' ``text_encoder_3=None``: zeros take its
place). The join (``sd3_join``, on the host) pads the CLIP states to T5's width and appends T5's on the token
axis; the pooled embedding (the transformer's ``pooled_projections``) is both CLIP projections joined. An
empty negative prompt is encoded (SD3 has no ``force_zeros_for_empty_prompt``).

The denoiser is the export's ``unet`` component (at ``transformer/``), a flow-prediction transformer; its
latents are 16 channels and a side must be a multiple of its patch (2 latent pixels, 16 image pixels). The
latent shift (``shift_factor``) lives in the exported VAE graphs; the flow samplers and the scheduler's shift
in ``runtime/samplers.py``.

Inpainting (``StableDiffusion3InpaintPipeline``): the shared blend for a 16-channel transformer, the concat path
for a 33-channel one (runtime/inpaint.py). ControlNets (``StableDiffusion3ControlNetPipeline``): the control image
enters as its VAE latents (runtime/control_stage.py encodes it once per call); no ``guess_mode``.

Skip-layer guidance (``skip_layer_guidance``: SD 3.5 Medium's ``skip_guidance_layers``): an export made with
``--skip-layers`` has the pass with those blocks skipped as its own graph (runtime/layer_skip.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..lora_files import LoraModule
from .sd3_join import sd3_join
from .sd3_lora import sd3_lora_modules
from .transformer_lora import TransformerLoraFamily

T5 = "text_encoder_3"
CLIPS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Sd3Family(TransformerLoraFamily):
    def lora_modules(self, modules: Sequence[LoraModule]) -> list[LoraModule]:
        return sd3_lora_modules(modules)

    @property
    def pooled_encoder(self) -> str | None:
        raise NotImplementedError(
            "SD3's pooled embedding is both CLIP encoders' text_embeds concatenated, not one encoder's")

    def tokenizer_kind(self, encoder: str) -> str:
        return "t5" if encoder == T5 else "clip"

    @property
    def text_tokens(self) -> int:
        return 256

    def join_on_host(self, hidden: dict[str, Any], pooled: dict[str, Any], width: int,
                     t5_tokens: int) -> tuple[Any, Any]:
        return sd3_join([hidden[c] for c in CLIPS], [pooled[c] for c in CLIPS], hidden.get(T5),
                        joint_dim=width, t5_tokens=t5_tokens)

    def width_problem(self, widths: dict[str, int], wanted: int) -> str | None:
        clip = sum(widths.get(c, 0) for c in CLIPS)
        if clip > wanted:
            return (f"the CLIP encoders produce {clip}-wide embeddings, wider than the transformer's "
                    f"joint_attention_dim {wanted}")
        if T5 in widths and widths[T5] != wanted:
            return f"T5 produces {widths[T5]}-wide embeddings but the transformer takes {wanted}"
        return None


SD3 = Sd3Family(key="sd3", label="SD 3 / 3.5", encoders=(*CLIPS, T5), penultimate=True, pooled=True,
                zero_negatives=False, diffusers_pipeline="StableDiffusion3", chunked=False,
                pooled_input="pooled_projections", optional_encoders=(T5,), host_join=True,
                feature_caches=("first-block",), control_guess_mode=False,
                skip_layer_guidance=True)
