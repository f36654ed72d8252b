"""``sdrt demo``: the embedded default. No GPU, no checkpoint, nothing downloaded.

By default it exports the shapes model that ships with sdrt (``sdrt.quality``: a tiny Stable Diffusion trained
here on pictures of shapes; reused when already exported), draws the prompt on the best backend present, reads
the picture back and says whether it shows what was asked, and prints the per-stage timings. ``--preset NAME``
exports synthetic weights of a shipped architecture instead (structured noise: for the timings only).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from sdrt.runtime.manifest import ShapeLimits

SIZES = ShapeLimits()  # what an export accepts (exporter.export_model writes these limits)
DEFAULT_SIZE = 256  # a synthetic preset's; the shapes model draws at the size it was trained at (64)
DEFAULT_PROMPT = "a red circle at the top left on a white background"
# the backends that run an ONNX export (runtime.pipeline.BACKENDS without tensorrt)
BACKENDS = ("auto", "ort-cpu", "ort-cuda", "openvino")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="sdrt-demo", help="working folder (default ./sdrt-demo)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"what to draw (default {DEFAULT_PROMPT!r}); the shapes model knows a circle, square or "
                        "triangle in red, green, blue, yellow, orange or purple, at the top left, top right, bottom "
                        "left, bottom right or in the center, on a white, black or gray background")
    p.add_argument("--preset", default=None,
                   help="export synthetic weights of this tiny preset instead of the shapes model (e.g. sd15-tiny: "
                        "structured noise, for the timings)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (default: ort-cuda when onnxruntime-gpu sees a GPU, else openvino when it is "
                        "installed, else ort-cpu), ort-cpu, ort-cuda or openvino: the demo runs the ONNX export, "
                        "not TensorRT engines")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of dpmpp-2m (default 20)")
    p.add_argument("--seed", type=int, default=0, help="the noise seed (default 0)")
    p.add_argument("--size", type=int, default=None,
                   help=f"image height and width in pixels, a multiple of {SIZES.multiple_of} from "
                        f"{SIZES.min_size} to {SIZES.max_size} (default: 64 for the shapes model, which was "
                        f"trained at that size; {DEFAULT_SIZE} for a --preset)")


def _check_size(size: int | None) -> None:
    """Before the export: the sizes every export accepts (its manifest's limits are these defaults)."""
    from sdrt.runtime.errors import InputError

    if size is not None and (size % SIZES.multiple_of or not SIZES.min_size <= size <= SIZES.max_size):
        raise InputError(f"--size {size} is not supported: use a multiple of {SIZES.multiple_of} from "
                         f"{SIZES.min_size} to {SIZES.max_size}, or leave --size out for the default (64 for the "
                         f"shapes model, {DEFAULT_SIZE} for a --preset)")


def _export(args: argparse.Namespace, onnx_dir: Path, t0: float) -> None:
    """Export the shapes model (or the preset's synthetic weights) to ``onnx_dir``, unless an export of the
    same weights is there already."""
    from sdrt.quality import MODEL_DIR
    from sdrt.runtime.errors import ArtifactError, CompatibilityError
    from sdrt.runtime.manifest import ExportManifest

    try:
        manifest = ExportManifest.read(onnx_dir)
    except (ArtifactError, CompatibilityError):
        manifest = None
    from sdrt.export.exporter import export_model
    from sdrt.export.loading import folder_digest, load_model

    if args.preset is None:
        if manifest is not None and manifest.source.get("sha256") == folder_digest(MODEL_DIR):
            print(f"reusing {onnx_dir}")
            return
        print(f"exporting the shapes model ({MODEL_DIR}) to {onnx_dir} (fp32: this demo runs on the CPU)")
        model = load_model(MODEL_DIR)
    else:
        if manifest is not None:
            print(f"reusing {onnx_dir}")
            return
        print(f"exporting synthetic {args.preset} weights to {onnx_dir} (fp32: this demo runs on the CPU)")
        model = load_model(random_preset=args.preset)
    export_model(model, onnx_dir, fp16=False,
                 progress=lambda m: print(f"  [{time.perf_counter() - t0:5.1f}s] {m}", flush=True))


def _say_what_it_shows(prompt: str, image: object) -> None:
    """The score of the picture: which of the asked attributes it shows (the shapes model's prompts only)."""
    from sdrt.quality import score, shapes

    reading = score.read(image)  # type: ignore[arg-type]
    print(f"the picture shows: {reading.describe()} (read back by sdrt.quality.score)")
    asked = shapes.parse(prompt)
    if asked is None:
        print("score: none (the score reads the shapes model's own prompts, like "
              f"{DEFAULT_PROMPT!r}; this one is not)")
        return
    got = reading.attributes()
    marks = [f"{a} {want} {'yes' if got[a] == want else 'NO (' + str(got[a]) + ')'}"
             for a, want in asked.attributes().items()]
    right = sum(got[a] == want for a, want in asked.attributes().items())
    print(f"score: {right} of {len(marks)} asked attributes shown: " + ", ".join(marks))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdrt.quality import suite
    from sdrt.runtime.pipeline import Pipeline

    from ._report import print_warnings, timing_table
    from .generate import write_image

    _check_size(args.size)
    shapes_model = args.preset is None
    size = args.size or (64 if shapes_model else DEFAULT_SIZE)
    out = Path(args.out)
    onnx_dir = out / ("shapes-onnx" if shapes_model else f"{args.preset}-onnx")
    t0 = time.perf_counter()
    _export(args, onnx_dir, t0)
    t_load = time.perf_counter()
    pipe = Pipeline.load(onnx_dir, backend=args.backend)
    load_ms = (time.perf_counter() - t_load) * 1e3
    guidance = suite.GUIDANCE if shapes_model else 7.5
    prompt = args.prompt if shapes_model or args.prompt != DEFAULT_PROMPT else "a lighthouse on a cliff at dawn"
    print(f"\ngenerating {size}x{size}, {args.steps} steps of dpmpp-2m, guidance {guidance:g}, seed {args.seed} "
          f"on {pipe.backend.name}: {prompt!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tqdm(total=args.steps, unit="step", desc="denoising") as bar:
            result = pipe(prompt, height=size, width=size, steps=args.steps, seed=args.seed,
                          guidance_scale=guidance, callback=lambda i, n: bar.update(1))
    print_warnings(caught)
    path = out / "demo.png"
    write_image(result.images[0], path)
    print(f"\nwrote {path}")
    if shapes_model:
        _say_what_it_shows(prompt, result.images[0])
    else:
        print("(synthetic weights: expect structured noise, not a picture)")
    print(f"load {load_ms:.0f} ms")
    print(timing_table(result.timings, args.steps))
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0
