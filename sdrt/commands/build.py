"""``sdrt build``: an ONNX export -> a folder of TensorRT engines (needs TensorRT and an NVIDIA GPU)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx_dir", nargs="?", help="the folder written by `sdrt export`")
    p.add_argument("--out", metavar="ENGINE_DIR",
                   help="engine folder: new, empty or a previous engine folder, replaced atomically when the build "
                        "succeeds (any other folder needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not an engine folder, deleting what it holds")
    shape = p.add_argument_group("profile (default: static, batch 1, at the model's native size)")
    shape.add_argument("--profile", metavar="NAME", help="a shipped profile (see --list-profiles) or a .toml file")
    shape.add_argument("--batch", metavar="N|MIN:OPT:MAX", help="images per call (default 1)")
    shape.add_argument("--height", metavar="PX|MIN:OPT:MAX", help="image height in pixels")
    shape.add_argument("--width", metavar="PX|MIN:OPT:MAX", help="image width in pixels (default: the height)")
    shape.add_argument("--dynamic", metavar="MIN:OPT:MAX", help="height and width range in pixels, e.g. 256:512:1024")
    shape.add_argument("--chunks", metavar="N|MIN:OPT:MAX", default="1",
                       help="77-token prompt chunks (long prompts); default 1")
    shape.add_argument("--no-cfg", action="store_true",
                       help="do not double the UNet batch for classifier-free guidance")
    shape.add_argument("--t5-tokens", metavar="N|MIN:OPT:MAX",
                       help="T5 tokens per prompt (a call's max_sequence_length, 2..512) on SD 3 / 3.5 and FLUX.1; "
                            "default: the model's (SD3 256, FLUX.1 512) alone; beside --profile, replaces its range")
    p.add_argument("--list-profiles", action="store_true", help="list the shipped profiles and exit")
    p.add_argument("--timing-cache", metavar="FILE", type=Path, help="reuse and update a TensorRT timing cache")
    p.add_argument("--opt-level", type=int, default=3, metavar="N", help="builder optimization level 0..5 (default 3)")
    p.add_argument("--workspace", type=float, metavar="GB", help="limit the builder's scratch memory")
    p.add_argument("--version-compatible", action="store_true",
                   help="engines later TensorRT 10.x versions and the lean runtime can run")
    p.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: leave the lean runtime out of the engines")
    p.add_argument("--hardware-compatible", action="store_true", help="engines for every Ampere or newer GPU")
    p.add_argument("--refittable", action="store_true", help="allow `sdrt refit` (new weights, LoRAs) later")
    p.add_argument("--weakly-typed", action="store_true",
                   help="let TensorRT pick fp16 anywhere in fp16 components (default: precision as exported)")
    p.add_argument("--tensorrt-module", choices=["tensorrt", "tensorrt_rtx"],
                   help="default: whichever is installed (tensorrt first, else TensorRT for RTX)")
    p.add_argument("--force", action="store_true", help="rebuild engines even when up to date")


def _profile(args: argparse.Namespace, default_size: int, cfg: bool = True):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from sdrt.export.profiles import Range, custom_profile, load_profile
    from sdrt.runtime.errors import InputError

    custom = [args.batch, args.height, args.width, args.dynamic]
    if args.profile:
        if any(v is not None for v in custom):
            raise InputError("give either --profile or --batch/--height/--width/--dynamic, not both")
        profile = load_profile(args.profile)
        if args.t5_tokens is None:
            return profile
        t5 = Range.parse(args.t5_tokens, "--t5-tokens")
        # the shipped profile's name no longer describes it: the engine folder records what changed
        return replace(profile, name=f"{profile.name}+t5_tokens={t5}", t5_tokens=t5)
    if args.dynamic and (args.height or args.width):
        raise InputError("--dynamic sets both height and width; drop --height/--width or --dynamic")
    height = args.dynamic or args.height
    width = args.dynamic or args.width
    # a guidance-distilled family (FLUX.1) runs one denoiser row per image: no CFG whatever --no-cfg says
    return custom_profile(args.batch or 1, height, width, args.chunks, cfg=cfg and not args.no_cfg,
                          default_size=default_size, t5_tokens=args.t5_tokens)


def run(args: argparse.Namespace) -> int:
    from sdrt.runtime.errors import InputError

    if args.list_profiles:
        from sdrt.engines import profile_names
        from sdrt.export.profiles import load_profile

        for name in profile_names():
            prof = load_profile(name)
            print(f"{name:14s} {prof.family or 'any':5s} {'static ' if prof.is_static else 'dynamic'} {prof.description}")
        return 0
    if not args.onnx_dir or not args.out:
        raise InputError("usage: sdrt build ONNX_DIR --out ENGINE_DIR [--profile NAME]")

    from sdrt.export.trt_build import BuildOptions, build_engines, check_engine_dir
    from sdrt.runtime.folders import read_manifest
    from sdrt.runtime.manifest import EXPORT_FOLDER

    check_engine_dir(args.out, overwrite=args.overwrite)
    export = read_manifest(args.onnx_dir, wanted=EXPORT_FOLDER)  # an sdrt export or an Optimum one
    profile = _profile(args, export.default_size, export.model_family.classifier_free)
    options = BuildOptions(
        opt_level=args.opt_level, workspace_gb=args.workspace, timing_cache=args.timing_cache,
        refittable=args.refittable, version_compatible=args.version_compatible,
        exclude_lean_runtime=args.exclude_lean_runtime, hardware_compatible=args.hardware_compatible,
        weakly_typed=args.weakly_typed, module=args.tensorrt_module, force=args.force,
    )
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    print(f"profile {profile.name}: {profile.shapes().describe()}")
    manifest = build_engines(args.onnx_dir, args.out, profile, options, progress=progress,
                             overwrite=args.overwrite)
    env = manifest.engines[0].env
    print(f"\nwrote {args.out} in {time.perf_counter() - t0:.1f} s ({env.backend} {env.version}, "
          f"{env.gpu_name or 'GPU unknown'}, compute capability {env.compute_capability or '?'})")
    print(f"{'engine':16s} {'precision':9s} {'MB':>8s} {'build s':>8s}")
    for r in manifest.engines:
        print(f"{r.component:16s} {r.precision:9s} {r.size_bytes / 1e6:8.1f} {r.build_seconds:8.1f}")
    return 0
