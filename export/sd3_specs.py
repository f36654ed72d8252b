"""The components of an SD3 export, as ``ComponentSpec``s for ``onnx_export.export_component``.

``text_encoder`` and ``text_encoder_2`` (CLIP with projection: penultimate ``hidden_states`` [B, 77, C] and
``text_embeds`` [B, P]), ``text_encoder_3`` (T5: ``hidden_states`` [B, sequence, D], kept in float32: T5's
activations overflow fp16; left out of a T5-less export), ``unet`` (the MMDiT denoiser, written to
``transformer/``: dynamic in batch, latent height and width, and tokens), ``vae_decoder`` and ``vae_encoder``
(16 latent channels, SD3's shift in the graph).

The CLIP encoders and the denoiser (and its cached step) held in memory are refittable (``refit_map.json``:
``sdrt refit --lora``); T5 and streamed components are not.
"""

from __future__ import annotations

from typing import Any

import torch

from sdrt.runtime.feature_cache import CHANGE, SHALLOW_UNET
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.layer_skip import SKIP_PREDICTION, SKIP_SCALE, SKIP_UNET

from . import wrappers
from .block_cache import random_residuals, residual_dims, residual_specs
from .onnx_export import TRACE_LATENT, ComponentSpec
from .sd3_presets import Sd3Modules
from .sd3_wrappers import (
    Sd3Transformer,
    Sd3TransformerCached,
    Sd3TransformerSkip,
    Sd3VaeDecoder,
    Sd3VaeEncoder,
    Sd3VaeEncoderMasked,
    T5Encoder,
)
from .streamed import StreamedSpec
from .transformer_config import inner_width

CLIP_TOKENS = 77
CLIP_NAMES = ("text_encoder", "text_encoder_2")


def _clip_spec(name: str, enc: torch.nn.Module) -> ComponentSpec:
    return ComponentSpec(
        name=name,
        module=wrappers.TextEncoder(enc, penultimate=True, pooled=True),
        weights=enc,
        inputs=[("input_ids", "int32", ("batch", CLIP_TOKENS))],
        outputs=[("hidden_states", "float", ("batch", CLIP_TOKENS, int(enc.config.hidden_size))),
                 ("text_embeds", "float", ("batch", int(enc.config.projection_dim)))],
        example=wrappers.clip_ids_example(int(enc.config.vocab_size), CLIP_TOKENS),
        refittable=True,
    )


def t5_spec(enc: torch.nn.Module, tokens: int, name: str = "text_encoder_3") -> ComponentSpec:
    """T5 with ``tokens`` example tokens (the trace's and the gate's; the axis stays dynamic), as the component
    ``name`` (SD3's third encoder; FLUX.1's second)."""
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
        name=name,
        module=T5Encoder(enc),
        weights=enc,
        inputs=[("input_ids", "int32", ("batch", "t5_tokens"))],
        outputs=[("hidden_states", "float", ("batch", "t5_tokens", int(enc.config.d_model)))],
        example=example,
        fp16_overflows=True,
    )


def transformer_spec(transformer: torch.nn.Module, tokens: int, block_cache: bool = False) -> ComponentSpec:
    """The MMDiT with ``tokens`` example tokens (77 CLIP + T5's in a real call); ``block_cache``: it also returns
    first-block caching's two residuals (``deep_feature``, ``head_residual``; ``Sd3Transformer``)."""
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
        name="unet",  # the export's denoiser component, whatever its architecture; its folder is transformer/
        module=Sd3Transformer(transformer, block_cache=block_cache),
        weights=transformer,
        inputs=[("sample", "float", ("batch", in_ch, "height", "width")),
                ("timestep", "float32", ("batch",)),
                ("encoder_hidden_states", "float", ("batch", "text_tokens", joint)),
                ("pooled_projections", "float", ("batch", pooled))],
        outputs=[("out_sample", "float", ("batch", out_ch, "height", "width")),
                 *(_residuals(cfg) if block_cache else [])],
        example=example,
        refittable=True,
    )


