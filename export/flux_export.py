"""FLUX.1 models -> a verified ONNX folder with ``sdrt.json``: loading (a diffusers ``FluxPipeline``,
``FluxFillPipeline``, ``FluxKontextPipeline`` or ``FluxControlPipeline`` folder, or a preset's seeded weights) and
``export_flux``, the family's counterpart of ``exporter.export_model``.

Layout: model_index.json, text_encoder/ (CLIP), text_encoder_2/ (T5), transformer/ (the manifest's ``unet``),
vae_decoder/, vae_encoder/ (and FLUX.1 Fill's vae_encoder_masked/; with ControlNets controlnet_0/ .. and
unet_control/, export/flux_controlnet.py), tokenizer/, tokenizer_2/, scheduler/,
sdrt.json; written under a temporary name and renamed once every component passed its parity gate.

Precision: FLUX.1's activations overflow fp16 (NaN images, diffusers issue 9096) and sdrt exports no bf16 graph
yet, so every FLUX.1 component is exported in float32; ``--fp16`` is refused for it, saying so. The 12B
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.atomic import atomic_dir
from sdrt.runtime.errors import InputError
from sdrt.runtime.families import family_named
from sdrt.runtime.feature_cache import SHALLOW_UNET
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.lora_files import LoraSpec, MergeReport
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
from .flux_presets import (
    CONTROL_PIPELINE,
    FLUX_PRESETS,
    KONTEXT_PIPELINE,
    FluxModules,
    FluxPreset,
    build_modules,
    fills,
    get_flux_preset,
    variant,
)
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
from .onnx_export import check_parity, export_component, parity_line
from .sd3_gate import T5_BLOCKS, load_reduced, mapped_weights, t5_blocks
from .sd3_loading import component_config
from .sd3_model import Streamed, streamed_parts
from .sd3_specs import t5_spec
from .streamed import (
    StreamedSpec,
    WeightSource,
    checkpoint_weights,
    export_streamed,
    fake_shapes,
    materialize,
    synthetic_weights,
)

PIPELINE_CLASS = "FluxPipeline"
# [schnell] / [dev], Fill, Kontext, Depth / Canny
PIPELINE_CLASSES = (PIPELINE_CLASS, "FluxFillPipeline", KONTEXT_PIPELINE, CONTROL_PIPELINE)
STREAMABLE = ("transformer", T5_NAME)
FP16_REFUSED = ("FLUX.1 overflows fp16 (NaN images: diffusers issue 9096) and sdrt exports no bf16 graph yet; "
                "FLUX.1 is exported in fp32: pass --fp32")


@dataclass
class LoadedFlux:
    """A FLUX.1 model: its preset, float32 modules for what is held in memory, ``streamed`` for what is not,
    each tokenizer's source folder (None: the tiny presets' shipped ones), the scheduler config."""

    preset: FluxPreset
    modules: FluxModules
    scheduler_config: dict[str, Any]
    tokenizer_dirs: tuple[Path | None, Path | None] = (None, None)
    source: dict[str, Any] = field(default_factory=dict)
    streamed: dict[str, Streamed] = field(default_factory=dict)

    def held(self) -> FluxModules:
        """The modules with the streamed ones built in memory from their weights (``streamed.materialize``; the
        full transformer is 44 GiB in fp32), for a reference that needs them all."""
        tr, t5 = self.streamed.get("transformer"), self.streamed.get(T5_NAME)
        return replace(
            self.modules,
            transformer=self.modules.transformer if tr is None else materialize(
                streamed_transformer_spec(tr.config, self.preset.t5_tokens), tr.weights),
            t5=self.modules.t5 if t5 is None else materialize(streamed_t5(t5.config, self.preset.t5_tokens),
                                                               t5.weights))


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a diffusers folder's model_index.json (None: no readable one)."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def is_flux_folder(path: Path) -> bool:
    """A diffusers folder of ``FluxPipeline``, ``FluxFillPipeline``, ``FluxKontextPipeline`` or
    ``FluxControlPipeline`` (its model_index.json says so)."""
    return pipeline_class(path) in PIPELINE_CLASSES


def is_flux_source(model: str | Path | None, random_preset: str | None) -> bool:
    """``sdrt export``'s source is a FLUX.1 model: a FLUX preset's name, a diffusers FluxPipeline folder, or a
    single .safetensors file in Black Forest Labs' layout (export/flux_single_file.py)."""
    from .flux_single_file import is_flux_file

    if random_preset is not None:
        return random_preset in FLUX_PRESETS
    return model is not None and (is_flux_folder(Path(model)) or is_flux_file(model))


