"""``sdrt export``: a checkpoint (or synthetic weights) -> a verified ONNX folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="a diffusers folder or a single-file .safetensors checkpoint")
    src.add_argument("--random", metavar="PRESET", help="synthetic weights of a preset architecture (see --list)")
    src.add_argument("--list", action="store_true", help="list the architecture presets and exit")
    p.add_argument("--out", metavar="DIR",
                   help="output folder: new, empty or a previous sdrt export, replaced atomically when the export "
                        "succeeds (any other folder needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not an sdrt export, deleting what it holds")
    p.add_argument("--fp32", action="store_true", help="export fp32 graphs (default: fp16; the SDXL VAE is fp32; FLUX.1 is always fp32)")
    p.add_argument("--vae-fp32", action="store_true", default=None,
                   help="keep the VAE in fp32 in an fp16 export (the default for SDXL, whose VAE overflows in fp16)")
    p.add_argument("--ort-cuda", action="store_true",
                   help="also write a UNet with ONNX Runtime's fused CUDA operators (attention, GroupNorm) for ort-cuda")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument("--arch", metavar="PRESET", help="architecture of a single-file checkpoint, if not detected")
    p.add_argument("--seed", type=int, default=0, help="seed of --random weights (default 0)")
    p.add_argument("--clip-skip", type=int, default=0, metavar="N",
                   help="condition on the text encoder layer N before the model's own (diffusers' clip_skip; "
                        "A1111's 'Clip skip 2' is 1; default 0)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="a single file with EMA and non-EMA UNet weights: load the non-EMA ones (default: EMA)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="merge a LoRA .safetensors into the weights before export (e.g. LCM-LoRA, then --sampler "
                        "lcm); repeat to stack")
    p.add_argument("--controlnet", action="append", dest="controlnets", type=lambda v: ("path", v),
                   metavar="PATH",
                   help="also export a ControlNet (a diffusers ControlNet folder or an A1111 .safetensors) and a "
                        "UNet that takes its residuals; repeat for several, in order")
    p.add_argument("--random-controlnet", action="append", dest="controlnets", type=lambda v: ("random", v),
                   metavar="PRESET",
                   help="also export a ControlNet of synthetic weights (e.g. sd15-controlnet-tiny); mixes with "
                        "--controlnet in the order given")
    p.add_argument("--feature-cache", "--deepcache", dest="feature_cache", action="store_true",
                   help="also export the model's feature-caching step (unet_shallow, a few %% of the denoiser), so "
                        "calls can skip most of the denoiser on most steps: DeepCache's shallow path for UNet "
                        "models (generate --cache deepcache), the first-block cached step for SD 3 / 3.5 and "
                        "FLUX.1 (generate --cache first-block)")
    p.add_argument("--lora-slots", default=None, metavar="RANK[:TARGETS]",
                   help="let calls carry LoRAs without re-export: the denoiser's attention layers (TARGETS attn, "
                        "the default; attn-ff adds the feed-forward layers, for SD 3 / FLUX.1 every linear layer of "
                        "the transformer blocks; attn-ff-conv, UNets only, also the ResNet and sampler "
                        "convolutions, for LoCon) and the CLIP encoders' take low-rank factors as inputs, up to "
                        "RANK per layer (the ranks of a call's LoRAs summed), e.g. 32, 64:attn-ff or 32:attn-ff-conv")
    p.add_argument("--skip-layers", type=_layers, default=None, metavar="N,N,...",
                   help="SD 3 / 3.5: also export the transformer pass with these blocks skipped, for skip-layer "
                        "guidance (generate --slg-scale); it reads the transformer's weights file. SD 3.5 Medium: "
                        "7,8,9 (diffusers' recommendation)")
    p.add_argument("--without-t5", action="store_true",
                   help="SD 3 / 3.5: leave the T5-XXL encoder out (diffusers' text_encoder_3=None: zeros in its "
                        "place); much lighter, weaker prompt following")
    p.add_argument("--clip-l", metavar="FILE",
                   help="SD 3 / 3.5 or FLUX.1 single file: its CLIP-L text encoder as a separate file (Stability's "
                        "text_encoders/clip_l.safetensors; for FLUX.1, clip_l.safetensors), for a file that does "
                        "not bundle it")
    p.add_argument("--clip-g", metavar="FILE",
                   help="SD 3 / 3.5 single file: its CLIP-G text encoder (text_encoders/clip_g.safetensors)")
    p.add_argument("--t5", metavar="FILE",
                   help="SD 3 / 3.5 or FLUX.1 single file: its T5-XXL text encoder (t5xxl_fp16.safetensors)")
    p.add_argument("--vae", metavar="FILE",
                   help="FLUX.1 single file: its VAE as a separate file (Black Forest Labs' ae.safetensors)")
    p.add_argument("--tokenizers", metavar="DIR",
                   help="SD 3 / 3.5 or FLUX.1 single file: a folder with the tokenizers of a diffusers folder of "
                        "the family (tokenizer/, tokenizer_2/, and tokenizer_3/ for SD 3); needed for T5 of a "
                        "full-size model")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading a pickled .ckpt/.bin (runs code from the file: only for trusted files)")


def run(args: argparse.Namespace) -> int:
    from sdrt.runtime.errors import InputError

    if args.list:
        from sdrt.export.controlnet_presets import CONTROLNET_PRESETS
        from sdrt.export.preset_tables import get_any_preset, preset_names

        for p in [get_any_preset(n) for n in preset_names()]:
            print(f"{p.name:16s} {p.family:5s} {p.prediction_type:15s} {p.default_size}px")
        for c in CONTROLNET_PRESETS.values():
            print(f"{c.name:16s} {c.family:5s} ControlNet for {c.unet_preset}")
        return 0
    if not args.out:
        raise InputError("--out DIR is required: the folder to write the ONNX export into")

    from sdrt.export.exporter import check_export_dir, export_model
    from sdrt.export.loading import load_model

    check_export_dir(args.out, overwrite=args.overwrite)  # before the weights load
    from sdrt.export.flux_export import is_flux_source
    from sdrt.export.sd3_export import is_sd3_source

    if is_flux_source(args.model, args.random):
        return _run_flux(args)
    if args.vae is not None:
        raise InputError("--vae goes with a FLUX.1 single file (Black Forest Labs' layout: its ae.safetensors); "
                         "this model is not one")
    if is_sd3_source(args.model, args.random):
        return _run_sd3(args)
    if args.without_t5:
        raise InputError("--without-t5 leaves out SD 3 / 3.5's T5 encoder; this model has none")
    if args.skip_layers is not None:
        raise InputError("--skip-layers exports SD 3 / 3.5's skip-layer guidance pass; this model is not SD 3 / 3.5")
    sd3_only = [flag for flag, v in _sd3_file_options(args).items() if v is not None and flag != "--arch"]
    if sd3_only:
        raise InputError(f"{', '.join(sd3_only)} go{'es' if len(sd3_only) == 1 else ''} with an SD 3 / 3.5 "
                         "single file (model.diffusion_model.joint_blocks.*); this model is not one")
    loras = [_lora_spec(s) for s in args.lora or []]  # likewise
    from sdrt.export.lora_slots import SlotPlan

    slots = None if args.lora_slots is None else SlotPlan.parse(args.lora_slots)  # likewise
    t0 = time.perf_counter()
    what = args.model or f"synthetic {args.random} weights"
    print(f"loading {what}", flush=True)
    model = load_model(args.model, random_preset=args.random, seed=args.seed, arch=args.arch,
                       allow_pickle=args.allow_pickle, ema=args.ema)

    nets = _load_controlnets(args, model.unet.config)
    if nets:
        from sdrt.export.controlnet_loading import check_pairing

        check_pairing(model, nets)  # before the LoRAs merge and any export work

    if args.lora:
        from sdrt.export.lora_merge import merge_loras

        reports = merge_loras(model, loras)
        for comp, rep in reports.items():
            if rep.matched:
                print(f"merged LoRA into {len(rep.matched)} {comp} weights"
                      + (f" ({len(rep.unmatched)} LoRA modules matched nothing)" if rep.unmatched else ""))

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    manifest = export_model(model, args.out, overwrite=args.overwrite, fp16=not args.fp32, opset=args.opset, vae_fp32=args.vae_fp32, progress=progress,
                           clip_skip=args.clip_skip, controlnets=nets, deepcache=args.feature_cache,
                           lora_slots=slots)
    if args.ort_cuda:
        from sdrt.export.ort_fusion import add_ort_cuda_variant

        add_ort_cuda_variant(args.out, model, opset=args.opset, progress=progress)
        from sdrt.runtime.manifest import ExportManifest

        manifest = ExportManifest.read(args.out)
    _report(args.out, manifest, t0)
    return 0


def _run_sd3(args: argparse.Namespace) -> int:
    """An SD 3 / 3.5 model: its own loader and exporter (export/sd3_export.py); the options it does not take yet
    are refused before the weights load."""
    from sdrt.export.sd3_export import export_sd3, load_sd3
    from sdrt.runtime.errors import InputError

    given = [flag for flag, on in (("--clip-skip", args.clip_skip), ("--ort-cuda", args.ort_cuda),
                                   ("--vae-fp32", args.vae_fp32), ("--no-ema", not args.ema)) if on]
    if given:
        raise InputError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not supported for SD 3 / 3.5 "
                         "models yet; export without")
    files = [v for kind, v in args.controlnets or [] if kind == "path" and Path(v).is_file()]
    if files:  # the kind of each ControlNet file, from its header, before the weights load
        from sdrt.export.sd3_controlnet_single_file import check_sd3_controlnet_file

        for f in files:
            check_sd3_controlnet_file(f)
    slots = _slot_plan(args, "sd3")
    loras = [_lora_spec(s) for s in args.lora or []]  # checked before the weights load
    opts = {k.removeprefix("--").replace("-", "_"): v for k, v in _sd3_file_options(args).items()}
    if args.random and (given := [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is not None]):
        raise InputError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with an SD 3 / 3.5 single "
                         "file, not --random (pick the architecture with --random PRESET)")
    t0 = time.perf_counter()
    print(f"loading {args.model or f'synthetic {args.random} weights'}", flush=True)
    if args.random:
        model = load_sd3(random_preset=args.random, seed=args.seed)
    else:  # a folder, or a single file with its options (refused for a folder)
        model = load_sd3(args.model, without_t5=args.without_t5, **opts)
    if loras:
        from sdrt.export.sd3_export import merge_sd3_loras

        _merged(merge_sd3_loras(model, loras))

    # paired with the transformer by export_sd3, before any export work
    nets = _load_controlnets(args, transformer_config=model.transformer_config)

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    manifest = export_sd3(model, args.out, overwrite=args.overwrite, fp16=not args.fp32, opset=args.opset,
                          without_t5=args.without_t5, block_cache=args.feature_cache, controlnets=nets,
                          progress=progress, lora_slots=slots, skip_layers=args.skip_layers)
    _report(args.out, manifest, t0)
    return 0


def _layers(text: str) -> list[int]:
    """``--skip-layers 7,8,9`` -> [7, 8, 9] (checked against the transformer by the export)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block numbers, e.g. 7,8,9") \
            from None


