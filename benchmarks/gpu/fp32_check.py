"""Correctness on the GPU (issue 7): an sdrt image against diffusers on PyTorch in float32, same latents.

`sdrt bench` already compares each backend's first image with the eager baseline (``image_vs_baseline``),
but that baseline runs in the bench's precision (fp16 on a GPU). This script adds the float32 reference:

1. the sdrt pipeline on ``--backend`` (ort-cuda: the fp16 export, fused UNet variant) from ``--latents``;
2. diffusers on PyTorch in float32 (TF32 off for matmuls and cuDNN) with the export's own weights
   (a preset's synthetic weights rebuilt from the seed in the export's manifest), same latents;
3. on a GPU, the same diffusers pipeline in float16 (SDPA): the error PyTorch's own fp16 makes, which
   gives the bound its scale.

Reported, as JSON: mean/max absolute pixel difference (0..255), RMSE, PSNR and the relative L2 error of
each pair, and NaN/inf counts of every output. The bound (``pass``): no NaN or inf anywhere, and the sdrt
image's mean absolute difference from fp32 at most ``max(2 x PyTorch fp16's, 1.0)`` (without an fp16
reference, CPU runs: at most 1.0). Also a PNG strip: sdrt | fp32 | fp16 | 8 x |sdrt - fp32|.

    python3 benchmarks/gpu/fp32_check.py --artifact EXPORT --backend ort-cuda --latents L.npy \
        --steps 30 --out check.json --png check.png
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BOUND_FACTOR = 2.0
BOUND_FLOOR = 1.0  # mean abs, 0..255 pixel units


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Pixel difference of two uint8 images (H, W, 3), as in 0..255 units."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(x - y)
    rmse = float(np.sqrt((d ** 2).mean()))
    return {
        "mean_abs": float(d.mean()),
        "max_abs": float(d.max()),
        "rmse": rmse,
        "psnr_db": None if rmse == 0 else float(20 * math.log10(255.0 / rmse)),  # None: identical
        "rel_l2": float(np.linalg.norm(x - y)) / max(float(np.linalg.norm(y)), 1e-12),
        "pixels_over_8": int((d.max(axis=-1) > 8).sum()),
    }


def bound(sdrt_vs_fp32: dict[str, Any], fp16_vs_fp32: dict[str, Any] | None, nonfinite: int) -> dict[str, Any]:
    limit = BOUND_FLOOR if fp16_vs_fp32 is None else max(BOUND_FACTOR * fp16_vs_fp32["mean_abs"], BOUND_FLOOR)
    ok = nonfinite == 0 and sdrt_vs_fp32["mean_abs"] <= limit
    rule = (f"no NaN/inf in any output, and mean |sdrt - fp32| <= max({BOUND_FACTOR:g} x mean |torch fp16 - fp32|, "
            f"{BOUND_FLOOR:g}) pixel units" if fp16_vs_fp32 is not None else
            f"no NaN/inf in any output, and mean |sdrt - fp32| <= {BOUND_FLOOR:g} pixel units (no fp16 reference)")
    return {"pass": bool(ok), "limit_mean_abs": limit, "rule": rule}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' numpy output (N, H, W, 3) in [0, 1] -> uint8, as its numpy_to_pil rounds."""
    return (np.nan_to_num(images) * 255).round().clip(0, 255).astype(np.uint8)


def _diffusers_pipe(folder: Path, manifest: Any, scheduler: str) -> tuple[Any, dict[str, Any]]:
    """diffusers' pipeline over the export's own weights, float32, on the CPU (moved by the caller)."""
    import diffusers
    from transformers import CLIPTokenizer

    from sdrt.benchmarks.worker import SCHEDULERS
    from sdrt.export.loading import load_model

    src = dict(manifest.source)
    if src.get("kind") == "random":
        model = load_model(random_preset=str(src["preset"]), seed=int(src.get("seed", 0)))
    elif src.get("kind") in ("diffusers", "single_file") and src.get("path"):
        model = load_model(str(src["path"]))
    else:
        raise SystemExit(f"the export does not say where its weights came from ({src}); no reference possible")
    cls_name, extra = SCHEDULERS[scheduler]
    sched = getattr(diffusers, cls_name).from_config(dict(model.scheduler_config), **extra)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if manifest.family == "sdxl":
        pipe: Any = diffusers.StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1], tokenizer=tok,
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), unet=model.unet, scheduler=sched,
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=tok, unet=model.unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, src


