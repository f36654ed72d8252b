"""The exact computation of SD3's own exported graphs, as small torch modules: the MMDiT denoiser, T5, and the
VAE decoder and encoder with SD3's latent shift.

SD3's two CLIP encoders need no wrapper of their own: ``wrappers.TextEncoder(penultimate=True, pooled=True)``
is what ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` computes (``hidden_states[-(clip_skip + 2)]`` and
``text_embeds``).
"""

from __future__ import annotations

import types

import torch

from .block_cache import on_grid, relative_change, with_residuals
from .wrappers import VaeDecoder, VaeEncoder, VaeEncoderMasked


class Sd3Transformer(torch.nn.Module):
    """``sample`` [B, 16, h, w], ``timestep`` float32 [B] (sigma x 1000, as the flow scheduler gives it),
    ``encoder_hidden_states`` [B, tokens, joint_attention_dim], ``pooled_projections`` [B, pooled] ->
    ``out_sample`` [B, 16, h, w], the flow (velocity) prediction.

    The names follow the UNet graph's where they mean the same thing; ``pooled_projections`` is diffusers'
    name. h and w must be multiples of the patch size (2) and at most ``pos_embed_max_size`` patches a side
    (diffusers raises past it; the graph has no such check).
    """

    def __init__(self, transformer: torch.nn.Module, dynamo: bool = False, block_cache: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        self.block_cache = block_cache
        if block_cache and len(transformer.transformer_blocks) < 2:
            raise ValueError("first-block caching needs a transformer of two blocks or more (it reuses what the "
                             "blocks after the first added)")
        if dynamo:  # torch.onnx's dynamo exporter mis-crops diffusers' slice at odd patch counts: narrow instead
            pe = transformer.pos_embed
            pe.cropped_pos_embed = types.MethodType(_cropped_pos_embed, pe)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.block_cache:
            return self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]
        # first-block caching's two residuals (export/block_cache.py): what the blocks after the first added to
        # the image tokens (a cached step adds it back) and what the first block added (the next step compares
        # its own with it)
        blocks = self.transformer.transformer_blocks
        out, deep, head = with_residuals(blocks[0], blocks[-1], lambda: self.transformer(
            hidden_states=sample, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
            timestep=timestep, return_dict=False)[0])
        p = int(self.transformer.config.patch_size)
        h, w = sample.shape[-2] // p, sample.shape[-1] // p
        return out, on_grid(deep, h, w), on_grid(head, h, w)


class Sd3TransformerSkip(Sd3Transformer):
    """Skip-layer guidance's pass (runtime/layer_skip.py): ``Sd3Transformer``'s inputs over the guided batch (B
    unconditional rows, then B conditional ones, as the step graph takes them), ``unet_out`` [2B, 16, h, w] (the
    transformer's prediction on them) and ``skip_scale`` float32 [1] -> ``out_sample``: ``unet_out`` with its
    conditional rows ``c`` moved to ``c + skip_scale * (c - s)``, where ``s`` is the transformer's prediction on
    the conditional rows with the blocks ``layers`` skipped (diffusers' ``skip_layers``). With ``skip_scale`` =
    scale / g the step graph's guidance ``u + g * (c' - u)`` is diffusers' ``u + g * (c - u) + scale * (c - s)``."""

    def __init__(self, transformer: torch.nn.Module, layers: list[int], dynamo: bool = False) -> None:
        super().__init__(transformer, dynamo=dynamo)
        self.layers = list(layers)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,  # type: ignore[override]
                pooled_projections: torch.Tensor, unet_out: torch.Tensor, skip_scale: torch.Tensor) -> torch.Tensor:
        n = sample.shape[0] // 2
        skipped = self.transformer(hidden_states=sample[n:], encoder_hidden_states=encoder_hidden_states[n:],
                                   pooled_projections=pooled_projections[n:], timestep=timestep[n:],
                                   skip_layers=self.layers, return_dict=False)[0]
        cond = unet_out[n:]
        return torch.cat([unet_out[:n], cond + skip_scale.to(cond.dtype) * (cond - skipped)])


