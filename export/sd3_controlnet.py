"""SD 3 / 3.5 ControlNets in an SD3 export: the pairing check and the components ``controlnet_0`` .. and
``unet_control``, as diffusers' ``StableDiffusion3ControlNetPipeline`` runs an ``SD3ControlNetModel`` (or several:
``SD3MultiControlNetModel`` sums their samples).

An SD3 ControlNet is a few MMDiT blocks beside the transformer: it reads the transformer's inputs (the latents,
the timestep, the text states where it has a context stream, the pooled projections or zeros) and the control
image's VAE latents (``pos_embed_input``), and gives one sample per block (``controlnet_block_samples``); the
transformer's block i adds sample ``int(i / (layers / samples))`` to its image tokens (all blocks but the last).
Here each net returns only the samples the paired transformer reads (``block_k``, on the patch grid [B, h/2, w/2,
D], times its column of the scale table), and ``unet_control`` takes every net's (``controlnet_j_block_k``) after
the transformer's own inputs. The control image is encoded once per call by the export's ``vae_encoder``.

Not yet: a streamed transformer (over a billion parameters, SD3 Medium and larger at the default threshold) with
ControlNets; refused before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sdrt.runtime.errors import InputError

from .controlnet_loading import LoadedControlNet, family_words
from .onnx_export import ComponentSpec
from .sd3_wrappers import Sd3ControlNet, Sd3TransformerControl, controlled_blocks

SD3_CONTROLNET_CLASS = "SD3ControlNetModel"
LABEL = "SD 3 / 3.5"


def _inner(cfg: Any) -> int:
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def check_sd3_pairing(preset_name: str, transformer: dict[str, Any], vae_channels: int,
                      nets: Sequence[LoadedControlNet], streamed: bool) -> None:
    """Each net must be an SD3 ControlNet of the transformer's width, patch, latent channels and pooled width (and
    text width, where it reads the text states), and all must give as many samples. Raises InputError naming both
    sides and the fix, before any export work."""
    if not nets:
        return
    if streamed:
        raise InputError(f"ControlNets with a streamed transformer are not supported yet ({preset_name}'s transformer "
                         "is over a billion parameters, so it is streamed rather than held): export the model "
                         "without --controlnet")
    if int(transformer["in_channels"]) != vae_channels:
        raise InputError(f"the model's transformer takes {transformer['in_channels']} input channels (an inpainting "
                         "one); ControlNets with an inpainting model are not supported yet: export an ordinary "
                         "(16-channel) model with --controlnet, or the inpainting model without it")
    counts = []
    for j, cn in enumerate(nets):
        what = f"ControlNet {j + 1} ({cn.name})"
        cls = type(cn.controlnet).__name__
        if cls != SD3_CONTROLNET_CLASS:
            raise InputError(
                f"{what} is an {family_words(cn.controlnet.config)} ControlNet ({cls}), but the model ({preset_name}) "
                f"is {LABEL}: a ControlNet works only with the model family it was trained for; pass an "
                f"{SD3_CONTROLNET_CLASS} made for this model (a diffusers folder)")
        c = cn.controlnet.config
        diffs = []
        for label, key in (("width", None), ("patch size", "patch_size"), ("latent channels", "in_channels"),
                           ("pooled projection width", "pooled_projection_dim")):
            cv, tv = (_inner(c), _inner(transformer)) if key is None else (int(c[key]), int(transformer[key]))
            if cv != tv:
                diffs.append(f"{label} {cv} in the ControlNet, {tv} in the transformer")
        if c.get("joint_attention_dim") is not None and int(c["joint_attention_dim"]) != int(
                transformer["joint_attention_dim"]):
            diffs.append(f"text width {c['joint_attention_dim']} in the ControlNet, {transformer['joint_attention_dim']} "
                         "in the transformer")
        if diffs:
            raise InputError(f"{what} does not match the model's transformer ({preset_name}): {'; '.join(diffs)}. "
                             "Pass a ControlNet made for this model")
        counts.append(len(cn.controlnet.controlnet_blocks))
    if len(set(counts)) > 1:
        raise InputError(f"the ControlNets give {counts} block samples: several SD3 ControlNets are summed sample by "
                         "sample (diffusers' SD3MultiControlNetModel), so they must give as many; export them "
                         "separately")


def sd3_controlnet_specs(transformer: torch.nn.Module, vae: torch.nn.Module, nets: Sequence[LoadedControlNet],
                         unet_spec: ComponentSpec) -> list[ComponentSpec]:
    """``controlnet_j`` for each net, then ``unet_control`` (``unet_spec``'s inputs, then every net's samples).
    Empty without nets; ``check_sd3_pairing`` has passed."""
    if not nets:
        return []
    cfg = transformer.config
    layers, patch, inner = len(transformer.transformer_blocks), int(cfg.patch_size), _inner(cfg)
    residuals = len(nets[0].controlnet.controlnet_blocks)
    used = controlled_blocks(layers, residuals)
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
    lat = int(vae.config.latent_channels)
    grid = ("batch", f"height/{patch}", f"width/{patch}", inner)
    by_name = {n: (kind, shape) for n, kind, shape in unet_spec.inputs}
    specs, modules = [], []
    for j, cn in enumerate(nets):
        pos = None
        if getattr(cn.controlnet, "pos_embed", None) is None:  # Stability's SD 3.5 nets use the transformer's
            pos = cn.controlnet._get_pos_embed_from_transformer(transformer)
        module = Sd3ControlNet(cn.controlnet, used, shift, scale, pos)
        names = ["sample", "timestep", *(["encoder_hidden_states"] if module.takes_text else []),
                 *(["pooled_projections"] if module.takes_pooled else [])]

        def example(g: torch.Generator, b: int, h: int, w: int, names: list[str] = names) -> tuple[torch.Tensor, ...]:
            base = dict(zip([n for n, _, _ in unet_spec.inputs], unet_spec.example(g, b, h, w)))
            # distinct per row and sample, so a column or row mix-up shows
            return (*(base[n] for n in names), torch.randn(b, lat, h, w, generator=g),
                    0.25 + 1.5 * torch.rand(b, len(used), generator=g))

        specs.append(ComponentSpec(
            name=f"controlnet_{j}",
            module=module,
            weights=cn.controlnet,
            inputs=[*((n, *by_name[n]) for n in names), ("controlnet_cond", "float", ("batch", lat, "height", "width")),
                    ("conditioning_scale", "float32", ("batch", len(used)))],
            outputs=[(f"block_{k}", "float", grid) for k in used],
            example=example,
        ))
        modules.append(module)

    def residual_example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """The transformer's example, then each net's samples on those inputs at scale 1: what a trained net feeds
        the transformer (nonzero, of its real scale)."""
        base = unet_spec.example(g, b, h, w)
        named = dict(zip([n for n, _, _ in unet_spec.inputs], base))
        res: list[torch.Tensor] = []
        for spec, module in zip(specs, modules):
            own = [named[n] for n, _, _ in spec.inputs[:-2]]
            with torch.no_grad():
                res += [t.float().clone() for t in module.float()(*own, torch.randn(b, lat, h, w, generator=g),
                                                                   torch.ones(b, len(used)))]
        return (*base, *res)

    specs.append(ComponentSpec(
        name="unet_control",
        module=Sd3TransformerControl(transformer, len(nets), used, residuals),
        weights=transformer,
        inputs=[*unet_spec.inputs, *((f"controlnet_{j}_block_{k}", "float", grid) for j in range(len(nets))
                                     for k in used)],
        outputs=[unet_spec.outputs[0]],  # the prediction (first-block caching's residuals are not the loop's here)
        example=residual_example,
    ))
    return specs
