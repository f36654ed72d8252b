"""The ControlNet components of an export: ``controlnet_0`` .. ``controlnet_{n-1}`` and ``unet_control`` (with
DeepCache, ``controlnet_j_shallow`` too: net j's first residual alone, which the cheap steps run).

Residual shapes: the UNet encoder gives, per down block, ``layers_per_block`` outputs at the block's
resolution and, except the last block, one more after its stride-2 downsampler (ceil(h / 2), which is
what a stride-2, padding-1 3x3 convolution gives), and the first is ``conv_in``'s. Their spatial axes are
named ``height`` / ``width`` at full latent size and ``height/2``, ``height/4``, ... below it
(ceil of the latent size over the factor), so build profiles can derive them.

Neither component carries a refit map: a refit from a checkpoint or LoRA knows only the plain UNet and
text encoders, and refitting the plain UNet alone would leave ``unet_control`` behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.feature_cache import shallow_controlnet

from . import wrappers
from .controlnet_loading import LoadedControlNet
from .loading import LoadedModel
from .onnx_export import ComponentSpec

Axes = tuple[int | str, ...]
TEXT_LEN = 77  # CLIP's tokens per chunk, as the plain UNet's example


def _axis(name: str, factor: int) -> str:
    return name if factor == 1 else f"{name}/{factor}"


def residual_shapes(controlnet: torch.nn.Module) -> list[tuple[str, Axes]]:
    """(output name, shape) of each residual a ControlNet gives, in order: ``down_0`` .. and ``mid``."""
    cfg = controlnet.config
    widths = list(cfg.block_out_channels)
    pooled = bool(cfg.get("global_pool_conditions", False))

    def shape(ch: int, factor: int) -> Axes:
        if pooled:  # mean-pooled over the spatial axes (shuffle nets)
            return ("batch", ch, 1, 1)
        return ("batch", ch, _axis("height", factor), _axis("width", factor))

    out: list[Axes] = [shape(widths[0], 1)]  # conv_in
    factor = 1
    for i, ch in enumerate(widths):
        out += [shape(ch, factor)] * int(cfg.layers_per_block)
        if i < len(widths) - 1:
            factor *= 2
            out.append(shape(ch, factor))
    n = len(controlnet.controlnet_down_blocks)
    if len(out) != n:
        raise InputError(f"the ControlNet has {n} down residuals, where its config implies {len(out)}; "
                         "its architecture is not one sdrt exports")
    names = [f"down_{i}" for i in range(n)] + ["mid"]
    return list(zip(names, [*out, shape(widths[-1], factor)]))



def controlnet_spec(name: str, controlnet: torch.nn.Module, *, sdxl: bool, pooled: int, vae_scale_factor: int = 8
                    ) -> ComponentSpec:
    """One ControlNet component (wrappers.ControlNet), on its own: ``pooled`` is the SDXL pooled text width."""
    cfg = controlnet.config
    cross, lat, f = int(cfg.cross_attention_dim), int(cfg.in_channels), vae_scale_factor
    res = residual_shapes(controlnet)
    r = len(res)
    inputs: list[tuple[str, str, Axes]] = [
        ("sample", "float", ("batch", lat, "height", "width")),
        ("timestep", "float32", ("batch",)),
        ("encoder_hidden_states", "float", ("batch", "sequence", cross)),
        ("controlnet_cond", "uint8", ("batch", "image_height", "image_width", 3)),
        ("conditioning_scale", "float32", ("batch", r)),
    ]
    if sdxl:
        inputs += [("text_embeds", "float", ("batch", pooled)), ("time_ids", "float", ("batch", 6))]

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        args = [
            torch.randn(b, lat, h, w, generator=g),
            torch.rand(b, generator=g) * 999,
            torch.randn(b, TEXT_LEN, cross, generator=g),
            torch.randint(0, 256, (b, h * f, w * f, 3), generator=g, dtype=torch.uint8),
            # distinct per row and residual, so a column or row mix-up shows
            0.25 + 1.5 * torch.rand(b, r, generator=g),
        ]
        if sdxl:
            args += [torch.randn(b, pooled, generator=g), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * b)]
        return tuple(args)

    return ComponentSpec(
        name=name,
        module=wrappers.ControlNet(controlnet, sdxl=sdxl),
        weights=controlnet,
        inputs=inputs,
        outputs=[(n, "float", s) for n, s in res],
        example=example,
    )


def controlnet_specs(model: LoadedModel, nets: Sequence[LoadedControlNet], unet_spec: ComponentSpec,
                     deep_feature: bool = False) -> list[ComponentSpec]:
    """``controlnet_j`` for each net, then ``unet_control`` (its inputs: ``unet_spec``'s, then the nets'
    residuals; its outputs ``unet_spec``'s: with ``deep_feature``, DeepCache's deep feature too). Empty without
    nets."""
    if not nets:
        return []
    sdxl = model.preset.model_family.pooled  # the added text-time conditioning (pooled embedding, time ids)
    pooled = int(model.text_encoders[-1].config.projection_dim)
    cond_dim = int(model.unet.config.get("time_cond_proj_dim") or 0)
    lat = int(model.unet.config.in_channels)
    f = 2 ** (len(model.vae.config.block_out_channels) - 1)
    specs = [controlnet_spec(f"controlnet_{j}", cn.controlnet, sdxl=sdxl, pooled=pooled, vae_scale_factor=f)
             for j, cn in enumerate(nets)]
    modules = [spec.module for spec in specs]

    shapes = [residual_shapes(cn.controlnet) for cn in nets]
    r = len(shapes[0])
    if any(len(s) != r for s in shapes):
        raise InputError("the ControlNets give different numbers of residuals; they must all copy the same UNet")
    res_inputs = [(f"controlnet_{j}_{n}", "float", s) for j, sh in enumerate(shapes) for n, s in sh]

    def residual_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """The plain UNet's example, then each net's residuals on those inputs: what a trained ControlNet
        feeds the UNet (nonzero, of its real scale), scale 1."""
        base = unet_spec.example(g, b, h, w)
        res: list[torch.Tensor] = []
        for spec, module in zip(specs, modules):
            ex = spec.example(g, b, h, w)
            args = (base[0][:, :lat], base[1], base[2], ex[3], torch.ones(b, r), *(base[3:5] if sdxl else ()))
            with torch.no_grad():
                res += [t.float().clone() for t in module.float()(*args)]
        return (*base, *res)

    specs.append(ComponentSpec(
        name="unet_control",
        module=wrappers.UNetControl(model.unet, sdxl=sdxl, time_cond=bool(cond_dim), nets=len(nets), residuals=r,
                                    deep_feature=deep_feature),
        weights=model.unet,
        inputs=[*unet_spec.inputs, *res_inputs],
        outputs=list(unet_spec.outputs),
        example=residual_example,
    ))
    if deep_feature:  # DeepCache's cheap steps read only each net's first residual: a small graph of it per net
        specs += [controlnet_shallow_spec(shallow_controlnet(spec.name), spec)
                  for spec, cn in zip(specs, nets) if wrappers.ControlNetShallow.applies(cn.controlnet)]
    return specs


def controlnet_shallow_spec(name: str, net_spec: ComponentSpec) -> ComponentSpec:
    """``controlnet_j_shallow`` beside ``controlnet_j`` (``net_spec``): its first residual ``down_0`` alone
    (wrappers.ControlNetShallow), from the inputs of the same names; its own small weights file (the stem, the
    conditioning embedding and one 1x1 convolution)."""
    keep = ("sample", "controlnet_cond", "conditioning_scale")
    idx = [i for i, (n, _, _) in enumerate(net_spec.inputs) if n in keep]

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        args = net_spec.example(g, b, h, w)
        return tuple(args[i] for i in idx)

    return ComponentSpec(
        name=name,
        module=wrappers.ControlNetShallow(net_spec.weights),
        weights=net_spec.weights,
        inputs=[net_spec.inputs[i] for i in idx],
        outputs=[net_spec.outputs[0]],
        example=example,
    )
