"""``sdrt generate``: images from an ONNX export or engine folder."""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

# what --output may end in, and the PIL format written
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}
# the images of a run without -o, in the current folder: the first names not taken
DEFAULT_NAME = "out-{:04d}.png"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an sdrt ONNX export (sdrt export) or engine folder (sdrt build)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30, help="denoising steps, 1 up to the model's schedule (default 30)")
    p.add_argument("--sampler", default=None,
                   help="ddim, dpmpp-2m, dpmpp-2m-karras, euler, euler-a, lcm; flow models: flow-euler, "
                        "flow-dpmpp-2m (default: dpmpp-2m, flow models flow-euler)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 0 to 100 (default 7.5; 5-9 is typical); 1 or less turns "
                        "it off")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="rescale guided outputs toward the conditional one's spread, 0 to 1 (default 0; 0.7 for "
                        "v-prediction models trained with zero terminal SNR)")
    p.add_argument("--timestep-spacing", default=None, choices=("leading", "trailing", "linspace"),
                   help="override the model's scheduler configuration (turbo models: trailing)")
    p.add_argument("--seed", type=int, default=None,
                   help="0 to 4294967295; default: a random seed, printed so the image can be reproduced")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of 8 from 64 to 2048 (default: the model's size; img2img: the image's "
                        "own size rounded down to a multiple of 8)")
    p.add_argument("--width", type=int, default=None, help="pixels, as --height")
    p.add_argument("--batch-size", type=int, default=1, help="images per prompt, 1 to 16 (default 1)")
    p.add_argument("--backend", default="auto", help="auto, ort-cpu, ort-cuda, tensorrt, openvino")
    p.add_argument("--precision", default=None, choices=("auto", "bf16", "fp32"),
                   help="openvino only: its inference precision (default auto: bf16 where the CPU has it, else "
                        "fp32); the other backends compute in the export's or engines' precision")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the denoising step as CUDA graphs (GPU; default: on for tensorrt, off for ort-cuda)")
    p.add_argument("--init-image", default=None, help="img2img: the starting image")
    p.add_argument("--mask", default=None,
                   help="inpainting (needs --init-image): a mask of the image's size, white = repaint; on an "
                        "editing model (FLUX.1 Kontext) the image is sized as --reference is")
    p.add_argument("--paste-back", type=float, default=None, metavar="BLUR",
                   help="inpainting: paste the original pixels outside the mask back, through the mask blurred by "
                        "BLUR pixels (0: a hard edge)")
    p.add_argument("--padding-mask-crop", type=int, default=None, metavar="N",
                   help="inpainting: inpaint only the region of the mask, at full size: the box around the mask grown "
                        "by N pixels and widened to the output aspect ratio is cut out, generated at --height x "
                        "--width (default: the image size) and pasted back into the image through the mask")
    p.add_argument("--reference", default=None, metavar="IMG",
                   help="an editing model (FLUX.1 Kontext): the image to edit; its latents condition every step and "
                        "the output starts from noise, at the reference's size unless --height/--width say; with "
                        "--init-image and --mask (Kontext inpainting) the reference beside the image (default: the "
                        "image itself)")
    p.add_argument("--reference-resize", action=argparse.BooleanOptionalAction, default=True,
                   help="resize --reference to the model's preferred resolution nearest its aspect ratio (Kontext's, "
                        "as diffusers; default); --no-reference-resize keeps its size, rounded down to 16 pixels")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img and inpainting (needs --init-image): how much to change the image, in (0, 1] "
                        "(default 0.8; inpainting 1)")
    p.add_argument("--control-image", action="append", default=None, metavar="IMG",
                   help="ControlNet: a control image, repeatable, one per ControlNet of the export in order (an "
                        "export made with --controlnet); a control model (FLUX.1 Depth / Canny) takes one, a depth "
                        "map or canny edges; resized to the output size")
    p.add_argument("--control-scale", action="append", type=float, default=None, metavar="S",
                   help="ControlNet: the conditioning scale, 0 to 10 (default 1), once for all nets or once per "
                        "--control-image")
    p.add_argument("--control-start", action="append", type=float, default=None, metavar="F",
                   help="ControlNet: the fraction of the steps where a net starts (default 0), as --control-scale")
    p.add_argument("--control-end", action="append", type=float, default=None, metavar="F",
                   help="ControlNet: the fraction of the steps where a net stops (default 1), as --control-scale")
    p.add_argument("--control-mode", action="append", type=int, default=None, metavar="M",
                   help="ControlNet: a Union net's control mode (FLUX.1's Union ControlNets; diffusers' "
                        "control_mode), as --control-scale")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode (diffusers'): the residuals scaled from 0.1 (shallow) to 1 (deep); "
                        "with guidance, only the conditional rows are controlled")
    p.add_argument("--control-preprocess", action="append", default=None, choices=("canny", "none"),
                   help="ControlNet: turn the control image into edges first (canny: OpenCV, the 'control' extra), "
                        "once for all images or once per --control-image")
    p.add_argument("--canny-low", type=float, default=100, help="canny's low hysteresis threshold (default 100)")
    p.add_argument("--canny-high", type=float, default=200, help="canny's high hysteresis threshold (default 200)")
    p.add_argument("--refiner", default=None, metavar="REFINER_DIR",
                   help="an SDXL refiner export (or engine folder) that takes over the base's latents at "
                        "--refiner-start of the schedule")
    p.add_argument("--refiner-start", type=float, default=None,
                   help="with --refiner: the fraction of the schedule the base runs, in (0, 1) (default 0.8)")
    p.add_argument("--aesthetic-score", type=float, default=None,
                   help="SDXL refiner: the aesthetic score it is conditioned on (default 6)")
    p.add_argument("--negative-aesthetic-score", type=float, default=None,
                   help="SDXL refiner: the score of the negative (unconditional) rows (default 2.5)")
    from sdrt.runtime.feature_cache import CACHE_KINDS, DEFAULT_INTERVAL, INTERVAL_MAX, SCHEDULES

    p.add_argument("--cache", default=None, choices=CACHE_KINDS,
                   help="feature caching (an export made with --feature-cache): deepcache (UNet models) runs the "
                        "UNet's shallow path on the steps between full ones, reusing the deep feature of the last "
                        "full step; first-block (SD 3 / 3.5, FLUX.1) runs only the transformer's first block, reusing what "
                        "the others added at the last full step")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help=f"with --cache: every Nth step runs the full UNet, 1 to {INTERVAL_MAX} (default "
                        f"{DEFAULT_INTERVAL}; higher: faster, further from the uncached image)")
    p.add_argument("--cache-schedule", default=None, choices=SCHEDULES,
                   help="with --cache: which steps are full: uniform (every Nth, the default) or DeepCache's "
                        "nonuniform (denser around step 15)")
    p.add_argument("--cache-threshold", type=float, default=None, metavar="T",
                   help="with --cache first-block, instead of a schedule: diffusers' rule, the full transformer runs "
                        "again where the first block's residual changed by more than T (relative; diffusers' "
                        "default 0.05) since the last full step (onnxruntime and openvino backends)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME[:SCALE]",
                   help="apply a LoRA to this call (an export made with --lora-slots): a .safetensors path, or a "
                        "name in --lora-dir; SCALE defaults to 1; repeat to stack")
    p.add_argument("--prompt-syntax", choices=["plain", "a1111", "compel"], default="plain",
                   help="read the prompts as they are (default), in AUTOMATIC1111's language: (word:1.2), [word], "
                        "BREAK, <lora:NAME:W> (needs --lora-dir), or in compel's: word+, (words)1.3, "
                        "(\"a\", \"b\").blend(0.7, 0.3)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="SD 3 / 3.5 and FLUX.1: T5 tokens per prompt, 2 to 512 (default: the model's, 256 and 512); "
                        "fewer is faster, longer prompts are cut there")
    p.add_argument("--slg-scale", type=float, default=None, metavar="S",
                   help="SD 3 / 3.5, an export made with --skip-layers: skip-layer guidance, the guided prediction "
                        "moved away from a pass with those blocks skipped by S (diffusers' skip_layer_guidance_scale; "
                        "2.8 is its default); guided calls only")
    p.add_argument("--slg-start", type=float, default=None, metavar="F",
                   help="with --slg-scale: the fraction of the steps where it starts (default 0.01)")
    p.add_argument("--slg-stop", type=float, default=None, metavar="F",
                   help="with --slg-scale: the fraction of the steps where it stops (default 0.2)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="a folder of LoRA .safetensors files that --lora names (NAME.safetensors)")
    p.add_argument("-o", "--output", default=None,
                   help=f"output image ({', '.join(IMAGE_FORMATS)}) in an existing folder (default: the first free "
                        f"name of {DEFAULT_NAME.format(1)}, {DEFAULT_NAME.format(2)}, ... in the current folder; "
                        "a batch takes one per image); with -o, batches get _1, _2, ... suffixes, and an existing "
                        "file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files -o names if they exist (never an input image)")


def run(args: argparse.Namespace) -> int:
    import warnings

    from tqdm import tqdm

    from sdrt.runtime.errors import InputError
    from sdrt.runtime.pipeline import GenerationRequest, Pipeline

    from ._report import print_warnings, timing_table

    inputs = [(flag, path) for flag, paths in (("--init-image", [args.init_image]), ("--mask", [args.mask]),
                                               ("--reference", [args.reference]),
                                               ("--control-image", args.control_image or []))
              for path in paths if path]
    paths = output_paths(None if args.output is None else Path(args.output), args.batch_size,
                         overwrite=args.overwrite, inputs=inputs)
    if args.strength is not None and not args.init_image:
        raise InputError("--strength applies to img2img only: pass --init-image, or leave --strength out")
    if args.mask and not args.init_image:
        raise InputError("--mask needs the image to inpaint: pass --init-image")
    if args.paste_back is not None and not args.mask:
        raise InputError("--paste-back applies to inpainting: pass --mask, or leave --paste-back out")
    if args.padding_mask_crop is not None:
        from sdrt.runtime.inpaint import check_padding_mask_crop

        check_padding_mask_crop(args.padding_mask_crop)
        if not args.mask:
            raise InputError("--padding-mask-crop applies to inpainting: pass --init-image and --mask, or leave "
                             "--padding-mask-crop out")
    if args.refiner_start is not None and not args.refiner:
        raise InputError("--refiner-start needs a refiner: pass --refiner REFINER_DIR")
    if args.refiner:
        from sdrt.runtime.refiner import check_refiner_start

        if args.refiner_start is not None:
            check_refiner_start(args.refiner_start)  # before loading anything
        if args.init_image or args.mask or args.guidance_rescale or args.timestep_spacing:
            raise InputError("--refiner generates from the prompt with the base, then the refiner: --init-image, "
                             "--mask, --guidance-rescale and --timestep-spacing are for one model; leave them out "
                             "(to refine an image, pass the refiner folder as the model with --init-image)")
    cache = _cache_options(args)
    from sdrt.runtime.layer_skip import skip_guidance

    skip_guidance(args.slg_scale, args.slg_start, args.slg_stop)  # before the model loads
    loras = _lora_options(args)
    image = None if not args.init_image else _open_image(args.init_image, "--init-image")
    mask = None if not args.mask else _open_image(args.mask, "--mask")
    ref = None if not args.reference else _open_image(args.reference, "--reference")
    control = _control_images(args)
    _check_image_sizes(args, image, control)
    pipe = Pipeline.load(args.path, backend=args.backend, cuda_graph=args.cuda_graph, precision=args.precision,
                         lora_dir=args.lora_dir)
    refiner = None
    if args.refiner:
        from sdrt.runtime.refiner import check_pair

        try:
            # one device, one scratch block: the refiner runs on the base's backend's device memory plan
            refiner = Pipeline.load(args.refiner, backend=pipe.backend.name, cuda_graph=args.cuda_graph,
                                    share_with=pipe, precision=args.precision)
            check_pair(pipe, refiner)
        except BaseException:
            pipe.close()
            if refiner is not None:
                refiner.close()
            raise
    precision = getattr(pipe.backend, "precision", None)  # openvino's inference precision
    print(f"{pipe.manifest.preset} on {pipe.backend.name}" + (f", {precision} inference" if precision else "")
          + (f", refiner {refiner.manifest.preset}" if refiner is not None else ""))
    if args.guidance is not None and not pipe.takes_guidance:
        print(f"note: --guidance {args.guidance:g} has no effect: {pipe.family.label} {pipe.manifest.preset} takes no "
              "guidance scale", file=sys.stderr)
    bar = tqdm(total=None, unit="step", desc="denoising")

    def progress(i: int, n: int) -> None:
        bar.total = n
        bar.update(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            request = GenerationRequest(
                prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                steps=args.steps, guidance_scale=7.5 if args.guidance is None else args.guidance,
                sampler=args.sampler, seed=args.seed,
                batch_size=args.batch_size, image=image, strength=args.strength, mask_image=mask,
                paste_back=args.paste_back, padding_mask_crop=args.padding_mask_crop, guidance_rescale=args.guidance_rescale,
                timestep_spacing=args.timestep_spacing, control_images=control,
                control_scales=_one_or_list(args.control_scale), control_start=_one_or_list(args.control_start),
                control_end=_one_or_list(args.control_end), guess_mode=args.guess_mode,
                control_modes=_one_or_list(args.control_mode), aesthetic_score=args.aesthetic_score,
                negative_aesthetic_score=args.negative_aesthetic_score,
                refiner_start=args.refiner_start, loras=loras, prompt_syntax=args.prompt_syntax,
                max_sequence_length=args.max_sequence_length, reference_image=ref,
                reference_resize=args.reference_resize, skip_layer_guidance_scale=args.slg_scale,
                skip_layer_guidance_start=args.slg_start, skip_layer_guidance_stop=args.slg_stop, **cache)
            result = pipe.generate(request, refiner=refiner, callback=progress)
        finally:
            bar.close()
            if refiner is not None:
                refiner.close()
            pipe.close()
    print_warnings(caught)
    print(f"seed {result.seed}")
    if len(paths) != len(result.images):  # a prompt list can only come from the API; here it is one prompt
        paths = output_paths(None if args.output is None else Path(args.output), len(result.images),
                             overwrite=args.overwrite, inputs=inputs)
    for img, path in zip(result.images, paths):
        path = _write_output(img, path, fresh=args.output is None, overwrite=args.overwrite)
        print(f"wrote {path}")
    print(timing_table(result.timings, len(result.timings["unet_steps_ms"])))
    print(f"denoising loop: {result.loop}")
    return 0


def _control_images(args: argparse.Namespace) -> list[object] | None:
    """The --control-image files, read and preprocessed (canny at the given thresholds) before the model
    loads; the other control flags without a control image are errors."""
    from sdrt.runtime.errors import InputError

    if not args.control_image:
        for flag, v in (("--control-scale", args.control_scale), ("--control-start", args.control_start),
                        ("--control-end", args.control_end), ("--control-preprocess", args.control_preprocess),
                        ("--control-mode", args.control_mode), ("--guess-mode", args.guess_mode or None)):
            if v is not None:
                raise InputError(f"{flag} applies to control images: pass --control-image, or leave {flag} out")
        return None
    from sdrt.runtime.controlnet import check_image

    n = len(args.control_image)
    prep = args.control_preprocess or ["none"]
    if len(prep) == 1:
        prep = prep * n
    if len(prep) != n:
        raise InputError(f"--control-preprocess is given {len(prep)} times for {n} --control-image: give it once "
                         "for all, or once per image")
    images: list[object] = []
    for j, (path, how) in enumerate(zip(args.control_image, prep)):
        img = check_image(_open_image(path, "--control-image"), j)
        if how == "canny":
            from sdrt.runtime.preprocess import canny

            img = canny(img.convert("RGB"), args.canny_low, args.canny_high)
        images.append(img)
    return images


def _lora_options(args: argparse.Namespace) -> list[tuple[str, float]] | None:
    """``--lora NAME[:SCALE]`` as (name, scale) pairs, checked before the model loads."""
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.lora_adapters import check_loras
    from sdrt.runtime.lora_files import LoraSpec

    if args.lora_dir is not None and not args.lora and args.prompt_syntax != "a1111":
        raise InputError("--lora-dir names where --lora (or, with --prompt-syntax a1111, a <lora:NAME:W> tag) finds "
                         "LoRAs: pass --lora NAME[:SCALE], or leave --lora-dir out")
    if not args.lora:
        return None
    pairs = []
    for text in args.lora:
        spec = LoraSpec.parse(text)
        pairs.append((str(spec.path), spec.scale))
    try:
        check_loras(pairs)
    except InputError as e:
        raise InputError(str(e), cli=f"--lora: {e}") from e
    return pairs


def _cache_options(args: argparse.Namespace) -> dict[str, object]:
    """The request's feature-caching fields, checked before the model loads; --cache-interval and
    --cache-schedule without --cache are errors."""
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.feature_cache import DEFAULT_INTERVAL, cache_policy

    if args.cache is None:
        for flag, v in (("--cache-interval", args.cache_interval), ("--cache-schedule", args.cache_schedule),
                        ("--cache-threshold", args.cache_threshold)):
            if v is not None:
                raise InputError(f"{flag} applies to feature caching: pass --cache deepcache (UNet models) or "
                                 f"--cache first-block (SD 3 / 3.5, FLUX.1), or leave {flag} out")
        return {}
    if args.cache_threshold is not None and (args.cache_interval is not None or args.cache_schedule is not None):
        raise InputError("--cache-threshold replaces the schedule: pass it, or --cache-interval / --cache-schedule, "
                         "not both")
    interval = DEFAULT_INTERVAL if args.cache_interval is None else args.cache_interval
    policy = cache_policy(args.cache, interval, args.cache_schedule or "uniform",
                          args.cache_threshold)  # InputError names the flag
    if policy is None:
        return {}
    if not args.init_image:  # img2img's loop runs only the steps --strength leaves: the pipeline checks that plan
        try:
            policy.full_steps(args.steps)
        except InputError as e:
            raise InputError(str(e), cli=f"--cache-schedule nonuniform has no plan for --steps {args.steps} at "
                                         f"--cache-interval {interval}: pass --cache-schedule uniform, or a larger "
                                         "--cache-interval") from e
    return {"cache": policy.kind, "cache_interval": policy.interval, "cache_schedule": policy.schedule,
            "cache_threshold": policy.threshold}


def _one_or_list(values: list[float] | list[int] | None) -> float | int | list[float] | list[int] | None:
    """A flag given once applies to every net; given several times, one value per net."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _open_image(path: str, flag: str) -> object:
    from PIL import Image, UnidentifiedImageError

    from sdrt.runtime.errors import InputError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read {flag} {path}: {e}") from e
    return img


def output_paths(out: Path | None, n: int, *, overwrite: bool = False,
                 inputs: list[tuple[str, str]] | tuple[()] = ()) -> list[Path]:
    """The files ``-o OUT`` names for ``n`` images, checked before any work: an existing, writable folder,
    an image extension, no folder, no existing file unless ``overwrite``, and never one of ``inputs``
    ((flag, path) of the input images). ``out`` None: the first ``n`` free names of ``DEFAULT_NAME`` in the
    current folder."""
    from sdrt.runtime.errors import InputError

    if out is None:
        paths = _free_names(Path("."), n)
        _check_writable(Path("."), "writing the images")
        return paths
    fmt = IMAGE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"-o {out}: {'no' if not out.suffix else 'unknown'} image extension "
                         f"{out.suffix!r}; end the name in one of {', '.join(IMAGE_FORMATS)}")
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(n)]
    parent = out.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise InputError(f"-o {out}: the folder {parent} {what}; create it first, or choose another path")
    for path in paths:
        for flag, given in inputs:
            if _same_file(path, Path(given)):
                raise InputError(f"-o {out}: {path} is the same file as {flag} {given}; writing the result there "
                                 "would destroy the input (even with --overwrite): choose another -o")
        if path.is_dir():
            raise InputError(f"-o {out}: {path} is a folder; give a file name such as {path / 'out.png'}")
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        one = len(existing) == 1
        raise InputError(f"-o {out}: {', '.join(existing)} already exist{'s' if one else ''}; pass --overwrite to "
                         f"replace {'it' if one else 'them'}, choose another name, or leave -o out to write the next "
                         f"free {DEFAULT_NAME.format(1).replace('0001', 'NNNN')}")
    _check_writable(parent, f"-o {out}")
    return paths


def _free_names(folder: Path, n: int, start: int = 1) -> list[Path]:
    names: list[Path] = []
    i = start
    while len(names) < n:
        path = folder / DEFAULT_NAME.format(i)
        if not (path.exists() or path.is_symlink()):
            names.append(path)
        i += 1
    return names


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_writable(folder: Path, what: str) -> None:
    import errno

    from sdrt.runtime.errors import InputError

    try:  # the only sure test of writability (permissions, read-only mounts, root, virtual file systems)
        fd, probe = tempfile.mkstemp(prefix=".sdrt-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        # /proc and /sys exist but take no new files, and say so with ENOENT
        why = ("it takes no new files" if e.errno == errno.ENOENT and folder.is_dir()
               else (e.strerror or str(e)).lower())
        shown = "the current folder" if str(folder) == "." else f"the folder {folder}"
        raise InputError(f"{what}: cannot write to {shown}: it is not writable ({why}); choose a folder you can "
                         "write to") from e


def _write_output(img: object, path: Path, *, fresh: bool, overwrite: bool) -> Path:
    """Write one image without replacing what appeared at ``path`` during the run (unless ``overwrite``);
    a default name that was taken meanwhile moves on to the next free one. Returns the path written."""
    from sdrt.runtime.atomic import atomic_write_new_bytes
    from sdrt.runtime.errors import InputError

    if overwrite:
        write_image(img, path)
        return path
    data = encode_image(img, path)
    while True:
        try:
            atomic_write_new_bytes(path, data)
            return path
        except FileExistsError:
            if not fresh:
                raise InputError(f"{path} appeared while generating and is left as it is; pass --overwrite to "
                                 "replace it, or choose another -o") from None
            number = int(path.stem.rsplit("-", 1)[1])
            path = _free_names(path.parent, 1, start=number + 1)[0]


def _check_image_sizes(args: argparse.Namespace, image: object | None, control: list[object] | None) -> None:
    """Without --height/--width an init image (else the first control image) sets the output size: refuse
    one whose size, rounded down as the pipeline does, is outside the model's limits, naming the image
    rather than flags the user did not pass."""
    from sdrt.runtime.errors import InputError, SdrtError
    from sdrt.runtime.folders import read_manifest
    from sdrt.runtime.reference import REFERENCE_INPUT

    if image is not None:
        flag, path, img = "--init-image", args.init_image, image
    elif control:
        flag, path, img = "--control-image", args.control_image[0], control[0]
    else:
        return
    if args.height is not None and args.width is not None:
        return
    try:
        m = read_manifest(args.path)
    except SdrtError:
        return  # the pipeline's load says what is wrong with the folder
    unet = m.components.get("unet")
    if args.mask and unet is not None and any(i.name == REFERENCE_INPUT for i in unet.inputs):
        return  # inpainting on an editing model sizes the image as a reference: the pipeline checks that size
    # an init image is rounded down to the VAE's factor; a control image to the export's multiple (as the pipeline)
    lim, multiple = m.limits, m.vae_scale_factor if image is not None else m.limits.multiple_of
    w, h = img.size  # type: ignore[attr-defined]
    sides = [(label, v - v % multiple) for label, v, given in (("height", h, args.height), ("width", w, args.width))
             if given is None]
    if all(lim.min_size <= v <= lim.max_size and v % lim.multiple_of == 0 for _, v in sides):
        return
    flags = " and ".join(f"--{label}" for label, _ in sides)
    raise InputError(f"{flag} {path} is {w}x{h} pixels: without {flags} the output takes the image's size "
                     f"(rounded down to a multiple of {multiple}), which must be {lim.min_size} to {lim.max_size} "
                     f"pixels a side; use an image of that size, or pass {flags} (the image is resized to them)")


def encode_image(img: object, path: Path) -> bytes:
    """The bytes of ``img`` in the format ``path``'s extension names."""
    buf = io.BytesIO()
    img.save(buf, format=IMAGE_FORMATS[path.suffix.lower()])  # type: ignore[attr-defined]
    return buf.getvalue()


def write_image(img: object, path: Path) -> None:
    """Encode in memory, then write through a temporary file and a rename: never a half-written image."""
    from sdrt.runtime.atomic import atomic_write_bytes

    atomic_write_bytes(path, encode_image(img, path))
