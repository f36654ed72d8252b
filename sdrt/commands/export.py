"""``sdrt export``: a checkpoint (or synthetic weights) -> a verified ONNX folder."""

from __future__ import annotations

import argparse
import time


def register(p: argparse.ArgumentParser) -> None:
    from sdrt.export.exporters import register_family_flags

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="a diffusers folder or a single-file .safetensors checkpoint")
    src.add_argument("--random", metavar="PRESET", help="synthetic weights of a preset architecture (see --list)")
    src.add_argument("--list", action="store_true", help="list the architecture presets and exit")
    p.add_argument("--out", metavar="DIR",
                   help="output folder: new, empty or a previous sdrt export, replaced atomically when the export "
                        "succeeds (any other folder needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not an sdrt export, deleting what it holds")
    p.add_argument("--fp32", action="store_true", help="export fp32 graphs (default: fp16; the SDXL VAE is fp32; FLUX.1: fp32 unless --bf16)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    p.add_argument("--arch", metavar="PRESET", help="architecture of a single-file checkpoint, if not detected")
    p.add_argument("--seed", type=int, default=0, help="seed of --random weights (default 0)")
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
    register_family_flags(p)  # those of the exporters (export/exporters.py), each declared by its exporter
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

    from sdrt.export.cli_options import dest
    from sdrt.export.exporter import check_export_dir
    from sdrt.export.exporters import check_flags, claiming, option_flags

    check_export_dir(args.out, overwrite=args.overwrite)  # before the weights load
    exporter = claiming(args.model, args.random)
    given = [f for f in option_flags() if getattr(args, dest(f)) not in (None, False)]  # 0, False, None: not set
    check_flags(exporter, given, random=args.random is not None)  # before the weights load
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    manifest = exporter.run(args, lambda line: print(line, flush=True), progress)
    _report(args.out, manifest, t0)
    return 0


def _report(out: str, manifest, t0: float) -> None:  # type: ignore[no-untyped-def]
    """What was written: each component's precision, size and parity against PyTorch."""
    print(f"\nwrote {out} ({manifest.preset}, {manifest.family}, {manifest.prediction_type}) "
          f"in {time.perf_counter() - t0:.1f} s")
    from sdrt.export.onnx_export import IMAGE_LEVELS, bound_text, image_parity

    print(f"{'component':16s} {'precision':9s} {'size MB':>8s} {'error':>11s} {'bound':>9s}")
    for name, c in manifest.components.items():
        par = c.parity
        if par is None:  # a streamed component: its weights were read back, its outputs not compared
            err, bound = "streamed", "-"
        elif image_parity(par, c.precision):  # an image output: judged in levels of 255
            err, bound = f"{par.max_abs_err:.0f} levels", f"{IMAGE_LEVELS[c.precision]} levels"
        else:
            err, bound = f"{par.rel_err:.2e}", bound_text(par, c.precision)
        folder = c.path.split("/")[0]
        label = name if folder == name else f"{name} ({folder})"  # SD3's denoiser: unet (transformer)
        print(f"{label:16s} {c.precision:9s} {c.size_bytes / 1e6:8.1f} {err:>11s} {bound:>9s}")
    print("error: relative to the PyTorch module's largest output; uint8 images: levels of 255"
          + ("; streamed: too large to compare with PyTorch here, every weight read back equal to its source"
             if any(c.parity is None for c in manifest.components.values()) else ""))