def _residuals(cfg: Any) -> list[tuple[str, str, tuple[int | str, ...]]]:
    """First-block caching's residuals over the image tokens, on the patch grid (export/block_cache.py)."""
    return residual_specs(inner_width(cfg), int(cfg["patch_size"]))


def cached_spec(transformer: torch.nn.Module, tokens: int) -> ComponentSpec:
    """First-block caching's cached step (``unet_shallow``, in ``transformer_shallow/``): the transformer's inputs
    and its two residuals of the last full step -> ``out_sample`` and ``change`` (``Sd3TransformerCached``)."""
    full = transformer_spec(transformer, tokens, block_cache=True)
    res = _residuals(transformer.config)
    inner = inner_width(transformer.config)
    p = int(transformer.config.patch_size)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (*full.example(g, b, h, w), *random_residuals(inner, p, g, b, h, w))

    return ComponentSpec(
        name=SHALLOW_UNET,
        module=Sd3TransformerCached(transformer),
        weights=transformer,
        inputs=[*full.inputs, *res],
        outputs=[full.outputs[0], (CHANGE, "float32", (1,))],
        example=example,
        refittable=True,
    )


def skip_spec(transformer: torch.nn.Module, tokens: int, layers: list[int]) -> ComponentSpec:
    """Skip-layer guidance's pass (``unet_skip``, ``Sd3TransformerSkip``): the transformer's inputs over the guided
    batch, its prediction ``unet_out`` and ``skip_scale`` -> ``out_sample`` with the conditional rows moved away
    from the pass with ``layers`` skipped. Traced and gated on a guided batch (2B rows). Not refittable: it reads
    the transformer's weights file (export/shared_weights.py), which a refit would rewrite."""
    full = transformer_spec(transformer, tokens)
    out_ch = int(transformer.config.out_channels)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        args = full.example(g, 2 * b, h, w)
        return (*args, torch.randn(2 * b, out_ch, h, w, generator=g), torch.rand(1, generator=g) + 0.2)

    return ComponentSpec(
        name=SKIP_UNET,
        module=Sd3TransformerSkip(transformer, layers),
        weights=transformer,
        inputs=[*full.inputs, (SKIP_PREDICTION, "float", ("batch", out_ch, "height", "width")),
                (SKIP_SCALE, "float32", (1,))],
        outputs=[full.outputs[0]],
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


def vae_encoder_spec(vae: torch.nn.Module, factor: int) -> ComponentSpec:
    """The VAE encoder: ``image`` uint8 [B, H, W, 3] -> ``latent`` [B, 16, H/8, W/8], shifted and scaled."""
    lat = int(vae.config.latent_channels)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 256, (b, h * factor, w * factor, 3), generator=g, dtype=torch.uint8),)

    return ComponentSpec(
        name="vae_encoder",
        module=Sd3VaeEncoder(vae),
        weights=vae,
        inputs=[("image", "uint8", ("batch", "image_height", "image_width", 3))],
        outputs=[("latent", "float", ("batch", lat, "height", "width"))],
        example=example,
    )


def vae_encoder_masked_spec(vae: torch.nn.Module, factor: int) -> ComponentSpec:
    """The masked image's encoder of an inpainting (33-channel) transformer: ``image`` uint8 [B, H, W, 3] and
    ``mask`` uint8 [B, H, W, 1] (1 = repaint) -> ``latent`` [B, 16, H/8, W/8], shifted and scaled."""
    enc = vae_encoder_spec(vae, factor)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        mask = (torch.rand(b, h * factor, w * factor, 1, generator=g) < 0.5).to(torch.uint8)
        return (*enc.example(g, b, h, w), mask)

    return ComponentSpec(
        name=MASKED_ENCODER,
        module=Sd3VaeEncoderMasked(vae),
        weights=vae,
        inputs=[*enc.inputs, ("mask", "uint8", ("batch", "image_height", "image_width", 1))],
        outputs=list(enc.outputs),
        example=example,
    )


