"""``run_bench``: measure sdrt's backends against diffusers on PyTorch, side by side, in one run.

The run, in order: check the request; take the environment fingerprint; export the preset (or read
the given export); build TensorRT engines where asked; save the same weights as a diffusers folder for
the baseline; count each module's FLOPs; measure each device's matrix-multiply rate; then, for every
(resolution, batch size, sampler, steps), run the baseline and each backend, each in its own worker
process (``worker.py``), sampling its memory from a background thread here; finally derive ratios to
the baseline and fractions of the floor. The result is a dict in the documented schema (``schema.py``).

Library code: it raises sdrt errors and reports progress through a callback; it never prints.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError

from . import schema
from .env import device_label, fingerprint, load_average
from .memory import MemoryPeaks, MemorySampler
from .stats import ratio, summarize
from .worker import PREFIX

KNOWN_BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "openvino")
# txt2img; controlnet: one ControlNet (the preset's export gets one) beside diffusers'
# StableDiffusion(XL)ControlNetPipeline; inpaint: an image and mask beside StableDiffusion(XL)InpaintPipeline;
# few-step: 1-4 steps without guidance, compared in images/s; base-refiner: an SDXL base + refiner pair
WORKLOADS = ("txt2img", "controlnet", "inpaint", "few-step", "base-refiner")
CPU_BACKENDS = ("ort-cpu", "openvino")
BASELINES = ("torch", "none")
PRECISIONS = ("fp16", "fp32")
OV_PRECISIONS = ("auto", "bf16", "fp32")  # the openvino backend's inference precision
BF16_SUFFIX = "-bf16"  # the PyTorch bf16 autocast baseline: torch-cpu-bf16
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
WEIGHTS_SEED = 0  # synthetic weights of a preset: the exporter's default seed

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Give exactly one of ``preset`` (synthetic weights) or ``artifact`` (an export)."""

    preset: str | None = None
    artifact: str | None = None
    engines: str | None = None  # a TensorRT engine folder (sdrt build); else one is built if possible
    backends: tuple[str, ...] = ()  # empty: ort-cuda and tensorrt on a GPU machine, ort-cpu otherwise
    resolutions: tuple[tuple[int, int], ...] = ()  # (height, width); empty: the model's default size
    steps: tuple[int, ...] = (20,)
    batch_sizes: tuple[int, ...] = (1,)
    samplers: tuple[str, ...] = ("dpmpp-2m",)
    baseline: str = "torch"  # "torch": diffusers on PyTorch; "none": no baseline (no ratios)
    compile: bool = False  # also run the baseline with torch.compile on the UNet
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    cuda_graph: bool = False  # ort-cuda: replay CUDA graphs (static shapes); tensorrt captures its loop anyway
    warmup: int = 1  # runs after the cold first image, excluded from the statistics
    repeats: int = 5
    threads: int | None = None  # CPU threads of every backend and the baseline; None: physical cores
    guidance_scale: float = 7.5
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    precision: str | None = None  # of a preset's export and the baseline; None: fp16 on a GPU, fp32 on CPU
    work_dir: str | None = None  # exports and baseline weights (kept, and reused); None: a temporary folder
    timeout_s: float | None = None  # per worker process
    matmul_n: int | None = None  # size of the rate-measuring matmul; None: 8192 on a GPU, 2048 on CPU
    openvino_precision: str | None = None  # the openvino backend's inference precision; None: auto
    # also run diffusers' fp32 weights under torch.autocast("cpu", dtype=torch.bfloat16), beside the fp32
    # baseline; None: when openvino (bf16 where the CPU has it) is measured
    bf16_baseline: bool | None = None
    # an SDXL refiner (a preset name or an export folder) that takes over at refiner_start: the base+refiner
    # workload; every measurement is then the pair, with each model's stages
    refiner: str | None = None
    refiner_start: float = 0.8
    workload: str = "txt2img"  # one of WORKLOADS: recorded, and how reports label it

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.artifact is None):
            raise InputError("give exactly one model: a preset (--preset sd15) or an export folder (--artifact DIR)")
        if self.backends:
            check_backends(self.backends)
        if self.workload not in WORKLOADS:
            raise InputError(f"unknown workload {self.workload!r}; choose one of: {', '.join(WORKLOADS)}")
        if self.refiner is not None:
            from sdrt.runtime.refiner import check_refiner_start

            check_refiner_start(self.refiner_start)
        if self.baseline not in BASELINES:
            raise InputError(f"unknown baseline {self.baseline!r}; choose one of: {', '.join(BASELINES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        for label, values in (("steps", self.steps), ("batch sizes", self.batch_sizes)):
            if not values or any(int(v) < 1 for v in values):
                raise InputError(f"{label} must be positive integers, got {list(values)}")
        for h, w in self.resolutions:
            if h < 8 or w < 8 or h % 8 or w % 8:
                raise InputError(f"resolution {h}x{w} is not supported: height and width must be multiples of 8")
        from sdrt.runtime.samplers import SAMPLERS

        unknown = [x for x in self.samplers if x not in SAMPLERS]
        if not self.samplers or unknown:
            raise InputError(f"unknown sampler {', '.join(map(repr, unknown))}; the samplers are: {', '.join(SAMPLERS)}"
                             if unknown else f"give at least one sampler: {', '.join(SAMPLERS)}")
        if self.warmup < 0 or self.repeats < 1:
            raise InputError(f"warmup must be >= 0 and repeats >= 1 (got {self.warmup} and {self.repeats})")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.openvino_precision is not None:
            if self.openvino_precision not in OV_PRECISIONS:
                raise InputError(f"unknown openvino precision {self.openvino_precision!r}; choose one of: "
                                 f"{', '.join(OV_PRECISIONS)}")
            if "openvino" not in self.backends:
                raise InputError("openvino_precision applies to the openvino backend, which this run does not "
                                 "measure: add it to the backends, or leave openvino_precision out",
                                 cli="--openvino-precision applies to the openvino backend, which this run does "
                                     "not measure: add it to --backends, or leave --openvino-precision out")
        if self.bf16_baseline and self.baseline != "torch":
            raise InputError("the bf16 baseline is diffusers on PyTorch: it needs baseline=\"torch\"",
                             cli="--bf16-baseline is diffusers on PyTorch: it needs --baseline torch")


def check_backends(names: Sequence[str]) -> None:
    """Raise InputError for a name that is no sdrt backend, listing the valid ones."""
    unknown = [n for n in names if n not in KNOWN_BACKENDS]
    if unknown:
        raise InputError(f"unknown backend {', '.join(map(repr, unknown))}; the backends are: "
                         f"{', '.join(KNOWN_BACKENDS)} (the PyTorch baseline is chosen with --baseline)")


def backend_device(name: str) -> str:
    return "cpu" if name in CPU_BACKENDS else "cuda"


def unavailable_reason(name: str, gpus: int) -> str | None:
    """Why ``name`` cannot run on this machine, or None when it can (checked without touching a GPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for ort-cuda)"
    if name == "ort-cpu":
        return None
    if name == "openvino":
        try:
            import openvino
        except ImportError as e:
            return f"the OpenVINO runtime is not installed ({e}); pip install 'sdrt[openvino]'"
        return None if "CPU" in openvino.Core().available_devices else "OpenVINO lists no CPU device here"
    if name == "ort-cuda":
        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has {', '.join(providers)}); "
                    "pip install onnxruntime-gpu on a machine with an NVIDIA GPU")
        if gpus == 0:
            return "onnxruntime-gpu is installed, but no NVIDIA GPU was found (NVML and nvidia-smi report none)"
        return None
    if name == "tensorrt":
        from sdrt.runtime.errors import BackendUnavailable

        try:
            from sdrt.runtime.trt_backend import import_cudart, import_tensorrt, module_candidates
        except ImportError as e:
            return f"this sdrt's TensorRT backend cannot be imported ({e})"
        try:
            trt = import_tensorrt(module_candidates())
            import_cudart()
        except BackendUnavailable as e:
            return str(e)
        if gpus == 0:
            return (f"TensorRT ({trt.__name__} {getattr(trt, '__version__', '')}) is installed, "
                    "but no NVIDIA GPU was found")
        return None
    raise InputError(f"unknown backend {name!r}")  # pragma: no cover - check_backends ran first


@dataclass
class _Job:
    kind: str  # "sdrt" | "diffusers"
    name: str  # backend name in the result: "ort-cpu", "torch-cpu", "torch-cuda-compile", ...
    device: str
    folder: Path
    height: int
    width: int
    batch_size: int
    sampler: str
    steps: int
    compile: bool = False
    autocast: str | None = None  # "bfloat16": the diffusers baseline under torch.autocast
    artifact_bytes: int | None = None
    image_out: Path | None = None

    def label(self) -> str:
        return f"{self.name} {self.height}x{self.width} batch {self.batch_size} {self.sampler}/{self.steps} steps"


@dataclass
class _Backend:
    """A backend's entry in the result, filled in as its jobs finish."""

    name: str
    role: str
    device: str
    status: str = "ok"
    reason: str | None = None
    precision: str | None = None
    threads: dict[str, Any] | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    timing_method: str | None = None
    build_s: float | None = None
    artifact_bytes: int | None = None


class _Run:
    def __init__(self, cfg: BenchConfig, progress: Progress) -> None:
        self.cfg = cfg
        self.progress = progress
        self.notes: list[str] = []
        self.threads = cfg.threads or _physical_cores()

    def emit(self, stage: str, message: str, **extra: Any) -> None:
        self.progress({"stage": stage, "message": message, **extra})

    # -- the pieces ---------------------------------------------------------------------------------
    def model(self, work: Path, precision: str, fuse: bool = False, preset: str | None = None,
              artifact: str | None = None) -> tuple[Path, Any, float | None]:
        """The export to measure: the artifact given, or the preset's (exported once into ``work``, then
        reused). ``fuse``: the preset's export also gets the UNet with ONNX Runtime's fused CUDA operators
        (``sdrt export --ort-cuda``), which the ort-cuda backend then runs. ``preset`` / ``artifact``: another
        model than the config's (the refiner)."""
        from sdrt.runtime.manifest import ExportManifest

        cfg = self.cfg
        if preset is None and artifact is None:
            preset, artifact = cfg.preset, cfg.artifact
        if artifact is not None:
            manifest = ExportManifest.read(artifact)
            if cfg.workload == "controlnet" and not manifest.controlnets:
                raise InputError(f"the controlnet workload needs an export with a ControlNet; {artifact} has "
                                 "none: re-export it with `sdrt export ... --controlnet CONTROLNET`, or use --preset")
            if fuse and "ort-cuda" not in manifest.components["unet"].variants:
                self.notes.append(f"{artifact} has no fused ort-cuda UNet (sdrt export --ort-cuda): ort-cuda "
                                  "runs the portable graph")
            return Path(artifact), manifest, None
        from sdrt.export.presets import get_preset

        assert preset is not None
        get_preset(preset)  # unknown preset: InputError listing the presets
        folder = work / f"export-{preset}{'-controlnet' if cfg.workload == 'controlnet' else ''}-{precision}"
        from sdrt.export.exporter import export_model
        from sdrt.export.loading import load_model

        t0, export_s = time.perf_counter(), None
        if (folder / "sdrt.json").is_file():
            self.notes.append(f"the export in {folder} was reused; its export time is not in this run")
            manifest = ExportManifest.read(folder)
        else:
            self.emit("export", f"exporting {preset} ({precision}) to ONNX")
            model = load_model(random_preset=preset, seed=WEIGHTS_SEED)
            manifest = export_model(model, folder, fp16=precision == "fp16",
                                    progress=lambda msg: self.emit("export", msg),
                                    controlnets=[_controlnet(model)] if cfg.workload == "controlnet" else [])
            export_s = time.perf_counter() - t0
        if fuse and "ort-cuda" not in manifest.components["unet"].variants:
            from sdrt.export.ort_fusion import add_ort_cuda_variant

            self.emit("export", "adding the UNet with ONNX Runtime's fused CUDA operators (sdrt export --ort-cuda)")
            add_ort_cuda_variant(folder, load_model(random_preset=preset, seed=WEIGHTS_SEED),
                                 progress=lambda msg: self.emit("export", msg))
            manifest = ExportManifest.read(folder)
            export_s = time.perf_counter() - t0 if export_s is not None else None
        return folder, manifest, export_s

    def baseline_weights(self, work: Path, onnx_folder: Path, manifest: Any, precision: str) -> tuple[Path | None, str | None]:
        """A diffusers folder with the export's weights (saved once, then reused), or the reason there is none."""
        src = dict(manifest.source)
        kind = src.get("kind")
        if kind == "diffusers":
            path = Path(str(src.get("path", "")))
            if (path / "model_index.json").is_file():
                return path, None
            return None, f"the export was made from the diffusers folder {path}, which is not here any more"
        if kind not in ("random", "single_file"):
            return None, f"the export does not record where its weights came from (source kind {kind!r})"
        digest = hashlib.sha256(json.dumps([src, self.cfg.workload], sort_keys=True).encode()).hexdigest()[:12]
        folder = work / f"diffusers-{manifest.preset}-{precision}-{digest}"
        if (folder / "model_index.json").is_file():
            return folder, None
        from sdrt.export.loading import load_model, random_model

        self.emit("baseline", f"saving the same weights as a diffusers folder for the baseline ({precision})")
        if kind == "random":
            model = random_model(str(src["preset"]), int(src.get("seed", 0)))
        else:
            path = Path(str(src.get("path", "")))
            if not path.is_file():
                return None, f"the export was made from {path}, which is not here any more"
            if path.suffix.lower() != ".safetensors":
                return None, f"the export was made from a pickled checkpoint ({path.name}); the bench does not unpickle"
            model = load_model(path)
        nets = [_controlnet_from_source(c, model) for c in src.get("controlnets", [])][:1]
        if self.cfg.workload == "controlnet" and not nets:
            return None, "the export records no ControlNet the baseline could rebuild"
        _save_diffusers(model, onnx_folder, folder, manifest.family, precision, nets[0] if nets else None,
                        self.cfg.workload)
        return folder, None

    def refiner_model(self, work: Path, precision: str) -> tuple[Path, Any]:
        """The refiner's export: a preset's (exported once into ``work``) or the folder given."""
        ref = self.cfg.refiner
        assert ref is not None
        if Path(ref).is_dir():
            folder, manifest, _ = self.model(work, precision, artifact=ref)
        else:
            folder, manifest, _ = self.model(work, precision, preset=ref)
        if not manifest.refiner:
            raise InputError(f"--refiner {ref} is not an SDXL refiner ({manifest.preset}); pass a refiner preset "
                             "(sdxl-refiner, sdxl-refiner-tiny) or export")
        return folder, manifest

    def engines(self, onnx_folder: Path, work: Path, resolutions: Sequence[tuple[int, int]], name: str = "engines"
                ) -> tuple[Path | None, float | None, str | None, str | None]:
        """(engine folder, build seconds, where that figure comes from, reason when there is no folder)."""
        from sdrt.runtime.engine_manifest import EngineManifest

        if self.cfg.engines and name == "engines":
            m = EngineManifest.read(self.cfg.engines)
            secs = sum(e.build_seconds for e in m.engines)
            return Path(self.cfg.engines), (secs or None), "the engine folder's manifest (built before this run)", None
        if importlib.util.find_spec("sdrt.commands.build") is None:
            return None, None, None, ("no engine folder was given (--engines DIR) and this sdrt has no `sdrt build` "
                                      "command to build one")
        out = work / name

        def span(values: Sequence[int]) -> str:  # N, or MIN:OPT:MAX with the first requested value as OPT
            return str(values[0]) if min(values) == max(values) else f"{min(values)}:{values[0]}:{max(values)}"

        cmd = [sys.executable, "-m", "sdrt", "build", str(onnx_folder), "--out", str(out),
               "--height", span([h for h, _ in resolutions]), "--width", span([w for _, w in resolutions]),
               "--batch", span(list(self.cfg.batch_sizes))]
        if self.cfg.guidance_scale <= 1.0:
            cmd.append("--no-cfg")
        self.emit("build", "building TensorRT engines: " + " ".join(cmd[3:]))
        t0 = time.perf_counter()
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            return None, None, None, f"`sdrt build` failed (exit {r.returncode}): {_tail(r.stderr or r.stdout)}"
        return out, secs, "measured in this run (`sdrt build`, a subprocess)", None

    def flops(self, manifest: Any) -> tuple[Any | None, str | None]:
        try:
            from sdrt.export.presets import PRESETS

            from . import flops

            if manifest.preset in PRESETS:
                return flops.architecture_of_preset(manifest.preset), None
            src = manifest.source
            if src.get("kind") == "diffusers" and Path(str(src.get("path"))).is_dir():
                return flops.architecture_of_folder(src["path"], manifest.family), None
            return None, f"no architecture to count FLOPs from (preset {manifest.preset!r} is not shipped)"
        except ImportError as e:
            return None, f"FLOPs need torch, diffusers and transformers ({e})"

    # -- workers ------------------------------------------------------------------------------------
    def worker(self, spec: dict[str, Any], work: Path, label: str, device: str) -> tuple[dict[str, Any], MemoryPeaks]:
        fd, spec_name = tempfile.mkstemp(prefix="job-", suffix=".json", dir=work)
        os.close(fd)
        spec_path = Path(spec_name)
        result_path = spec_path.with_suffix(".result.json")
        err_path = spec_path.with_suffix(".stderr.txt")
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        t = str(self.threads)
        env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [sys.executable, "-m", "sdrt.benchmarks.worker", str(spec_path), str(result_path)]
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            timer = None
            if self.cfg.timeout_s:
                timer = threading.Timer(self.cfg.timeout_s, proc.kill)
                timer.start()
            with MemorySampler(proc.pid, gpu_index=0 if device == "cuda" else None) as sampler:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith(PREFIX):
                        try:
                            event = json.loads(line[len(PREFIX):])
                        except json.JSONDecodeError:
                            continue
                        self.emit("job", label, **event)
                rc = proc.wait()
            if timer is not None:
                timer.cancel()
        peaks = sampler.peaks
        if result_path.is_file():
            return json.loads(result_path.read_text()), peaks
        why = f"the worker process exited with code {rc} without a result"
        if self.cfg.timeout_s and rc == -9:
            why = f"the worker process ran past --timeout {self.cfg.timeout_s:g} s and was stopped"
        return {"status": "failed", "reason": f"{why}: {_tail(err_path.read_text())}", "peak_rss_bytes": None}, peaks

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.emit("env", "taking the environment fingerprint")
        env = fingerprint()
        gpus = len(env["gpus"])
        requested = list(cfg.backends) or (["ort-cuda", "tensorrt"] if gpus else ["ort-cpu"])
        reasons = {name: unavailable_reason(name, gpus) for name in requested}
        available = [n for n in requested if reasons[n] is None]
        devices = sorted({backend_device(n) for n in available}) or (["cuda"] if gpus else ["cpu"])
        precision = cfg.precision or ("fp16" if "cuda" in devices else "fp32")

        own_work = cfg.work_dir is None
        work = Path(tempfile.mkdtemp(prefix="sdrt-bench-")) if own_work else Path(str(cfg.work_dir))
        work.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(env, requested, reasons, available, devices, precision, work)
        finally:
            if own_work:
                shutil.rmtree(work, ignore_errors=True)

    def _run(self, env: dict[str, Any], requested: list[str], reasons: dict[str, str | None],
             available: list[str], devices: list[str], precision: str, work: Path) -> dict[str, Any]:
        import numpy as np

        cfg = self.cfg
        folder, manifest, export_s = self.model(work, precision, fuse="ort-cuda" in available)
        ref_folder = ref_manifest = None
        if manifest.refiner and cfg.refiner is None:
            raise InputError(f"{manifest.preset} is an SDXL refiner: it continues a base model's latents. Measure it "
                             f"as the second model: --workload base-refiner --refiner {cfg.preset or cfg.artifact} "
                             "with an SDXL base as --preset / --artifact")
        if cfg.refiner is not None:
            if manifest.refiner or manifest.family != "sdxl":
                raise InputError(f"the base+refiner workload needs an SDXL base model, not {manifest.preset}: pass "
                                 "--preset sdxl(-tiny) or an SDXL base export with --refiner")
            ref_folder, ref_manifest = self.refiner_model(work, precision)
        resolutions = list(cfg.resolutions) or [(manifest.default_size, manifest.default_size)]
        components = {k: {"precision": c.precision, "size_bytes": c.size_bytes} for k, c in manifest.components.items()}
        onnx_bytes = sum(c.size_bytes for c in manifest.components.values())
        backends: dict[str, _Backend] = {}
        for name in requested:
            b = _Backend(name, "sdrt", backend_device(name), precision=_export_precision(manifest))
            if reasons[name] is not None:
                b.status, b.reason = "skipped", reasons[name]
            b.artifact_bytes = onnx_bytes if name != "tensorrt" else None
            backends[name] = b

        engine_folder = None
        if "tensorrt" in available:
            engine_folder, build_s, source, why = self.engines(folder, work, resolutions)
            b = backends["tensorrt"]
            if engine_folder is None:
                b.status, b.reason = "skipped", why
                available.remove("tensorrt")
            else:
                b.build_s = build_s
                b.artifact_bytes = _engine_bytes(engine_folder)
                if source:
                    self.notes.append(f"TensorRT engine build time: {source}")
        ref_engines = None
        if "tensorrt" in available and ref_folder is not None:
            ref_engines, ref_build_s, _, why = self.engines(ref_folder, work, resolutions, name="engines-refiner")
            if ref_engines is None:
                backends["tensorrt"].status, backends["tensorrt"].reason = "skipped", f"the refiner's engines: {why}"
                available.remove("tensorrt")
            else:
                b = backends["tensorrt"]
                b.build_s = (b.build_s or 0.0) + (ref_build_s or 0.0)
                b.artifact_bytes = (b.artifact_bytes or 0) + _engine_bytes(ref_engines)
        if ref_manifest is not None:
            ref_bytes = sum(c.size_bytes for c in ref_manifest.components.values())
            for name in requested:
                if name != "tensorrt" and backends[name].artifact_bytes is not None:
                    backends[name].artifact_bytes = int(backends[name].artifact_bytes or 0) + ref_bytes

        base_folder, base_reason, ref_base_folder = None, None, None
        if cfg.baseline == "torch":
            try:
                base_folder, base_reason = self.baseline_weights(work, folder, manifest, precision)
                if base_folder is not None and ref_folder is not None:
                    ref_base_folder, base_reason = self.baseline_weights(work, ref_folder, ref_manifest, precision)
                    base_folder = base_folder if ref_base_folder is not None else None
            except ImportError as e:
                base_reason = f"the baseline needs torch, diffusers and transformers ({e})"
        baselines: list[tuple[str, str, bool, str | None]] = []  # (name, device, compiled, autocast)
        bf16 = cfg.bf16_baseline if cfg.bf16_baseline is not None else "openvino" in requested
        if bf16 and "cpu" not in devices:
            self.notes.append("no PyTorch bf16 baseline: it is a CPU baseline (torch.autocast on CPU), and "
                              "nothing in this run measures the CPU")
        if cfg.baseline == "torch":
            for d in devices:
                variants: list[tuple[bool, str | None]] = [(c, None) for c in ((False, True) if cfg.compile
                                                                              else (False,))]
                if bf16 and d == "cpu":
                    variants.append((False, "bfloat16"))
                for compiled, autocast in variants:
                    name = f"torch-{d}" + ("-compile" if compiled else "") + (BF16_SUFFIX if autocast else "")
                    baselines.append((name, d, compiled, autocast))
                    b = _Backend(name, "baseline", d,
                                 precision=f"{precision} weights, bf16 autocast" if autocast else precision)
                    if base_folder is None:
                        b.status, b.reason = "skipped", base_reason
                    elif d == "cuda" and not _torch_cuda():
                        b.status, b.reason = "skipped", "torch has no CUDA device here (torch.cuda.is_available() is False)"
                    elif autocast and precision != "fp32":
                        b.status, b.reason = "skipped", (f"the bf16 autocast baseline runs fp32 weights; this run's "
                                                         f"weights are {precision} (use --precision fp32)")
                    backends[name] = b

        # FLOPs of each stage per shape, and each device's matmul rate
        if cfg.workload == "inpaint":
            self.notes.append("inpaint: diffusers samples the image's latents from the VAE's distribution, sdrt takes "
                              "its mean (deterministic), so the two images differ a little by design")
        arch, flops_reason = self.flops(manifest) if cfg.workload in ("txt2img", "few-step", "base-refiner") else (
            None, f"the FLOP count covers txt2img; this run's workload is {cfg.workload}")
        if ref_manifest is not None:  # the floor counts one UNet's FLOPs per step; a pair runs two UNets
            arch, flops_reason = None, "the base+refiner workload runs two UNets; the floor counts one model"
        if flops_reason:
            self.notes.append(f"no floor: {flops_reason}")
        shape_flops: dict[tuple[int, int, int], dict[str, int]] = {}
        guided = cfg.guidance_scale > 1.0
        if arch is not None:
            from .flops import module_flops

            self.emit("flops", "counting FLOPs of each module")
            for (h, w), bsz in itertools.product(resolutions, cfg.batch_sizes):
                shape_flops[(h, w, bsz)] = module_flops(arch, h, w, bsz, guided)
        ceilings: list[dict[str, Any]] = []
        rates: dict[str, float] = {}
        for d in devices:
            dtype = "float16" if (d == "cuda" and precision == "fp16") else "float32"
            n = cfg.matmul_n or (8192 if d == "cuda" else 2048)
            self.emit("ceiling", f"measuring the {d} matmul rate ({dtype}, n={n})")
            spec: dict[str, Any] = {"job": "matmul", "device": d, "dtype": dtype, "n": n, "threads": self.threads}
            res, _ = self.worker(spec, work, f"matmul {d}", d)
            ceilings.append({"device": d, "dtype": dtype, "n": n, "tflops": res.get("tflops"),
                             "ms_p50": res.get("ms_p50"), "method": res.get("method", ""),
                             "status": res["status"], "reason": res.get("reason")})
            if res["status"] == "ok":
                rates[d] = float(res["tflops"])

        # the jobs: per configuration, the baseline(s) first, then each backend
        jobs: list[_Job] = []
        latents: dict[tuple[int, int, int], Path] = {}
        inputs: dict[tuple[int, int], dict[str, str]] = {}
        f = manifest.vae_scale_factor
        for (h, w), bsz, sampler, steps in itertools.product(resolutions, cfg.batch_sizes, cfg.samplers, cfg.steps):
            key = (h, w, bsz)
            if key not in latents:
                noise = np.random.default_rng(cfg.seed).standard_normal((bsz, manifest.latent_channels, h // f, w // f),
                                                                        dtype=np.float32)
                latents[key] = work / f"latents-{h}x{w}-b{bsz}.npy"
                np.save(latents[key], noise)
            if (h, w) not in inputs:
                inputs[(h, w)] = workload_inputs(cfg.workload, work, h, w, cfg.seed)
            for name, d, compiled, autocast in baselines:
                if backends[name].status == "ok":
                    assert base_folder is not None
                    jobs.append(_Job("diffusers", name, d, base_folder, h, w, bsz, sampler, steps, compiled,
                                     autocast))
            for name in available:
                src = engine_folder if name == "tensorrt" else folder
                assert src is not None
                jobs.append(_Job("sdrt", name, backend_device(name), src, h, w, bsz, sampler, steps,
                                 artifact_bytes=backends[name].artifact_bytes))

        measurements: list[dict[str, Any]] = []
        for i, job in enumerate(jobs):
            job.image_out = work / f"image-{i}.png"
            spec = {
                "job": job.kind, "backend": job.name, "folder": str(job.folder), "device": job.device,
                "precision": precision, "family": manifest.family, "height": job.height, "width": job.width,
                "batch_size": job.batch_size, "sampler": job.sampler, "steps": job.steps,
                "guidance_scale": cfg.guidance_scale, "prompt": cfg.prompt, "seed": cfg.seed, "warmup": cfg.warmup,
                "repeats": cfg.repeats, "threads": self.threads, "latents": str(latents[(job.height, job.width, job.batch_size)]),
                "image_out": str(job.image_out), "compile": job.compile, "compile_mode": cfg.compile_mode,
                "cuda_graph": cfg.cuda_graph, "autocast": job.autocast, "workload": cfg.workload,
                **inputs[(job.height, job.width)],
            }
            if ref_folder is not None:
                spec["refiner_start"] = cfg.refiner_start
                if job.kind == "sdrt":
                    spec["refiner_folder"] = str(ref_engines if job.name == "tensorrt" else ref_folder)
                else:
                    spec["refiner_diffusers_folder"] = str(ref_base_folder)
            if job.name == "openvino":
                spec["ov_precision"] = cfg.openvino_precision or "auto"
                # a model cache of this run's own, empty for the measured cold start; then a second cold
                # start in a fresh process that finds the cache filled
                spec["ov_cache_dir"] = str(work / f"openvino-cache-{i}")
                shutil.rmtree(spec["ov_cache_dir"], ignore_errors=True)
            self.emit("job", job.label(), phase="start", job_index=i + 1, jobs=len(jobs))
            res, peaks = self.worker(spec, work, job.label(), job.device)
            m = _measurement(job, res, peaks, cfg, guided)
            if ref_folder is not None and res["status"] == "ok":
                m["stages_ms"] = {k: summarize([r["stages"][k] for r in res["runs"]]) for k in REFINER_STAGES}
                m["raw"]["stages"] = [r["stages"] for r in res["runs"]]
                m["raw"]["clocks"]["stages"] = m["raw"]["clocks"]["text_encoder_ms"]
                m["clocks"]["stages_ms"] = m["clocks"]["text_encoder_ms"]
            if job.name == "openvino" and res["status"] == "ok":
                self.emit("job", job.label(), phase="cached cold start")
                again, _ = self.worker({**spec, "cold_only": True, "image_out": None}, work,
                                       job.label() + " (model cache filled)", job.device)
                m["cold_start_cached"] = _cold_start(again)
            m["host_load_avg"] = load_average()
            fl = shape_flops.get((job.height, job.width, job.batch_size))
            _add_floor(m, fl, rates.get(job.device))
            measurements.append(m)
            _note_backend(backends[job.name], res, job)
            self.emit("job", job.label(), phase="done", job_index=i + 1, jobs=len(jobs), status=m["status"],
                      its=m["its"])
        for b in backends.values():
            ran = [m for m in measurements if m["backend"] == b.name]
            if b.status == "ok" and ran and all(m["status"] != "ok" for m in ran):
                b.status, b.reason = ran[0]["status"], ran[0]["reason"]

        _add_ratios(measurements, self._baseline_of, work)
        self.notes += _standard_notes(cfg, guided)
        if cfg.workload == "few-step":
            spacing = manifest_spacing(folder)
            self.notes.append("few-step workload: compare images/s (at 1 step it/s counts one UNet call); the "
                              "baseline's scheduler is built from the model's own configuration "
                              f"(timestep_spacing {spacing!r}), as sdrt's sampler")
        if ref_manifest is not None:
            self.notes.append(f"base+refiner workload: {manifest.preset} denoises to {cfg.refiner_start} of the "
                              f"schedule, {ref_manifest.preset} the rest from its latents; the baseline is diffusers' "
                              "StableDiffusionXLPipeline(denoising_end) + StableDiffusionXLImg2ImgPipeline"
                              "(denoising_start); sdrt loads the refiner with share_with the base (one scratch block "
                              "on tensorrt); peak memory is the whole process's, both models loaded")
        doc = {
            "schema": schema.SCHEMA_NAME,
            "schema_version": schema.SCHEMA_VERSION,
            "created": env["date"],
            "env": env,
            "config": {
                "preset": cfg.preset, "artifact": cfg.artifact, "engines": cfg.engines,
                "resolutions": [list(r) for r in resolutions], "steps": list(cfg.steps),
                "batch_sizes": list(cfg.batch_sizes), "samplers": list(cfg.samplers), "backends": requested,
                "baseline": cfg.baseline, "compile": cfg.compile, "cuda_graph": cfg.cuda_graph,
                "bf16_baseline": any(a for *_, a in baselines), "openvino_precision": cfg.openvino_precision,
                "warmup": cfg.warmup, "repeats": cfg.repeats,
                "threads": self.threads, "guidance_scale": cfg.guidance_scale, "prompt": cfg.prompt, "seed": cfg.seed,
                "isolation": "subprocess", "workload": cfg.workload,
                "refiner": None if ref_manifest is None else {"preset": ref_manifest.preset,
                                                              "refiner_start": cfg.refiner_start},
            },
            "model": {
                "family": manifest.family, "preset": manifest.preset, "precision": _export_precision(manifest),
                "folder": str(folder) if cfg.artifact else f"(temporary export of {manifest.preset})",
                "export_s": export_s, "components": components, "artifact_bytes": onnx_bytes,
                "source": dict(manifest.source),
                "flops": {f"{h}x{w}-b{b}": v for (h, w, b), v in shape_flops.items()},
            },
            "ceilings": ceilings,
            "backends": [asdict(b) for b in backends.values()],
            "measurements": measurements,
            "notes": self.notes,
            "device_labels": {d: device_label(env, d) for d in sorted({b.device for b in backends.values()})},
        }
        schema.validate(doc)
        return doc

    @staticmethod
    def _baseline_of(m: dict[str, Any]) -> str | None:
        if m["role"] == "baseline" and not m["backend"].endswith(("-compile", BF16_SUFFIX)):
            return None
        return f"torch-{m['device']}"


def _standard_notes(cfg: BenchConfig, guided: bool) -> list[str]:
    steps = ("Guidance is on, so every step runs the UNet once at batch 2 x batch_size (conditional and "
             "unconditional halves together); a step also includes the guidance combination and the sampler "
             "update." if guided else "Guidance is off: every step runs the UNet at batch_size.")
    stats = (f"Statistics: the cold first image and {cfg.warmup} warm-up run(s) are excluded; p50/p90 over "
             f"{cfg.repeats} repeats (step times pooled over every step of every repeat).")
    processes = ("Each measurement ran in its own process, one after another: peak RSS (the kernel's VmHWM "
                 "high-water mark) and GPU memory belong to that process alone; cold start = loading the model "
                 "+ the first image, in a fresh process, after imports (import_ms is recorded apart).")
    ratios = ("vs_baseline = this figure / the same figure of diffusers on PyTorch (eager), measured in this run "
              "with the same weights, shape, sampler, steps, latents and thread count. Above 1 is better for it/s "
              "and images/s; below 1 is better for times, memory and sizes.")
    floor = ("of_floor = the floor time (matrix FLOPs / the measured matmul rate) / the measured time: the "
             "fraction of the device's matrix throughput a stage achieves (1.0 is the physical limit).")
    notes = ["it/s is denoising steps per second: 1000 / the median step time. " + steps, stats, processes,
             ratios, floor]
    return notes


def _physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    return os.cpu_count() or 1


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _export_precision(manifest: Any) -> str:
    unet = manifest.components.get("unet")
    return str(unet.precision) if unet is not None else "?"


def _engine_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".engine", ".plan"))


