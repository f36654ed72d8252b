"""``BenchConfig``: what a bench run measures, with its defaults, and the refusal of a request that cannot run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdrt.runtime.errors import InputError

from .backends import check_backends

# txt2img; controlnet: one ControlNet (the preset's export gets one) beside diffusers'
# StableDiffusion(XL)ControlNetPipeline; inpaint: an image and mask beside StableDiffusion(XL)InpaintPipeline;
# few-step: 1-4 steps without guidance, compared in images/s; base-refiner: an SDXL base + refiner pair
WORKLOADS = ("txt2img", "controlnet", "inpaint", "few-step", "base-refiner")
BASELINES = ("torch", "none")
PRECISIONS = ("fp16", "fp32")
OV_PRECISIONS = ("auto", "bf16", "fp32")  # the openvino backend's inference precision
CACHE_FORM = ("KIND:INTERVAL[:SCHEDULE] (e.g. deepcache:3, deepcache:5:nonuniform for UNets, first-block:2 for "
              "SD 3 / 3.5 and FLUX.1)")
# the pipeline does not cache a refiner pair; ControlNets only beside DeepCache (a UNet's shallow path takes their
# residuals: sdrt export --controlnet ... --feature-cache), not beside first-block caching
CACHE_WORKLOADS = ("txt2img", "controlnet", "inpaint", "few-step")
CONTROL_CACHES = ("deepcache",)  # the cache kinds that run beside ControlNets
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse, highly detailed"


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
    samplers: tuple[str, ...] = ()  # empty: the model's default (runtime.samplers.default_sampler)
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
    # feature caching measured beside each uncached sdrt job: specs "deepcache:INTERVAL[:SCHEDULE]"
    # (cache_specs parses them); the export then needs DeepCache's shallow path (sdrt export --deepcache)
    caches: tuple[str, ...] = ()
    # every row runs this many times, interleaved (A, B, A, B: each a process of its own), its figures pooled
    # and the spread of the rounds' medians recorded beside them
    rounds: int = 2
    # wait before each row until other processes use at most this share of the machine (0..1; None: do not
    # wait), for at most quiet_timeout_s (then measure anyway: the row is flagged)
    quiet: float | None = None
    quiet_timeout_s: float = 300.0
    # the interpreter of an environment with optimum-intel and openvino-genai: Intel's two CPU pipelines are then
    # measured beside diffusers, on one OpenVINO export of the baseline's weights (benchmarks/intel_worker.py)
    intel_python: str | None = None
    # a preset's export leaves its optional T5 out (sdrt export --without-t5; SD 3 / 3.5), and so does the
    # baseline (diffusers' text_encoder_3=None): the full-size model without T5-XXL's 17.7 GiB
    without_t5: bool = False

    @property
    def cache_policies(self) -> tuple[Any, ...]:
        """The ``feature_cache.CachePolicy`` of each spec in ``caches``, in order."""
        return tuple(parse_cache(spec) for spec in self.caches)

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
        from sdrt.runtime.samplers import FLOW_SAMPLERS, SAMPLERS

        known = (*SAMPLERS, *FLOW_SAMPLERS)
        unknown = [x for x in self.samplers if x not in known]
        if unknown:
            raise InputError(f"unknown sampler {', '.join(map(repr, unknown))}; the samplers are: "
                             f"{', '.join(known)}")
        if self.warmup < 0 or self.repeats < 1:
            raise InputError(f"warmup must be >= 0 and repeats >= 1 (got {self.warmup} and {self.repeats})")
        if not 1 <= self.rounds <= 20:
            raise InputError(f"rounds must be from 1 to 20, got {self.rounds}",
                             cli=f"--rounds must be from 1 to 20, got {self.rounds}")
        if self.quiet is not None and not 0.0 <= self.quiet < 1.0:
            raise InputError(f"quiet is the share of the machine other work may use, from 0 to 1 (e.g. 0.05), "
                             f"got {self.quiet}", cli=f"--quiet must be from 0 to 1 (e.g. 0.05), got {self.quiet}")
        if self.quiet_timeout_s <= 0:
            raise InputError(f"quiet_timeout_s must be positive, got {self.quiet_timeout_s}",
                             cli=f"--quiet-timeout must be positive, got {self.quiet_timeout_s}")
        if self.without_t5 and self.artifact is not None:
            raise InputError("without_t5 applies to a preset's export; an export folder already has T5 or not: "
                             "export it with `sdrt export ... --without-t5` and measure that folder",
                             cli="--without-t5 goes with --preset; an export folder already has T5 or not: export "
                                 "it with `sdrt export ... --without-t5` and pass that folder as --artifact")
        if self.intel_python is not None:
            import os

            if not (os.path.isfile(self.intel_python) and os.access(self.intel_python, os.X_OK)):
                raise InputError(f"intel_python {self.intel_python!r} is not an executable Python: give the "
                                 "interpreter of a virtualenv with optimum-intel and openvino-genai "
                                 "(benchmarks/README.md, \"Intel's pipelines\")",
                                 cli=f"--intel-python {self.intel_python!r} is not an executable Python: give the "
                                     "interpreter of a virtualenv with optimum-intel and openvino-genai "
                                     "(benchmarks/README.md, \"Intel's pipelines\")")
            if self.baseline != "torch":
                raise InputError("Intel's pipelines are compared with diffusers: they need baseline=\"torch\"",
                                 cli="--intel-python needs the diffusers baseline: leave out --baseline none")
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
        if self.caches:
            self._check_caches()
        if self.bf16_baseline and self.baseline != "torch":
            raise InputError("the bf16 baseline is diffusers on PyTorch: it needs baseline=\"torch\"",
                             cli="--bf16-baseline is diffusers on PyTorch: it needs --baseline torch")

    def _check_caches(self) -> None:
        """Each cache spec parsed and checked (``parse_cache``), none twice, on a workload the cache covers (with
        ControlNets: DeepCache on a UNet preset)."""
        policies = [parse_cache(spec) for spec in self.caches]
        labels = [cache_label(p) for p in policies]
        if len(set(labels)) != len(labels):
            raise InputError(f"a cache is given twice: {', '.join(self.caches)}",
                             cli=f"--cache gives a cache twice: {','.join(self.caches)}")
        if self.workload not in CACHE_WORKLOADS:
            raise InputError(f"feature caching is not measured on the {self.workload} workload (the pipeline does "
                             f"not cache a base+refiner pair): use one of {', '.join(CACHE_WORKLOADS)}, "
                             "or leave caches out", cli=f"--cache is not measured on --workload {self.workload}: use "
                             f"one of {', '.join(CACHE_WORKLOADS)}, or leave --cache out")
        if self.workload == "controlnet":
            from sdrt.export.preset_tables import is_transformer_preset

            other = [spec for spec, p in zip(self.caches, policies) if p.kind not in CONTROL_CACHES]
            if other or (self.preset is not None and is_transformer_preset(self.preset)):
                what = (f"the cache {', '.join(other)}" if other else f"{self.preset} (a transformer model)")
                raise InputError(f"feature caching runs beside ControlNets only as DeepCache on a UNet model, and "
                                 f"{what} is not that: measure the controlnet workload with deepcache:INTERVAL on a "
                                 "UNet preset (sd15, sdxl), or leave caches out",
                                 cli=f"--cache on --workload controlnet is DeepCache on a UNet model only ({what} "
                                     "is not that): use --cache deepcache:INTERVAL with a UNet preset, or leave "
                                     "--cache out")


def parse_cache(spec: str) -> Any:
    """A cache spec ``KIND:INTERVAL[:SCHEDULE]`` as a ``feature_cache.CachePolicy``, checked by ``cache_policy``;
    anything else an InputError naming the form. The bench measures fixed schedules only: first-block caching's
    threshold rule decides its full steps per run, which the step split and the UNet-equivalent work assume
    known (measure it with ``sdrt generate --cache-threshold`` and its ``Result.loop``)."""
    from sdrt.runtime.feature_cache import CACHE_KINDS, SCHEDULES, cache_policy

    parts = str(spec).strip().split(":")
    if len(parts) not in (2, 3) or not parts[1].strip().isdigit():
        raise InputError(f"cache {spec!r}: use {CACHE_FORM}; kinds: {', '.join(CACHE_KINDS)}, schedules: "
                         f"{', '.join(SCHEDULES)} (default uniform)",
                         cli=f"--cache {spec!r}: use {CACHE_FORM}; kinds: {', '.join(CACHE_KINDS)}, schedules: "
                             f"{', '.join(SCHEDULES)} (default uniform)")
    kind, interval, schedule = parts[0].strip(), int(parts[1]), (parts[2].strip() if len(parts) == 3 else "uniform")
    try:
        policy = cache_policy(kind, interval, schedule)
    except InputError as e:
        raise InputError(f"cache {spec!r}: {e}; the form is {CACHE_FORM}",
                         cli=f"--cache {spec!r}: {e}; the form is {CACHE_FORM}") from None
    assert policy is not None
    return policy


def cache_label(policy: Any) -> str:
    """How a row names its cache (a policy, or its record ``{kind, interval, schedule}``): ``deepcache/3``, or
    ``deepcache/5/nonuniform`` off the uniform schedule; "" uncached."""
    if policy is None:
        return ""
    c = policy if isinstance(policy, dict) else cache_record(policy)
    assert c is not None
    return f"{c['kind']}/{c['interval']}" + ("" if c["schedule"] == "uniform" else f"/{c['schedule']}")


def cache_record(policy: Any) -> dict[str, Any] | None:
    """A policy as the result records it: ``{kind, interval, schedule}``, or None (uncached)."""
    if policy is None:
        return None
    return {"kind": policy.kind, "interval": policy.interval, "schedule": policy.schedule}