class Sd3TransformerCached(torch.nn.Module):
    """First-block caching's cached step (diffusers' ``apply_first_block_cache``, after ParaAttention's First
    Block Cache): ``Sd3Transformer``'s inputs, then ``deep_feature`` (what the blocks after the first added to
    the image tokens at the last full step) and ``head_residual`` (what the first block added then), both on the
    patch grid [B, h, w, D] as ``Sd3Transformer`` returns them ->
    ``out_sample`` as diffusers' ``SD3Transformer2DModel.forward`` computes it when every block after the first
    returns its input plus that step's residual: embeddings, the first block, ``norm_out`` and ``proj_out`` over
    the first block's image tokens plus ``deep_feature``, unpatchified; and ``change`` [1] float32, the relative
    mean absolute change of the first block's residual from ``head_residual`` (diffusers' rule: the remaining
    blocks run again where it exceeds the threshold)."""

    def __init__(self, transformer: torch.nn.Module, dynamo: bool = False) -> None:
        super().__init__()
        Sd3Transformer(transformer, dynamo=dynamo)  # the same crop fix
        self.transformer = transformer  # only the first of its blocks runs (a streamed export builds no other)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, deep_feature: torch.Tensor,
                head_residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.transformer
        height, width = sample.shape[-2:]
        hidden = t.pos_embed(sample).contiguous()
        temb = t.time_text_embed(timestep, pooled_projections)
        context = t.context_embedder(encoder_hidden_states)
        _, head = t.transformer_blocks[0](hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        change = relative_change(head - hidden, head_residual)
        x = t.proj_out(t.norm_out(head + deep_feature.reshape(head.shape), temb))
        p, c = int(t.config.patch_size), int(t.out_channels)
        h, w = height // p, width // p
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p), change


