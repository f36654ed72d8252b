"""``sdrt export`` of a FLUX.1 model: which sources and flags are its, and the run (export/flux_loading.py loads,
export/flux_export.py exports, in fp32 or bf16: FLUX.1 overflows fp16)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.runtime.errors import InputError
from sdrt.runtime.families.flux import FLUX
from sdrt.runtime.manifest import ExportManifest

from .cli_exporter import BF16, CLIP_L_FILE, T5_FILE, TOKENIZERS, Exporter, FlagUse, Say
from .cli_options import (
    controlnet_files,
    flag_options,
    load_controlnets,
    lora_spec,
    merged_lines,
    slot_plan,
    source_line,
)

FILE_FLAGS = ("--clip-l", "--t5", "--vae", "--tokenizers", "--arch")  # what load_flux takes of a single file


def claims(model: str | Path | None, random_preset: str | None) -> bool:
    from .flux_loading import is_flux_source

    return is_flux_source(model, random_preset)


def run(args: argparse.Namespace, say: Say, progress: Say) -> ExportManifest:
    """A FLUX.1 model: its own loader and exporter; the ControlNets, LoRA slots and LoRA files are checked
    before the weights load."""
    from .flux_export import export_flux
    from .flux_loading import load_flux, merge_flux_loras

    files = controlnet_files(args)
    if files:
        raise InputError(f"{files[0]} is a single file; FLUX.1 ControlNets load from a diffusers folder "
                         "(config.json naming FluxControlNetModel, with its .safetensors) for now")
    if args.bf16 and args.fp32:
        raise InputError("--bf16 and --fp32 each choose the graphs' precision: give one")
    slots = slot_plan(args.lora_slots, FLUX)
    loras = [lora_spec(s) for s in args.lora or []]
    say(source_line(args))
    if args.random:
        model = load_flux(random_preset=args.random, seed=args.seed)
    else:  # a folder, or a single file with its options (refused for a folder)
        opts = flag_options(args, FILE_FLAGS)
        model = load_flux(args.model, **opts)
    if loras:
        merged_lines(merge_flux_loras(model, loras), say)
    nets = load_controlnets(args, say)  # paired with the transformer by export_flux, before any export work
    if not args.fp32 and not args.bf16:
        progress("FLUX.1 is exported in fp32: it overflows fp16 (NaN images, diffusers issue 9096); --bf16 exports "
                 "its text encoders and transformer in bf16 (half the size; openvino, ort-cuda and tensorrt run it)")
    return export_flux(model, args.out, overwrite=args.overwrite, fp16=False, bf16=args.bf16, opset=args.opset,
                       block_cache=args.feature_cache, progress=progress, lora_slots=slots, controlnets=nets)


FLUX_EXPORTER = Exporter(
    name=FLUX.label, single_file=f"a {FLUX.label} single file", layout="Black Forest Labs' layout",
    takes=(CLIP_L_FILE,
           T5_FILE,
           FlagUse("--vae", "for its VAE as a separate file (ae.safetensors)",
                   "FLUX.1 single file: its VAE as a separate file (Black Forest Labs' ae.safetensors)",
                   metavar="FILE"),
           TOKENIZERS,
           BF16),
    file_only=frozenset(FILE_FLAGS), claims=claims, run=run)
