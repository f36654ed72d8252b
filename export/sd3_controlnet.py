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

A streamed transformer (over a billion parameters: every full-size SD 3 / 3.5 model) gets a streamed
``unet_control`` (``streamed_unet_control_spec``), gated on a reduced-depth copy as its plain graph is
(export/sd3_gate.py); the nets themselves are held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sdrt.runtime.errors import InputError

from .controlnet_loading import LoadedControlNet, family_words, with_article
from .onnx_export import ComponentSpec
from .sd3_specs import streamed_transformer_spec, transformer_spec
from .sd3_wrappers import Sd3ControlNet, Sd3TransformerControl, controlled_blocks
from .streamed import IoSpec, StreamedSpec, WeightSource
from .transformer_config import inner_width
from .transformer_controlnet import control_spec, net_spec

SD3_CONTROLNET_CLASS = "SD3ControlNetModel"
LABEL = "SD 3 / 3.5"


def check_sd3_pairing(preset_name: str, transformer: dict[str, Any], vae_channels: int,
                      nets: Sequence[LoadedControlNet]) -> None:
    """Each net must be an SD3 ControlNet of the transformer's width, patch, latent channels and pooled width (and
    text width, where it reads the text states), and all must give as many samples. Raises InputError naming both
    sides and the fix, before any export work."""
    if not nets:
        return
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
                f"{what} is {with_article(family_words(cn.controlnet.config))} ControlNet ({cls}), but the model "
                f"({preset_name}) is {LABEL}: a ControlNet works only with the model family it was trained "
                f"for; pass an {SD3_CONTROLNET_CLASS} made for this model (a diffusers folder, or Stability's SD 3.5 "
                "ControlNet single file)")
        c = cn.controlnet.config
        if int(c.get("extra_conditioning_channels") or 0):
            raise InputError(f"{what} takes {c['extra_conditioning_channels']} extra conditioning channels beside the "
                             "control latents (an inpainting ControlNet, as diffusers' "
                             "StableDiffusion3ControlNetInpaintingPipeline runs it); not supported yet: pass a "
                             "ControlNet of the control latents alone")
        diffs = []
        for label, key in (("width", None), ("patch size", "patch_size"), ("latent channels", "in_channels"),
                           ("pooled projection width", "pooled_projection_dim")):
            cv, tv = (inner_width(c), inner_width(transformer)) if key is None else (int(c[key]), int(transformer[key]))
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


def _patch_embed(config: dict[str, Any], weights: WeightSource) -> torch.nn.Module:
    """The transformer's position embedding, as ``SD3ControlNetModel._get_pos_embed_from_transformer`` copies it
    for a net without its own, from a streamed transformer's weights (one tensor at a time)."""
    from diffusers.models.embeddings import PatchEmbed

    pe = PatchEmbed(height=int(config["sample_size"]), width=int(config["sample_size"]),
                    patch_size=int(config["patch_size"]), in_channels=int(config["in_channels"]),
                    embed_dim=inner_width(config), pos_embed_max_size=config["pos_embed_max_size"])
    pe.load_state_dict({k: weights(f"pos_embed.{k}") for k in pe.state_dict()}, strict=True)
    return pe.float().eval()


def _base_example(config: dict[str, Any], tokens: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The transformer's example inputs at (b, h, w), as ``sd3_specs.transformer_spec`` makes them."""
    in_ch, joint, pooled = int(config["in_channels"]), int(config["joint_attention_dim"]), int(
        config["pooled_projection_dim"])

    def example(g: torch.Generator, b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, in_ch, h, w, generator=g), torch.rand(b, generator=g) * 1000,
                torch.randn(b, tokens, joint, generator=g), torch.randn(b, pooled, generator=g))

    return example


def residual_inputs(config: dict[str, Any], nets: int, used: Sequence[int]) -> IoSpec:
    """``unet_control``'s residual inputs after the transformer's: ``controlnet_{j}_block_{k}`` on the patch grid."""
    p = int(config["patch_size"])
    grid = ("batch", f"height/{p}", f"width/{p}", inner_width(config))
    return [(f"controlnet_{j}_block_{k}", "float", grid) for j in range(nets) for k in used]


def unet_control_spec(transformer: torch.nn.Module, tokens: int, nets: int, used: Sequence[int], residuals: int,
                      residual_example: Callable[..., tuple[torch.Tensor, ...]] | None = None) -> ComponentSpec:
    """The in-memory ``unet_control``: the transformer's inputs, then ``nets`` groups of the ``used`` samples.
    ``residual_example(g, b, h, w, base)``: the samples fed with the transformer's example ``base`` (default:
    random ones of unit scale)."""
    cfg = dict(transformer.config)
    module = Sd3TransformerControl(transformer, nets, list(used), residuals)
    return control_spec(module, transformer_spec(transformer, tokens), residual_inputs(cfg, nets, used),
                        int(cfg["patch_size"]), inner_width(cfg), residual_example)