def weight_shapes(transformer: dict[str, Any], t5: dict[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each streamable component's weight names and shapes, from one build in fake mode (nothing allocated)."""
    return {"transformer": fake_shapes(streamed_transformer_spec(transformer, 8).build, "transformer."),
            T5_NAME: fake_shapes(streamed_t5(t5, 8).build, "encoder.")}


def merge_flux_loras(model: LoadedFlux, specs: Sequence[LoraSpec]) -> dict[str, MergeReport]:
    """``sdrt export --lora``: the LoRAs merged into the transformer and CLIP (in memory; a streamed transformer's
    weights as they are read: export/lora_merge.py), recorded in ``model.source["loras"]``. T5 is not adapted (its
    modules are reported unmatched). Returns what matched per component."""
    from .lora_merge import merge_into

    st = model.streamed.get("transformer")
    streamed = {} if st is None else {
        "unet": (st.weights, fake_shapes(streamed_transformer_spec(st.config, 8).build, "transformer."))}
    fam = family_named(model.preset.family)
    reports, wrapped, record = merge_into(fam, fam.label, {"unet": model.modules.transformer,
                                                           "text_encoder": model.modules.clip}, streamed, specs)
    if st is not None:
        model.streamed["transformer"] = replace(st, weights=wrapped["unet"])
    model.source["loras"] = record
    return reports


def load_flux(path: str | Path | None = None, *, random_preset: str | None = None, seed: int = 0,
              stream: bool | None = None, **single_file: Any) -> LoadedFlux:
    """A diffusers FLUX.1 folder (safetensors only: nothing is unpickled), a single file in Black Forest Labs'
    layout (``single_file``: ``flux_single_file.load_flux_single_file``'s options: clip_l, t5, vae, tokenizers,
    arch) or ``random_preset``'s seeded weights. ``stream``: whether the transformer and T5 are streamed at
    export instead of loaded (default: those over a billion parameters; a streamed random preset's weights are
    seeded per tensor, a single file's converted as they are read)."""
    if (path is None) == (random_preset is None):
        raise InputError("give either a diffusers FLUX.1 folder or random_preset (one of them)")
    if path is not None and Path(path).is_file():
        from .flux_single_file import load_flux_single_file

        return load_flux_single_file(path, stream=stream, **single_file)
    if given := sorted("--" + k.replace("_", "-") for k, v in single_file.items() if v is not None):
        raise InputError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with a FLUX.1 single .safetensors "
                         "file only; a diffusers folder holds its parts and tokenizers, a preset its architecture")
    if random_preset is not None:
        preset = get_flux_preset(random_preset)
        shapes = weight_shapes(preset.config("transformer"), preset.config("t5"))
        skip, streamed = streamed_parts(shapes, stream, lambda n: preset.config("transformer" if n == "transformer"
                                                                                else "t5"),
                                        lambda n: synthetic_weights(seed, shapes[n]), "synthetic")
        return LoadedFlux(preset, build_modules(preset, seed, skip), dict(preset.scheduler),
                          source={"kind": "random", "preset": preset.name, "seed": seed}, streamed=streamed)
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    folder = Path(path)  # type: ignore[arg-type]
    if not is_flux_folder(folder):
        raise InputError(f"{folder} is not a diffusers FLUX.1 folder (its model_index.json must name "
                         f"{' or '.join(PIPELINE_CLASSES)})")
    missing = [n for n in ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler", "tokenizer",
                           "tokenizer_2") if not (folder / n).is_dir()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}: a FLUX.1 folder has each of them")
    kw: dict[str, Any] = {"torch_dtype": torch.float32, "use_safetensors": True}
    tr_cfg, t5_cfg = component_config(folder / "transformer"), component_config(folder / "text_encoder_2")
    skip, streamed = streamed_parts(weight_shapes(tr_cfg, t5_cfg), stream,
                                    lambda n: tr_cfg if n == "transformer" else t5_cfg,
                                    lambda n: checkpoint_weights(folder / n), "checkpoint")
    transformer = None if "transformer" in skip else \
        FluxTransformer2DModel.from_pretrained(folder / "transformer", **kw).eval()
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw).eval()
    t5 = None if T5_NAME in skip else T5EncoderModel.from_pretrained(folder / T5_NAME, **kw).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw).eval()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    preset = _preset_for(tr_cfg, sched, vae, folder.name, pipeline_class(folder) or PIPELINE_CLASS)
    toks = tuple(folder / n if (folder / n).is_dir() else None for n in ("tokenizer", "tokenizer_2"))
    return LoadedFlux(preset, FluxModules(transformer, clip, t5, vae), sched, toks,  # type: ignore[arg-type]
                      {"kind": "diffusers", "path": str(folder)}, streamed)


