"""The exact computation each exported graph performs, as small torch modules.

Each wrapper fixes the graph's contract: names, dtypes, and the pre/post-processing that moves into the
graph so the runtime does no array work on the host (int32 ids in; display-ready uint8 pixels out).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def clip_ids_example(vocab: int, tokens: int = 77, mask: bool = False
                     ) -> Callable[[torch.Generator, int, int, int], tuple[torch.Tensor, ...]]:
    """Example ``input_ids`` for tracing and gating a CLIP text encoder of ``vocab`` tokens: bos, random ids,
    then eos repeated as padding (CLIP's framing), as a ComponentSpec ``example``. ``mask``: an
    ``attention_mask`` too, int32, 1 but for a few words hidden (3 to 5, as compel hides a downweighted
    fragment), so the gate checks the mask's effect and not only an all-ones mask."""

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab - 2, (b, tokens), generator=g, dtype=torch.int32)
        ids[:, 0] = vocab - 2  # bos
        ids[:, 10:] = vocab - 1  # eos, then padding with eos
        if not mask:
            return (ids,)
        hidden = torch.ones(b, tokens, dtype=torch.int32)
        hidden[:, 3:6] = 0
        return ids, hidden

    return example


class TextEncoder(torch.nn.Module):
    """``input_ids`` int32 [B, 77] (+ ``attention_mask`` int32 [B, 77]) -> ``hidden_states`` [B, 77, D] (+
    ``text_embeds`` [B, P]).

    ``attention_mask`` (0: no token attends to this one) is transformers' CLIPTextModel's own: it is joined to
    the causal mask (a token attends to the ones before it that the mask keeps), so all ones is the graph
    without a mask. compel's default downweighting hides a fragment's tokens with it (runtime/compel_prompts.py).

    SD 1.x/2.x condition on the last hidden state (after the final layer norm), SDXL on the
    penultimate hidden state of both encoders and on the projected pooled embedding of the second.
    ``clip_skip`` N > 0 (diffusers' ``clip_skip``; A1111's "Clip skip" N + 1) takes the hidden state N
    layers earlier: SD 1.x/2.x then apply the final layer norm to it, SDXL does not (as diffusers).
    """

    def __init__(self, encoder: torch.nn.Module, penultimate: bool, pooled: bool, clip_skip: int = 0) -> None:
        super().__init__()
        # The TorchScript exporter's SDPA symbolic builds an fp32 causal mask and promotes fp16
        # attention to fp32 (an invalid graph). Eager CLIP attention exports cleanly and computes its
        # softmax in fp32, which fp16 needs anyway.
        if hasattr(encoder, "set_attn_implementation"):
            encoder.set_attn_implementation("eager")
        self.encoder = encoder
        self.penultimate = penultimate
        self.pooled = pooled
        self.clip_skip = clip_skip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        deep = self.penultimate or self.clip_skip > 0
        out = self.encoder(input_ids.long(), attention_mask=attention_mask, output_hidden_states=deep,
                           return_dict=True)
        if self.penultimate:
            hidden = out.hidden_states[-(self.clip_skip + 2)]
        elif self.clip_skip:
            norm = getattr(self.encoder, "text_model", self.encoder).final_layer_norm  # transformers 4 or 5
            hidden = norm(out.hidden_states[-(self.clip_skip + 1)])
        else:
            hidden = out.last_hidden_state
        if self.pooled:  # the projection's output; a CLIP without one (FLUX.1's) gives its pooled output
            return hidden, out.text_embeds if "text_embeds" in out else out.pooler_output
        return (hidden,)


class UNet(torch.nn.Module):
    """Noise (or v) prediction. ``timestep`` stays float32 in fp16 graphs: its sinusoidal embedding is
    computed before the cast, as diffusers does. Extra inputs, in order: SDXL's ``text_embeds`` and
    ``time_ids``; an LCM-distilled UNet's ``timestep_cond`` (its guidance-scale embedding)."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool, time_cond: bool = False, deep_feature: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl
        self.time_cond = time_cond
        self.deep_feature = deep_feature

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._run(sample, timestep, encoder_hidden_states, **self._conditioning(extra))

    def _run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """diffusers' forward with ``kwargs``; with ``deep_feature``, DeepCache's deep feature too."""
        if not self.deep_feature:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
        # DeepCache's deep feature: what the last layer of the last up block reads beside the skip from conv_in
        seen: list[torch.Tensor] = []
        hook = self.unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            out = self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]
        finally:
            hook.remove()
        joined = seen[-1]
        return out, joined[:, : joined.shape[1] - self.unet.conv_in.out_channels]

    def _conditioning(self, extra: tuple[torch.Tensor, ...]) -> dict[str, object]:
        """The extra inputs as diffusers' keyword arguments."""
        kwargs: dict[str, object] = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
            extra = extra[2:]
        if self.time_cond:
            kwargs["timestep_cond"] = extra[0]
        return kwargs


