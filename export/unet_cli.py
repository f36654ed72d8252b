"""``sdrt export`` of a UNet model (SD 1.x, SD 2.x, SDXL and its refiner): its flags and the run
(export/loading.py loads, export/exporter.py exports). It claims every source no other exporter does."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.runtime.families.sd import SD1, SD2
from sdrt.runtime.families.sdxl import SDXL
from sdrt.runtime.families.sdxl_refiner import SDXL_REFINER
from sdrt.runtime.manifest import ExportManifest

from .cli_exporter import Exporter, FlagUse, Say
from .cli_options import load_controlnets, lora_spec, merged_lines, slot_plan, source_line


def claims(model: str | Path | None, random_preset: str | None) -> bool:
    return True  # the last of the table: what the others do not claim (load_model names what it cannot load)


def run(args: argparse.Namespace, say: Say, progress: Say) -> ExportManifest:
    """A UNet model: the LoRA files and slots checked before the weights load, the ControlNets paired with the
    UNet before the LoRAs merge and any export work."""
    from .exporter import export_model
    from .loading import load_model

    loras = [lora_spec(s) for s in args.lora or []]
    slots = slot_plan(args.lora_slots)  # checked against the UNet's family by the export
    say(source_line(args))
    model = load_model(args.model, random_preset=args.random, seed=args.seed, arch=args.arch,
                       allow_pickle=args.allow_pickle, ema=not args.no_ema)
    nets = load_controlnets(args, say, model.unet.config)
    if nets:
        from .controlnet_loading import check_pairing

        check_pairing(model, nets)
    if loras:
        from .lora_merge import merge_loras

        reports = merge_loras(model, loras)
        merged_lines({comp: rep for comp, rep in reports.items() if rep.matched}, say)
    manifest = export_model(model, args.out, overwrite=args.overwrite, fp16=not args.fp32, opset=args.opset,
                            vae_fp32=args.vae_fp32, progress=progress, clip_skip=args.clip_skip, controlnets=nets,
                            deepcache=args.feature_cache, lora_slots=slots,
                            release=not args.ort_cuda)  # the CUDA variant re-exports the UNet from ``model``
    if args.ort_cuda:
        from .ort_fusion import add_ort_cuda_variant

        add_ort_cuda_variant(args.out, model, opset=args.opset, progress=progress)
        manifest = ExportManifest.read(args.out)
    return manifest


UNET_EXPORTER = Exporter(
    name=f"a UNet model ({', '.join(f.label for f in (SD1, SD2, SDXL, SDXL_REFINER))})",
    single_file="a UNet single file", layout="A1111's layout: model.diffusion_model.input_blocks.*",
    takes=(FlagUse("--clip-skip", "to condition on an earlier text encoder layer",
                   "condition on the text encoder layer N before the model's own (diffusers' clip_skip; A1111's "
                   "'Clip skip 2' is 1; default 0)", metavar="N", type=int, default=0),
           FlagUse("--vae-fp32", "to keep the VAE in fp32 in an fp16 export",
                   "keep the VAE in fp32 in an fp16 export (the default for SDXL, whose VAE overflows in fp16)",
                   action="store_true", default=None),  # None: the family's choice
           FlagUse("--no-ema", "to load a single file's non-EMA UNet weights",
                   "a single file with EMA and non-EMA UNet weights: load the non-EMA ones (default: EMA)",
                   action="store_true"),
           FlagUse("--ort-cuda", "to also write a UNet with ONNX Runtime's fused CUDA operators",
                   "also write a UNet with ONNX Runtime's fused CUDA operators (attention, GroupNorm) for ort-cuda",
                   action="store_true")),
    file_only=frozenset(), claims=claims, run=run)