def _preset_for(transformer: dict[str, Any], scheduler: dict[str, Any], vae: torch.nn.Module,
                name: str, cls: str = PIPELINE_CLASS) -> FluxPreset:
    """The shipped preset of this architecture, schedule and pipeline class ([schnell] and [dev] differ in both,
    Fill and Depth / Canny in their input channels), else one named after the folder (its default size: 1024 for a
    full-width model, 64 latents' worth otherwise). Presets of one shape (Depth and Canny: only their weights
    differ) give their values under the folder's name."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.items()}
    found = [p for p in FLUX_PRESETS.values()
             if all(cfg.get(k) == v for k, v in p.transformer.items()) and p.pipeline_class == cls
             and bool(scheduler.get("use_dynamic_shifting")) == bool(p.scheduler["use_dynamic_shifting"])]
    if found:
        return found[0] if len(found) == 1 else replace(found[0], name=name)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    base = next(p for p in FLUX_PRESETS.values() if p.guided == bool(cfg.get("guidance_embeds")))
    return replace(base, name=name, default_size=1024 if int(cfg["attention_head_dim"]) >= 64 else 8 * f,
                   transformer=cfg, test_scale=False, pipeline_class=cls)


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
    opset: int = MIN_OPSET,
    block_cache: bool = False,
    parity_shape: tuple[int, int, int] | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    lora_slots: SlotPlan | None = None,
    controlnets: Sequence[LoadedControlNet] = (),
) -> ExportManifest:
    """Export every component of ``model`` into ``out`` (atomically) and return its manifest. ``fp16`` is refused
    (see the module docstring); ``block_cache`` adds first-block caching (the transformer also returns its two
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
            done[spec.name] = export_component(spec, "fp32", tmp / folder, opset=opset, parity_shape=parity_shape,
                                               progress=progress)
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
                comp = export_streamed(sspec, st.weights, "fp32", tmp / folder, progress=progress)
                par = gate_streamed(kind, st.config, st.weights, p.t5_tokens, parity_shape, progress,
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
                  block_cache: bool = False, reference: bool = False,
                  slots: tuple[SlotPlan, tuple[str, ...]] | None = None,
                  control: tuple[int, tuple[int, int]] | None = None) -> Parity:
    """The parity gate of a streamed component on a reduced-depth copy at full width, exported through the same
    streamed path: the ``transformer``'s first double-stream and last single-stream blocks (``block_cache``: with
    first-block caching's residual outputs; ``reference``: taking a reference image's latents, FLUX.1 Kontext; the
    ``cached`` step on the same copy), T5's (``text_encoder_2``) first
    and last blocks, each with the checkpoint's own weights; compared with the same copy in PyTorch (fp32,
    onnxruntime CPU). Raises ParityError past the bound, as every gate. The cached step runs only the first double
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
        comp = export_streamed(sspec, source, "fp32", Path(tmp) / sspec.name)
        par = check_parity(copy.copy(cspec), comp.precision, Path(tmp) / sspec.name / "model.onnx", parity_shape)
    return Parity(reference=f"torch fp32, onnxruntime CPU; {what} (reduced depth, full width)",
                  max_abs_err=par.max_abs_err, rel_err=par.rel_err, bound=par.bound)
