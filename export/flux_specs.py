"""The components of a FLUX.1 export, as ``ComponentSpec``s for ``onnx_export.export_component``.

``text_encoder`` (CLIP ViT-L: ``hidden_states`` [B, 77, 768], unused by the transformer, and ``text_embeds``
[B, 768], its pooled output), ``text_encoder_2`` (T5: ``hidden_states`` [B, tokens, 4096], kept in float32),
``unet`` (the transformer, written to ``transformer/``: NCHW latents in and out, packed in the graph; dynamic in
batch, latent height and width, and text tokens; [dev] adds ``guidance``), ``vae_decoder`` and ``vae_encoder``
(16 latent channels, the shift in the graph: SD3's VAE specs).
"""

from __future__ import annotations

from typing import Any

import torch

from . import wrappers
from .flux_presets import FluxModules
from .flux_wrappers import FluxTransformer
from .onnx_export import TRACE_LATENT, ComponentSpec
from .sd3_specs import CLIP_TOKENS, streamed_t5_spec, t5_spec, vae_decoder_spec, vae_encoder_spec
from .streamed import StreamedSpec

CLIP_NAME, T5_NAME = "text_encoder", "text_encoder_2"


def clip_spec(enc: torch.nn.Module) -> ComponentSpec:
    """CLIP without a projection: its final hidden states and pooled output (``text_embeds``)."""
    vocab, width = int(enc.config.vocab_size), int(enc.config.hidden_size)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab - 2, (b, CLIP_TOKENS), generator=g, dtype=torch.int32)
        ids[:, 0] = vocab - 2  # bos
        ids[:, 10:] = vocab - 1  # eos, then padding with eos
        return (ids,)

    return ComponentSpec(
        name=CLIP_NAME,
        module=wrappers.TextEncoder(enc, penultimate=False, pooled=True),
        weights=enc,
        inputs=[("input_ids", "int32", ("batch", CLIP_TOKENS))],
        outputs=[("hidden_states", "float", ("batch", CLIP_TOKENS, width)),
                 ("text_embeds", "float", ("batch", width))],
        example=example,
    )


def _io(config: dict[str, Any]) -> tuple[list[tuple[str, str, tuple[int | str, ...]]],
                                         list[tuple[str, str, tuple[int | str, ...]]]]:
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    ch = int(config["in_channels"]) // 4  # the packed tokens' width is 2x2 latent pixels
    inputs = [("sample", "float", ("batch", ch, "height", "width")), ("timestep", "float32", ("batch",)),
              ("encoder_hidden_states", "float", ("batch", "text_tokens", joint)),
              ("pooled_projections", "float", ("batch", pooled))]
    if config.get("guidance_embeds"):
        inputs.append(("guidance", "float32", ("batch",)))
    return inputs, [("out_sample", "float", ("batch", ch, "height", "width"))]


def _example(config: dict[str, Any], tokens: int, g: torch.Generator | None, b: int, h: int,
             w: int) -> tuple[torch.Tensor, ...]:
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    ch = int(config["in_channels"]) // 4
    args = [torch.randn(b, ch, h, w, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, tokens, joint, generator=g), torch.randn(b, pooled, generator=g)]
    if config.get("guidance_embeds"):
        args.append(1.0 + 4.0 * torch.rand(b, generator=g))
    return tuple(args)


def transformer_spec(transformer: torch.nn.Module, tokens: int) -> ComponentSpec:
    """The transformer with ``tokens`` example text tokens (T5's, in a real call)."""
    config = dict(transformer.config)
    inputs, outputs = _io(config)
    return ComponentSpec(
        name="unet",  # the export's denoiser component; its folder is transformer/
        module=FluxTransformer(transformer),
        weights=transformer,
        inputs=inputs,
        outputs=outputs,
        example=lambda g, b, h, w: _example(config, tokens, g, b, h, w),
    )


def flux_specs(modules: FluxModules, t5_tokens: int) -> list[ComponentSpec]:
    """The components held in memory, in the family's encoder order, then the denoiser and the VAE decoder and
    encoder (T5 and the transformer left out where streamed)."""
    factor = 2 ** (len(modules.vae.config.block_out_channels) - 1)
    specs = [clip_spec(modules.clip)]
    if modules.t5 is not None:
        specs.append(t5_spec(modules.t5, t5_tokens, name=T5_NAME))
    if modules.transformer is not None:
        specs.append(transformer_spec(modules.transformer, t5_tokens))
    return [*specs, vae_decoder_spec(modules.vae), vae_encoder_spec(modules.vae, factor)]


# -- the large components, streamed (export/streamed.py): built from their configs in fake mode -----------------

def streamed_transformer_spec(config: dict[str, Any], tokens: int) -> StreamedSpec:
    """The transformer as ``transformer_spec`` describes it, traced on fake tensors (dynamic batch, latent sides
    in patches and text tokens) for a streamed export; its weights are named as the diffusers checkpoint's."""
    from diffusers import FluxTransformer2DModel

    inputs, outputs = _io(config)

    def build() -> torch.nn.Module:
        return FluxTransformer(FluxTransformer2DModel(**config), torchscript=False)

    def dynamic() -> dict[str, Any]:
        d = torch.export.Dim
        b, t = d("batch", min=1, max=64), d("text_tokens", min=1, max=4096)
        h, w = d("patches_h", min=1, max=256), d("patches_w", min=1, max=256)
        dims: dict[str, Any] = {"sample": {0: b, 2: 2 * h, 3: 2 * w}, "timestep": {0: b},
                                "encoder_hidden_states": {0: b, 1: t}, "pooled_projections": {0: b}}
        if config.get("guidance_embeds"):
            dims["guidance"] = {0: b}
        return dims

    return StreamedSpec(
        name="unet", build=build, prefix="transformer.", inputs=inputs, outputs=outputs,
        example=lambda: _example(config, tokens, None, 2, *TRACE_LATENT), dynamic=dynamic)


def streamed_t5(config: dict[str, Any], tokens: int) -> StreamedSpec:
    return streamed_t5_spec(config, tokens, name=T5_NAME)
