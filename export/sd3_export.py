"""An SD3 / 3.5 model -> a verified ONNX folder with ``sdrt.json``: ``export_sd3``, the family's counterpart of
``exporter.export_model`` (the model: export/sd3_model.py; loading it: export/sd3_loading.py).

Layout: model_index.json, text_encoder/, text_encoder_2/, [text_encoder_3/,] transformer/ (the manifest's
``unet`` component: the denoiser; [skip_layers.onnx, skip-layer guidance's ``unet_skip`` over the same weights
file,]) vae_decoder/, vae_encoder/, [vae_encoder_masked/ (an inpainting
transformer's),] tokenizer/, tokenizer_2/, [tokenizer_3/,]
scheduler/, sdrt.json. ``without_t5`` leaves T5 out (diffusers' ``text_encoder_3=None``: the runtime puts
zeros in its place). Written under a temporary name and renamed once every component passed its parity gate.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdrt.runtime.atomic import atomic_dir
from sdrt.runtime.errors import InputError
from sdrt.runtime.families import family_named
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.layer_skip import SKIP_UNET
from sdrt.runtime.manifest import (
    MANIFEST_NAME,
    Component,
    ExportManifest,
    ShapeLimits,
    export_entries,
    tokenizer_of,
)

from .block_cache import DENOISER_FOLDER, FOLDERS
from .controlnet_loading import LoadedControlNet
from .exporter import EXPORT_KIND, MIN_OPSET, TEXT_LEN, check_export_dir, tool_versions
from .lora_slots import SlotPlan, check_slots, slot_components, slots_record, slotted_streamed
from .onnx_export import component_precision, export_component, parity_line
from .sd3_controlnet import (
    check_sd3_pairing,
    control_layout,
    sd3_controlnet_specs,
    streamed_unet_control_spec,
)
from .sd3_gate import gate_streamed
from .sd3_loading import PIPELINE_CLASS
from .sd3_model import LoadedSd3
from .sd3_specs import (
    CLIP_NAMES,
    sd3_specs,
    streamed_cached_spec,
    streamed_skip_spec,
    streamed_t5_spec,
    streamed_transformer_spec,
)
from .shared_weights import share_weights
from .streamed import export_streamed

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
SKIP_FILE = "skip_layers.onnx"  # skip-layer guidance's pass, in the transformer's folder over its weights file


def limits_of(transformer: dict[str, Any], factor: int) -> ShapeLimits:
    """The image sides the transformer's position grid takes: multiples of a patch (patch x VAE factor pixels),
    up to ``pos_embed_max_size`` patches."""
    patch = int(transformer.get("patch_size", 2))
    step = patch * factor
    top = int(transformer["pos_embed_max_size"]) * step
    return ShapeLimits(min_size=max(step, 64 - 64 % step), max_size=top, multiple_of=step)


def check_skip_layers(layers: Sequence[int] | None, num_layers: int, name: str) -> list[int]:
    """``--skip-layers``, checked against the transformer's blocks: distinct block indices, some blocks left (none
    given: [])"""
    if layers is None:
        return []
    given = list(layers)
    bad = [v for v in given if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_layers]
    if not given or bad or len(set(given)) != len(given) or len(given) >= num_layers:
        raise InputError(f"skip layers {given} are not distinct blocks of {name}'s transformer (0 to {num_layers - 1}), "
                         f"leaving some to run: give e.g. 7,8,9 (SD 3.5 Medium's, diffusers' recommendation)",
                         cli=f"--skip-layers {','.join(map(str, given))}: give distinct blocks of {name}'s transformer "
                             f"(0 to {num_layers - 1}), leaving some to run, e.g. 7,8,9 (SD 3.5 Medium's)")
    return sorted(given)


def _share_skip(tmp: Path, comp: Component, progress: Callable[[str], None]) -> Component:
    """Skip-layer guidance's pass moved beside the transformer's graph, reading its weights from the transformer's
    file (export/shared_weights.py); its own folder removed."""
    src = tmp / comp.path
    donor = tmp / DENOISER_FOLDER / "model.onnx"
    dest = donor.with_name(SKIP_FILE)
    how = share_weights(src, donor, dest)
    shutil.rmtree(src.parent)
    progress(f"{SKIP_UNET}: reads {how.shared} weights ({how.shared_bytes / 2**20:.1f} MiB) from the transformer's "
             f"weights file; {how.own} of its own ({how.own_bytes / 2**20:.1f} MiB)")
    size = sum(f.stat().st_size for f in dest.parent.iterdir() if f.name.startswith(SKIP_FILE))
    return replace(comp, path=f"{DENOISER_FOLDER}/{SKIP_FILE}", size_bytes=size)


def _model_index(model: LoadedSd3) -> dict[str, object]:
    import diffusers

    idx: dict[str, object] = {
        "_class_name": f"ORT{PIPELINE_CLASS}",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
        "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
        "text_encoder_2": ["onnxruntime", "ORTModelTextEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        DENOISER_FOLDER: ["onnxruntime", "ORTModelTransformer"],
        "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
        "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
    }
    if model.has_t5:
        idx["text_encoder_3"] = ["onnxruntime", "ORTModelTextEncoder"]
        idx["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    return idx


def export_sd3(
    model: LoadedSd3,
    out: str | Path,
    *,
    overwrite: bool = False,
    fp16: bool = True,
    bf16: bool = False,
    opset: int = MIN_OPSET,
    without_t5: bool = False,
    block_cache: bool = False,
    controlnets: Sequence[LoadedControlNet] = (),
    parity_shape: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    lora_slots: SlotPlan | None = None,
    skip_layers: Sequence[int] | None = None,
) -> ExportManifest:
    """Export every component of ``model`` into ``out`` (atomically) and return its manifest; ``without_t5``
    leaves T5 out; ``block_cache`` adds first-block caching (the transformer also returns its two residuals, and
    its cached step is ``unet_shallow`` in ``transformer_shallow/``; runtime/feature_cache.py); ``controlnets``: SD3
    ControlNets, each ``controlnet_j``, with ``unet_control`` (the transformer taking their samples, streamed where
    the transformer is; export/sd3_controlnet.py), checked against the transformer first. ``out`` is checked as ``export_model`` checks
    it. T5 stays float32 in an fp16 export (its activations overflow fp16). ``bf16`` (over ``fp16``): the text
    encoders, T5 included, and the transformer's graphs in bf16, the VAE in float32 (``onnx_export.bf16_emulation``
    gates them; they run on openvino, ort-cuda and tensorrt, not ort-cpu).
    ``lora_slots``: the transformer's and the CLIP encoders' targeted layers take LoRA factors as inputs, so calls
    can carry LoRAs (``Pipeline(..., loras=...)``; export/lora_slots.py); T5 has none. With ``controlnets``,
    ``unet_control`` takes the transformer's slots under the same names (the nets none: LoRAs do not adapt them).
    ``skip_layers``: the transformer's blocks skip-layer guidance skips (SD 3.5 Medium: 7, 8, 9); its pass is
    ``unet_skip`` (``transformer/skip_layers.onnx``, reading the transformer's weights file; runtime/layer_skip.py),
    gated on parity like the transformer before its weights are shared; with ``lora_slots`` it takes the transformer's
    slot inputs (those of the blocks it runs), so a call's LoRAs apply to both passes."""
    from .tokenizer_assets import write_clip_tokenizer

    out = check_export_dir(out, overwrite=overwrite)
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old; sdrt exports opset {MIN_OPSET} or newer (e.g. --opset 17)")
    p = model.preset
    mods = model.modules
    streamed = dict(model.streamed)
    patterns = check_slots(family_named(p.family), lora_slots)
    slots = None if lora_slots is None else (lora_slots, patterns)
    if without_t5:
        mods = replace(mods, text_encoders=(mods.text_encoders[0], mods.text_encoders[1], None))
        streamed.pop("text_encoder_3", None)
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    f = 2 ** (len(mods.vae.config.block_out_channels) - 1)
    tr_cfg = streamed["transformer"].config if "transformer" in streamed else dict(mods.transformer.config)
    if block_cache and int(tr_cfg["num_layers"]) < 2:
        raise InputError(f"first-block caching reuses what the blocks after the first added; {p.name}'s transformer "
                         "has one block: export it without --feature-cache")
    layers = check_skip_layers(skip_layers, int(tr_cfg["num_layers"]), p.name)
    limits = limits_of(tr_cfg, f)
    controlnets = list(controlnets)
    check_sd3_pairing(p.name, tr_cfg, int(mods.vae.config.latent_channels), controlnets)
    if parity_shape is None:
        side = min(p.default_size // f, 32)
        parity_shape = (2, side, side + limits.multiple_of // f)  # non-square, whole patches
    with atomic_dir(out, marker=MANIFEST_NAME, overwrite=overwrite, what=EXPORT_KIND, owned=export_entries) as tmp:
        done = {}
        masked = int(tr_cfg["in_channels"]) == 2 * int(mods.vae.config.latent_channels) + 1  # an inpainting one
        specs, inert = sd3_specs(mods, p.t5_tokens, block_cache, masked, layers), {}
        if controlnets:  # the nets in memory; unet_control with the transformer, in memory or streamed below
            tr_weights = streamed["transformer"].weights if "transformer" in streamed else None
            specs += sd3_controlnet_specs(tr_cfg, mods.vae, controlnets, TEXT_LEN + p.t5_tokens,
                                          transformer=mods.transformer, weights=tr_weights)
        if lora_slots is not None:
            specs, inert = slot_components(specs, lora_slots, patterns, CLIP_NAMES)
        for spec in specs:
            folder = FOLDERS.get(spec.name, spec.name)
            done[spec.name] = export_component(spec, component_precision(spec.name, precision), tmp / folder,
                                               opset=opset, parity_shape=parity_shape, progress=progress)
        for name, st in streamed.items():
            tokens = TEXT_LEN + p.t5_tokens if name == "transformer" else p.t5_tokens
            jobs = [(name, streamed_t5_spec(st.config, tokens))] if name != "transformer" else \
                [("transformer", streamed_transformer_spec(st.config, tokens, block_cache))]
            if name == "transformer" and block_cache:
                jobs.append(("cached", streamed_cached_spec(st.config, tokens)))
            if name == "transformer" and layers:
                jobs.append(("skip", streamed_skip_spec(st.config, tokens, layers)))
            if name == "transformer" and controlnets:
                used, residuals = control_layout(st.config, controlnets)
                jobs.append(("control", streamed_unet_control_spec(st.config, tokens, len(controlnets), used,
                                                                   residuals)))
            if name == "transformer" and lora_slots is not None:
                jobs = [(kind, slotted_streamed(sspec, lora_slots, patterns)) for kind, sspec in jobs]
            for kind, sspec in jobs:
                folder = FOLDERS.get(sspec.name, sspec.name)
                progress(f"{sspec.name} is streamed ({st.kind} weights, one tensor at a time)")
                comp = export_streamed(sspec, st.weights, precision, tmp / folder, progress=progress)
                par = gate_streamed(kind, st.config, st.weights, precision, tokens, parity_shape, progress,
                                    block_cache=block_cache,
                                    control=(len(controlnets), len(controlnets[0].controlnet.controlnet_blocks))
                                    if kind == "control" else None,
                                    slots=slots if kind in ("transformer", "cached", "skip", "control") else None,
                                    skip_layers=layers if kind == "skip" else None)
                progress(f"{sspec.name}: {parity_line(par, comp.precision)} ({par.reference})")
                done[sspec.name] = replace(comp, parity=par)
        if layers:  # every graph gated: the pass now reads the transformer's weights file
            done[SKIP_UNET] = _share_skip(tmp, done[SKIP_UNET], progress)
        nets = tuple(f"controlnet_{j}" for j in range(len(controlnets)))
        order = [*ENCODERS, "unet", *nets, *(("unet_control",) if nets else ()), SHALLOW_UNET, SKIP_UNET,
                 "vae_decoder", "vae_encoder", MASKED_ENCODER]
        components = {n: done[n] for n in order if n in done}
        for i, name in enumerate(("text_encoder", "text_encoder_2")):
            write_clip_tokenizer(tmp / tokenizer_of(name), pad_token=p.pad_tokens[i], source=model.tokenizer_dirs[i])
        if mods.text_encoders[2] is not None or "text_encoder_3" in streamed:
            from .t5_tokenizer_assets import write_t5_tokenizer

            write_t5_tokenizer(tmp / tokenizer_of("text_encoder_3"), source=model.tokenizer_dirs[2])
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(_model_index(replace(model, modules=mods,
                                                                              streamed=streamed)), indent=2))
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
            source={**model.source, "t5": "text_encoder_3" in components,
                    **({"streamed": sorted("unet" if n == "transformer" else n for n in streamed)}
                       if streamed else {}),
                    **({"controlnets": [dict(c.source) for c in controlnets]} if controlnets else {}),
                    **({"skip_layers": layers} if layers else {}), **slots_record(lora_slots, inert)},
            tools=tool_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            latent_scaling=float(mods.vae.config.scaling_factor),
            controlnets=nets,
        )
        manifest.write(tmp)
    return manifest