def _run_flux(args: argparse.Namespace) -> int:
    """A FLUX.1 model: its own loader and exporter (export/flux_export.py), in fp32 (FLUX.1 overflows fp16); the
    options it does not take yet are refused before the weights load."""
    from sdrt.export.flux_export import export_flux, load_flux
    from sdrt.runtime.errors import InputError

    given = [flag for flag, on in (("--clip-skip", args.clip_skip), ("--ort-cuda", args.ort_cuda),
                                   ("--vae-fp32", args.vae_fp32), ("--no-ema", not args.ema),
                                   ("--without-t5", args.without_t5),
                                   ("--skip-layers", args.skip_layers is not None)) if on]
    if given:
        raise InputError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not supported for FLUX.1 "
                         "models yet; export without")
    files = [v for kind, v in args.controlnets or [] if kind == "path" and Path(v).is_file()]
    if files:
        raise InputError(f"{files[0]} is a single file; FLUX.1 ControlNets load from a diffusers folder "
                         "(config.json naming FluxControlNetModel, with its .safetensors) for now")
    slots = _slot_plan(args, "flux")
    loras = [_lora_spec(s) for s in args.lora or []]  # checked before the weights load
    if args.clip_g is not None:
        raise InputError("--clip-g goes with an SD 3 / 3.5 single file; FLUX.1 has no CLIP-G (its encoders: "
                         "--clip-l, --t5)")
    opts = {"clip_l": args.clip_l, "t5": args.t5, "vae": args.vae, "tokenizers": args.tokenizers,
            "arch": args.arch}
    if args.random and (flags := [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is not None]):
        raise InputError(f"{', '.join(flags)} go{'es' if len(flags) == 1 else ''} with a FLUX.1 single file, not "
                         "--random (pick the architecture with --random PRESET)")
    t0 = time.perf_counter()
    print(f"loading {args.model or f'synthetic {args.random} weights'}", flush=True)
    if args.random:
        model = load_flux(random_preset=args.random, seed=args.seed)
    else:  # a folder, or a single file with its options (refused for a folder)
        model = load_flux(args.model, **opts)
    if loras:
        from sdrt.export.flux_export import merge_flux_loras

        _merged(merge_flux_loras(model, loras))
    nets = _load_controlnets(args)  # paired with the transformer by export_flux, before any export work

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    if not args.fp32:
        progress("FLUX.1 is exported in fp32: it overflows fp16 (NaN images, diffusers issue 9096), and sdrt "
                 "exports no bf16 graph yet")
    manifest = export_flux(model, args.out, overwrite=args.overwrite, fp16=False, opset=args.opset,
                           block_cache=args.feature_cache, progress=progress, lora_slots=slots, controlnets=nets)
    _report(args.out, manifest, t0)
    return 0