def _cropped_pos_embed(self: torch.nn.Module, height: int, width: int) -> torch.Tensor:
    """diffusers' ``PatchEmbed.cropped_pos_embed`` (the centred ``height`` x ``width`` patches of the position
    grid) with ``narrow``: the dynamo exporter (torch 2.13) turns the slice ``[top : top + h]`` into a crop one
    row too long where ``h`` is odd (see tests/test_sd3_export.py); ``narrow``'s start and length export exactly."""
    n = int(self.pos_embed_max_size)
    h, w = height // self.patch_size, width // self.patch_size
    grid = self.pos_embed.reshape(1, n, n, -1)
    rows = torch.narrow(grid, 1, (n - h) // 2, h)
    return torch.narrow(rows, 2, (n - w) // 2, w).reshape(1, -1, grid.shape[-1])


class T5Encoder(torch.nn.Module):
    """``input_ids`` int32 [B, T] -> ``hidden_states`` [B, T, d_model]: the last hidden state (after T5's final
    RMS norm), with no attention mask, as ``StableDiffusion3Pipeline._get_t5_prompt_embeds`` calls it
    (``text_encoder_3(ids)[0]``, padding tokens attended to)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        # eager attention, as wrappers.TextEncoder: the TorchScript exporter's SDPA symbolic misbehaves in fp16
        if hasattr(encoder, "set_attn_implementation"):
            encoder.set_attn_implementation("eager")
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids.long(), return_dict=False)[0]


class Sd3VaeDecoder(VaeDecoder):
    """The shared ``VaeDecoder`` (uint8 images and ``finite`` out, postprocessing in the graph) with SD3's
    latent shift: diffusers decodes ``latents / scaling_factor + shift_factor``; the shared wrapper divides by
    the scaling only, so the shift is added here as ``shift * scaling`` before it (equal up to rounding)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__(vae)
        self.shift = float(vae.config.shift_factor or 0.0)

    def forward(self, latent_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(latent_sample + self.shift * self.scale)


class Sd3VaeEncoder(VaeEncoder):
    """The shared ``VaeEncoder`` (uint8 pixels in, the latent distribution's mean out: sdrt's img2img is
    deterministic) with SD3's latent shift: diffusers' SD3 img2img encodes ``(latents - shift_factor) *
    scaling_factor``; the shared wrapper gives ``mean * scaling``, so ``shift * scaling`` is taken off."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__(vae)
        self.shift = float(vae.config.shift_factor or 0.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return super().forward(image) - self.shift * self.scale


class Sd3VaeEncoderMasked(VaeEncoderMasked):
    """The shared ``VaeEncoderMasked`` (the masked image's latent mean, for an inpainting transformer) with SD3's
    latent shift, as ``StableDiffusion3InpaintPipeline.prepare_mask_latents`` encodes: ``(latents - shift_factor)
    * scaling_factor``."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__(vae)
        self.shift = float(vae.config.shift_factor or 0.0)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(image, mask) - self.shift * self.scale


def controlled_blocks(layers: int, residuals: int) -> list[int]:
    """The ControlNet residuals an SD3 transformer of ``layers`` joint blocks reads when given ``residuals`` of them:
    block i (all but the last, whose context stream ends: ``context_pre_only``) adds residual
    ``int(i / (layers / residuals))``, as ``SD3Transformer2DModel.forward`` indexes ``block_controlnet_hidden_states``
    (Python's float division, as there). Sorted, each once."""
    interval = layers / residuals
    return sorted({int(i / interval) for i in range(layers - 1)})


class Sd3ControlNet(torch.nn.Module):
    """One SD3 ControlNet (diffusers' ``SD3ControlNetModel``): ``sample`` [B, 16, h, w], ``timestep`` float32 [B],
    ``encoder_hidden_states`` (a net with a context stream), ``pooled_projections`` (a net that reads them),
    ``controlnet_cond`` [B, 16, h, w] (the control image's latents as the export's ``vae_encoder`` gives them:
    ``(mean - shift) * scaling``), ``conditioning_scale`` float32 [B, R] -> ``block_k`` for each residual k the
    paired transformer reads (``used``), on the patch grid [B, h/2, w/2, D], each times its column of the scale.

    As ``StableDiffusion3ControlNetPipeline`` feeds each kind of net: one with ``force_zeros_for_pooled_projection``
    (InstantX's SD3 nets) gets zeros for the pooled projections and the control latents without the VAE's shift
    (added back here); one without a context stream (``joint_attention_dim`` None: Stability's SD 3.5 nets) gets no
    text states; one without a position embedding of its own (``use_pos_embed`` False) gets the transformer's
    (``pos_embed``, the pipeline's ``_get_pos_embed_from_transformer``)."""

    def __init__(self, controlnet: torch.nn.Module, used: list[int], vae_shift: float, vae_scale: float,
                 pos_embed: torch.nn.Module | None = None) -> None:
        super().__init__()
        cfg = controlnet.config
        if getattr(controlnet, "pos_embed", None) is None:
            if pos_embed is None:
                raise ValueError("this SD3 ControlNet has no position embedding: pass the transformer's")
            controlnet.pos_embed = pos_embed
        self.controlnet = controlnet
        self.used = list(used)
        self.zero_pooled = bool(cfg.get("force_zeros_for_pooled_projection", True))
        self.pooled_dim = int(cfg.pooled_projection_dim)
        self.context = cfg.get("joint_attention_dim") is not None
        self.unshift = vae_shift * vae_scale if self.zero_pooled else 0.0  # InstantX encodes without the shift
        self.patch = int(cfg.patch_size)

    @property
    def takes_text(self) -> bool:
        return self.context

    @property
    def takes_pooled(self) -> bool:
        return not self.zero_pooled

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = list(rest)
        text = rest.pop(0) if self.context else None
        pooled = rest.pop(0) if not self.zero_pooled else \
            torch.zeros(sample.shape[0], self.pooled_dim, dtype=sample.dtype, device=sample.device)
        cond, scale = rest
        if self.unshift:
            cond = cond + self.unshift
        blocks = self.controlnet(hidden_states=sample, controlnet_cond=cond, conditioning_scale=1.0,
                                 encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                                 return_dict=False)[0]
        h, w = sample.shape[-2] // self.patch, sample.shape[-1] // self.patch
        scale = scale.to(sample.dtype)
        return tuple(on_grid(blocks[k], h, w) * scale[:, i, None, None, None] for i, k in enumerate(self.used))


class Sd3TransformerControl(Sd3Transformer):
    """``Sd3Transformer`` with ControlNet residuals: its inputs, then ``nets`` groups of the residuals it reads
    (``used`` of ``residuals``, each [B, h/2, w/2, D] on the patch grid). The groups are summed here (diffusers'
    ``SD3MultiControlNetModel`` sums the nets' samples) and passed as ``block_controlnet_hidden_states``, a list
    of ``residuals`` entries (the ones no block reads are None), so the transformer's own indexing picks them."""

    def __init__(self, transformer: torch.nn.Module, nets: int, used: list[int], residuals: int,
                 dynamo: bool = False) -> None:
        super().__init__(transformer, dynamo=dynamo)
        self.nets, self.used, self.residuals = nets, list(used), residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,  # type: ignore[override]
                pooled_projections: torch.Tensor, *res: torch.Tensor) -> torch.Tensor:
        k = len(self.used)
        summed = list(res[:k])
        for j in range(1, self.nets):
            summed = [a + b for a, b in zip(summed, res[j * k:(j + 1) * k], strict=True)]
        blocks: list[torch.Tensor | None] = [None] * self.residuals
        for i, r in zip(self.used, summed, strict=True):
            blocks[i] = r.reshape(r.shape[0], -1, r.shape[-1])
        return self.transformer(hidden_states=sample, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep,
                                block_controlnet_hidden_states=blocks, return_dict=False)[0]