def sd3_specs(modules: Sd3Modules, t5_tokens: int, block_cache: bool = False,
              masked: bool = False, skip_layers: list[int] | None = None) -> list[ComponentSpec]:
    """The components of an SD3 export held in memory, in the family's encoder order, then the denoiser (with
    ``block_cache``: returning first-block caching's residuals, its cached step after it) and the VAE decoder and
    encoder (T5 and the transformer left out where the modules have none: streamed or absent); ``masked``: an
    inpainting transformer's masked-image encoder too; ``skip_layers``: skip-layer guidance's pass after the
    transformer (``skip_spec``)."""
    clip_l, clip_g, t5 = modules.text_encoders
    factor = 2 ** (len(modules.vae.config.block_out_channels) - 1)
    specs = [_clip_spec(CLIP_NAMES[0], clip_l), _clip_spec(CLIP_NAMES[1], clip_g)]
    if t5 is not None:
        specs.append(t5_spec(t5, t5_tokens))
    if modules.transformer is not None:
        specs.append(transformer_spec(modules.transformer, CLIP_TOKENS + t5_tokens, block_cache))
        if block_cache:
            specs.append(cached_spec(modules.transformer, CLIP_TOKENS + t5_tokens))
        if skip_layers:
            specs.append(skip_spec(modules.transformer, CLIP_TOKENS + t5_tokens, skip_layers))
    specs += [vae_decoder_spec(modules.vae), vae_encoder_spec(modules.vae, factor)]
    return [*specs, vae_encoder_masked_spec(modules.vae, factor)] if masked else specs


# -- the large components, streamed (export/streamed.py): built from their configs in fake mode -----------------

def streamed_transformer_spec(config: dict[str, Any], tokens: int, block_cache: bool = False) -> StreamedSpec:
    """The MMDiT as ``transformer_spec`` describes it (``block_cache``: returning first-block caching's two
    residuals), traced on fake tensors (dynamic batch, patches and text tokens) for a streamed export; its
    weights are named as the diffusers checkpoint's."""
    from diffusers import SD3Transformer2DModel

    in_ch, out_ch = int(config["in_channels"]), int(config["out_channels"])
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])

    def build() -> torch.nn.Module:
        return Sd3Transformer(SD3Transformer2DModel(**config), dynamo=True, block_cache=block_cache)

    def example() -> tuple[torch.Tensor, ...]:
        b, (h, w) = 2, TRACE_LATENT
        return (torch.randn(b, in_ch, h, w), torch.rand(b) * 1000, torch.randn(b, tokens, joint), torch.randn(b, pooled))

    return StreamedSpec(
        name="unet", build=build, prefix="transformer.",
        inputs=[("sample", "float", ("batch", in_ch, "height", "width")), ("timestep", "float32", ("batch",)),
                ("encoder_hidden_states", "float", ("batch", "text_tokens", joint)),
                ("pooled_projections", "float", ("batch", pooled))],
        outputs=[("out_sample", "float", ("batch", out_ch, "height", "width")),
                 *(_residuals(config) if block_cache else [])],
        example=example, dynamic=lambda: _transformer_dims(config))


def _transformer_dims(config: dict[str, Any], residuals: bool = False, batch: Any = None) -> dict[str, Any]:
    """torch.export's dynamic shapes of the transformer's inputs (and of the cached step's residual inputs, on
    the patch grid): batch (``batch``: a dimension of the caller's), text tokens, and the sides in patches."""
    d = torch.export.Dim
    grid, p = int(config["pos_embed_max_size"]), int(config["patch_size"])
    b, t = d("batch", min=1, max=64) if batch is None else batch, d("text_tokens", min=1, max=4096)
    h, w = d("patches_h", min=1, max=grid), d("patches_w", min=1, max=grid)
    dims: dict[str, Any] = {"sample": {0: b, 2: p * h, 3: p * w}, "timestep": {0: b},
                            "encoder_hidden_states": {0: b, 1: t}, "pooled_projections": {0: b}}
    if residuals:
        dims.update(residual_dims(b))
    return dims


