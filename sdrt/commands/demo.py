"""``sdrt demo``: the embedded default. No GPU, no checkpoint, nothing downloaded.

Exports the tiny synthetic SD1.5-architecture model (reused when already exported), generates one
image on the best backend present, and prints the per-stage timings.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from sdrt.runtime.manifest import ShapeLimits

SIZES = ShapeLimits()  # what an export accepts (exporter.export_model writes these limits)
DEFAULT_SIZE = 256
# the backends that run an ONNX export (runtime.pipeline.BACKENDS without tensorrt)
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "openvino")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="sdrt-demo", help="working folder (default ./sdrt-demo)")
    p.add_argument("--preset", default="sd15-tiny", help="tiny preset to export (default sd15-tiny)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (default: ort-cuda when onnxruntime-gpu sees a GPU, else openvino when it is "
                        "installed, else ort-cpu), ort-cpu, ort-cuda or openvino: the demo runs the ONNX export, "
                        "not TensorRT engines")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of dpmpp-2m (default 20)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"image height and width in pixels, a multiple of {SIZES.multiple_of} from "
                        f"{SIZES.min_size} to {SIZES.max_size} (default {DEFAULT_SIZE})")


def _check_size(size: int) -> None:
    """Before the export: the sizes every export accepts (its manifest's limits are these defaults)."""
    from sdrt.runtime.errors import InputError

    if size % SIZES.multiple_of or not SIZES.min_size <= size <= SIZES.max_size:
        raise InputError(f"--size {size} is not supported: use a multiple of {SIZES.multiple_of} from "
                         f"{SIZES.min_size} to {SIZES.max_size}, or leave --size out for the default ({DEFAULT_SIZE})")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdrt.runtime.errors import ArtifactError, CompatibilityError
    from sdrt.runtime.manifest import ExportManifest
    from sdrt.runtime.pipeline import Pipeline

    from ._report import print_warnings, timing_table
    from .generate import write_image

    _check_size(args.size)
    out = Path(args.out)
    onnx_dir = out / f"{args.preset}-onnx"
    t0 = time.perf_counter()
    try:
        ExportManifest.read(onnx_dir)
        print(f"reusing {onnx_dir}")
    except (ArtifactError, CompatibilityError):
        from sdrt.export.exporter import export_model
        from sdrt.export.loading import load_model

        print(f"exporting synthetic {args.preset} weights to {onnx_dir} (fp32: this demo runs on the CPU)")
        export_model(load_model(random_preset=args.preset), onnx_dir, fp16=False,
                     progress=lambda m: print(f"  [{time.perf_counter() - t0:5.1f}s] {m}", flush=True))
    t_load = time.perf_counter()
    pipe = Pipeline.load(onnx_dir, backend=args.backend)
    load_ms = (time.perf_counter() - t_load) * 1e3
    prompt = "a lighthouse on a cliff at dawn, oil painting"
    print(f"\ngenerating {args.size}x{args.size}, {args.steps} steps of dpmpp-2m on {pipe.backend.name}: {prompt!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tqdm(total=args.steps, unit="step", desc="denoising") as bar:
            result = pipe(prompt, height=args.size, width=args.size, steps=args.steps, seed=0,
                          callback=lambda i, n: bar.update(1))
    print_warnings(caught)
    path = out / "demo.png"
    write_image(result.images[0], path)
    print(f"\nwrote {path} (synthetic weights: expect structured noise, not a picture)")
    print(f"load {load_ms:.0f} ms")
    print(timing_table(result.timings, args.steps))
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0
