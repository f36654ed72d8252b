"""The components of a FLUX.1 export, as ``ComponentSpec``s for ``onnx_export.export_component``.

``text_encoder`` (CLIP ViT-L: ``hidden_states`` [B, 77, 768], unused by the transformer, and ``text_embeds``
[B, 768], its pooled output), ``text_encoder_2`` (T5: ``hidden_states`` [B, tokens, 4096], kept in float32),
``unet`` (the transformer, written to ``transformer/``: NCHW latents in and out, packed in the graph; dynamic in
batch, latent height and width, and text tokens; [dev] adds ``guidance``), ``vae_decoder`` and ``vae_encoder``
(16 latent channels, the shift in the graph: SD3's VAE specs). FLUX.1 Fill adds ``vae_encoder_masked`` (the
masked image's latents), and its transformer's ``sample`` also has the mask's and the masked latents' channels;
FLUX.1 Kontext's transformer also takes ``reference_latents`` [1, 16, H, W], a reference image's latents;
FLUX.1 Depth / Canny's ``control_latents`` [1, 16, h, w], a control image's latents at the latents' size.
With first-block caching (``sdrt export --feature-cache``) the transformer also returns its two residuals and
``unet_shallow`` (``transformer_shallow/``) is its cached step (export/block_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdrt.runtime.control_latents import CONTROL_INPUT
from sdrt.runtime.feature_cache import CHANGE, SHALLOW_UNET
from sdrt.runtime.inpaint import MASKED_ENCODER

from . import wrappers
from .block_cache import random_residuals, reference_residual_spec, residual_dims, residual_specs
from .flux_presets import FluxModules, controls
from .flux_wrappers import (
    PATCH,
    FluxControlCached,
    FluxControlTransformer,
    FluxKontextCached,
    FluxTransformer,
    FluxTransformerCached,
    FluxVaeEncoderMasked,
)
from .onnx_export import TRACE_LATENT, ComponentSpec
from .sd3_specs import CLIP_TOKENS, streamed_t5_spec, t5_spec, vae_decoder_spec, vae_encoder_spec
from .streamed import StreamedSpec
from .transformer_config import inner_width

CLIP_NAME, T5_NAME = "text_encoder", "text_encoder_2"
Spec = tuple[str, str, tuple[int | str, ...]]


def clip_spec(enc: torch.nn.Module) -> ComponentSpec:
    """CLIP without a projection: its final hidden states and pooled output (``text_embeds``)."""
    width = int(enc.config.hidden_size)
    return ComponentSpec(
        name=CLIP_NAME,
        module=wrappers.TextEncoder(enc, penultimate=False, pooled=True),
        weights=enc,
        inputs=[("input_ids", "int32", ("batch", CLIP_TOKENS))],
        outputs=[("hidden_states", "float", ("batch", CLIP_TOKENS, width)),
                 ("text_embeds", "float", ("batch", width))],
        example=wrappers.clip_ids_example(int(enc.config.vocab_size), CLIP_TOKENS),
        refittable=True,
    )


def _io(config: dict[str, Any], block_cache: bool = False, reference: bool = False) -> tuple[list[Spec], list[Spec]]:
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    ch = _sample_channels(config)
    out = int(config.get("out_channels") or config["in_channels"]) // 4  # fewer than ch: FLUX.1 Fill
    inputs = [("sample", "float", ("batch", ch, "height", "width")), ("timestep", "float32", ("batch",)),
              ("encoder_hidden_states", "float", ("batch", "text_tokens", joint)),
              ("pooled_projections", "float", ("batch", pooled))]
    if config.get("guidance_embeds"):
        inputs.append(("guidance", "float32", ("batch",)))
    if reference:  # FLUX.1 Kontext: one reference image's latents, of a size of their own
        inputs.append(("reference_latents", "float", (1, out, "reference_height", "reference_width")))
    if controls(config):  # FLUX.1 Depth / Canny: one control image's latents, at the latents' size
        inputs.append((CONTROL_INPUT, "float", (1, out, "height", "width")))
    return inputs, [("out_sample", "float", ("batch", out, "height", "width")),
                    *(_residuals(config, reference) if block_cache else [])]


def _sample_channels(config: dict[str, Any]) -> int:
    """``sample``'s channels: the packed input's, 2x2 latent pixels a token (FLUX.1 Fill's include the mask and the
    masked latents), less a control image's latents, which come as ``control_latents``."""
    ch = int(config["in_channels"]) // 4
    return ch // 2 if controls(config) else ch


