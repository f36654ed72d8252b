"""``run_bench``: measure sdrt's backends against diffusers on PyTorch, side by side, in one run.

The run, in order: check the request (``config.py``); take the environment fingerprint; export the preset
(or read the given export) and build TensorRT engines where asked (``artifacts.py``); save the same weights
as a diffusers folder for the baseline (``baselines.py``); count each module's FLOPs; measure each
device's matrix-multiply rate; then, for every (resolution, batch size, sampler, steps), run the baseline
and each backend, each in its own worker process (``jobs.py``, ``worker.py``), sampling its memory from a
background thread here; finally derive ratios to the baseline and fractions of the floor
(``records.py``). The result is a dict in the documented schema (``schema.py``); ``output.py`` writes it.

This module is the orchestration: the order of those steps and what each hands the next. Library code: it
raises sdrt errors and reports progress through a callback; it never prints.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import InputError
from sdrt.runtime.families import has_refiner

from . import schema
from .artifacts import build_engines, engine_bytes, export_for, export_precision, refiner_export
from .backends import KNOWN_BACKENDS, backend_device, check_backends, unavailable_reason
from .baselines import (
    INTEL_MARKER,
    INTEL_ROWS,
    BaselineRow,
    baseline_of,
    baseline_record,
    baseline_rows,
    baseline_weights,
    intel_export,
    intel_reason,
    pipeline_class,
)
from .config import DEFAULT_PROMPT, WORKLOADS, BenchConfig
from .contention import other_cpu, snapshot, wait_quiet
from .env import fingerprint, load_average, physical_cores
from .flops import architecture_of_export
from .jobs import BASELINE, INTEL, SDRT, Job, job_spec, run_worker, workload_inputs, write_latents
from .memory import MemoryPeaks
from .output import check_output, default_filename, save
from .records import (
    REFINER_STAGES,
    BackendRecord,
    add_floor,
    add_ratios,
    add_refiner_stages,
    add_rounds,
    add_uncached,
    cold_start,
    document,
    fail_unmeasured,
    measurement,
    note_backend,
    standard_notes,
    workload_notes,
)

# the Python API (benchmarks/README.md), importable from here as before the modules were split
__all__ = ["DEFAULT_PROMPT", "KNOWN_BACKENDS", "REFINER_STAGES", "WORKLOADS", "BenchConfig", "Progress",
           "backend_device", "check_backends", "check_output", "default_filename", "pipeline_class", "run_bench",
           "save", "unavailable_reason"]

Progress = Callable[[dict[str, Any]], None]


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole measurement and return the result document (see ``benchmarks/README.md``)."""
    return _Run(cfg, progress or (lambda event: None)).run()


@dataclass
class _Models:
    """The folders a run measures, found step by step."""

    folder: Path  # the export
    manifest: Any
    export_s: float | None  # seconds exporting it took in this run (None: given, or reused)
    ref_folder: Path | None = None  # the refiner's export (the base+refiner workload)
    ref_manifest: Any = None
    engines: Path | None = None  # TensorRT's engine folders
    ref_engines: Path | None = None
    baseline: Path | None = None  # the baseline's diffusers folders
    ref_baseline: Path | None = None
    intel: Path | None = None  # the OpenVINO export of the baseline's weights Intel's pipelines run