def _run_torch(pipe: Any, latents: np.ndarray, args: argparse.Namespace, device: str, dtype: Any) -> np.ndarray:
    import torch

    lat = torch.from_numpy(latents).to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.inference_mode():
        out = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, num_images_per_prompt=1, generator=gen, latents=lat,
                   output_type="np")
    if device == "cuda":
        torch.cuda.synchronize()
    return np.asarray(out.images, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    from sdrt.benchmarks.bench import DEFAULT_PROMPT

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="the sdrt export folder")
    p.add_argument("--backend", default="ort-cuda")
    p.add_argument("--device", default=None, help="cuda or cpu for PyTorch (default: cuda when available)")
    p.add_argument("--latents", default=None, help=".npy latents (the bench's work dir has latents-HxW-b1.npy); "
                                                   "default: drawn as the bench draws them from --seed")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-fp16", action="store_true", help="skip the PyTorch fp16 reference (default on a GPU: run it)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--png", default=None, help="also write the side-by-side strip here")
    args = p.parse_args(argv)

    from sdrt.runtime.manifest import ExportManifest
    from sdrt.runtime.pipeline import Pipeline

    folder = Path(args.artifact)
    manifest = ExportManifest.read(folder)
    args.height = args.height or manifest.default_size
    args.width = args.width or manifest.default_size
    f = manifest.vae_scale_factor
    shape = (1, manifest.latent_channels, args.height // f, args.width // f)
    if args.latents:
        latents = np.load(args.latents).astype(np.float32)
    else:
        latents = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)
    if latents.shape != shape:
        raise SystemExit(f"latents {args.latents} have shape {latents.shape}, expected {shape}")
    timings: dict[str, float] = {}
    result: dict[str, Any] = {
        "artifact": str(folder), "preset": manifest.preset, "family": manifest.family, "backend": args.backend,
        "unet_precision": manifest.components["unet"].precision,
        "unet_graph": manifest.components["unet"].variants.get(args.backend, manifest.components["unet"].path),
        "height": args.height, "width": args.width, "steps": args.steps, "guidance_scale": args.guidance,
        "sampler": args.sampler, "seed": args.seed, "prompt": args.prompt,
        "latents": args.latents or f"np.random.default_rng({args.seed}).standard_normal({shape})",
    }

    # 1. sdrt
    t0 = time.perf_counter()
    import torch  # first: it loads the CUDA libraries that onnxruntime's CUDA EP links against

    pipe = Pipeline.load(folder, backend=args.backend, threads=args.threads)
    r = pipe(args.prompt, height=args.height, width=args.width, steps=args.steps, guidance_scale=args.guidance,
             sampler=args.sampler, seed=args.seed, batch_size=1, latents=latents)
    sdrt_img = np.asarray(r.images[0].convert("RGB"), dtype=np.uint8)
    nonfinite = {"sdrt_images_nonfinite": int(sum(bool(x) for x in r.nonfinite))}
    result["sdrt_backend"] = pipe.backend.name
    import onnxruntime

    result["versions"] = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    del pipe, r
    gc.collect()
    timings["sdrt_s"] = time.perf_counter() - t0

    # 2. PyTorch float32 (and float16 on a GPU)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    ref, src = _diffusers_pipe(folder, manifest, args.sampler)
    import diffusers

    result["versions"].update(diffusers=diffusers.__version__, torch_cuda=torch.version.cuda)
    result["reference_weights"] = src
    ref = ref.to(device)
    timings["torch_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp32 = _run_torch(ref, latents, args, device, torch.float32)
    timings["torch_fp32_s"] = time.perf_counter() - t0
    nonfinite["torch_fp32_nonfinite_values"] = int((~np.isfinite(fp32)).sum())
    fp32_img = to_uint8(fp32)[0]
    fp16_img = None
    if device == "cuda" and not args.no_fp16:
        t0 = time.perf_counter()
        ref = ref.to(torch.float16)
        fp16 = _run_torch(ref, latents, args, device, torch.float16)
        timings["torch_fp16_s"] = time.perf_counter() - t0
        nonfinite["torch_fp16_nonfinite_values"] = int((~np.isfinite(fp16)).sum())
        fp16_img = to_uint8(fp16)[0]
    result["torch_device"] = device
    result["torch_tf32"] = False

    # 3. compare
    sdrt_vs_fp32 = compare(sdrt_img, fp32_img)
    fp16_vs_fp32 = compare(fp16_img, fp32_img) if fp16_img is not None else None
    result["sdrt_vs_fp32"] = sdrt_vs_fp32
    result["torch_fp16_vs_fp32"] = fp16_vs_fp32
    result["sdrt_vs_torch_fp16"] = compare(sdrt_img, fp16_img) if fp16_img is not None else None
    result["nonfinite"] = nonfinite
    result["bound"] = bound(sdrt_vs_fp32, fp16_vs_fp32, sum(nonfinite.values()))
    result["timings_s"] = timings
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        from PIL import Image

        diff = np.clip(np.abs(sdrt_img.astype(np.int16) - fp32_img.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
        tiles = [sdrt_img, fp32_img] + ([fp16_img] if fp16_img is not None else []) + [diff]
        Image.fromarray(np.concatenate(tiles, axis=1)).save(args.png)
    line = (f"fp32 check ({args.backend} vs PyTorch fp32): mean abs {sdrt_vs_fp32['mean_abs']:.3f}, max abs "
            f"{sdrt_vs_fp32['max_abs']:.0f}, PSNR {sdrt_vs_fp32['psnr_db'] or float('inf'):.1f} dB")
    if fp16_vs_fp32 is not None:
        line += f"; PyTorch fp16 vs fp32: mean abs {fp16_vs_fp32['mean_abs']:.3f}, max abs {fp16_vs_fp32['max_abs']:.0f}"
    print(line)
    print(f"nonfinite: {nonfinite}; bound: {'PASS' if result['bound']['pass'] else 'FAIL'} "
          f"(limit {result['bound']['limit_mean_abs']:.3f}: {result['bound']['rule']})")
    return 0 if result["bound"]["pass"] else 3


if __name__ == "__main__":
    sys.exit(main())
