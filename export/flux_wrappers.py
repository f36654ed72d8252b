"""The exact computation of FLUX.1's exported denoiser graph, as a small torch module.

The text encoders and the VAE need no wrapper of their own: ``wrappers.TextEncoder(pooled=True)`` gives CLIP's
pooled output (``FluxPipeline._get_clip_prompt_embeds``), ``sd3_wrappers.T5Encoder`` T5's states
(``_get_t5_prompt_embeds``), and SD3's VAE wrappers apply the latent shift as FLUX does.
"""

from __future__ import annotations

import copy

import torch

PATCH = 2


class FluxRope(torch.nn.Module):
    """diffusers' ``FluxPosEmbed`` computed in float32 (diffusers computes the frequencies in float64 off Apple
    GPUs; float64 is not a type every backend runs, TensorRT's included). Positions are integers below a few
    hundred, so the angles agree to about 1e-5 radians."""

    def __init__(self, theta: int, axes_dim: list[int]) -> None:
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos = ids.float()
        cos, sin = zip(*(get_1d_rotary_pos_embed(d, pos[:, i], theta=self.theta, repeat_interleave_real=True,
                                                 use_real=True, freqs_dtype=torch.float32)
                         for i, d in enumerate(self.axes_dim)), strict=True)
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


class ExplicitRmsNorm(torch.nn.Module):
    """``torch.nn.RMSNorm`` written out (mean of squares, rsqrt, weight), which the TorchScript exporter can
    export; the same weight tensor."""

    def __init__(self, norm: torch.nn.RMSNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = torch.finfo(torch.float32).eps if norm.eps is None else float(norm.eps)
        self.dims = tuple(range(-len(norm.normalized_shape), 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + self.eps)
        return y if self.weight is None else y * self.weight


def explicit_rms_norms(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``torch.nn.RMSNorm`` replaced by ``ExplicitRmsNorm`` (in place; returns it)."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.RMSNorm):
            setattr(module, name, ExplicitRmsNorm(child))
        else:
            explicit_rms_norms(child)
    return module


def pack(latents: torch.Tensor) -> torch.Tensor:
    """NCHW latents [B, C, h, w] -> 2x2-patch tokens [B, h/2 * w/2, 4C] (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``pack``'s inverse for latents of h x w (``FluxPipeline._unpack_latents``)."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """The packed latents' position ids [h/2 * w/2, 3]: (0, row, column) (``_prepare_latent_image_ids``)."""
    rows = torch.arange(h // PATCH, dtype=like.dtype, device=like.device)
    cols = torch.arange(w // PATCH, dtype=like.dtype, device=like.device)
    grid = torch.stack([torch.zeros_like(rows)[:, None].expand(-1, cols.shape[0]),
                        rows[:, None].expand(-1, cols.shape[0]),
                        cols[None, :].expand(rows.shape[0], -1)], dim=-1)
    return grid.reshape(-1, 3)


class FluxTransformer(torch.nn.Module):
    """``sample`` [B, 16, h, w], ``timestep`` float32 [B] (sigma x 1000, as the flow scheduler gives it),
    ``encoder_hidden_states`` [B, tokens, joint_attention_dim] (T5's states), ``pooled_projections`` [B, 768]
    (CLIP's pooled output), and for [dev] ``guidance`` float32 [B] (the scale) -> ``out_sample`` [B, 16, h, w],
    the flow prediction.

    What ``FluxPipeline``'s loop does around ``transformer(...)`` is in the graph: the latents packed into 2x2
    patches, the image ids from h and w, zero text ids, ``timestep / 1000``, the output unpacked; the rotary
    embedding in float32 (``FluxRope``). h and w must be even (sides multiples of 16 pixels)."""

    def __init__(self, transformer: torch.nn.Module, torchscript: bool = True) -> None:
        super().__init__()
        if torchscript:  # the TorchScript exporter has no aten::rms_norm at opset 17: a copy with explicit norms
            transformer = explicit_rms_norms(copy.deepcopy(transformer))
        self.transformer = transformer
        self.guided = bool(transformer.config.guidance_embeds)
        pe = transformer.pos_embed
        self.rope = FluxRope(pe.theta, pe.axes_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        h, w = sample.shape[-2], sample.shape[-1]
        img_ids = image_ids(h, w, sample)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, dtype=sample.dtype, device=sample.device)
        from diffusers.models.transformers import transformer_flux

        t = self.transformer
        kept, kept_apply = t.pos_embed, transformer_flux.apply_rotary_emb
        # for this call only (the module and diffusers stay their own outside it): the float32 rotary embedding,
        # and its application with every size read from the tensor (diffusers' ``reshape(*x.shape[:-1], -1, 2)``
        # traces to constant sizes)
        t.pos_embed, transformer_flux.apply_rotary_emb = self.rope, apply_rope
        try:
            out = t(hidden_states=pack(sample), encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=pooled_projections, timestep=timestep / 1000,
                    guidance=guidance if self.guided else None, img_ids=img_ids, txt_ids=txt_ids,
                    return_dict=False)[0]
        finally:
            t.pos_embed, transformer_flux.apply_rotary_emb = kept, kept_apply
        return unpack(out, h, w)


def apply_rope(x: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor], sequence_dim: int = 2) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` as FLUX calls it (real cos / sin, pairs interleaved on the last axis) on
    [B, S, H, D] (``sequence_dim`` 1) or [B, H, S, D] (2)."""
    cos, sin = freqs_cis
    if sequence_dim == 1:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[None, None, :, :], sin[None, None, :, :]
    pairs = x.unflatten(-1, (-1, 2))  # sizes from the tensor at run time (a traced x.shape may be constant)
    real, imag = pairs.unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