def _load_controlnets(args: argparse.Namespace, unet_config=None,  # type: ignore[no-untyped-def]
                      transformer_config=None) -> list:
    """--controlnet / --random-controlnet, loaded in the order given (``unet_config``: the UNet a single file's
    architecture is matched against; ``transformer_config``: the SD 3 / 3.5 transformer, whose head width a single
    file takes)."""
    nets = []
    if args.controlnets:
        from sdrt.export.controlnet_loading import load_controlnet, random_controlnet

        for kind, value in args.controlnets:
            print(f"loading ControlNet {value}" if kind == "path" else f"making a {value} ControlNet", flush=True)
            nets.append(load_controlnet(value, allow_pickle=args.allow_pickle, unet_config=unet_config,
                                        transformer_config=transformer_config)
                        if kind == "path" else random_controlnet(value, seed=args.seed))
    return nets


def _merged(reports) -> None:  # type: ignore[no-untyped-def]
    """What ``--lora`` merged, per component (a component none of whose modules matched: said so)."""
    for comp, rep in reports.items():
        if rep.matched:
            print(f"merged LoRA into {len(rep.matched)} {comp} weights"
                  + (f" ({len(rep.unmatched)} LoRA modules matched nothing)" if rep.unmatched else ""))
        elif rep.unmatched:
            print(f"{len(rep.unmatched)} LoRA modules of {comp} matched nothing (not applied; e.g. "
                  f"{rep.unmatched[0]})")


