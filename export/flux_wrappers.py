"""The exact computation of FLUX.1's exported denoiser graphs, as small torch modules: the transformer (with
first-block caching's cached step, and with ControlNet samples) and a FLUX ControlNet.

The text encoders and the VAE need no wrapper of their own: ``wrappers.TextEncoder(pooled=True)`` gives CLIP's
pooled output (``FluxPipeline._get_clip_prompt_embeds``), ``sd3_wrappers.T5Encoder`` T5's states
(``_get_t5_prompt_embeds``), and SD3's VAE wrappers apply the latent shift as FLUX does.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from .block_cache import block_list, on_grid, relative_change, with_residuals
from .wrappers import VaeEncoderMasked

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


@contextlib.contextmanager
def traceable(*modules: torch.nn.Module) -> Iterator[None]:
    """For one call (the modules and diffusers stay their own outside it): each module's rotary embedding
    (``pos_embed``: a FLUX transformer's or ControlNet's) in float32 (``FluxRope``), and its application with every
    size read from the tensor (diffusers' ``reshape(*x.shape[:-1], -1, 2)`` traces to constant sizes)."""
    from diffusers.models.transformers import transformer_flux

    kept, kept_apply = [m.pos_embed for m in modules], transformer_flux.apply_rotary_emb
    for m, pe in zip(modules, kept, strict=True):
        m.pos_embed = FluxRope(pe.theta, pe.axes_dim)
    transformer_flux.apply_rotary_emb = apply_rope
    try:
        yield
    finally:
        for m, pe in zip(modules, kept, strict=True):
            m.pos_embed = pe
        transformer_flux.apply_rotary_emb = kept_apply


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
    # counted in float32 and cast, as diffusers does (a bf16 Range is one TensorRT does not take)
    rows = torch.arange(h // PATCH, dtype=torch.float32, device=like.device)
    cols = torch.arange(w // PATCH, dtype=torch.float32, device=like.device)
    grid = torch.stack([torch.zeros_like(rows)[:, None].expand(-1, cols.shape[0]),
                        rows[:, None].expand(-1, cols.shape[0]),
                        cols[None, :].expand(rows.shape[0], -1)], dim=-1)
    return grid.reshape(-1, 3).to(like.dtype)


def position_ids(sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary position ids FluxPipeline passes: the packed latents' (``image_ids``) and zeros for the text."""
    txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, dtype=sample.dtype, device=sample.device)
    return image_ids(sample.shape[-2], sample.shape[-1], sample), txt_ids


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # diffusers' order: 19 double, then 38 single


class FluxTransformer(torch.nn.Module):
    """``sample`` [B, 16, h, w] (FLUX.1 Fill: [B, 16 + 64 + 16, h, w], see ``tokens``), ``timestep`` float32 [B]
    (sigma x 1000, as the flow scheduler gives it), ``encoder_hidden_states`` [B, tokens, joint_attention_dim]
    (T5's states), ``pooled_projections`` [B, 768] (CLIP's pooled output), for [dev] ``guidance`` float32 [B] (the
    scale), and with ``reference`` (FLUX.1 Kontext) ``reference_latents`` [1, 16, H, W], a reference image's
    latents (``with_reference``; the output is cut back to the generated tokens), or for a transformer of twice
    the output's input channels (FLUX.1 Depth / Canny; ``FluxControlTransformer`` names its inputs)
    ``control_latents`` [1, 16, h, w] (``with_control``) -> ``out_sample`` [B, 16, h, w],
    the flow prediction; with ``block_cache`` also first-block caching's two residuals over the image tokens on
    the patch grid [B, h/2, w/2, D] (``deep_feature``, ``head_residual``; export/block_cache.py), and with a
    reference a third, ``head_residual_reference`` [B, H/2, W/2, D] (the first block's residual over the reference's
    tokens, on its own patch grid): the first block is ``transformer_blocks[0]``, the last
    ``single_transformer_blocks[-1]``, as diffusers' ``apply_first_block_cache`` takes them.

    What ``FluxPipeline``'s loop does around ``transformer(...)`` is in the graph: the latents packed into 2x2
    patches, the image ids from h and w, zero text ids, ``timestep / 1000``, the output unpacked; the rotary
    embedding in float32 (``FluxRope``). h and w must be even (sides multiples of 16 pixels)."""

    def __init__(self, transformer: torch.nn.Module, torchscript: bool = True, block_cache: bool = False,
                 reference: bool = False) -> None:
        super().__init__()
        if reference and not transformer.config.guidance_embeds:
            raise ValueError("a reference image's tokens (FLUX.1 Kontext) go with a guidance-embedding transformer "
                             "([dev])")
        if block_cache and len(block_list(transformer, BLOCK_LISTS)) < 2:
            raise ValueError("first-block caching needs a transformer of two blocks or more (it reuses what the "
                             "blocks after the first added)")
        if torchscript:  # the TorchScript exporter has no aten::rms_norm at opset 17: a copy with explicit norms
            transformer = explicit_rms_norms(copy.deepcopy(transformer))
        self.transformer = transformer
        self.block_cache = block_cache
        self.reference = reference
        self.guided = bool(transformer.config.guidance_embeds)
        inner, out = int(transformer.config.in_channels), int(transformer.config.out_channels or 0)
        out = out or inner
        # FLUX.1 Fill: (latents, mask, masked latents) channels in sdrt's order -> diffusers' (see ``tokens``)
        self.fill = (out // PATCH**2, (inner - 2 * out) // PATCH**2) if inner > 2 * out else None
        # FLUX.1 Depth / Canny: a control image's latents beside the latents (``control_latents``)
        self.control = inner == 2 * out
        if self.control and reference:
            raise ValueError("a control image's latents (FLUX.1 Depth / Canny) go without a reference image")

    def tokens(self, sample: torch.Tensor) -> torch.Tensor:
        """``sample`` packed into the transformer's input tokens. FLUX.1 Fill's ``sample`` is [latents C, mask M,
        masked image latents C] on channels (every sdrt inpainting denoiser's order, an SD inpainting UNet's): put
        in FluxFillPipeline's order, [latents, masked image latents, mask], before packing. Packing is per
        channel, so the packed concatenation is the concatenation of the packed parts, as that pipeline makes it:
        ``cat((latents, masked_image_latents, mask), dim=-1)`` of 64, 64 and 4M features."""
        if self.fill is not None:
            c, m = self.fill
            lat, mask, masked = torch.split(sample, [c, m, c], dim=1)
            sample = torch.cat([lat, masked, mask], dim=1)
        return pack(sample)

    def traceable(self) -> contextlib.AbstractContextManager[None]:
        return traceable(self.transformer)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None,
                reference_latents: torch.Tensor | None = None, control_latents: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.denoise(sample, timestep, encoder_hidden_states, pooled_projections, guidance, reference_latents,
                            control_latents=control_latents)

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor | None = None,
                reference_latents: torch.Tensor | None = None, control: dict[str, Any] | None = None,
                control_latents: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``forward``'s computation; ``control``: ControlNet samples as ``FluxTransformer2DModel.forward``'s
        keywords (``FluxTransformerControl``); ``control_latents``: FLUX.1 Depth / Canny's control image latents."""
        h, w = sample.shape[-2], sample.shape[-1]
        img_ids, txt_ids = position_ids(sample, encoder_hidden_states)
        t = self.transformer
        hidden = self.tokens(sample)
        generated = hidden.shape[1]
        if self.control:
            assert control_latents is not None
            hidden = with_control(hidden, control_latents)
        if self.reference:
            assert reference_latents is not None
            hidden, img_ids = with_reference(hidden, img_ids, reference_latents)

        def run() -> torch.Tensor:
            out = t(hidden_states=hidden, encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=pooled_projections, timestep=timestep / 1000,
                    guidance=guidance if self.guided else None, img_ids=img_ids, txt_ids=txt_ids,
                    return_dict=False, **(control or {}))[0]
            return out[:, :generated] if self.reference else out

        with self.traceable():
            if not self.block_cache:
                return unpack(run(), h, w)
            blocks = block_list(t, BLOCK_LISTS)
            out, deep, head = with_residuals(blocks[0], blocks[-1], run)
        if not self.reference:
            return unpack(out, h, w), on_grid(deep, h // PATCH, w // PATCH), on_grid(head, h // PATCH, w // PATCH)
        # the blocks saw the image's tokens and the reference's joined, and diffusers' hooks keep the residuals of the
        # whole sequence. The output layers work token by token and the pipeline keeps the image's tokens alone, so
        # the deep feature's reference part reaches no output: only the image's leaves the graph. The head
        # residual's reference part does count, in the threshold rule's mean (``FluxTransformerCached``).
        assert reference_latents is not None
        rh, rw = reference_latents.shape[-2] // PATCH, reference_latents.shape[-1] // PATCH
        return (unpack(out, h, w), on_grid(deep[:, :generated], h // PATCH, w // PATCH),
                on_grid(head[:, :generated], h // PATCH, w // PATCH), on_grid(head[:, generated:], rh, rw))


def with_reference(hidden: torch.Tensor, img_ids: torch.Tensor, reference: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """FluxKontextPipeline's sequence: the reference image's packed latents [1, C, H, W] (one image, broadcast over
    the batch) appended to the image tokens, and their position ids (``_prepare_latent_image_ids`` of the
    reference's patch grid with the first component 1) appended to the image's."""
    ref = pack(reference)
    ref = ref.expand(hidden.shape[0], ref.shape[1], ref.shape[2])
    ids = image_ids(reference.shape[-2], reference.shape[-1], img_ids)
    ids = torch.cat([torch.ones_like(ids[:, :1]), ids[:, 1:]], dim=1)
    return torch.cat([hidden, ref], dim=1), torch.cat([img_ids, ids], dim=0)


def with_control(hidden: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """FluxControlPipeline's transformer input: the image tokens and the control image's packed latents [1, C, h, w]
    (one image, broadcast over the batch) side by side on the feature axis, ``torch.cat([latents, control_image],
    dim=2)``."""
    ctl = pack(control)
    return torch.cat([hidden, ctl.expand(hidden.shape[0], ctl.shape[1], ctl.shape[2])], dim=2)


class FluxControlTransformer(FluxTransformer):
    """FLUX.1 Depth / Canny [dev]: ``FluxTransformer``'s inputs (with [dev]'s ``guidance``) and ``control_latents``
    [1, 16, h, w], the control image's latents at the latents' size (shifted and scaled as latents; one image for
    the whole batch), which every step reads beside the latents (``with_control``)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, guidance: torch.Tensor,
                control_latents: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return super().forward(sample, timestep, encoder_hidden_states, pooled_projections, guidance,
                               control_latents=control_latents)


class FluxTransformerCached(FluxTransformer):
    """First-block caching's cached step (diffusers' ``apply_first_block_cache``, after ParaAttention's First
    Block Cache): ``FluxTransformer``'s inputs, then ``deep_feature`` and ``head_residual`` as a full step's
    ``FluxTransformer(block_cache=True)`` returned them, then [dev]'s ``guidance`` (last, so that [schnell]'s
    positional inputs bind to the same names) -> ``out_sample`` as ``FluxTransformer2DModel.forward`` computes
    it under diffusers' hooks on a step they skip: the embeddings, ``transformer_blocks[0]``, every later block
    returning its input, so ``norm_out`` and ``proj_out`` over the first block's image tokens plus
    ``deep_feature``, unpacked; and ``change`` [1] float32, the relative mean absolute change of the first
    block's residual from ``head_residual`` (diffusers' rule: the rest run again where it exceeds the threshold).
    ``FluxKontextCached`` and ``FluxControlCached`` name the inputs of the editing and control models.

    diffusers' hooks also add the text tokens' residual (the last block's context output less the first
    block's) to the first block's context output on such a step; nothing after the blocks reads the context
    (``norm_out`` and ``proj_out`` take the image tokens alone), so it changes no output and is not carried.
    Only ``transformer_blocks[0]`` runs: a streamed export builds no other."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, deep_feature: torch.Tensor,
                head_residual: torch.Tensor, guidance: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cached(sample, timestep, encoder_hidden_states, pooled_projections, deep_feature, head_residual,
                           guidance)

    def cached(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
               pooled_projections: torch.Tensor, deep_feature: torch.Tensor, head_residual: torch.Tensor,
               guidance: torch.Tensor | None = None, reference_latents: torch.Tensor | None = None,
               head_residual_reference: torch.Tensor | None = None,
               control_latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s computation; with a reference (FLUX.1 Kontext) the first block runs on the image's and the
        reference's tokens joined, as in a full step, and ``change`` is taken over the joined sequence (the stored
        residual: ``head_residual`` then ``head_residual_reference``, in the sequence's order), as diffusers' hooks
        take it; ``control_latents`` (FLUX.1 Depth / Canny) join the image tokens on the feature axis, as in a full
        step."""
        t = self.transformer
        h, w = sample.shape[-2], sample.shape[-1]
        img_ids, txt_ids = position_ids(sample, encoder_hidden_states)
        # FluxTransformer2DModel.forward up to its blocks, on the inputs FluxTransformer gives it
        tokens = self.tokens(sample)
        generated = tokens.shape[1]
        if self.control:
            assert control_latents is not None
            tokens = with_control(tokens, control_latents)
        last = head_residual
        if self.reference:
            assert reference_latents is not None and head_residual_reference is not None
            tokens, img_ids = with_reference(tokens, img_ids, reference_latents)
            b, d = head_residual.shape[0], head_residual.shape[-1]
            last = torch.cat([head_residual.reshape(b, -1, d), head_residual_reference.reshape(b, -1, d)], dim=1)
        hidden = t.x_embedder(tokens)
        step, g = (timestep / 1000).to(hidden.dtype) * 1000, guidance if self.guided else None
        temb = (t.time_text_embed(step, pooled_projections) if g is None
                else t.time_text_embed(step, g.to(hidden.dtype) * 1000, pooled_projections))
        context = t.context_embedder(encoder_hidden_states)
        with self.traceable():
            rotary = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
            _, head = t.transformer_blocks[0](hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                              image_rotary_emb=rotary)
        change = relative_change(head - hidden, last)
        if self.reference:  # the output layers work token by token; the pipeline keeps the image's tokens alone
            head = head[:, :generated]
        out = t.proj_out(t.norm_out(head + deep_feature.reshape(head.shape), temb))
        return unpack(out, h, w), change


class FluxKontextCached(FluxTransformerCached):
    """FLUX.1 Kontext's cached step (build it with ``reference=True``): ``FluxTransformerCached``'s inputs with
    ``head_residual_reference`` [B, H/2, W/2, D] (what the first block added to the reference's tokens at the last
    full step) after ``head_residual``, then ``guidance`` and ``reference_latents`` [1, 16, H, W]."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, deep_feature: torch.Tensor,
                head_residual: torch.Tensor, head_residual_reference: torch.Tensor, guidance: torch.Tensor,
                reference_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cached(sample, timestep, encoder_hidden_states, pooled_projections, deep_feature, head_residual,
                           guidance, reference_latents=reference_latents,
                           head_residual_reference=head_residual_reference)


class FluxControlCached(FluxTransformerCached):
    """FLUX.1 Depth / Canny's cached step: ``FluxTransformerCached``'s inputs, then ``guidance`` and
    ``control_latents`` [1, 16, h, w] (``FluxControlTransformer``'s)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, deep_feature: torch.Tensor,
                head_residual: torch.Tensor, guidance: torch.Tensor, control_latents: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cached(sample, timestep, encoder_hidden_states, pooled_projections, deep_feature, head_residual,
                           guidance, control_latents=control_latents)


def controlled_samples(blocks: int, samples: int) -> list[int]:
    """The ControlNet samples a FLUX transformer's ``blocks`` blocks of one kind (double- or single-stream) read
    when given ``samples`` of them: block i adds sample ``i // ceil(blocks / samples)``, as
    ``FluxTransformer2DModel.forward`` indexes ``controlnet_block_samples`` and ``controlnet_single_block_samples``
    (``interval_control``). Sorted, each once; none without samples."""
    if samples == 0:
        return []
    interval = -(-blocks // samples)  # int(np.ceil(blocks / samples)) on integers
    return sorted({i // interval for i in range(blocks)})


class FluxControlNet(torch.nn.Module):
    """One FLUX.1 ControlNet (diffusers' ``FluxControlNetModel``): the transformer's inputs (``sample`` [B, 16, h, w],
    ``timestep``, ``encoder_hidden_states``, ``pooled_projections``, and ``guidance`` where the net embeds one),
    ``controlnet_cond`` [B, 16, h, w] (the control image's latents as the export's ``vae_encoder`` gives them:
    ``(mean - shift) * scaling``, as FluxControlNetPipeline shifts and scales them), for a Union net
    (``num_mode``) ``controlnet_mode`` int32 [B], and ``conditioning_scale`` float32 [B, R] -> ``block_k`` for each
    double-stream sample k the paired transformer reads (``used[0]``), then ``single_block_k`` for each
    single-stream one (``used[1]``), on the patch grid [B, h/2, w/2, D], each times its column of the scale.

    What FluxControlNetPipeline does around ``controlnet(...)`` is in the graph, as ``FluxTransformer`` does it:
    the latents and the control latents packed into 2x2 patches (``_pack_latents``), the image ids from h and w,
    zero text ids, ``timestep / 1000``, the mode as ``mode[:, None]``; the rotary embedding in float32."""

    def __init__(self, controlnet: torch.nn.Module, used: tuple[list[int], list[int]], torchscript: bool = True) -> None:
        super().__init__()
        cfg = controlnet.config
        if torchscript:  # as FluxTransformer: explicit RMS norms in a copy
            controlnet = explicit_rms_norms(copy.deepcopy(controlnet))
        self.controlnet = controlnet
        self.used = (list(used[0]), list(used[1]))
        self.guided = bool(cfg.guidance_embeds)
        self.union = cfg.get("num_mode") is not None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = list(rest)
        guidance = args.pop(0) if self.guided else None
        cond = args.pop(0)
        mode = args.pop(0).long()[:, None] if self.union else None
        (scale,) = args
        img_ids, txt_ids = position_ids(sample, encoder_hidden_states)
        with traceable(self.controlnet):
            double, single = self.controlnet(
                hidden_states=pack(sample), controlnet_cond=pack(cond), controlnet_mode=mode, conditioning_scale=1.0,
                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                timestep=timestep / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)
        h, w = sample.shape[-2] // PATCH, sample.shape[-1] // PATCH
        picked = [double[k] for k in self.used[0]] + [single[k] for k in self.used[1]]
        scale = scale.to(sample.dtype)
        return tuple(on_grid(s, h, w) * scale[:, i, None, None, None] for i, s in enumerate(picked))


class FluxTransformerControl(FluxTransformer):
    """``FluxTransformer`` with ControlNet samples: its inputs (``guidance`` included), then ``nets`` groups of the
    samples it reads (each group ``used[0]`` double-stream ones, then ``used[1]`` single-stream ones, [B, h/2, w/2,
    D] on the patch grid). The groups are summed here (diffusers' ``FluxMultiControlNetModel`` sums the nets'
    samples) and passed as ``controlnet_block_samples`` and ``controlnet_single_block_samples``, lists of
    ``counts`` entries (the ones no block reads are None; no list where a net gives none), so the transformer's own
    indexing picks them (``controlnet_blocks_repeat`` False: nets that read the control latents)."""

    def __init__(self, transformer: torch.nn.Module, nets: int, used: tuple[list[int], list[int]],
                 counts: tuple[int, int], torchscript: bool = True) -> None:
        super().__init__(transformer, torchscript=torchscript)
        self.nets, self.used, self.counts = nets, (list(used[0]), list(used[1])), counts

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,  # type: ignore[override]
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        args = list(rest)
        guidance = args.pop(0) if self.guided else None
        k = len(self.used[0]) + len(self.used[1])
        summed = list(args[:k])
        for j in range(1, self.nets):
            summed = [a + b for a, b in zip(summed, args[j * k:(j + 1) * k], strict=True)]
        lists: list[list[torch.Tensor | None] | None] = []
        for used, count, samples in ((self.used[0], self.counts[0], summed[:len(self.used[0])]),
                                     (self.used[1], self.counts[1], summed[len(self.used[0]):])):
            entries: list[torch.Tensor | None] = [None] * count
            for i, r in zip(used, samples, strict=True):
                entries[i] = r.reshape(r.shape[0], -1, r.shape[-1])
            lists.append(entries if count else None)
        out = self.denoise(sample, timestep, encoder_hidden_states, pooled_projections, guidance,
                           control={"controlnet_block_samples": lists[0],
                                    "controlnet_single_block_samples": lists[1]})
        assert isinstance(out, torch.Tensor)
        return out


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


class FluxVaeEncoderMasked(VaeEncoderMasked):
    """FLUX.1 Fill's masked image -> latents: ``image`` uint8 [B, H, W, 3] and ``mask`` uint8 [B, H, W, 1] (1 =
    repaint) -> ``latent`` [B, 16, H/8, W/8]. FluxFillPipeline encodes ``init_image * (1 - mask)`` (the image
    normalized to [-1, 1], the mask binarized) and shifts and scales the latents, ``(z - shift_factor) *
    scaling_factor``; the distribution's mean is taken (sdrt's encoders are deterministic)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__(vae)
        self.shift = float(vae.config.shift_factor or 0.0)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(image, mask) - self.shift * self.scale