class _Run:
    def __init__(self, cfg: BenchConfig, progress: Progress) -> None:
        self.cfg = cfg
        self.progress = progress
        self.notes: list[str] = []
        self.threads = cfg.threads or physical_cores()
        self._ov_bf16: bool | None = None  # whether openvino rows infer in bf16, once asked

    def emit(self, stage: str, message: str, **extra: Any) -> None:
        self.progress({"stage": stage, "message": message, **extra})

    def model(self, work: Path, precision: str, fuse: bool = False, preset: str | None = None,
              artifact: str | None = None) -> tuple[Path, Any, float | None]:
        """The export to measure (``artifacts.export_for``), its notes kept with the run's."""
        return export_for(self.cfg, work, precision, self.emit, self.notes, fuse=fuse, preset=preset,
                          artifact=artifact)

    def _worker(self, spec: dict[str, Any], work: Path, label: str, device: str,
                python: str | None = None) -> tuple[dict[str, Any], MemoryPeaks]:
        return run_worker(spec, work, label, device, threads=self.threads, timeout_s=self.cfg.timeout_s,
                          emit=self.emit, python=python)

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.cfg = cfg = replace(self.cfg, samplers=model_samplers(self.cfg))  # before any work
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
        cfg = self.cfg
        models = self._models(work, precision, fuse="ort-cuda" in available)
        size = models.manifest.default_size
        resolutions = list(cfg.resolutions) or [(size, size)]
        backends = self._sdrt_records(requested, reasons, models)
        if "tensorrt" in available:
            self._engines(models, work, resolutions, backends["tensorrt"])
            available = [n for n in available if backends[n].status == "ok"]
        baselines = self._baselines(models, work, precision, devices, requested, backends)
        if cfg.workload == "inpaint":
            self.notes.append("inpaint: diffusers samples the image's latents from the VAE's distribution, sdrt takes "
                              "its mean (deterministic), so the two images differ a little by design")
        # classifier-free guidance doubles the denoiser's rows, except in a guidance-distilled family (FLUX.1)
        guided = cfg.guidance_scale > 1.0 and models.manifest.model_family.classifier_free
        shape_flops = self._flops(models, resolutions, guided)
        jobs = self._jobs(models, work, resolutions, baselines, available, backends)
        arithmetic = [self._matmul_dtype(job, models, precision) for job in jobs]
        ceilings, rates = self._ceilings(work, sorted({(j.device, a) for j, a in zip(jobs, arithmetic)}
                                                      | {(d, self._matmul_dtype(None, models, precision, d))
                                                         for d in devices}))
        measurements: list[dict[str, Any]] = []
        rounds: list[list[tuple[dict[str, Any], Any, dict[str, Any]]]] = [[] for _ in jobs]
        for r in range(cfg.rounds):  # interleaved: every row once per round, each in a process of its own
            for i, job in enumerate(jobs):
                rounds[i].append(self._run_row(i, job, len(jobs), models, work, precision, r))
        for i, job in enumerate(jobs):
            m, res = self._record(job, rounds[i], models, guided)
            # the floor counts a full UNet every step: a cached row records its FLOPs, not a fraction of the floor
            add_floor(m, shape_flops.get((job.height, job.width, job.batch_size)),
                      rates.get((job.device, arithmetic[i])) if job.cache is None else None)
            measurements.append(m)
            if job.cache is None or not backends[job.name].versions:  # an uncached job tells its backend's loop
                note_backend(backends[job.name], res, job)
            self.emit("job", job.label(), phase="done", job_index=i + 1, jobs=len(jobs), status=m["status"],
                      its=m["its"])
        fail_unmeasured(backends, measurements)

        add_ratios(measurements, baseline_of, work)
        add_uncached(measurements, work)
        self.notes += standard_notes(cfg, guided)
        self.notes += workload_notes(cfg, models.folder, models.manifest, models.ref_manifest)
        doc = document(cfg, env, threads=self.threads, requested=requested, resolutions=resolutions,
                       bf16_baseline=any(row.autocast for row in baselines), folder=models.folder,
                       manifest=models.manifest, export_s=models.export_s, ref_manifest=models.ref_manifest,
                       shape_flops=shape_flops, ceilings=ceilings, backends=backends, measurements=measurements,
                       notes=self.notes)
        schema.validate(doc)
        return doc

    # -- the steps ----------------------------------------------------------------------------------
    def _models(self, work: Path, precision: str, fuse: bool) -> _Models:
        """The export measured and, for the base+refiner workload, the refiner's beside an SDXL base."""
        cfg = self.cfg
        models = _Models(*self.model(work, precision, fuse=fuse))
        manifest = models.manifest
        if manifest.refiner and cfg.refiner is None:
            raise InputError(f"{manifest.preset} is an SDXL refiner: it continues a base model's latents. Measure it "
                             f"as the second model: --workload base-refiner --refiner {cfg.preset or cfg.artifact} "
                             "with an SDXL base as --preset / --artifact")
        if cfg.refiner is not None:
            if not manifest.model_family.generates or not has_refiner(manifest.family):
                raise InputError(f"the base+refiner workload needs an SDXL base model, not {manifest.preset}: pass "
                                 "--preset sdxl(-tiny) or an SDXL base export with --refiner")
            models.ref_folder, models.ref_manifest = refiner_export(cfg, work, precision, self.emit, self.notes)
        return models

    def _sdrt_records(self, requested: list[str], reasons: dict[str, str | None],
                      models: _Models) -> dict[str, BackendRecord]:
        """The sdrt backends' entries: skipped, with the reason, where a backend cannot run here. Their artifact is
        the ONNX export (with a refiner: both exports); tensorrt's, its engines (``_engines``)."""
        onnx_bytes = sum(c.size_bytes for c in models.manifest.components.values())
        if models.ref_manifest is not None:
            onnx_bytes += sum(c.size_bytes for c in models.ref_manifest.components.values())
        backends: dict[str, BackendRecord] = {}
        for name in requested:
            b = BackendRecord(name, "sdrt", backend_device(name), precision=export_precision(models.manifest))
            if reasons[name] is not None:
                b.status, b.reason = "skipped", reasons[name]
            b.artifact_bytes = onnx_bytes if name != "tensorrt" else None
            backends[name] = b
        return backends

    def _engines(self, models: _Models, work: Path, resolutions: list[tuple[int, int]], b: BackendRecord) -> None:
        """TensorRT's engine folders (the refiner's too), given or built here, their build time and size in its
        entry ``b``; without them, ``b`` is skipped with the reason."""
        models.engines, build_s, source, why = build_engines(self.cfg, models.folder, work, resolutions, self.emit)
        if models.engines is None:
            b.status, b.reason = "skipped", why
            return
        b.build_s = build_s
        b.artifact_bytes = engine_bytes(models.engines)
        if source:
            self.notes.append(f"TensorRT engine build time: {source}")
        if models.ref_folder is None:
            return
        models.ref_engines, ref_build_s, _, why = build_engines(self.cfg, models.ref_folder, work, resolutions,
                                                                self.emit, name="engines-refiner")
        if models.ref_engines is None:
            b.status, b.reason = "skipped", f"the refiner's engines: {why}"
            return
        b.build_s = (b.build_s or 0.0) + (ref_build_s or 0.0)
        b.artifact_bytes = (b.artifact_bytes or 0) + engine_bytes(models.ref_engines)

    def _baselines(self, models: _Models, work: Path, precision: str, devices: list[str], requested: list[str],
                   backends: dict[str, BackendRecord]) -> list[BaselineRow]:
        """The baseline rows measured, their entries added to ``backends`` (skipped, with the reason, where their
        diffusers folder could not be made or their device is missing)."""
        cfg = self.cfg
        reason = None
        if cfg.baseline == "torch":
            try:
                models.baseline, reason = baseline_weights(cfg.workload, work, models.folder, models.manifest,
                                                           precision, self.emit)
                if models.baseline is not None and models.ref_folder is not None:
                    models.ref_baseline, reason = baseline_weights(cfg.workload, work, models.ref_folder,
                                                                   models.ref_manifest, precision, self.emit)
                    models.baseline = models.baseline if models.ref_baseline is not None else None
            except ImportError as e:
                reason = f"the baseline needs torch, diffusers and transformers ({e})"
        bf16 = cfg.bf16_baseline if cfg.bf16_baseline is not None else "openvino" in requested
        if bf16 and "cpu" not in devices:
            self.notes.append("no PyTorch bf16 baseline: it is a CPU baseline (torch.autocast on CPU), and "
                              "nothing in this run measures the CPU")
        if cfg.baseline != "torch":
            return []
        rows = baseline_rows(devices, cfg.compile, bf16)
        for row in rows:
            backends[row.name] = baseline_record(row, precision, models.baseline, reason)
        if cfg.intel_python is not None:
            self._intel(models, work, devices, backends)
        return rows

    def _intel(self, models: _Models, work: Path, devices: list[str], backends: dict[str, BackendRecord]) -> None:
        """Intel's pipelines' entries, and their OpenVINO export of the baseline's weights (made once by their own
        environment's ``optimum-cli``, then reused); skipped, with the reason, where they cannot run."""
        why = intel_reason(self.cfg, models.manifest.family, devices)
        if why is None and models.baseline is None:
            why = "the diffusers folder of the baseline, which they export, could not be made"
        folder = work / f"intel-ov-{models.baseline.name if models.baseline is not None else 'none'}"
        export_s = None
        if why is None and not (folder / INTEL_MARKER).is_file():  # complete: written aside, renamed when done
            assert models.baseline is not None
            self.emit("baseline", "exporting the same weights for Intel's pipelines (optimum-cli export openvino)")
            why, export_s = intel_export(models.baseline, folder, lambda spec: self._worker(
                spec, work, "optimum-cli export openvino", "cpu", python=self.cfg.intel_python)[0])
        for name in INTEL_ROWS:
            b = BackendRecord(name, "baseline", "cpu", precision="fp32 OpenVINO IR, f32 inference")
            if why is not None:
                b.status, b.reason = "skipped", why
            else:
                b.artifact_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                b.build_s = export_s
            backends[name] = b
        models.intel = folder if why is None else None

    def _flops(self, models: _Models, resolutions: list[tuple[int, int]],
               guided: bool) -> dict[tuple[int, int, int], dict[str, int]]:
        """FLOPs of each module per (height, width, batch size), where the floor applies (else a note why not)."""
        cfg = self.cfg
        arch, flops_reason = architecture_of_export(models.manifest) if cfg.workload in (
            "txt2img", "few-step", "base-refiner") else (
            None, f"the FLOP count covers txt2img; this run's workload is {cfg.workload}")
        if models.ref_manifest is not None:  # the floor counts one UNet's FLOPs per step; a pair runs two UNets
            arch, flops_reason = None, "the base+refiner workload runs two UNets; the floor counts one model"
        if flops_reason:
            self.notes.append(f"no floor: {flops_reason}")
        shape_flops: dict[tuple[int, int, int], dict[str, int]] = {}
        if arch is not None:
            from .flops import module_flops

            self.emit("flops", "counting FLOPs of each module")
            for (h, w), bsz in itertools.product(resolutions, cfg.batch_sizes):
                shape_flops[(h, w, bsz)] = module_flops(arch, h, w, bsz, guided)
        return shape_flops

    def _matmul_dtype(self, job: Job | None, models: _Models, precision: str, device: str = "cpu") -> str:
        """:func:`matmul_dtype` of a row of this run (None: the device's default)."""
        unet = models.manifest.components.get("unet")
        ov_bf16 = job is not None and (job.name == "openvino" or job.kind == INTEL) and self._openvino_bf16()
        return matmul_dtype(job, precision, device, export_bf16=unet is not None and unet.precision == "bf16",
                            openvino_bf16=ov_bf16)

    def _openvino_bf16(self) -> bool:
        """Whether the run's openvino rows infer in bf16 (``--openvino-precision``, auto: where the CPU has it); asked of
        OpenVINO once per run."""
        if self._ov_bf16 is None:
            from .intel_worker import inference_precision

            try:
                self._ov_bf16 = inference_precision({"ov_precision": self.cfg.openvino_precision or "auto"}) == "bf16"
            except (ImportError, ValueError):  # no openvino, or bf16 asked of a CPU without it: those rows fail alone
                self._ov_bf16 = False
        return self._ov_bf16

    def _ceilings(self, work: Path, pairs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]],
                                                                           dict[tuple[str, str], float]]:
        """The matmul rate of each (device, dtype) the rows compute in, measured in a worker process: (the records,
        the TFLOPS of those measured)."""
        cfg = self.cfg
        ceilings: list[dict[str, Any]] = []
        rates: dict[tuple[str, str], float] = {}
        for d, dtype in pairs:
            n = cfg.matmul_n or (8192 if d == "cuda" else 2048)
            self.emit("ceiling", f"measuring the {d} matmul rate ({dtype}, n={n})")
            spec: dict[str, Any] = {"job": "matmul", "device": d, "dtype": dtype, "n": n, "threads": self.threads}
            res, _ = self._worker(spec, work, f"matmul {d}", d)
            ceilings.append({"device": d, "dtype": dtype, "n": n, "tflops": res.get("tflops"),
                             "ms_p50": res.get("ms_p50"), "method": res.get("method", ""),
                             "status": res["status"], "reason": res.get("reason")})
            if res["status"] == "ok":
                rates[(d, dtype)] = float(res["tflops"])
        return ceilings, rates

    def _jobs(self, models: _Models, work: Path, resolutions: list[tuple[int, int]], baselines: list[BaselineRow],
              available: list[str], backends: dict[str, BackendRecord]) -> list[Job]:
        """Per configuration, the baseline rows first, then each backend (uncached, then with each cache of the
        config); each shape's latents and the workload's
        images are written once, for every job of that shape."""
        cfg = self.cfg
        manifest = models.manifest
        jobs: list[Job] = []
        latents: dict[tuple[int, int, int], Path] = {}
        inputs: dict[tuple[int, int], dict[str, str]] = {}
        for (h, w), bsz, sampler, steps in itertools.product(resolutions, cfg.batch_sizes, cfg.samplers, cfg.steps):
            if (h, w, bsz) not in latents:
                latents[(h, w, bsz)] = write_latents(work, cfg.seed, h, w, bsz, manifest.latent_channels,
                                                     manifest.vae_scale_factor)
            if (h, w) not in inputs:
                inputs[(h, w)] = workload_inputs(cfg.workload, work, h, w, cfg.seed)
            shared: dict[str, Any] = {"latents": latents[(h, w, bsz)], "inputs": inputs[(h, w)]}
            for row in baselines:
                if backends[row.name].status == "ok":
                    assert models.baseline is not None
                    jobs.append(Job(BASELINE, row.name, row.device, models.baseline, h, w, bsz, sampler, steps,
                                    row.compiled, row.autocast, **shared))
            if models.intel is not None:  # Intel's pipelines beside diffusers, on the same weights and latents
                for name in INTEL_ROWS:
                    jobs.append(Job(INTEL, name, "cpu", models.intel, h, w, bsz, sampler, steps,
                                    artifact_bytes=backends[name].artifact_bytes, **shared))
            for name in available:
                src = models.engines if name == "tensorrt" else models.folder
                assert src is not None
                for cache in (None, *cfg.cache_policies):  # uncached first, then each cache beside it
                    jobs.append(Job(SDRT, name, backend_device(name), src, h, w, bsz, sampler, steps,
                                    artifact_bytes=backends[name].artifact_bytes, cache=cache, **shared))
        return jobs

    def _run_row(self, i: int, job: Job, n_jobs: int, models: _Models, work: Path, precision: str,
                 r: int) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """Run job ``i`` once (round ``r``) in its worker process, after waiting for a quiet host where asked
        (openvino, first round: a second process, with its model cache filled): (the worker's result, its memory
        peaks, the round's record: the host's other CPU use meanwhile, the load average, the wait)."""
        cfg = self.cfg
        info: dict[str, Any] = {"round": r + 1, "waited_s": None}
        if cfg.quiet is not None:
            info["waited_s"], _ = wait_quiet(cfg.quiet, cfg.quiet_timeout_s, self.emit)
        job.image_out = work / f"image-{i}.png"
        spec = self._spec(i, job, models, work, precision)
        if r > 0:  # the first round's image is the one compared
            spec["image_out"] = None
        self.emit("job", job.label(), phase="start", job_index=i + 1, jobs=n_jobs, round=r + 1, rounds=cfg.rounds)
        load, before = load_average(), snapshot()
        res, peaks = self._worker(spec, work, job.label(), job.device,
                                  python=cfg.intel_python if job.kind == INTEL else None)
        info.update(other_cpu=other_cpu(before, snapshot()), load_avg=None if load is None else load[0])
        self.emit("job", job.label(), phase="ran", job_index=i + 1, jobs=n_jobs, round=r + 1, status=res["status"])
        if r == 0 and job.name == "openvino" and job.cache is None and res["status"] == "ok":  # fills once
            self.emit("job", job.label(), phase="cached cold start")
            again, _ = self._worker({**spec, "cold_only": True, "image_out": None}, work,
                                    job.label() + " (model cache filled)", job.device)
            res["cold_start_cached"] = cold_start(again)
        return res, peaks, info

    def _record(self, job: Job, rounds: list[tuple[dict[str, Any], Any, dict[str, Any]]], models: _Models,
                guided: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """A row's measurement over its rounds: the runs pooled (the first round's cold start and memory
        peaks), each round's medians, the spread between them, and whether the host was busy meanwhile."""
        first, peaks, _ = rounds[0]
        failed = next((res for res, _, _ in rounds if res["status"] != "ok"), None)
        pooled = failed if failed is not None else {**first, "runs": [x for res, _, _ in rounds for x in res["runs"]]}
        m = measurement(job, pooled, peaks, self.cfg, guided)
        if models.ref_folder is not None and pooled["status"] == "ok":
            add_refiner_stages(m, pooled)
        if "cold_start_cached" in first:
            m["cold_start_cached"] = first["cold_start_cached"]
        m["host_load_avg"] = load_average()
        add_rounds(m, [(measurement(job, res, p, self.cfg, guided), res, info) for res, p, info in rounds],
                   threads=self.threads)
        return m, pooled

    def _spec(self, i: int, job: Job, models: _Models, work: Path, precision: str) -> dict[str, Any]:
        """Job ``i``'s worker spec: the job's, with the refiner's folders and openvino's settings."""
        cfg = self.cfg
        spec = job_spec(job, cfg, precision=precision, family=models.manifest.family, threads=self.threads)
        if models.ref_folder is not None:
            spec["refiner_start"] = cfg.refiner_start
            if not job.is_baseline:
                spec["refiner_folder"] = str(models.ref_engines if job.name == "tensorrt" else models.ref_folder)
            else:
                spec["refiner_diffusers_folder"] = str(models.ref_baseline)
        if job.name == "openvino" or job.kind == INTEL:  # Intel's rows compute in what sdrt's openvino does
            spec["ov_precision"] = cfg.openvino_precision or "auto"
            # a model cache of this run's own, empty for the measured cold start; then a second cold
            # start in a fresh process that finds the cache filled
            spec["ov_cache_dir"] = str(work / f"openvino-cache-{i}")
            shutil.rmtree(spec["ov_cache_dir"], ignore_errors=True)
        return spec


def matmul_dtype(job: Job | None, precision: str, device: str = "cpu", *, export_bf16: bool = False,
                 openvino_bf16: bool = False) -> str:
    """The arithmetic a row's matrix products run in, whose measured matmul rate is its floor: bf16 for the bf16
    autocast baseline, for openvino rows (sdrt's and Intel's) that infer in bf16 (``openvino_bf16``), and for
    sdrt's rows of a bf16 export; else the run's ``precision`` on the row's device (fp16 on a GPU, fp32 on a CPU).
    ``job`` None: ``device``'s default."""
    if job is not None:
        device = job.device
        if job.autocast:
            return job.autocast
        if job.name == "openvino" or job.kind == INTEL:
            return "bfloat16" if openvino_bf16 else "float32"
        if job.kind == SDRT and export_bf16:
            return "bfloat16"
    return "float16" if (device == "cuda" and precision == "fp16") else "float32"


def model_samplers(cfg: BenchConfig) -> tuple[str, ...]:
    """The samplers a run measures: those asked (each refused unless it serves the model's prediction
    type), or the model's default (``dpmpp-2m``; ``flow-euler`` for a flow-matching model such as SD 3 /
    3.5). The prediction type comes from the preset or the export's manifest, before anything is exported."""
    from sdrt.runtime.samplers import default_sampler, samplers_for

    if cfg.artifact is not None:
        from sdrt.runtime.manifest import ExportManifest

        prediction, name = ExportManifest.read(cfg.artifact).prediction_type, cfg.artifact
    else:
        from sdrt.export.preset_tables import get_any_preset

        assert cfg.preset is not None
        prediction, name = get_any_preset(cfg.preset).prediction_type, cfg.preset
    if not cfg.samplers:
        return (default_sampler(prediction),)
    serving = samplers_for(prediction)
    wrong = [x for x in cfg.samplers if x not in serving]
    if wrong:
        raise InputError(f"sampler {', '.join(map(repr, wrong))} does not serve {name} (a {prediction} "
                         f"model); use one of: {', '.join(serving)} (or leave --samplers out: "
                         f"{default_sampler(prediction)})")
    return tuple(cfg.samplers)

