"""FLUX.1 ControlNets in a FLUX export: the pairing check and the components ``controlnet_0`` .. and
``unet_control``, as diffusers' ``FluxControlNetPipeline`` runs a ``FluxControlNetModel`` (or several:
``FluxMultiControlNetModel`` sums their samples).

A FLUX ControlNet is a few double- and single-stream blocks beside the transformer: it reads the transformer's
inputs (the packed latents, the timestep, [dev]'s guidance where the net embeds it, the pooled projections, the
text states, the position ids) and the control image's packed VAE latents, and gives one sample per block of each
kind; the transformer's block i of a kind adds sample ``i // ceil(blocks / samples)`` of that kind
(``flux_wrappers.controlled_samples``). InstantX's Union nets (``num_mode``) also take a control mode, whose
embedding joins the text tokens. Here each net returns only the samples the paired transformer reads (``block_k``,
``single_block_k``, on the patch grid [B, h/2, w/2, D], times its column of the scale table), and ``unet_control``
takes every net's (``controlnet_j_block_k``, ``controlnet_j_single_block_k``) after the transformer's own inputs.
The control image is encoded once per call by the export's ``vae_encoder`` (which shifts and scales the latents as
the pipeline does); the graphs pack them, as the transformer's packs the latents.

A streamed transformer (over a billion parameters: every full-size FLUX.1 model) gets a streamed ``unet_control``
(``streamed_unet_control_spec``), gated on a reduced-depth copy as its plain graph is (export/flux_export.py's
``gate_streamed``); the nets themselves are held in memory.

With LoRA slots (``--lora-slots``), ``unet_control`` takes the transformer's slots under the same input names, in
memory and streamed (export/lora_slots.py), so a call's LoRAs reach it as they reach ``unet``; the nets get none,
as diffusers' ``FluxControlNetPipeline.load_lora_weights`` adapts the transformer and CLIP, not the ControlNet.

Not yet: nets that read the control image as pixels through an embedding of their own
(``conditioning_embedding_channels``, whose samples diffusers repeats over the blocks), FLUX.1 Fill and Kontext
and first-block caching beside ControlNets: each is refused before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sdrt.runtime.errors import InputError

from .controlnet_loading import LoadedControlNet, family_words, with_article
from .flux_presets import fills
from .flux_specs import denoiser_example, denoiser_io, streamed_transformer_spec, transformer_spec
from .flux_wrappers import PATCH, FluxControlNet, FluxTransformerControl, controlled_samples
from .onnx_export import ComponentSpec
from .streamed import IoSpec, StreamedSpec
from .transformer_config import inner_width
from .transformer_controlnet import control_spec, net_spec

FLUX_CONTROLNET_CLASS = "FluxControlNetModel"
LABEL = "FLUX.1"
MODE = "controlnet_mode"  # a Union net's mode input (int32 [B]); its range is recorded in sdrt.json


def _listed(v: Any) -> Any:
    """A config value with tuples as lists (a loaded config and a preset's may differ in which they hold)."""
    return list(v) if isinstance(v, (list, tuple)) else v


def sample_counts(net: torch.nn.Module) -> tuple[int, int]:
    """(double-stream, single-stream) samples a net gives."""
    return len(net.controlnet_blocks), len(net.controlnet_single_blocks)


def check_flux_pairing(preset_name: str, transformer: dict[str, Any], nets: Sequence[LoadedControlNet], *,
                       kontext: bool = False, block_cache: bool = False) -> None:
    """Each net must be a FLUX ControlNet reading the control image's latents, of the transformer's width, packed
    channels, text and pooled widths and rotary axes, embedding a guidance scale only where the transformer takes
    one ([dev]); all must give as many samples of each kind. What the export does not cover beside nets (see the
    module docstring) is refused too. Raises InputError naming both sides and the fix, before any export work."""
    if not nets:
        return
    ordinary = "export an ordinary FLUX.1 model with --controlnet, or the {} model without it"
    for what, on, fix in (
            ("an inpainting transformer (FLUX.1 Fill)", fills(transformer), ordinary.format("Fill")),
            ("an editing transformer (FLUX.1 Kontext)", kontext, ordinary.format("Kontext")),
            ("first-block caching (--feature-cache)", block_cache, "export with one of them")):
        if on:
            raise InputError(f"FLUX.1 ControlNets with {what} are not supported yet ({preset_name}): {fix}")
    counts = []
    for j, cn in enumerate(nets):
        what = f"ControlNet {j + 1} ({cn.name})"
        cls = type(cn.controlnet).__name__
        if cls != FLUX_CONTROLNET_CLASS:
            raise InputError(
                f"{what} is {with_article(family_words(cn.controlnet.config))} ControlNet ({cls}), but the model "
                f"({preset_name}) is {LABEL}: a ControlNet works only with the model family it was trained "
                f"for; pass a {FLUX_CONTROLNET_CLASS} made for this model (a diffusers folder)")
        c = cn.controlnet.config
        if c.get("conditioning_embedding_channels") is not None:
            raise InputError(f"{what} reads the control image as pixels through an embedding of its own "
                             "(conditioning_embedding_channels), which sdrt does not export yet: pass a FLUX "
                             "ControlNet that reads the control image's VAE latents (InstantX's and Shakker-Labs' do)")
        diffs = []
        for label, key in (("width", None), ("packed input channels", "in_channels"),
                           ("text width", "joint_attention_dim"), ("pooled projection width", "pooled_projection_dim"),
                           ("rotary axes", "axes_dims_rope")):
            cv, tv = (inner_width(c), inner_width(transformer)) if key is None else (c[key], transformer[key])
            if _listed(cv) != _listed(tv):
                diffs.append(f"{label} {cv} in the ControlNet, {tv} in the transformer")
        if c.get("guidance_embeds") and not transformer.get("guidance_embeds"):
            diffs.append("the ControlNet embeds a guidance scale ([dev]'s), the transformer takes none ([schnell])")
        if diffs:
            raise InputError(f"{what} does not match the model's transformer ({preset_name}): {'; '.join(diffs)}. "
                             "Pass a ControlNet made for this model")
        counts.append(sample_counts(cn.controlnet))
    if len(set(counts)) > 1:
        raise InputError(f"the ControlNets give {counts} (double, single) block samples: several FLUX ControlNets are "
                         "summed sample by sample (diffusers' FluxMultiControlNetModel), so they must give as many; "
                         "export them separately")


def control_layout(config: dict[str, Any], nets: Sequence[LoadedControlNet]) -> tuple[
        tuple[list[int], list[int]], tuple[int, int]]:
    """(the samples of each kind the transformer reads, how many of each the nets give)."""
    counts = sample_counts(nets[0].controlnet)
    used = (controlled_samples(int(config["num_layers"]), counts[0]),
            controlled_samples(int(config["num_single_layers"]), counts[1]))
    return used, counts


def sample_names(used: tuple[list[int], list[int]]) -> list[str]:
    """A net's outputs, in order: ``block_k`` (double-stream samples), then ``single_block_k``."""
    return [f"block_{k}" for k in used[0]] + [f"single_block_{k}" for k in used[1]]


def _grid(config: dict[str, Any]) -> tuple[int | str, ...]:
    return ("batch", f"height/{PATCH}", f"width/{PATCH}", inner_width(config))


def residual_inputs(config: dict[str, Any], nets: int, used: tuple[list[int], list[int]]) -> IoSpec:
    """``unet_control``'s sample inputs after the transformer's: ``controlnet_{j}_block_{k}`` and
    ``controlnet_{j}_single_block_{k}`` on the patch grid, net after net."""
    return [(f"controlnet_{j}_{n}", "float", _grid(config)) for j in range(nets) for n in sample_names(used)]


def flux_controlnet_specs(config: dict[str, Any], nets: Sequence[LoadedControlNet], tokens: int,
                          transformer: torch.nn.Module | None = None) -> list[ComponentSpec]:
    """``controlnet_j`` for each net (held in memory), then, for a ``transformer`` held in memory, ``unet_control``
    (its inputs, then every net's samples; a streamed transformer's is ``streamed_unet_control_spec``). Empty
    without nets; ``check_flux_pairing`` has passed."""
    if not nets:
        return []
    used, counts = control_layout(config, nets)
    base_inputs, _ = denoiser_io(config)
    base_example = denoiser_example(config, tokens)  # guidance: a net embeds it only on [dev]
    lat = int(config["in_channels"]) // PATCH**2
    specs = []
    for j, cn in enumerate(nets):
        module = FluxControlNet(cn.controlnet, used)
        reads = ["sample", "timestep", "encoder_hidden_states", "pooled_projections",
                 *(["guidance"] if module.guided else [])]
        modes = cn.controlnet.config.get("num_mode")
        specs.append(net_spec(f"controlnet_{j}", module, cn.controlnet, base_inputs, base_example, reads, lat,
                              sample_names(used), _grid(config), mode=(MODE, int(modes)) if modes else None))
    if transformer is None:
        return specs
    return [*specs, unet_control_spec(transformer, tokens, len(nets), used, counts)]


def unet_control_spec(transformer: torch.nn.Module, tokens: int, nets: int, used: tuple[list[int], list[int]],
                      counts: tuple[int, int]) -> ComponentSpec:
    """The in-memory ``unet_control``: the transformer's inputs, then ``nets`` groups of the ``used`` samples (random
    ones of unit scale as its example)."""
    config = dict(transformer.config)
    return control_spec(FluxTransformerControl(transformer, nets, used, counts), transformer_spec(transformer, tokens),
                        residual_inputs(config, nets, used), PATCH, inner_width(config))


def streamed_unet_control_spec(config: dict[str, Any], tokens: int, nets: int, used: tuple[list[int], list[int]],
                               counts: tuple[int, int]) -> StreamedSpec:
    """``unet_control`` traced on fake tensors for a streamed transformer (export/streamed.py): the streamed
    transformer's inputs and dynamic axes, then the samples (their sides left for export to infer from the
    sample's, as first-block caching's residual inputs)."""
    from diffusers import FluxTransformer2DModel

    base = streamed_transformer_spec(config, tokens)
    res = residual_inputs(config, nets, used)
    inner = inner_width(config)

    def build() -> torch.nn.Module:
        return FluxTransformerControl(FluxTransformer2DModel(**config), nets, used, counts, torchscript=False)

    def example() -> tuple[torch.Tensor, ...]:
        args = base.example()
        b, h, w = args[0].shape[0], args[0].shape[2], args[0].shape[3]
        return (*args, *(torch.randn(b, h // PATCH, w // PATCH, inner) for _ in res))

    def dynamic() -> dict[str, Any]:
        dims = base.dynamic()
        auto = torch.export.Dim.AUTO
        # the wrapper takes [dev]'s guidance and the samples as *rest: one entry of shapes for them all, in order
        guidance = [dims.pop("guidance")] if "guidance" in dims else []
        dims["rest"] = (*guidance, *({0: dims["sample"][0], 1: auto, 2: auto} for _ in res))
        return dims

    return StreamedSpec(name="unet_control", build=build, prefix="transformer.", inputs=[*base.inputs, *res],
                        outputs=[base.outputs[0]], example=example, dynamic=dynamic)


def controlnet_records(nets: Sequence[LoadedControlNet]) -> list[dict[str, Any]]:
    """sdrt.json's ``source["controlnets"]``: each net's source, and a Union net's mode count (``num_mode``: the
    runtime refuses a mode outside it before any work)."""
    out = []
    for cn in nets:
        modes = cn.controlnet.config.get("num_mode")
        out.append({**dict(cn.source), **({"num_mode": int(modes)} if modes is not None else {})})
    return out