def streamed_cached_spec(config: dict[str, Any], tokens: int) -> StreamedSpec:
    """First-block caching's cached step as ``cached_spec`` describes it, traced on fake tensors for a streamed
    export: built with the first block alone (its weights, the embeddings' and the output layers' are all it
    reads from the checkpoint)."""
    from diffusers import SD3Transformer2DModel

    full = streamed_transformer_spec(config, tokens, block_cache=True)
    res = _residuals(config)
    inner, p = inner_width(config), int(config["patch_size"])

    def build() -> torch.nn.Module:
        t = SD3Transformer2DModel(**{**config, "num_layers": 2})  # block 0 as the full model builds it, then
        del t.transformer_blocks[1:]  # the rest dropped: a single-block model's block would end the context stream
        return Sd3TransformerCached(t, dynamo=True)

    def example() -> tuple[torch.Tensor, ...]:
        args = full.example()
        return (*args, *random_residuals(inner, p, None, args[0].shape[0], args[0].shape[2], args[0].shape[3]))

    return StreamedSpec(
        name=SHALLOW_UNET, build=build, prefix="transformer.", inputs=[*full.inputs, *res],
        outputs=[full.outputs[0], (CHANGE, "float32", (1,))], example=example,
        dynamic=lambda: _transformer_dims(config, residuals=True))


def streamed_skip_spec(config: dict[str, Any], tokens: int, layers: list[int]) -> StreamedSpec:
    """Skip-layer guidance's pass as ``skip_spec`` describes it, traced on fake tensors for a streamed export: a
    guided batch, twice the images (torch.export's ``2 * half``, traced at 4 rows; half is at least 2 there only so
    that the trace does not specialize a size of 1: the graph takes any even batch)."""
    from diffusers import SD3Transformer2DModel

    full = streamed_transformer_spec(config, tokens)
    out_ch = int(config["out_channels"])
    in_ch, joint, pooled = int(config["in_channels"]), int(config["joint_attention_dim"]), \
        int(config["pooled_projection_dim"])

    def build() -> torch.nn.Module:
        return Sd3TransformerSkip(SD3Transformer2DModel(**config), layers, dynamo=True)

    def example() -> tuple[torch.Tensor, ...]:
        b, (h, w) = 4, TRACE_LATENT
        return (torch.randn(b, in_ch, h, w), torch.rand(b) * 1000, torch.randn(b, tokens, joint),
                torch.randn(b, pooled), torch.randn(b, out_ch, h, w), torch.rand(1))

    def dynamic() -> dict[str, Any]:
        dims = _transformer_dims(config, batch=2 * torch.export.Dim("half", min=2, max=32))
        return {**dims, SKIP_PREDICTION: dims["sample"], SKIP_SCALE: None}

    return StreamedSpec(
        name=SKIP_UNET, build=build, prefix="transformer.",
        inputs=[*full.inputs, (SKIP_PREDICTION, "float", ("batch", out_ch, "height", "width")),
                (SKIP_SCALE, "float32", (1,))],
        outputs=[full.outputs[0]], example=example, dynamic=dynamic)


def streamed_t5_spec(config: dict[str, Any], tokens: int, name: str = "text_encoder_3") -> StreamedSpec:
    """T5's encoder as ``t5_spec`` describes it (float32), traced on fake tensors for a streamed export."""
    from transformers import T5Config, T5EncoderModel

    def build() -> torch.nn.Module:
        return T5Encoder(T5EncoderModel(T5Config(**config)))

    def example() -> tuple[torch.Tensor, ...]:
        return (torch.zeros(2, tokens, dtype=torch.int32),)

    def dynamic() -> dict[str, Any]:
        d = torch.export.Dim
        return {"input_ids": {0: d("batch", min=1, max=128), 1: d("t5_tokens", min=2, max=512)}}

    return StreamedSpec(
        name=name, build=build, prefix="encoder.",
        inputs=[("input_ids", "int32", ("batch", "t5_tokens"))],
        outputs=[("hidden_states", "float", ("batch", "t5_tokens", int(config["d_model"])))],
        example=example, dynamic=dynamic, fp16_overflows=True)
