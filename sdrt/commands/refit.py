"""``sdrt refit``: new weights into refittable TensorRT engines (or into a copy of an ONNX export),
without rebuilding: a checkpoint of the same architecture, stacked LoRAs, or back to the base weights."""

from __future__ import annotations

import argparse
import time


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="an engine folder (refitted in place, atomically) or an ONNX export (needs --out)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                     help="a LoRA .safetensors (kohya/A1111 or diffusers keys) with its strength; repeat to stack")
    src.add_argument("--checkpoint", metavar="PATH", help="weights of the same architecture (diffusers folder or .safetensors)")
    src.add_argument("--base", action="store_true", help="restore the export's own weights")
    p.add_argument("--onnx", metavar="DIR", help="the ONNX export the engines were built from (default: as recorded)")
    p.add_argument("--out", metavar="DIR",
                   help="with an ONNX export as target: where to write the refitted copy (new, empty or a previous "
                        "sdrt export; any other folder needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not an sdrt export, deleting what it holds")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickled checkpoint (runs code from the file)")


def run(args: argparse.Namespace) -> int:
    from sdrt.export.refit import RefitRequest, refit_folder
    from sdrt.runtime.lora_files import LoraSpec

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    request = RefitRequest(
        loras=tuple(LoraSpec.parse(s) for s in args.lora or ()),
        checkpoint=args.checkpoint,
        base=args.base,
        allow_pickle=args.allow_pickle,
    )
    result = refit_folder(args.target, request, onnx_dir=args.onnx, out=args.out, progress=progress,
                          overwrite=args.overwrite)
    for line in result.warnings:
        print(f"warning: {line}")
    print(f"\n{result.folder}: {result.weights} ({', '.join(result.components)}) in {time.perf_counter() - t0:.1f} s")
    return 0