def _residuals(config: dict[str, Any], reference: bool = False) -> list[Spec]:
    """First-block caching's residuals over the image tokens, on the patch grid (export/block_cache.py), and with a
    reference (FLUX.1 Kontext) the first block's residual over the reference's tokens, on the reference's grid."""
    extra = [reference_residual_spec(inner_width(config), PATCH)] if reference else []
    return [*residual_specs(inner_width(config), PATCH), *extra]


def _cached_io(config: dict[str, Any], reference: bool = False) -> tuple[list[Spec], list[Spec]]:
    """The cached step's I/O: the transformer's first four inputs, the residuals, then its others ([dev]'s
    ``guidance``, Kontext's ``reference_latents``, Depth / Canny's ``control_latents``; the order of
    ``FluxTransformerCached.forward`` and its subclasses), ``out_sample`` and ``change``."""
    inputs, outputs = _io(config, reference=reference)
    return [*inputs[:4], *_residuals(config, reference), *inputs[4:]], [outputs[0], (CHANGE, "float32", (1,))]


def _cached_args(config: dict[str, Any], args: tuple[torch.Tensor, ...], g: torch.Generator | None,
                 reference: bool = False) -> tuple[torch.Tensor, ...]:
    """The transformer's example inputs with random residuals placed as ``_cached_io`` orders them (``reference``:
    its last input is the reference's latents, and the reference tokens' residual follows the other two)."""
    b, _, h, w = args[0].shape
    res = random_residuals(inner_width(config), PATCH, g, b, h, w)
    if reference:
        rh, rw = args[-1].shape[-2:]
        res = (*res, torch.randn(b, rh // PATCH, rw // PATCH, inner_width(config), generator=g))
    return (*args[:4], *res, *args[4:])


def _example(config: dict[str, Any], tokens: int, g: torch.Generator | None, b: int, h: int,
             w: int, reference: bool = False) -> tuple[torch.Tensor, ...]:
    joint, pooled = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    ch = _sample_channels(config)
    args = [torch.randn(b, ch, h, w, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, tokens, joint, generator=g), torch.randn(b, pooled, generator=g)]
    if config.get("guidance_embeds"):
        args.append(1.0 + 4.0 * torch.rand(b, generator=g))
    if reference:  # a reference of another size than the image (its sides swapped)
        args.append(torch.randn(1, int(config.get("out_channels") or config["in_channels"]) // 4, w, h, generator=g))
    if controls(config):  # a control image's latents, as a VAE gives them (about unit scale)
        args.append(torch.randn(1, ch, h, w, generator=g))
    return tuple(args)


def denoiser_io(config: dict[str, Any]) -> tuple[list[Spec], list[Spec]]:
    """The plain transformer's inputs and outputs, from its config (``transformer_spec``'s)."""
    return _io(config)


def denoiser_example(config: dict[str, Any], tokens: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The plain transformer's example inputs at (generator, b, h, w), from its config (``transformer_spec``'s)."""
    return lambda g, b, h, w: _example(config, tokens, g, b, h, w)


def transformer_spec(transformer: torch.nn.Module, tokens: int, block_cache: bool = False,
                     reference: bool = False) -> ComponentSpec:
    """The transformer with ``tokens`` example text tokens (T5's, in a real call); ``block_cache``: it also
    returns first-block caching's two residuals; ``reference``: it takes a reference image's latents (FLUX.1
    Kontext; ``FluxTransformer``). A FLUX.1 Depth / Canny transformer (``controls``) also takes a control image's
    latents (``FluxControlTransformer``)."""
    config = dict(transformer.config)
    inputs, outputs = _io(config, block_cache, reference)
    return ComponentSpec(
        name="unet",  # the export's denoiser component; its folder is transformer/
        module=_wrapper(config)(transformer, block_cache=block_cache, reference=reference),
        weights=transformer,
        inputs=inputs,
        outputs=outputs,
        example=lambda g, b, h, w: _example(config, tokens, g, b, h, w, reference),
        refittable=True,
    )


def _wrapper(config: dict[str, Any]) -> type[FluxTransformer]:
    return FluxControlTransformer if controls(config) else FluxTransformer


def _cached_wrapper(config: dict[str, Any], reference: bool) -> type[FluxTransformerCached]:
    return FluxKontextCached if reference else FluxControlCached if controls(config) else FluxTransformerCached


def cached_spec(transformer: torch.nn.Module, tokens: int, reference: bool = False) -> ComponentSpec:
    """First-block caching's cached step (``unet_shallow``, in ``transformer_shallow/``): the transformer's inputs
    and its residuals of the last full step -> ``out_sample`` and ``change`` (``FluxTransformerCached``;
    ``reference``: FLUX.1 Kontext's, ``FluxKontextCached``; a Depth / Canny transformer's: ``FluxControlCached``)."""
    config = dict(transformer.config)
    inputs, outputs = _cached_io(config, reference)
    return ComponentSpec(
        name=SHALLOW_UNET,
        module=_cached_wrapper(config, reference)(transformer, reference=reference),
        weights=transformer,
        inputs=inputs,
        outputs=outputs,
        example=lambda g, b, h, w: _cached_args(config, _example(config, tokens, g, b, h, w, reference), g,
                                                reference),
        refittable=True,
    )


def masked_encoder_spec(vae: torch.nn.Module, factor: int) -> ComponentSpec:
    """FLUX.1 Fill's encoder of the masked image (``vae_encoder_masked``): ``image`` uint8 [B, H, W, 3] and
    ``mask`` uint8 [B, H, W, 1] -> ``latent`` [B, 16, H/8, W/8], shifted and scaled (``FluxVaeEncoderMasked``)."""
    lat = int(vae.config.latent_channels)

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        image = torch.randint(0, 256, (b, h * factor, w * factor, 3), generator=g, dtype=torch.uint8)
        return image, (torch.rand(b, h * factor, w * factor, 1, generator=g) < 0.5).to(torch.uint8)

    return ComponentSpec(
        name=MASKED_ENCODER,
        module=FluxVaeEncoderMasked(vae),
        weights=vae,
        inputs=[("image", "uint8", ("batch", "image_height", "image_width", 3)),
                ("mask", "uint8", ("batch", "image_height", "image_width", 1))],
        outputs=[("latent", "float", ("batch", lat, "height", "width"))],
        example=example,
    )


def flux_specs(modules: FluxModules, t5_tokens: int, block_cache: bool = False, fill: bool = False,
               reference: bool = False) -> list[ComponentSpec]:
    """The components held in memory, in the family's encoder order, then the denoiser (with ``block_cache``:
    returning first-block caching's residuals, its cached step after it; ``reference``: taking a reference
    image's latents, FLUX.1 Kontext) and the VAE decoder and encoder (T5 and the transformer left out where
    streamed); ``fill`` (FLUX.1 Fill) adds the masked image's encoder."""
    factor = 2 ** (len(modules.vae.config.block_out_channels) - 1)
    specs = [clip_spec(modules.clip)]
    if modules.t5 is not None:
        specs.append(t5_spec(modules.t5, t5_tokens, name=T5_NAME))
    if modules.transformer is not None:
        specs.append(transformer_spec(modules.transformer, t5_tokens, block_cache, reference))
        if block_cache:
            specs.append(cached_spec(modules.transformer, t5_tokens, reference))
    specs += [vae_decoder_spec(modules.vae), vae_encoder_spec(modules.vae, factor)]
    return [*specs, masked_encoder_spec(modules.vae, factor)] if fill else specs


# -- the large components, streamed (export/streamed.py): built from their configs in fake mode -----------------

def _dims(config: dict[str, Any], residuals: bool = False, reference: bool = False) -> dict[str, Any]:
    """torch.export's dynamic shapes of the transformer's inputs (and of the cached step's residuals, or a
    reference image's latents): batch, latent sides in patches, text tokens."""
    d = torch.export.Dim
    b, t = d("batch", min=1, max=64), d("text_tokens", min=1, max=4096)
    h, w = d("patches_h", min=1, max=256), d("patches_w", min=1, max=256)
    dims: dict[str, Any] = {"sample": {0: b, 2: PATCH * h, 3: PATCH * w}, "timestep": {0: b},
                            "encoder_hidden_states": {0: b, 1: t}, "pooled_projections": {0: b}}
    if config.get("guidance_embeds"):
        dims["guidance"] = {0: b}
    if residuals:
        dims.update(residual_dims(b, reference))
    if reference:
        rh, rw = d("reference_patches_h", min=1, max=256), d("reference_patches_w", min=1, max=256)
        dims["reference_latents"] = {2: PATCH * rh, 3: PATCH * rw}
    if controls(config):
        dims[CONTROL_INPUT] = {2: PATCH * h, 3: PATCH * w}
    return dims


def streamed_transformer_spec(config: dict[str, Any], tokens: int, block_cache: bool = False,
                              reference: bool = False) -> StreamedSpec:
    """The transformer as ``transformer_spec`` describes it (``block_cache``: returning first-block caching's two
    residuals; ``reference``: taking a reference image's latents; FLUX.1 Depth / Canny's: a control image's),
    traced on fake tensors (dynamic batch, latent sides in patches, text tokens, the reference's sides) for a
    streamed export; its weights are named as the
    diffusers checkpoint's."""
    from diffusers import FluxTransformer2DModel

    inputs, outputs = _io(config, block_cache, reference)

    def build() -> torch.nn.Module:
        return _wrapper(config)(FluxTransformer2DModel(**config), torchscript=False, block_cache=block_cache,
                                reference=reference)

    return StreamedSpec(
        name="unet", build=build, prefix="transformer.", inputs=inputs, outputs=outputs,
        example=lambda: _example(config, tokens, None, 2, *TRACE_LATENT, reference),
        dynamic=lambda: _dims(config, reference=reference))


def streamed_cached_spec(config: dict[str, Any], tokens: int, reference: bool = False) -> StreamedSpec:
    """First-block caching's cached step as ``cached_spec`` describes it (``reference``: FLUX.1 Kontext's), traced
    on fake tensors for a streamed export: built with ``transformer_blocks[0]`` alone (its weights, the embeddings'
    and the output layers' are all it reads from the checkpoint)."""
    from diffusers import FluxTransformer2DModel

    inputs, outputs = _cached_io(config, reference)

    def build() -> torch.nn.Module:
        return _cached_wrapper(config, reference)(
            FluxTransformer2DModel(**{**config, "num_layers": 1, "num_single_layers": 0}), torchscript=False,
            reference=reference)

    return StreamedSpec(
        name=SHALLOW_UNET, build=build, prefix="transformer.", inputs=inputs, outputs=outputs,
        example=lambda: _cached_args(config, _example(config, tokens, None, 2, *TRACE_LATENT, reference), None,
                                     reference),
        dynamic=lambda: _dims(config, residuals=True, reference=reference))


def streamed_t5(config: dict[str, Any], tokens: int) -> StreamedSpec:
    return streamed_t5_spec(config, tokens, name=T5_NAME)
