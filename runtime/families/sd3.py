"""Stable Diffusion 3 / 3.5 (an MMDiT denoiser): what the family interface can say of it today, and what not.

Declared here, as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` does it: three text encoders, two CLIP
with projection (``text_encoder``: ViT-L, ``text_encoder_2``: OpenCLIP bigG) and T5-XXL (``text_encoder_3``);
the CLIP encoders condition with their penultimate hidden states; the denoiser takes a pooled embedding; an
empty negative prompt is encoded (SD3 has no ``force_zeros_for_empty_prompt``).

What the interface lacks for it (so the family is registered as a preview: ``family_named("sd3")`` finds it,
but it is not among ``FAMILY_KEYS``, so no manifest, build profile or pipeline accepts it yet):

- **The T5 join.** ``encoders`` means "hidden states joined on the channel axis"; SD3 joins the two CLIP
  encoders on channels, zero-pads them to T5's width (4096), then appends T5's states on the *token* axis
  (77 + 256 tokens); without T5, zeros [B, 256, joint_attention_dim] take its place.
- **Two pooled encoders.** ``pooled_encoder`` names one encoder (the last); SD3's pooled embedding is the
  concatenation of both CLIP encoders' ``text_embeds`` (768 + 1280), and its last encoder (T5) has none.
  ``manifest.pooled_encoder`` (a name test: ``text_encoder_2``) would also miss ``text_encoder``'s projection.
- **T5's tokens.** T5 takes ``max_sequence_length`` tokens (256 by default, up to 512), not CLIP's 77-token
  chunks; the tokenizer stage and the join graph (``runtime/text_join.py``) assume 77.
- **The latents.** 16 channels and a VAE with ``shift_factor`` (decode: ``latents / scaling + shift``); the
  shared VAE wrappers divide by ``scaling_factor`` only and assume 4 channels in places.
- **The denoiser.** A transformer with its own inputs (``pooled_projections``, a token axis of any length),
  latent sizes a multiple of the patch size (2), at most ``pos_embed_max_size`` patches a side.
- **Flow prediction.** The prediction type is a preset's field, not the family's; the flow samplers exist
  (``runtime/samplers.py``: flow-euler, flow-dpmpp-2m) but nothing ties SD3's scheduler shift (3.0) to them.
- **Skip-layer guidance** (SD 3.5 Medium's ``skip_guidance_layers``) has no place in the interface at all.

``pooled_encoder`` is overridden to refuse, rather than answer ``text_encoder_3`` (which has no pooled output).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Family


@dataclass(frozen=True)
class Sd3Family(Family):
    @property
    def pooled_encoder(self) -> str | None:
        raise NotImplementedError(
            "SD3's pooled embedding is both CLIP encoders' text_embeds concatenated; the family interface "
            "names one pooled encoder (see runtime/families/sd3.py)")


SD3 = Sd3Family(key="sd3", label="SD 3 / 3.5", encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
                penultimate=True, pooled=True, zero_negatives=False, diffusers_pipeline="StableDiffusion3")
