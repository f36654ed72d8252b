"""``sdrt export`` of an SD 3 / 3.5 model: which sources and flags are its, and the run (export/sd3_loading.py
loads, export/sd3_export.py exports)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.runtime.errors import InputError
from sdrt.runtime.families.sd3 import SD3
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

FILE_FLAGS = ("--clip-l", "--clip-g", "--t5", "--tokenizers", "--arch")  # what load_sd3 takes of a single file


def claims(model: str | Path | None, random_preset: str | None) -> bool:
    from .sd3_loading import is_sd3_source

    return is_sd3_source(model, random_preset)


def run(args: argparse.Namespace, say: Say, progress: Say) -> ExportManifest:
    """An SD 3 / 3.5 model: its own loader and exporter; the ControlNet files, LoRA slots and LoRA files are
    checked before the weights load."""
    from .sd3_export import export_sd3
    from .sd3_loading import load_sd3
    from .sd3_model import merge_sd3_loras

    files = controlnet_files(args)
    if files:  # the kind of each ControlNet file, from its header, before the weights load
        from .sd3_controlnet_single_file import check_sd3_controlnet_file

        for f in files:
            check_sd3_controlnet_file(f)
    if args.bf16 and args.fp32:
        raise InputError("--bf16 and --fp32 each choose the graphs' precision: give one")
    slots = slot_plan(args.lora_slots, SD3)
    loras = [lora_spec(s) for s in args.lora or []]
    say(source_line(args))
    if args.random:
        model = load_sd3(random_preset=args.random, seed=args.seed)
    else:  # a folder, or a single file with its options (refused for a folder)
        opts = flag_options(args, FILE_FLAGS)
        model = load_sd3(args.model, without_t5=args.without_t5, **opts)
    if loras:
        merged_lines(merge_sd3_loras(model, loras), say)
    # paired with the transformer by export_sd3, before any export work
    nets = load_controlnets(args, say, transformer_config=model.transformer_config)
    return export_sd3(model, args.out, overwrite=args.overwrite, fp16=not args.fp32, bf16=args.bf16, opset=args.opset,
                      without_t5=args.without_t5, block_cache=args.feature_cache, controlnets=nets,
                      progress=progress, lora_slots=slots, skip_layers=args.skip_layers)


def _layers(text: str) -> list[int]:
    """``--skip-layers 7,8,9`` -> [7, 8, 9] (checked against the transformer by the export)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block numbers, e.g. 7,8,9") \
            from None


SD3_EXPORTER = Exporter(
    name=SD3.label, single_file=f"an {SD3.label} single file",
    layout="Stability's layout: model.diffusion_model.joint_blocks.*",
    takes=(FlagUse("--without-t5", "to leave out the T5-XXL text encoder (zeros in its place)",
                   "SD 3 / 3.5: leave the T5-XXL encoder out (diffusers' text_encoder_3=None: zeros in its place); "
                   "much lighter, weaker prompt following", action="store_true"),
           FlagUse("--skip-layers", "to also export the transformer pass with those blocks skipped, for skip-layer "
                                    "guidance",
                   "SD 3 / 3.5: also export the transformer pass with these blocks skipped, for skip-layer guidance "
                   "(generate --slg-scale); it reads the transformer's weights file. SD 3.5 Medium: 7,8,9 "
                   "(diffusers' recommendation)", metavar="N,N,...", type=_layers),
           CLIP_L_FILE,
           FlagUse("--clip-g", "for its CLIP-G text encoder as a separate file (clip_g.safetensors)",
                   "SD 3 / 3.5 single file: its CLIP-G text encoder (text_encoders/clip_g.safetensors)",
                   metavar="FILE"),
           T5_FILE,
           TOKENIZERS,
           BF16),
    file_only=frozenset(FILE_FLAGS), claims=claims, run=run)