class UNetShallow(UNet):
    """DeepCache's shallow path: the plain UNet's inputs, then ``deep_feature`` (the full UNet's second output at
    the last full step) -> the noise (or v) prediction, as diffusers' ``UNet2DConditionModel.forward`` computes it
    when every block but the last layer of the last up block returns what it returned at that step: the time
    (and added) embedding, ``conv_in``, that layer over [deep_feature, conv_in's output], then ``conv_out``.

    ``nets`` > 0 (an export with ControlNets): then ``nets`` groups of the residuals of the skips this path reads
    (``SKIPS``: the first of each net's down residuals, the one diffusers adds to ``conv_in``'s output), summed as
    ``UNetControl`` sums them and added to that skip as diffusers adds ``down_block_additional_residuals``. The
    deep feature already holds what the residuals of the deeper skips did at the last full step."""

    SKIPS = 1  # the UNet's skip samples the shallow path reads: conv_in's (the first down residual)

    def __init__(self, unet: torch.nn.Module, sdxl: bool, time_cond: bool = False, nets: int = 0) -> None:
        super().__init__(unet, sdxl, time_cond)
        self.nets = nets
        cfg = unet.config
        if unet.class_embedding is not None or cfg.addition_embed_type in ("image_hint", "text", "text_image"):
            raise ValueError("DeepCache's shallow path is exported for UNets without class, image-hint or text "
                             "embeddings")

    @staticmethod
    def reads_text(unet: torch.nn.Module) -> bool:
        """Whether the shallow path reads ``encoder_hidden_states`` (the last up block cross-attends: SD 1.x/2.x;
        SDXL's does not, and its graph then has no such input)."""
        return bool(getattr(unet.up_blocks[-1], "attentions", None))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        encoder_hidden_states, rest = (extra[0], extra[1:]) if self.reads_text(self.unet) else (None, extra)
        res = rest[len(rest) - self.nets * self.SKIPS:]
        *cond, deep = rest[: len(rest) - self.nets * self.SKIPS]
        u, kwargs = self.unet, self._conditioning(tuple(cond))
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), kwargs.get("timestep_cond"))
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=kwargs.get("added_cond_kwargs"))
        emb = emb + aug if aug is not None else emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        states = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                 added_cond_kwargs=kwargs.get("added_cond_kwargs"))
        up = u.up_blocks[-1]
        skip = u.conv_in(sample)
        if self.nets:  # the nets' residuals summed first, then added to the skip: UNetControl's order, diffusers'
            summed = res[0]
            for r in res[1:]:
                summed = summed + r
            skip = skip + summed
        x = up.resnets[-1](torch.cat([deep, skip], dim=1), emb)
        if getattr(up, "attentions", None):
            x = up.attentions[-1](x, encoder_hidden_states=states, return_dict=False)[0]
        if u.conv_norm_out:
            x = u.conv_act(u.conv_norm_out(x))
        return u.conv_out(x)


