"""The components of an SD3 export, as ``ComponentSpec``s for ``onnx_export.export_component``.

``text_encoder`` and ``text_encoder_2`` (CLIP with projection: penultimate ``hidden_states`` [B, 77, C] and
``text_embeds`` [B, P]), ``text_encoder_3`` (T5: ``hidden_states`` [B, sequence, D], kept in float32: T5's
activations overflow fp16), ``transformer`` (the MMDiT, dynamic in batch, latent height and width, and
tokens) and ``vae_decoder`` (16 latent channels, SD3's shift). No ``vae_encoder`` yet (img2img: diffusers
encodes ``(mean - shift) * scaling``).

Not yet: refit maps (``refittable`` stays False: no checkpoint or LoRA path knows SD3's names), fp16 gates,
the manifest and folder layout (``export_model`` is the UNet families' and is not called for SD3).
"""

from __future__ import annotations

import torch

from . import wrappers
from .onnx_export import ComponentSpec
from .sd3_presets import Sd3Modules
from .sd3_wrappers import Sd3Transformer, Sd3VaeDecoder, T5Encoder

CLIP_TOKENS = 77
CLIP_NAMES = ("text_encoder", "text_encoder_2")


def _clip_spec(name: str, enc: torch.nn.Module) -> ComponentSpec:
    vocab = int(enc.config.vocab_size)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab - 2, (b, CLIP_TOKENS), generator=g, dtype=torch.int32)
        ids[:, 0] = vocab - 2  # bos
        ids[:, 10:] = vocab - 1  # eos, then padding with eos
        return (ids,)

    return ComponentSpec(
        name=name,
        module=wrappers.TextEncoder(enc, penultimate=True, pooled=True),
        weights=enc,
        inputs=[("input_ids", "int32", ("batch", CLIP_TOKENS))],
        outputs=[("hidden_states", "float", ("batch", CLIP_TOKENS, int(enc.config.hidden_size))),
                 ("text_embeds", "float", ("batch", int(enc.config.projection_dim)))],
        example=example,
    )


def t5_spec(enc: torch.nn.Module, tokens: int) -> ComponentSpec:
    """T5 with ``tokens`` example tokens (the trace's and the gate's; the axis stays dynamic)."""
    vocab = int(enc.config.vocab_size)
    eos = int(enc.config.eos_token_id)
    pad = int(enc.config.pad_token_id)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(2, vocab, (b, tokens), generator=g, dtype=torch.int32)
        end = max(1, tokens // 3)
        ids[:, end] = eos
        ids[:, end + 1:] = pad
        return (ids,)

    return ComponentSpec(
        name="text_encoder_3",
        module=T5Encoder(enc),
        weights=enc,
        inputs=[("input_ids", "int32", ("batch", "sequence"))],
        outputs=[("hidden_states", "float", ("batch", "sequence", int(enc.config.d_model)))],
        example=example,
        force_fp32=True,
    )


def transformer_spec(transformer: torch.nn.Module, tokens: int) -> ComponentSpec:
    """The MMDiT with ``tokens`` example tokens (77 CLIP + T5's in a real call)."""
    cfg = transformer.config
    in_ch, out_ch = int(cfg.in_channels), int(cfg.out_channels)
    joint, pooled = int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (
            torch.randn(b, in_ch, h, w, generator=g),
            torch.rand(b, generator=g) * 1000,
            torch.randn(b, tokens, joint, generator=g),
            torch.randn(b, pooled, generator=g),
        )

    return ComponentSpec(
        name="transformer",
        module=Sd3Transformer(transformer),
        weights=transformer,
        inputs=[("sample", "float", ("batch", in_ch, "height", "width")),
                ("timestep", "float32", ("batch",)),
                ("encoder_hidden_states", "float", ("batch", "tokens", joint)),
                ("pooled_projections", "float", ("batch", pooled))],
        outputs=[("out_sample", "float", ("batch", out_ch, "height", "width"))],
        example=example,
    )


def vae_decoder_spec(vae: torch.nn.Module) -> ComponentSpec:
    """The VAE decoder: ``latent_sample`` [B, 16, h, w] -> ``images`` uint8 [B, 8h, 8w, 3], ``finite`` [B]."""
    lat = int(vae.config.latent_channels)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, lat, h, w, generator=g),)

    return ComponentSpec(
        name="vae_decoder",
        module=Sd3VaeDecoder(vae),
        weights=vae,
        inputs=[("latent_sample", "float", ("batch", lat, "height", "width"))],
        outputs=[("images", "uint8", ("batch", "image_height", "image_width", 3)), ("finite", "bool", ("batch",))],
        example=example,
    )


def sd3_specs(modules: Sd3Modules, t5_tokens: int) -> list[ComponentSpec]:
    """Every component SD3 exports so far, in the family's encoder order, then the transformer and the VAE
    decoder."""
    clip_l, clip_g, t5 = modules.text_encoders
    return [_clip_spec(CLIP_NAMES[0], clip_l), _clip_spec(CLIP_NAMES[1], clip_g), t5_spec(t5, t5_tokens),
            transformer_spec(modules.transformer, CLIP_TOKENS + t5_tokens), vae_decoder_spec(modules.vae)]