def manifest_spacing(folder: Path) -> str | None:
    """The timestep spacing of an export's scheduler configuration."""
    try:
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("timestep_spacing")
    except (OSError, ValueError):
        return None


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()) or "(no output)"


def _controlnet(model: Any) -> Any:
    """The controlnet workload's net: the tiny preset's pair (seed 1), or one copied from the UNet."""
    from sdrt.export.controlnet_loading import controlnet_from_unet, random_controlnet
    from sdrt.export.controlnet_presets import CONTROLNET_PRESETS

    pair = model.preset.name.removesuffix("-tiny") + "-controlnet" + ("-tiny" if model.preset.name.endswith("-tiny")
                                                                      else "")
    return random_controlnet(pair, seed=1) if pair in CONTROLNET_PRESETS else controlnet_from_unet(model, seed=1)


def _controlnet_from_source(src: dict[str, Any], model: Any) -> Any:
    """The torch ControlNet an export recorded (synthetic: rebuilt from its preset or the UNet and seed)."""
    from sdrt.export.controlnet_loading import controlnet_from_unet, load_controlnet, random_controlnet

    kind = src.get("kind")
    if kind == "random":
        return random_controlnet(str(src["preset"]), int(src.get("seed", 0))).controlnet
    if kind == "from_unet":
        return controlnet_from_unet(model, int(src.get("seed", 0))).controlnet
    return load_controlnet(str(src.get("path", ""))).controlnet


