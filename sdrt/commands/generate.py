"""``sdrt generate``: images from an ONNX export or engine folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an sdrt ONNX export (sdrt export) or engine folder (sdrt build)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="dpmpp-2m", help="ddim, dpmpp-2m, dpmpp-2m-karras, euler, euler-a, lcm")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, tensorrt")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the denoising step as CUDA graphs (GPU; default: on for tensorrt, off for ort-cuda)")
    p.add_argument("--init-image", default=None, help="img2img: the starting image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much to change the image (0, 1]")
    p.add_argument("-o", "--output", default="out.png", help="output file; batches get _1, _2, ... suffixes")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdrt.runtime.errors import InputError
    from sdrt.runtime.pipeline import Pipeline

    from ._report import timing_table

    image = None
    if args.init_image:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.init_image)
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"cannot read --init-image {args.init_image}: {e}") from e
    pipe = Pipeline.load(args.path, backend=args.backend, cuda_graph=args.cuda_graph)
    print(f"{pipe.manifest.preset} on {pipe.backend.name}")
    bar = tqdm(total=None, unit="step", desc="denoising")

    def progress(i: int, n: int) -> None:
        bar.total = n
        bar.update(1)

    try:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed,
                      batch_size=args.batch_size, image=image, strength=args.strength, callback=progress)
    finally:
        bar.close()
    out = Path(args.output)
    paths = [out] if len(result.images) == 1 else [
        out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(len(result.images))]
    for img, path in zip(result.images, paths):
        img.save(path)
        print(f"wrote {path}")
    print(timing_table(result.timings, len(result.timings["unet_steps_ms"])))
    print(f"denoising loop: {result.loop}")
    return 0