def streamed_unet_control_spec(config: dict[str, Any], tokens: int, nets: int, used: Sequence[int],
                               residuals: int) -> StreamedSpec:
    """``unet_control`` traced on fake tensors for a streamed transformer (export/streamed.py): the streamed
    transformer's inputs and dynamic axes, then the samples (their sides left for export to infer from the
    sample's, as first-block caching's residual inputs)."""
    from diffusers import SD3Transformer2DModel

    base = streamed_transformer_spec(config, tokens)
    res = residual_inputs(config, nets, used)
    p, inner = int(config["patch_size"]), inner_width(config)

    def build() -> torch.nn.Module:
        return Sd3TransformerControl(SD3Transformer2DModel(**config), nets, list(used), residuals, dynamo=True)

    def example() -> tuple[torch.Tensor, ...]:
        args = base.example()
        b, h, w = args[0].shape[0], args[0].shape[2], args[0].shape[3]
        return (*args, *(torch.randn(b, h // p, w // p, inner) for _ in res))

    def dynamic() -> dict[str, Any]:
        dims = base.dynamic()
        auto = torch.export.Dim.AUTO
        # the wrapper takes the samples as *res: one entry of shapes for them all, in order
        dims["res"] = tuple({0: dims["sample"][0], 1: auto, 2: auto} for _ in res)
        return dims

    return StreamedSpec(name="unet_control", build=build, prefix="transformer.", inputs=[*base.inputs, *res],
                        outputs=[base.outputs[0]], example=example, dynamic=dynamic)


def sd3_controlnet_specs(config: dict[str, Any], vae: torch.nn.Module, nets: Sequence[LoadedControlNet], tokens: int,
                         transformer: torch.nn.Module | None = None, weights: WeightSource | None = None
                         ) -> list[ComponentSpec]:
    """``controlnet_j`` for each net, then, for a ``transformer`` held in memory, ``unet_control`` (its inputs,
    then every net's samples; a streamed transformer's is ``streamed_unet_control_spec``, its position embedding
    read from ``weights``). Empty without nets; ``check_sd3_pairing`` has passed."""
    if not nets:
        return []
    layers, inner = int(config["num_layers"]), inner_width(config)
    residuals = len(nets[0].controlnet.controlnet_blocks)
    used = controlled_blocks(layers, residuals)
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)
    lat = int(vae.config.latent_channels)
    p = int(config["patch_size"])
    grid = ("batch", f"height/{p}", f"width/{p}", inner)
    base_inputs = streamed_transformer_spec(config, tokens).inputs
    base_names = [n for n, _, _ in base_inputs]
    base_example = _base_example(config, tokens)
    specs, modules = [], []
    for j, cn in enumerate(nets):
        pos = None
        if getattr(cn.controlnet, "pos_embed", None) is None:  # Stability's SD 3.5 nets use the transformer's
            if transformer is not None:
                pos = cn.controlnet._get_pos_embed_from_transformer(transformer)
            else:
                assert weights is not None  # a streamed transformer's weights
                pos = _patch_embed(config, weights)
        module = Sd3ControlNet(cn.controlnet, used, shift, scale, pos)
        reads = ["sample", "timestep", *(["encoder_hidden_states"] if module.takes_text else []),
                 *(["pooled_projections"] if module.takes_pooled else [])]
        specs.append(net_spec(f"controlnet_{j}", module, cn.controlnet, base_inputs, base_example, reads, lat,
                              [f"block_{k}" for k in used], grid))
        modules.append(module)
    if transformer is None:
        return specs

    def residual_example(g: torch.Generator, b: int, h: int, w: int,
                         base: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Each net's samples on the transformer's example inputs at scale 1: what a trained net feeds the
        transformer (nonzero, of its real scale)."""
        named = dict(zip(base_names, base))
        res: list[torch.Tensor] = []
        for spec, module in zip(specs, modules):
            own = [named[n] for n, _, _ in spec.inputs[:-2]]
            with torch.no_grad():
                res += [t.float().clone() for t in module.float()(*own, torch.randn(b, lat, h, w, generator=g),
                                                                   torch.ones(b, len(used)))]
        return res

    return [*specs, unet_control_spec(transformer, tokens, len(nets), used, residuals, residual_example)]


def control_layout(config: dict[str, Any], nets: Sequence[LoadedControlNet]) -> tuple[list[int], int]:
    """(the samples the transformer reads, how many the nets give)."""
    residuals = len(nets[0].controlnet.controlnet_blocks)
    return controlled_blocks(int(config["num_layers"]), residuals), residuals