def workload_inputs(workload: str, work: Path, h: int, w: int, seed: int) -> dict[str, str]:
    """The workload's images, made once per size and shared by every job: a control image (blocks and
    lines, the kind of map a ControlNet reads), or an image and a mask (a box in the middle to repaint)."""
    import numpy as np
    from PIL import Image

    if workload not in ("controlnet", "inpaint"):
        return {}
    rng = np.random.default_rng(seed)
    if workload == "controlnet":
        a = np.zeros((h, w, 3), np.uint8)
        for _ in range(8):
            y, x = rng.integers(0, h), rng.integers(0, w)
            a[y:y + h // 4, x:x + w // 4] = rng.integers(0, 256, 3)
        a[:, :: max(w // 16, 2)] = 255
        path = work / f"control-{h}x{w}.png"
        Image.fromarray(a).save(path)
        return {"control_image": str(path)}
    img, mask = work / f"init-{h}x{w}.png", work / f"mask-{h}x{w}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    Image.fromarray(m, mode="L").save(mask)
    return {"init_image": str(img), "mask_image": str(mask)}


def _save_diffusers(model: Any, onnx_folder: Path, out: Path, family: str, precision: str, controlnet: Any = None,
                    workload: str = "txt2img") -> None:
    """Save ``model``'s modules as a diffusers pipeline folder (tokenizers from the export), the workload's
    pipeline: txt2img, ControlNet (with ``controlnet``) or inpainting."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from sdrt.runtime.atomic import atomic_dir

    cfg = dict(model.scheduler_config)
    sched_cls = getattr(diffusers, str(cfg.get("_class_name", "PNDMScheduler")), diffusers.PNDMScheduler)
    scheduler = sched_cls.from_config(cfg)
    if model.preset.refiner:  # one encoder and aesthetic scores: diffusers' refiner configuration
        pipe: Any = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=model.vae, text_encoder=None, text_encoder_2=model.text_encoders[0], tokenizer=None,
            tokenizer_2=CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer_2"), unet=model.unet,
            scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
        if precision == "fp16":
            pipe = pipe.to(torch.float16)
        with atomic_dir(out, marker="model_index.json", what="a diffusers folder") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return
    tok = CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer")
    cls = pipeline_class(family, workload)
    extra: dict[str, Any] = {} if controlnet is None else {"controlnet": controlnet}
    if family == "sdxl":
        tok2 = CLIPTokenizer.from_pretrained(onnx_folder / "tokenizer_2")
        if workload == "inpaint":
            extra["requires_aesthetics_score"] = False
        else:
            extra["add_watermarker"] = False
        pipe = cls(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1], tokenizer=tok,
            tokenizer_2=tok2, unet=model.unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, **extra)
    else:
        pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=tok, unet=model.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                   **extra)
    if precision == "fp16":
        pipe = pipe.to(torch.float16)
    with atomic_dir(out, marker="model_index.json", what="a diffusers folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def pipeline_class(family: str, workload: str) -> Any:
    """diffusers' pipeline class for a family and workload (the baseline's)."""
    import diffusers

    names = {("sd", "txt2img"): "StableDiffusionPipeline", ("sdxl", "txt2img"): "StableDiffusionXLPipeline",
             ("sd", "controlnet"): "StableDiffusionControlNetPipeline",
             ("sdxl", "controlnet"): "StableDiffusionXLControlNetPipeline",
             ("sd", "inpaint"): "StableDiffusionInpaintPipeline", ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline"}
    kind = workload if workload in ("controlnet", "inpaint") else "txt2img"  # few-step, base-refiner: txt2img's
    return getattr(diffusers, names[("sdxl" if family == "sdxl" else "sd", kind)])


def _measurement(job: _Job, res: dict[str, Any], peaks: MemoryPeaks, cfg: BenchConfig, guided: bool) -> dict[str, Any]:
    m: dict[str, Any] = {
        "backend": job.name, "role": "sdrt" if job.kind == "sdrt" else "baseline", "device": job.device,
        "status": res["status"], "reason": res.get("reason"), "height": job.height, "width": job.width,
        "batch_size": job.batch_size, "sampler": job.sampler, "steps": job.steps,
        "guidance_scale": cfg.guidance_scale, "guided": guided,
        "unet_batch": 2 * job.batch_size if guided else job.batch_size,
        "warmup": cfg.warmup, "repeats": cfg.repeats,
        "import_ms": res.get("import_ms"), "load_ms": res.get("load_ms"), "first_image_ms": res.get("first_image_ms"),
        "cold_start_ms": None,
        "text_encoder_ms": None, "unet_step_ms": None, "vae_decoder_ms": None, "total_ms": None,
        "its": None, "images_per_s": None,
        "peak_vram_bytes": peaks.peak_process_bytes, "device_mem_delta_bytes": peaks.device_delta_bytes,
        "torch_peak_allocated_bytes": res.get("torch_peak_allocated_bytes"),
        "peak_rss_bytes": res.get("peak_rss_bytes"), "rss_sampled_peak_bytes": peaks.rss_peak_bytes,
        "memory_notes": list(peaks.notes),
        "artifact_bytes": job.artifact_bytes if job.kind == "sdrt" else res.get("weight_bytes"),
        "raw": None, "flops": None, "floor_ms": None, "of_floor": None,
        "baseline": None, "vs_baseline": None, "image_vs_baseline": None, "clocks": None,
    }
    if res["status"] != "ok":
        return m
    runs = res["runs"]
    m["cold_start_ms"] = res["load_ms"] + res["first_image_ms"]
    raw: dict[str, Any] = {
        "text_encoder_ms": [r["text_encoder_ms"] for r in runs],
        "unet_steps_ms": [r["unet_steps_ms"] for r in runs],
        "vae_decoder_ms": [r["vae_decoder_ms"] for r in runs],
        "total_ms": [r["total_ms"] for r in runs],
    }
    stage_clock = [str(r.get("clock") or "host") for r in runs]
    total_clock = [str(r.get("total_clock") or "host") for r in runs]
    raw["clocks"] = {"text_encoder_ms": stage_clock, "unet_steps_ms": stage_clock, "vae_decoder_ms": stage_clock,
                     "total_ms": total_clock}
    m["raw"] = raw
    stage, total = clock_label(stage_clock), clock_label(total_clock)
    m["clocks"] = {**{k: stage for k in CLOCKED_BY_BACKEND}, **{k: total for k in ("total_ms", "images_per_s")},
                   **{k: "host" for k in ("import_ms", "load_ms", "first_image_ms", "cold_start_ms")}}
    m["text_encoder_ms"] = summarize(raw["text_encoder_ms"])
    m["unet_step_ms"] = summarize([x for r in raw["unet_steps_ms"] for x in r])
    m["vae_decoder_ms"] = summarize(raw["vae_decoder_ms"])
    m["total_ms"] = summarize(raw["total_ms"])
    m["its"] = 1e3 / m["unet_step_ms"]["p50"]
    m["images_per_s"] = job.batch_size * 1e3 / m["total_ms"]["p50"]
    if any(any(r.get("nonfinite") or []) for r in [res.get("first", {}), *runs]):
        m["memory_notes"].append("some images decoded to NaN/inf")
    return m


# figures timed by the backend's clock (sdrt: Result.timings["clock"]; the baseline: CUDA events on a GPU);
# the totals, images/s and the cold start are the host's wall clock
CLOCKED_BY_BACKEND = ("text_encoder_ms", "unet_step_ms", "vae_decoder_ms", "its")


def clock_label(kinds: Sequence[str]) -> str:
    """The clock of a figure pooled over runs: the runs' one clock, or each of them when they differ."""
    found = sorted(set(kinds))
    return found[0] if len(found) == 1 else "mixed: " + ", ".join(found)


def _add_floor(m: dict[str, Any], flops: dict[str, int] | None, tflops: float | None) -> None:
    if flops is None:
        return
    m["flops"] = dict(flops)
    if tflops is None or m["status"] != "ok":
        return
    from .flops import floor_ms

    fl = floor_ms(flops, tflops, m["steps"])
    m["floor_ms"] = fl
    measured = {s: m[f"{s}_ms"]["p50"] for s in schema.STAGES}
    m["of_floor"] = {s: ratio(fl[s], measured[s]) for s in schema.STAGES}


def _metric(m: dict[str, Any], path: tuple[str, ...]) -> Any:
    v: Any = m
    for k in path:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v


def _add_ratios(measurements: list[dict[str, Any]], baseline_of: Callable[[dict[str, Any]], str | None],
                work: Path) -> None:
    by_key = {(m["backend"], m["height"], m["width"], m["batch_size"], m["sampler"], m["steps"]): (i, m)
              for i, m in enumerate(measurements) if m["status"] == "ok"}
    images = {i: work / f"image-{i}.png" for i in range(len(measurements))}
    for i, m in enumerate(measurements):
        name = baseline_of(m)
        if name is None or m["status"] != "ok":
            continue
        hit = by_key.get((name, m["height"], m["width"], m["batch_size"], m["sampler"], m["steps"]))
        if hit is None:
            continue
        j, b = hit
        m["baseline"] = name
        m["vs_baseline"] = {k: ratio(_metric(m, p), _metric(b, p)) for k, p in schema.RATIO_METRICS.items()}
        m["image_vs_baseline"] = _image_diff(images[i], images[j], m["sampler"])


# a base+refiner run's stages, each a summary over the repeats (milliseconds per image call)
REFINER_STAGES = ("base_text_encoder_ms", "base_denoise_ms", "refiner_text_encoder_ms", "refiner_denoise_ms",
                  "vae_decoder_ms")
STOCHASTIC_SAMPLERS = ("euler-a", "lcm")  # they draw fresh noise every step: each side from its own RNG


def _image_diff(a: Path, b: Path, sampler: str) -> dict[str, Any] | None:
    """Pixel difference of two first images made from the same latents (0..255 units)."""
    if not (a.is_file() and b.is_file()):
        return None
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return {"mean_abs": None, "max_abs": None, "note": f"image shapes differ: {x.shape} vs {y.shape}"}
    d = np.abs(x - y)
    note = "first image, same starting latents"
    if sampler in STOCHASTIC_SAMPLERS:
        note += f"; {sampler} adds fresh noise every step, drawn by each side's own generator: they differ by design"
    return {"mean_abs": float(d.mean()), "max_abs": int(d.max()), "note": note}


def _cold_start(res: dict[str, Any]) -> dict[str, Any]:
    """A second cold start (a backend with a model cache, found filled): its load, first image and sum."""
    if res.get("status") != "ok":
        return {"status": res.get("status"), "reason": res.get("reason")}
    return {"status": "ok", "import_ms": res["import_ms"], "load_ms": res["load_ms"],
            "first_image_ms": res["first_image_ms"], "cold_start_ms": res["load_ms"] + res["first_image_ms"],
            "peak_rss_bytes": res.get("peak_rss_bytes")}


def _note_backend(b: _Backend, res: dict[str, Any], job: _Job) -> None:
    if res["status"] != "ok":
        return
    b.versions = dict(res.get("versions") or {})
    b.threads = dict(res.get("threads") or {})
    b.timing_method = res.get("timing_method")
    if res.get("precision"):  # what the backend computed in, where that is not the export's (openvino bf16)
        b.precision = str(res["precision"])
    if job.kind == "diffusers":
        b.artifact_bytes = res.get("weight_bytes")


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole measurement and return the result document (see ``benchmarks/README.md``)."""
    return _Run(cfg, progress or (lambda event: None)).run()


def _is_result(path: Path) -> bool:
    """``path`` holds a result written by ``sdrt bench`` (any schema version), so replacing it loses nothing foreign."""
    try:
        if path.stat().st_size > 256 << 20:  # far above any result; not worth reading to find out
            return False
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("schema") == schema.SCHEMA_NAME


def check_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse a result path that must not be replaced (a folder; a file not written by ``sdrt bench`` unless
    ``overwrite``), before the run."""
    from sdrt.runtime.atomic import check_output_file

    return check_output_file(path, is_previous=_is_result, overwrite=overwrite, what="an sdrt bench result")


def save(doc: dict[str, Any], path: str | Path, *, overwrite: bool = False) -> Path:
    """Validate ``doc`` and write it as JSON, atomically; see ``check_output`` for what is replaced."""
    from sdrt.runtime.atomic import atomic_write_text

    schema.validate(doc)
    p = check_output(path, overwrite=overwrite)
    atomic_write_text(p, json.dumps(doc, indent=1) + "\n")
    return p


def default_filename(doc: dict[str, Any]) -> str:
    """``bench-<device>-<preset>-<date>.json``: GPU name (or "cpu"), preset, UTC timestamp."""
    gpus = doc["env"]["gpus"]
    used_gpu = any(b["device"] == "cuda" and b["status"] == "ok" for b in doc["backends"])
    dev = gpus[0]["name"] if (gpus and used_gpu) else "cpu"
    slug = "".join(ch.lower() if ch.isalnum() else "-" for ch in dev).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = doc["created"].replace(":", "").replace("-", "").replace("+0000", "")[:15]
    return f"bench-{slug}-{doc['model']['preset']}-{stamp}.json"