def _slot_plan(args: argparse.Namespace, family: str):  # type: ignore[no-untyped-def]
    """``--lora-slots`` for a transformer family, checked against the family's targets before the weights load."""
    from sdrt.export.lora_slots import SlotPlan
    from sdrt.runtime.families import family_named

    if args.lora_slots is None:
        return None
    plan = SlotPlan.parse(args.lora_slots)
    family_named(family).lora_targets(plan.targets)  # an InputError for a target set the family has not
    return plan


def _sd3_file_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The options an SD 3 / 3.5 single file takes, by flag (--arch: its architecture, e.g. sd35-large-turbo;
    the UNet families' single files take it too)."""
    return {"--clip-l": args.clip_l, "--clip-g": args.clip_g, "--t5": args.t5,
            "--tokenizers": args.tokenizers, "--arch": args.arch}


def _report(out: str, manifest, t0: float) -> None:  # type: ignore[no-untyped-def]
    """What was written: each component's precision, size and parity against PyTorch."""
    print(f"\nwrote {out} ({manifest.preset}, {manifest.family}, {manifest.prediction_type}) "
          f"in {time.perf_counter() - t0:.1f} s")
    from sdrt.export.onnx_export import IMAGE_LEVELS, PARITY_BOUND

    print(f"{'component':16s} {'precision':9s} {'size MB':>8s} {'error':>11s} {'bound':>9s}")
    for name, c in manifest.components.items():
        par = c.parity
        if par is None:  # a streamed component: its weights were read back, its outputs not compared
            err, bound = "streamed", "-"
        elif par.bound != PARITY_BOUND[c.precision]:  # an image output: judged in levels of 255
            err, bound = f"{par.max_abs_err:.0f} levels", f"{IMAGE_LEVELS[c.precision]} levels"
        else:
            err, bound = f"{par.rel_err:.2e}", f"{par.bound:.0e}"
        folder = c.path.split("/")[0]
        label = name if folder == name else f"{name} ({folder})"  # SD3's denoiser: unet (transformer)
        print(f"{label:16s} {c.precision:9s} {c.size_bytes / 1e6:8.1f} {err:>11s} {bound:>9s}")
    print("error: relative to the PyTorch module's largest output; uint8 images: levels of 255"
          + ("; streamed: too large to compare with PyTorch here, every weight read back equal to its source"
             if any(c.parity is None for c in manifest.components.values()) else ""))


def _lora_spec(text: str):  # type: ignore[no-untyped-def]
    """``--lora FILE[:SCALE]`` -> a LoraSpec whose file exists, or an InputError that names the real problem
    (a scale that is not a number reads as part of the file name otherwise)."""
    from pathlib import Path

    from sdrt.runtime.errors import InputError
    from sdrt.runtime.lora_files import LoraSpec

    spec = LoraSpec.parse(text)
    if spec.path.is_file():
        return spec
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).is_file():
        raise InputError(f"--lora {text}: the scale {tail!r} is not a number; give FILE:SCALE with a number "
                         f"(e.g. {head}:0.8), or FILE alone for scale 1")
    what = "is a folder" if spec.path.is_dir() else "does not exist"
    raise InputError(f"--lora {text}: the LoRA file {spec.path} {what}; give a .safetensors file, optionally "
                     "with :SCALE")