class VaeDecoder(torch.nn.Module):
    """``latent_sample`` [B, 4, h, w] -> ``images`` uint8 [B, 8h, 8w, 3] and ``finite`` bool [B].

    The latent scaling and diffusers' postprocessing ((x / 2 + 0.5).clamp(0, 1) * 255, rounded) run
    inside the graph, in float32. ``finite`` is False for an image whose decoded values held NaN or inf
    (an fp16 overflow), which the uint8 cast would otherwise hide.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latent_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.vae.decode(latent_sample / self.scale, return_dict=False)[0].float()
        finite = torch.isfinite(image).flatten(1).all(dim=1)
        image = torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=-1.0)
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).round()
        # uint8 only at the graph's edge: TensorRT's ONNX parser takes uint8 on graph inputs and outputs alone
        return image.permute(0, 2, 3, 1).to(torch.uint8), finite


class VaeEncoder(torch.nn.Module):
    """``image`` uint8 [B, H, W, 3] -> ``latent`` [B, 4, H/8, W/8]: the scaled mean of the latent
    distribution (img2img starts from it; sdrt's img2img is deterministic)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        x = image.float().permute(0, 3, 1, 2) / 255.0  # cast first: TensorRT takes uint8 only at the graph's edge
        x = (2.0 * x - 1.0).to(dtype)
        return self.vae.encode(x, return_dict=False)[0].mean * self.scale


class VaeEncoderMasked(torch.nn.Module):
    """``image`` uint8 [B, H, W, 3] and ``mask`` uint8 [B, H, W, 1] (1 = repaint) -> ``latent`` of the
    masked image, for a 9-channel inpainting UNet.

    diffusers zeroes the repainted pixels after normalization to [-1, 1] (mid-gray 127.5, which no uint8
    pixel is), so the masking happens here, in float32, on the normalized image.
    """

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        x = 2.0 * (image.float().permute(0, 3, 1, 2) / 255.0) - 1.0
        x = x * (mask.float().permute(0, 3, 1, 2) < 0.5).float()
        return self.vae.encode(x.to(dtype), return_dict=False)[0].mean * self.scale


class ControlNet(torch.nn.Module):
    """One ControlNet: ``sample``, ``timestep`` (float32), ``encoder_hidden_states``, ``controlnet_cond`` uint8
    [B, H, W, 3] pixels, ``conditioning_scale`` float32 [B, R] (+ SDXL ``text_embeds``, ``time_ids``) ->
    ``down_0`` .. ``down_{R-2}``, ``mid``: the residuals, each multiplied by its column of the scale table.

    The pixels become float [0, 1] NCHW here, as diffusers' control image processor gives them
    (``do_normalize=False``). One scale per batch row and residual expresses per-net scales, guidance
    windows (0 outside) and guess mode (the runtime fills the table) without graph variants. A net with
    ``global_pool_conditions`` (shuffle) mean-pools its residuals inside diffusers' forward, so its outputs
    are [B, C, 1, 1] and broadcast in the UNet's sum.
    """

    def __init__(self, controlnet: torch.nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = sdxl

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
        *extra: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cond = (controlnet_cond.float().permute(0, 3, 1, 2) / 255.0).to(sample.dtype)
        kwargs: dict[str, object] = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, cond, conditioning_scale=1.0,
                                    return_dict=False, **kwargs)
        scale = conditioning_scale.to(sample.dtype)
        outs = [r * scale[:, i, None, None, None] for i, r in enumerate((*down, mid))]
        return tuple(outs)


class ControlNetShallow(torch.nn.Module):
    """The first residual of one ControlNet, alone: ``sample``, ``controlnet_cond`` uint8 [B, H, W, 3] pixels and
    ``conditioning_scale`` float32 [B, R] (``ControlNet``'s inputs of those names) -> ``down_0``, its column 0 of
    the scale table times what diffusers' ``ControlNetModel.forward`` gives first:
    ``controlnet_down_blocks[0](conv_in(sample) + controlnet_cond_embedding(cond))`` (mean-pooled for a net with
    ``global_pool_conditions``). Neither the timestep nor the text (nor SDXL's added embeddings, which enter the time
    embedding) reach it, so DeepCache's cheap steps, whose shallow path reads only that residual, run this graph
    instead of the whole net. Guess mode is a column of the table the runtime fills, as for ``ControlNet``."""

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__()
        cfg = controlnet.config
        if cfg.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
            raise ValueError(f"unknown controlnet_conditioning_channel_order "
                             f"{cfg.controlnet_conditioning_channel_order!r}")
        self.controlnet = controlnet
        self.bgr = cfg.get("controlnet_conditioning_channel_order", "rgb") == "bgr"
        self.pooled = bool(cfg.get("global_pool_conditions", False))

    @staticmethod
    def applies(controlnet: torch.nn.Module) -> bool:
        """Whether the net's first residual is the formula above (diffusers' ``ControlNetModel``; a Union net mixes
        its conditions first)."""
        from diffusers import ControlNetModel

        return type(controlnet) is ControlNetModel

    def forward(self, sample: torch.Tensor, controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor
                ) -> torch.Tensor:
        cn = self.controlnet
        cond = (controlnet_cond.float().permute(0, 3, 1, 2) / 255.0).to(sample.dtype)
        if self.bgr:
            cond = torch.flip(cond, dims=[1])
        x = cn.controlnet_down_blocks[0](cn.conv_in(sample) + cn.controlnet_cond_embedding(cond))
        if self.pooled:
            x = torch.mean(x, dim=(2, 3), keepdim=True)
        return x * conditioning_scale.to(sample.dtype)[:, 0, None, None, None]


class UNetControl(UNet):
    """The UNet with ControlNet residuals: the plain UNet's inputs, then ``nets`` groups of ``residuals``
    tensors (each net's ``down_*`` then ``mid``). The groups are summed here, so several ControlNets cost
    the host nothing, and passed as diffusers' ``down_block_additional_residuals`` /
    ``mid_block_additional_residual``. ``deep_feature``: DeepCache's deep feature too, as ``UNet``'s (it then holds
    what the residuals did, which the shallow path's cheap steps reuse)."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool, time_cond: bool, nets: int, residuals: int,
                 deep_feature: bool = False) -> None:
        super().__init__(unet, sdxl, time_cond, deep_feature)
        self.base = 2 * sdxl + int(time_cond)
        self.nets = nets
        self.residuals = residuals

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *extra: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        base, res = extra[: self.base], extra[self.base:]
        summed = list(res[: self.residuals])
        for j in range(1, self.nets):
            group = res[j * self.residuals: (j + 1) * self.residuals]
            summed = [a + b for a, b in zip(summed, group)]
        return self._run(sample, timestep, encoder_hidden_states, down_block_additional_residuals=tuple(summed[:-1]),
                         mid_block_additional_residual=summed[-1], **self._conditioning(base))
