"""FLUX.1 models -> a verified ONNX folder with ``sdrt.json``: ``export_flux``, the family's counterpart of
``exporter.export_model`` (loading the model, a diffusers ``FluxPipeline``, ``FluxFillPipeline``,
``FluxKontextPipeline`` or ``FluxControlPipeline`` folder or a preset's seeded weights: export/flux_loading.py).

Layout: model_index.json, text_encoder/ (CLIP), text_encoder_2/ (T5), transformer/ (the manifest's ``unet``),
vae_decoder/, vae_encoder/ (and FLUX.1 Fill's vae_encoder_masked/; with ControlNets controlnet_0/ .. and
unet_control/, export/flux_controlnet.py), tokenizer/, tokenizer_2/, scheduler/,
sdrt.json; written under a temporary name and renamed once every component passed its parity gate.

Precision: FLUX.1's activations overflow fp16 (NaN images, diffusers issue 9096), so ``--fp16`` is refused,
saying so. Its components are exported in float32, or with ``bf16`` the text encoders, the transformer (and its
cached step, ControlNets) in bf16, as the peers run FLUX.1 on GPUs: half the weights' size, fp32's range. The VAE
stays float32 (it is small, and the image's last step). A bf16 graph takes and returns float32 (the runtimes'
host side has no bf16) and runs on openvino, ort-cuda and tensorrt, not on ONNX Runtime's CPU provider (no bf16
kernels); its parity gate runs it as bf16 hardware computes it (onnx_export.bf16_emulation). The 12B
transformer and T5-XXL are streamed (export/streamed.py: never held in memory), each gated on a reduced-depth
copy at full width (its first double block and last single block; T5's first and last blocks) with the
checkpoint's own weights for those blocks.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.atomic import atomic_dir
from sdrt.runtime.errors import InputError
from sdrt.runtime.families import family_named
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.manifest import (
    MANIFEST_NAME,
    ExportManifest,
    Parity,
    ShapeLimits,
    export_entries,
    tokenizer_of,
)

from .block_cache import DENOISER_FOLDER, FOLDERS
from .controlnet_loading import LoadedControlNet
from .exporter import EXPORT_KIND, MIN_OPSET, TEXT_LEN, check_export_dir, tool_versions
from .flux_controlnet import (
    check_flux_pairing,
    control_layout,
    controlnet_records,
    flux_controlnet_specs,
    streamed_unet_control_spec,
    unet_control_spec,
)
from .flux_loading import LoadedFlux
from .flux_presets import fills, variant
from .flux_specs import (
    CLIP_NAME,
    T5_NAME,
    cached_spec,
    flux_specs,
    streamed_cached_spec,
    streamed_t5,
    streamed_transformer_spec,
    transformer_spec,
)
from .flux_wrappers import controlled_samples
from .lora_slots import SlotPlan, check_slots, slot_components, slots_record, slotted_gate, slotted_streamed
from .onnx_export import check_parity, component_precision, export_component, parity_line
from .sd3_gate import T5_BLOCKS, load_reduced, mapped_weights, t5_blocks
from .sd3_specs import t5_spec
from .streamed import StreamedSpec, WeightSource, export_streamed

FP16_REFUSED = ("FLUX.1 overflows fp16 (NaN images: diffusers issue 9096); export it in bf16 (--bf16: openvino, "
                "ort-cuda and tensorrt run it) or fp32 (--fp32)")


def _model_index(model: LoadedFlux) -> dict[str, object]:
    import diffusers

    return {
        "_class_name": f"ORT{model.preset.pipeline_class}",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
        "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
        T5_NAME: ["onnxruntime", "ORTModelTextEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        DENOISER_FOLDER: ["onnxruntime", "ORTModelTransformer"],
        "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
        "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
    }


def export_flux(
    model: LoadedFlux,
    out: str | Path,
    *,
    overwrite: bool = False,
    fp16: bool = False,
    bf16: bool = False,
    opset: int = MIN_OPSET,
    block_cache: bool = False,
    parity_shape: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    lora_slots: SlotPlan | None = None,
    controlnets: Sequence[LoadedControlNet] = (),
) -> ExportManifest:
    """Export every component of ``model`` into ``out`` (atomically) and return its manifest. ``fp16`` is refused,
    ``bf16`` exports all but the VAE in bf16 (see the module docstring); ``block_cache`` adds first-block caching (the transformer also returns its two
    residuals, and its cached step is ``unet_shallow`` in ``transformer_shallow/``; runtime/feature_cache.py).
    ``out`` is checked as ``export_model`` checks it. ``lora_slots``: the transformer's and CLIP's targeted layers
    take LoRA factors as inputs, so calls can carry LoRAs (``Pipeline(..., loras=...)``; export/lora_slots.py); T5
    has none (common FLUX.1 LoRAs do not adapt it). ``controlnets``: FLUX ControlNets, each ``controlnet_j``, with
    ``unet_control`` (the transformer taking their samples; export/flux_controlnet.py), checked against the
    transformer first; with ``lora_slots`` it takes the transformer's slots under the same names (the nets none:
    LoRAs do not adapt them)."""
    from .t5_tokenizer_assets import write_t5_tokenizer
    from .tokenizer_assets import write_clip_tokenizer

    if fp16:
        raise InputError(FP16_REFUSED, cli=FP16_REFUSED)
    precision = "bf16" if bf16 else "fp32"
    out = check_export_dir(out, overwrite=overwrite)
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old; sdrt exports opset {MIN_OPSET} or newer (e.g. --opset 17)")
    p, mods = model.preset, model.modules
    patterns = check_slots(family_named(p.family), lora_slots)
    slots = None if lora_slots is None else (lora_slots, patterns)
    f = 2 ** (len(mods.vae.config.block_out_channels) - 1)
    tr_cfg = model.streamed["transformer"].config if "transformer" in model.streamed else dict(mods.transformer.config)
    reference = p.kontext  # the transformer also takes a reference image's latents
    model_variant = "kontext" if reference else variant(tr_cfg)
    if block_cache and int(tr_cfg["num_layers"]) + int(tr_cfg["num_single_layers"]) < 2:
        raise InputError(f"first-block caching reuses what the blocks after the first added; {p.name}'s transformer "
                         "has one block: export it without --feature-cache")
    controlnets = list(controlnets)
    check_flux_pairing(p.name, tr_cfg, controlnets, kontext=reference, block_cache=block_cache)
    # rotary positions set no grid limit: FLUX.1's sides are multiples of a 2x2 patch of latents, up to 2048
    limits = ShapeLimits(min_size=2 * f * (64 // (2 * f) or 1), max_size=2048, multiple_of=2 * f)
    if parity_shape is None:
        side = min(p.default_size // f, 32)
        parity_shape = (2, side, side + 2)  # non-square, whole patches
    with atomic_dir(out, marker=MANIFEST_NAME, overwrite=overwrite, what=EXPORT_KIND, owned=export_entries) as tmp:
        done = {}
        specs, inert = flux_specs(mods, p.t5_tokens, block_cache, fill=fills(tr_cfg),
                                   reference=reference), {}
        if controlnets:  # the nets in memory; unet_control with the transformer, in memory or streamed below
            specs += flux_controlnet_specs(tr_cfg, controlnets, p.t5_tokens, transformer=mods.transformer)
        if lora_slots is not None:
            specs, inert = slot_components(specs, lora_slots, patterns, (CLIP_NAME,))
        for spec in specs:
            folder = FOLDERS.get(spec.name, spec.name)
            done[spec.name] = export_component(spec, component_precision(spec.name, precision), tmp / folder,
                                               opset=opset, parity_shape=parity_shape, progress=progress)
        for name, st in model.streamed.items():
            jobs = [(name, streamed_t5(st.config, p.t5_tokens))] if name != "transformer" else \
                [("transformer", streamed_transformer_spec(st.config, p.t5_tokens, block_cache, reference))]
            if name == "transformer" and block_cache:
                jobs.append(("cached", streamed_cached_spec(st.config, p.t5_tokens, reference)))
            if name == "transformer" and controlnets:
                used, counts = control_layout(st.config, controlnets)
                jobs.append(("control", streamed_unet_control_spec(st.config, p.t5_tokens, len(controlnets), used,
                                                                   counts)))
            if name == "transformer" and lora_slots is not None:
                jobs = [(kind, slotted_streamed(sspec, lora_slots, patterns)) for kind, sspec in jobs]
            for kind, sspec in jobs:
                folder = FOLDERS.get(sspec.name, sspec.name)
                progress(f"{sspec.name} is streamed ({st.kind} weights, one tensor at a time)")
                comp = export_streamed(sspec, st.weights, precision, tmp / folder, progress=progress)
                par = gate_streamed(kind, st.config, st.weights, p.t5_tokens, parity_shape, progress, precision,
                                    block_cache=block_cache, reference=reference,
                                    slots=slots if kind in ("transformer", "cached", "control") else None,
                                    control=(len(controlnets), control_layout(st.config, controlnets)[1])
                                    if kind == "control" else None)
                progress(f"{sspec.name}: {parity_line(par, comp.precision)} ({par.reference})")
                done[sspec.name] = replace(comp, parity=par)
        nets = tuple(f"controlnet_{j}" for j in range(len(controlnets)))
        order = ["text_encoder", T5_NAME, "unet", *nets, *(("unet_control",) if nets else ()), SHALLOW_UNET,
                 "vae_decoder", "vae_encoder", MASKED_ENCODER]
        components = {n: done[n] for n in order if n in done}
        write_clip_tokenizer(tmp / tokenizer_of("text_encoder"), pad_token=p.pad_token, source=model.tokenizer_dirs[0])
        write_t5_tokenizer(tmp / tokenizer_of(T5_NAME), source=model.tokenizer_dirs[1])
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(model), indent=2))
        manifest = ExportManifest(
            family=p.family,
            preset=p.name,
            prediction_type=p.prediction_type,
            components=components,
            latent_channels=int(mods.vae.config.latent_channels),
            vae_scale_factor=f,
            default_size=p.default_size,
            text_max_length=TEXT_LEN,
            limits=limits,
            source={**model.source, "guidance_embeds": bool(tr_cfg.get("guidance_embeds")),
                    "variant": model_variant,
                    **({"streamed": sorted("unet" if n == "transformer" else n for n in model.streamed)}
                       if model.streamed else {}), **slots_record(lora_slots, inert),
                    **({"controlnets": controlnet_records(controlnets)} if controlnets else {})},
            tools=tool_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            latent_scaling=float(mods.vae.config.scaling_factor),
            controlnets=nets,
        )
        manifest.write(tmp)
    return manifest


DOUBLE_BLOCKS = re.compile(r"^transformer_blocks\.(\d+)\.")
SINGLE_BLOCKS = re.compile(r"^single_transformer_blocks\.(\d+)\.")


def gate_streamed(kind: str, config: dict[str, Any], weights: WeightSource, tokens: int,
                  parity_shape: tuple[int, int, int], progress: Callable[[str], None] = lambda m: None,
                  precision: str = "fp32", block_cache: bool = False, reference: bool = False,
                  slots: tuple[SlotPlan, tuple[str, ...]] | None = None,
                  control: tuple[int, tuple[int, int]] | None = None) -> Parity:
    """The parity gate of a streamed component on a reduced-depth copy at full width, exported through the same
    streamed path: the ``transformer``'s first double-stream and last single-stream blocks (``block_cache``: with
    first-block caching's residual outputs; ``reference``: taking a reference image's latents, FLUX.1 Kontext; the
    ``cached`` step on the same copy), T5's (``text_encoder_2``) first
    and last blocks, each with the checkpoint's own weights; compared with the same copy in PyTorch (fp32,
    onnxruntime CPU; a bf16 graph, ``precision``, emulated). Raises ParityError past the bound, as every gate. The
    cached step runs only the first double
    block, which the reduced copy keeps as its own first: its gate is exact in depth. ``slots``: the transformer's
    LoRA slots (the plan and the family's targets), on the reduced copy's layers alike (``unet_control``'s too),
    gated with random factors. ``control`` (kind ``control``: ``unet_control``): (nets, (double, single) samples per net); the reduced
    copy reads the samples its own depth picks, random ones."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    used: tuple[list[int], list[int]] = ([], [])
    if kind in ("transformer", "cached", "control"):
        singles = int(config["num_single_layers"])
        picked = ([0], [singles - 1])
        reduced = {**config, "num_layers": 1, "num_single_layers": 1}
        inner = mapped_weights(weights, SINGLE_BLOCKS, "single_transformer_blocks.", picked[1])
        source = mapped_weights(inner, DOUBLE_BLOCKS, "transformer_blocks.", picked[0])
        if kind == "control":
            assert control is not None
            used = (controlled_samples(1, control[1][0]), controlled_samples(1, control[1][1]))
            sspec: StreamedSpec = streamed_unet_control_spec(reduced, tokens, control[0], used, control[1])
        else:
            sspec = streamed_cached_spec(reduced, tokens, reference) if kind == "cached" else \
                streamed_transformer_spec(reduced, tokens, block_cache, reference)
        module: torch.nn.Module = FluxTransformer2DModel(**reduced)
        what = f"double block 0 of {config['num_layers']} and single block {singles - 1} of {singles}"
    else:
        t5_picked = t5_blocks(config)
        reduced = {**config, "num_layers": len(t5_picked)}
        source = mapped_weights(weights, T5_BLOCKS, "encoder.block.", t5_picked)
        sspec = streamed_t5(reduced, tokens)
        module = T5EncoderModel(T5Config(**reduced))
        what = f"blocks {t5_picked} of {config['num_layers']}"
    progress(f"{sspec.name}: parity gate on {what} at full width (a reduced-depth copy)")
    module = load_reduced(module, source, sspec.name)
    if kind == "control":
        assert control is not None
        cspec = unet_control_spec(module, tokens, control[0], used, control[1])
    else:
        cspec = (cached_spec(module, tokens, reference) if kind == "cached" else
                 transformer_spec(module, tokens, block_cache, reference) if kind == "transformer" else
                 t5_spec(module, tokens, name=T5_NAME))
    if slots is not None:
        sspec, cspec = slotted_gate(sspec, cspec, module, *slots)
    with tempfile.TemporaryDirectory(prefix="sdrt-gate-") as tmp:
        comp = export_streamed(sspec, source, precision, Path(tmp) / sspec.name)
        par = check_parity(copy.copy(cspec), comp.precision, Path(tmp) / sspec.name / "model.onnx", parity_shape)
    return Parity(reference=f"{par.reference}; {what} (reduced depth, full width)",
                  max_abs_err=par.max_abs_err, rel_err=par.rel_err, bound=par.bound)
