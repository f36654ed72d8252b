"""``sdrt bench``: measure sdrt's backends against diffusers on PyTorch; ``sdrt bench report``: merge runs.

    sdrt bench --preset sd15 --backends ort-cuda,tensorrt --resolutions 512,768 --batch-sizes 1,4
    sdrt bench --preset sd15-tiny --backends ort-cpu --steps 4 --repeats 3 -o run.json
    sdrt bench --workload few-step                  # sd-turbo-tiny, 1 and 4 steps, euler-a, guidance 0: images/s
    sdrt bench --workload base-refiner              # sdxl-tiny + sdxl-refiner-tiny from 0.8 of the schedule
    sdrt bench --preset sd35-medium --backends openvino,ort-cpu --resolutions 1024,512 --steps 2  # SD 3.5
    sdrt bench --preset sd15 --backends ort-cpu,openvino --cache deepcache:3 --baseline none  # DeepCache vs uncached
    sdrt bench --quality                            # the shapes model's score beside the speed of each setting
    sdrt bench report benchmarks/results/bench-*.json -o benchmarks/results --readme README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _list(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def _resolutions(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        h, _, w = item.partition("x")
        try:
            out.append((int(h), int(w or h)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"resolution {item!r}: use HEIGHTxWIDTH or SIZE, e.g. 512x768 or 512")
    return out


# each workload's defaults, for what the command line leaves out; no samplers: the model's default (dpmpp-2m,
# flow-euler for a flow-matching model such as SD 3 / 3.5)
WORKLOAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "txt2img": {"steps": [20], "samplers": [], "guidance": 7.5},
    "controlnet": {"steps": [20], "samplers": [], "guidance": 7.5},
    "inpaint": {"steps": [20], "samplers": [], "guidance": 7.5},
    # few-step (adversarially distilled) models: Euler ancestral over trailing timesteps, no guidance
    "few-step": {"preset": "sd-turbo-tiny", "steps": [1, 4], "samplers": ["euler-a"], "guidance": 0.0},
    "base-refiner": {"preset": "sdxl-tiny", "refiner": "sdxl-refiner-tiny", "steps": [20], "samplers": ["euler"],
                     "guidance": 7.5},
}


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="txt2img", choices=list(WORKLOAD_DEFAULTS),
                   help="txt2img (default); controlnet: one ControlNet (a preset's export gets one), beside diffusers' "
                        "ControlNet pipeline; inpaint: an image and a mask (e.g. --preset sd15-inpaint-tiny), beside "
                        "diffusers' inpainting pipeline; few-step (default --preset sd-turbo-tiny --steps 1,4 "
                        "--samplers euler-a --guidance 0, compare images/s); base-refiner (default --preset sdxl-tiny "
                        "--refiner sdxl-refiner-tiny --samplers euler: the SDXL base + refiner pair, per-stage times)")
    p.add_argument("--quality", action="store_true",
                   help="score pictures, not only time them: the shapes model (sdrt.quality) on every backend and "
                        "precision this machine runs, and each sampler at 1 to 50 steps (--steps, --samplers), "
                        "beside seconds per image; writes quality-shapes-<time>.json and a plot of the score against "
                        "steps (-o names the JSON; the plot takes its name with .png)")
    p.add_argument("--refiner", default=None,
                   help="an SDXL refiner preset or export folder that takes over from the base (base-refiner)")
    p.add_argument("--refiner-start", type=float, default=0.8,
                   help="the fraction of the schedule the base runs before the refiner (default 0.8)")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--preset", help="synthetic weights of a shipped architecture: sd15, sd21, sd21-768, "
                          "sdxl, sd3-medium, sd35-medium, sd35-large, *-tiny (sdrt export --list)")
    src.add_argument("--artifact", help="an sdrt ONNX export folder (sdrt export)")
    p.add_argument("--without-t5", action="store_true",
                   help="SD 3 / 3.5 presets: export and measure without T5-XXL (diffusers' text_encoder_3=None), "
                        "on both sides")
    p.add_argument("--engines", help="a TensorRT engine folder for the tensorrt backend (sdrt build)")
    p.add_argument("--backends", type=_list(str), default=[],
                   help="comma-separated: ort-cpu, ort-cuda, tensorrt, openvino (default: ort-cuda,tensorrt on a GPU, else ort-cpu)")
    p.add_argument("--resolutions", type=_resolutions, default=[],
                   help="comma-separated HEIGHTxWIDTH or SIZE (default: the model's own size)")
    p.add_argument("--steps", type=_list(int), default=None, help="comma-separated step counts (default 20)")
    p.add_argument("--batch-sizes", type=_list(int), default=[1], help="comma-separated images per call (default 1)")
    p.add_argument("--samplers", type=_list(str), default=None,
                   help="comma-separated (default: the model's, dpmpp-2m; flow-euler for SD 3 / 3.5)")
    p.add_argument("--cache", dest="caches", type=_list(str), default=[], metavar="SPEC[,SPEC]",
                   help="also measure feature caching beside each sdrt backend's uncached run, one row per SPEC: "
                        "KIND:INTERVAL[:SCHEDULE], e.g. deepcache:3 or deepcache:5:nonuniform (UNets), "
                        "first-block:2 (SD 3 / 3.5, FLUX.1) (a preset is exported with --feature-cache; an --artifact needs "
                        "`sdrt export --feature-cache`)")
    p.add_argument("--baseline", default="torch", choices=["torch", "none"],
                   help="diffusers on PyTorch with the same weights (default), or none")
    p.add_argument("--compile", action="store_true", help="also run the baseline with torch.compile on the UNet")
    p.add_argument("--cuda-graph", action="store_true",
                   help="ort-cuda: replay CUDA graphs (static shapes); tensorrt captures its denoising loop anyway")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--warmup", type=int, default=1, help="runs after the cold first image, not counted (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per configuration (default 5)")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every row this many times, interleaved (A, B, A, B; each a process of its own), and "
                        "record the spread of the rounds (default 2)")
    p.add_argument("--quiet", type=float, default=None, metavar="SHARE",
                   help="before each row, wait until other processes use at most this share of the machine "
                        "(e.g. 0.05); rows measured while it was busier are flagged either way")
    p.add_argument("--quiet-timeout", type=float, default=300.0, metavar="S",
                   help="the longest --quiet waits before a row, in seconds (default 300; then it measures, "
                        "flagged)")
    p.add_argument("--intel-python", default=None, metavar="PYTHON",
                   help="also measure Intel's CPU pipelines (optimum-intel's OVStableDiffusionPipeline and OpenVINO "
                        "GenAI's Text2ImagePipeline) on an OpenVINO export of the same weights, run by this "
                        "interpreter of an environment that has them (see benchmarks/README.md)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every backend (default: physical cores)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale; > 1 runs the UNet at batch 2 (default 7.5)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp16", "fp32"], default=None,
                   help="of a preset's export and the baseline (default fp16 on a GPU, fp32 on CPU)")
    p.add_argument("--openvino-precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="the openvino backend's inference precision (default auto: bf16 where the CPU has it, "
                        "else fp32); --precision is the export's")
    p.add_argument("--bf16-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure diffusers under torch.autocast(\"cpu\", dtype=torch.bfloat16) beside the fp32 "
                        "baseline, as torch-cpu-bf16 (default: when openvino is measured)")
    p.add_argument("--work-dir", default=None, help="keep exports and baseline weights here, and reuse them")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement process")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="n of the n x n matmul that measures the device's rate (default 8192 on a GPU, 2048 on CPU)")
    p.add_argument("-o", "--output", default=None,
                   help="result JSON (default: bench-<device>-<preset>-<time>.json); an existing file is replaced "
                        "only if it is an sdrt bench result (else it needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace -o even if it is not an sdrt bench result")
    sub = p.add_subparsers(dest="bench_command", metavar="report")
    r = sub.add_parser("report", help="merge result files into a Markdown table and a PNG chart",
                       description="merge result files (any GPUs, backends, runs) into DIR/bench.md and DIR/bench.png")
    r.add_argument("files", nargs="+", help="result JSON files written by `sdrt bench`")
    r.add_argument("-o", "--out-dir", dest="report_dir", default=None,
                   help="write bench.md and bench.png here (other files in it are left alone; a bench.md or "
                        "bench.png that is not an sdrt report needs --overwrite)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace bench.md and bench.png in -o even if they are not an sdrt report")
    r.add_argument("--readme", default=None,
                   help="also replace the text between <!-- bench:start --> and <!-- bench:end --> in this file")


def _report(args: argparse.Namespace) -> int:
    from sdrt.benchmarks import report
    from sdrt.runtime.errors import InputError

    if not args.report_dir and not args.readme:
        raise InputError("say where the report goes: -o DIR (bench.md and bench.png) and/or --readme README.md")
    # every refusal before anything is written: the folder's files, then the README's markers
    if args.report_dir:
        report.check_report_dir(args.report_dir, overwrite=args.overwrite)
    if args.readme:
        try:
            text = Path(args.readme).read_text()
        except OSError as e:
            raise InputError(f"cannot read --readme {args.readme}: {e.strerror or e}") from e
        report.replace_between_markers(text, "", f"--readme {args.readme}")
    png = None
    if args.report_dir:
        md, png = report.write_report(args.files, args.report_dir, overwrite=args.overwrite)
        print(f"wrote {md}\nwrote {png}")
    if args.readme:
        path = report.update_readme(args.readme, args.files, chart_path=png)
        print(f"updated the performance section of {path}")
    return 0


class _Progress:
    """Draws the run's progress: stage messages as lines, the measurements as a bar."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        stage, msg = event.get("stage"), event.get("message", "")
        if stage != "job":
            (self.bar.write if self.bar else print)(f"[{stage}] {msg}")
            return
        phase = event.get("phase")
        if phase == "start":
            rounds = int(event.get("rounds") or 1)
            if self.bar is None:
                self.bar = tqdm(total=event["jobs"] * rounds, unit="run", dynamic_ncols=True)
            self.bar.set_description(msg + (f" (round {event.get('round')}/{rounds})" if rounds > 1 else ""))
            self.bar.set_postfix_str("starting")
        elif phase == "ran":
            if self.bar is not None:
                self.bar.update(1)
        elif phase == "done":
            if self.bar is not None:
                its = event.get("its")
                self.bar.write(f"{msg}: " + (f"{its:.2f} it/s" if its else str(event.get("status"))))
        elif self.bar is not None:
            n = event.get("n")
            self.bar.set_postfix_str(f"{phase} {event['i']}/{n}" if n else str(phase))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quality(args: argparse.Namespace) -> int:
    from sdrt.benchmarks import quality
    from sdrt.runtime.errors import InputError

    other = [flag for flag, v in (("--preset", args.preset), ("--artifact", args.artifact),
                                  ("--engines", args.engines), ("--backends", args.backends),
                                  ("--refiner", args.refiner), ("--resolutions", args.resolutions), ("--cache", args.caches)) if v]
    if other or args.workload != "txt2img":
        raise InputError(f"--quality runs the shapes model on every backend this machine has; "
                         f"{', '.join(other) or '--workload'} does not apply to it (leave it out)")
    if args.output:
        quality.check_output(args.output, overwrite=args.overwrite)
    samplers = args.samplers or quality.CURVE_SAMPLERS
    from sdrt.runtime.samplers import SAMPLERS

    unknown = [name for name in samplers if name not in SAMPLERS]
    if unknown:
        raise InputError(f"unknown sampler {', '.join(map(repr, unknown))}; valid names: {', '.join(SAMPLERS)}")
    steps = args.steps or quality.CURVE_STEPS
    if any(k < 1 or k > 1000 for k in steps):
        raise InputError(f"--steps {','.join(map(str, steps))}: each must be from 1 to 1000")
    doc = quality.run_quality(args.work_dir, curve_steps=steps, samplers=samplers, threads=args.threads)
    out, png = quality.save(doc, args.output or quality.default_filename(doc), overwrite=args.overwrite)
    print()
    print(quality.text_table(doc))
    print(f"\nwrote {out}\nwrote {png}")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "report":
        return _report(args)
    if args.quality:
        return _quality(args)
    from sdrt.benchmarks.bench import run_bench
    from sdrt.benchmarks.config import DEFAULT_PROMPT, BenchConfig
    from sdrt.benchmarks.output import check_output, default_filename, save
    from sdrt.benchmarks.report import text_table

    if args.output:
        check_output(args.output, overwrite=args.overwrite)  # before the run, not after it

    defaults = WORKLOAD_DEFAULTS[args.workload]
    preset = args.preset if args.preset or args.artifact else defaults.get("preset")
    refiner = args.refiner or defaults.get("refiner")
    cfg = BenchConfig(
        preset=preset, artifact=args.artifact, engines=args.engines, backends=tuple(args.backends),
        resolutions=tuple(args.resolutions), steps=tuple(args.steps or defaults["steps"]),
        batch_sizes=tuple(args.batch_sizes), samplers=tuple(args.samplers or defaults["samplers"]), baseline=args.baseline, compile=args.compile, compile_mode=args.compile_mode,
        cuda_graph=args.cuda_graph,
        warmup=args.warmup, repeats=args.repeats, threads=args.threads,
        guidance_scale=defaults["guidance"] if args.guidance is None else args.guidance,
        prompt=args.prompt or DEFAULT_PROMPT, seed=args.seed, precision=args.precision, work_dir=args.work_dir,
        timeout_s=args.timeout, matmul_n=args.matmul_size, refiner=refiner, refiner_start=args.refiner_start,
        openvino_precision=args.openvino_precision, bf16_baseline=args.bf16_baseline,
        workload=args.workload, caches=tuple(args.caches), rounds=args.rounds, quiet=args.quiet,
        quiet_timeout_s=args.quiet_timeout, intel_python=args.intel_python, without_t5=args.without_t5,
    )
    progress = _Progress()
    try:
        doc = run_bench(cfg, progress)
    finally:
        progress.close()
    out = save(doc, Path(args.output) if args.output else Path(default_filename(doc)), overwrite=args.overwrite)
    print()
    print(text_table(doc))
    print(f"\nwrote {out}")
    return 0
