"""ONNX export -> TensorRT engine folder, through the TensorRT Python API (TensorRT 10).

A lazy chain per component (plan -> parse -> configure -> build -> write), nothing built until asked:

    plan_engines(onnx_dir, profile, options)      what would be built, and each engine's cache key
    build_engines(onnx_dir, out_dir, profile, options, progress=print)

The engine folder (written atomically: a killed build leaves the previous folder as it was; only a new or
empty folder or a previous engine folder holding nothing but what its manifests name is replaced, any other
needs ``overwrite=True``)::

    ENGINE_DIR/
      sdrt-engines.json        the engine manifest (sdrt.runtime.engine_manifest)
      text_encoder.engine [text_encoder_2.engine] unet.engine vae_decoder.engine vae_encoder.engine
      sampler_step_cfg.engine sampler_step_cfg_rescale.engine sampler_step.engine
                               the sampler's step graphs (guided; guided with guidance rescale; unguided)
      sampler_input_cfg.engine sampler_input.engine   the first UNet input of a call (s x), on the device
      [text_join_*.engine]     the prompt embeddings' join (SDXL; prompts over 77 tokens)
      sdrt.json                the export's manifest, kind "tensorrt", component paths -> *.engine
      tokenizer/ [tokenizer_2/ tokenizer_3/] scheduler/ model_index.json   copied from the export

An engine whose cache key (ONNX digest, shapes, precision, flags, TensorRT version, GPU) matches the
folder's previous one is reused, not rebuilt.

Precision follows the export: networks are strongly typed by default, so fp16 graphs run in fp16 and the
fp32 components (the SDXL VAE) in fp32 with TF32 matmuls. ``weakly_typed`` instead lets TensorRT pick
fp16 kernels anywhere in an fp16 component (the FP16 builder flag).

TensorRT for RTX: the same code drives the ``tensorrt_rtx`` module (chosen with ``module=`` /
``--tensorrt-module tensorrt_rtx``, or found when ``tensorrt`` is absent), also as ``tensorrt_rtx_bindings``,
as PyPI's ``tensorrt-rtx-cu13-bindings`` wheel names it. Its networks are always
strongly typed and engines are JIT-specialized to the GPU at load, so precision flags and the optimization
level are not set; it has no hardware- or version-compatible engines (an engine runs only on the TensorRT for
RTX release that built it) and its timing cache is a deprecated no-op, so none is used. Checked against
TensorRT for RTX 1.7 on a machine without a GPU, where it builds engines (CPU-only ahead-of-time compilation;
tests/test_trt_modules.py), except refittable ones (its compiler then wants CUDA); not run on an RTX GPU.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdrt import __version__
from sdrt.runtime.atomic import atomic_dir, atomic_write_bytes, check_output_dir
from sdrt.runtime.engine_manifest import (
    ENGINE_MANIFEST_NAME,
    BuildFlags,
    EngineEnv,
    EngineManifest,
    EngineRecord,
    TensorShapes,
    build_mismatches,
    cache_key,
    current_env,
    engine_entries,
)
from sdrt.runtime.errors import ArtifactError, BackendUnavailable, InputError, SdrtError
from sdrt.runtime.inpaint import MASKED_ENCODER
from sdrt.runtime.manifest import EXPORT_FOLDER, ExportManifest
from sdrt.runtime.step_graph import (
    cast_engine_name,
    cast_graph_bytes,
    extra_engine_name,
    extra_graph_bytes,
    input_engine_name,
    input_graph_bytes,
    noise_engine_name,
    noise_graph_bytes,
    step_engine_name,
    step_graph_bytes,
)
from sdrt.runtime.text_join import join_variant
from sdrt.runtime.trt_modules import backend_name, import_tensorrt, make_logger

from .profiles import (
    BuildProfile,
    engine_shapes,
    input_graph_shapes,
    mask_channels,
    step_graph_modes,
    step_graph_shapes,
    text_join_shapes,
)

if TYPE_CHECKING:
    import tensorrt as trt  # for annotations; the module in use is passed as ``trt`` (from load_tensorrt)

MODULES = ("tensorrt", "tensorrt_rtx")
# what each module chosen by name may be installed as (PyPI's standalone wheels name the package *_bindings)
_IMPORT_NAMES = {"tensorrt": ("tensorrt",), "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
INSTALL_HINT = (
    "install TensorRT from NVIDIA's package index: pip install tensorrt --extra-index-url https://pypi.nvidia.com "
    "(needs an NVIDIA GPU and driver); on RTX GPUs, TensorRT for RTX (the tensorrt_rtx module) is used when installed"
)
ASSETS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "model_index.json")
_OOM_MARKERS = ("out of memory", "outofmemory", "cudaerrormemoryallocation", "requested amount of gpu memory",
                "insufficient memory", "failed to allocate", "cuda_error_out_of_memory")

Progress = Callable[[str], None]


class EngineBuildError(SdrtError):
    """TensorRT could not build an engine (out of memory, unsupported operator, builder failure)."""


# -- the TensorRT module --------------------------------------------------------------------------------

def load_tensorrt(module: str | None = None) -> Any:
    """Import ``tensorrt`` (or ``tensorrt_rtx``): the builder's choice among the runtime's importer's."""
    chosen = module or os.environ.get("SDRT_TENSORRT_MODULE") or ""
    names = [module] if module else [chosen, *MODULES]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise InputError(f"unknown TensorRT module {unknown[0]!r}; the builder takes one of {MODULES}")
    # every module may also be installed under its PyPI package name, chosen or not: "whichever is installed"
    # includes PyPI's TensorRT for RTX (tensorrt_rtx_bindings)
    candidates = list(dict.fromkeys(alias for n in names for alias in _IMPORT_NAMES[n]))
    try:
        mod = import_tensorrt(candidates)
    except BackendUnavailable as e:
        # the runtime's message also offers the lean runtime, which cannot build
        tried = str(e).rsplit("); ", 1)[0] + ")"  # "TensorRT is not available (what was tried)"
        raise BackendUnavailable(f"{tried}; building engines needs TensorRT with its builder: {INSTALL_HINT}") from e
    if not hasattr(mod, "Builder"):
        raise BackendUnavailable(f"{mod.__name__} has no builder (a lean runtime?); {INSTALL_HINT}")
    return mod


def _is_rtx(trt: Any) -> bool:
    return backend_name(trt) == "tensorrt_rtx"  # tensorrt_rtx, or tensorrt_rtx_bindings from PyPI


# -- options and plans ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildOptions:
    opt_level: int = 3  # builder optimization level 0..5: higher searches longer for faster kernels
    workspace_gb: float | None = None  # scratch memory limit for tactics; None: TensorRT's default
    timing_cache: Path | None = None  # read before and written after the build, shared by all engines
    refittable: bool = False
    version_compatible: bool = False  # runnable by later TensorRT 10.x and by the lean runtime
    exclude_lean_runtime: bool = False  # with version_compatible: smaller engines, lean runtime installed apart
    hardware_compatible: bool = False  # Ampere and newer GPUs (compute capability >= 8.0)
    weakly_typed: bool = False  # let TensorRT choose fp16 anywhere in fp16 components (FP16 flag)
    module: str | None = None  # "tensorrt" | "tensorrt_rtx"; None: whichever is installed
    force: bool = False  # rebuild even when an up-to-date engine exists

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise InputError(f"--opt-level {self.opt_level}: the builder optimization level is 0..5 (default 3)")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InputError(f"--workspace {self.workspace_gb}: give a positive number of GB")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise InputError("--exclude-lean-runtime applies only with --version-compatible")

    def flags(self, precision: str) -> BuildFlags:
        return BuildFlags(
            fp16=precision == "fp16" and self.weakly_typed,
            tf32=True,
            strongly_typed=not self.weakly_typed,
            opt_level=self.opt_level,
            workspace_bytes=None if self.workspace_gb is None else int(self.workspace_gb * 2**30),
            refittable=self.refittable,
            version_compatible=self.version_compatible,
            exclude_lean_runtime=self.exclude_lean_runtime,
            hardware_compatibility="ampere_plus" if self.hardware_compatible else "none",
        )

    def cli_args(self) -> list[str]:
        args: list[str] = []
        if self.opt_level != 3:
            args += ["--opt-level", str(self.opt_level)]
        if self.workspace_gb is not None:
            args += ["--workspace", f"{self.workspace_gb:g}"]
        if self.timing_cache is not None:
            args += ["--timing-cache", str(self.timing_cache)]
        for flag, on in (("--refittable", self.refittable), ("--version-compatible", self.version_compatible),
                         ("--exclude-lean-runtime", self.exclude_lean_runtime),
                         ("--hardware-compatible", self.hardware_compatible), ("--weakly-typed", self.weakly_typed)):
            if on:
                args.append(flag)
        if self.module:
            args += ["--tensorrt-module", self.module]
        return args


@dataclass(frozen=True)
class EnginePlan:
    """One engine to build (or reuse): the record it will have, minus the build results."""

    onnx_path: Path
    record: EngineRecord
    onnx_bytes: bytes | None = None  # a graph sdrt makes itself (the sampler step graphs), parsed from memory


def onnx_digest(component_dir: Path) -> str:
    """sha256 over a component's graph and external weights (``model.onnx*``), names included."""
    h = hashlib.sha256()
    for f in sorted(component_dir.glob("model.onnx*")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def rebuild_command(onnx_dir: str | Path, out_dir: str | Path, profile: BuildProfile, options: BuildOptions) -> str:
    argv = ["sdrt", "build", str(onnx_dir), "--out", str(out_dir), *profile.cli_args(), *options.cli_args()]
    return shlex.join(argv)


def plan_engines(
    onnx_dir: str | Path,
    profile: BuildProfile,
    options: BuildOptions,
    env: EngineEnv,
    progress: Progress = lambda msg: None,
) -> tuple[ExportManifest, list[EnginePlan]]:
    """What a build would produce; TensorRT-free (``env`` says which TensorRT and GPU)."""
    from sdrt.runtime.optimum import is_optimum_folder, read_optimum

    src = Path(onnx_dir)
    graphs: dict[str, bytes] = {}
    if is_optimum_folder(src):  # Optimum's export: its graphs adapted to sdrt's contracts, in memory
        optimum = read_optimum(src)
        manifest, graphs = optimum.manifest, dict(optimum.graphs)
    else:
        manifest = ExportManifest.read(src, wanted=EXPORT_FOLDER)
    shapes = engine_shapes(profile, manifest)
    plans = []
    for name, comp in manifest.components.items():
        path = src / comp.path
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; re-export the model with `sdrt export`")
        if comp.precision == "bf16" and options.weakly_typed:
            raise InputError(f"{name} is a bf16 graph, which builds strongly typed (TensorRT computes in the types "
                             "the graph gives): leave --weakly-typed out")
        if comp.precision == "bf16" and options.refittable:
            raise InputError(f"{name} is a bf16 graph, and sdrt does not refit bf16 engines yet: leave --refittable "
                             "out (LoRA slots, --lora-slots at export, need no refit)")
        progress(f"{name}: hashing {comp.path}")
        digest = onnx_digest(path.parent)
        flags = options.flags(comp.precision)
        key = cache_key(name, digest, comp.precision, shapes[name], flags, env)
        rec = EngineRecord(component=name, file=f"{name}.engine", precision=comp.precision, shapes=shapes[name],
                           flags=flags, onnx_sha256=digest, env=env, cache_key=key)
        plans.append(EnginePlan(path, rec, graphs.get(name)))
    return manifest, (plans + text_join_plans(profile, manifest, options, env)
                      + step_graph_plans(profile, manifest, options, env)
                      + input_graph_plans(profile, manifest, options, env))


def step_graph_plans(profile: BuildProfile, manifest: ExportManifest, options: BuildOptions,
                     env: EngineEnv) -> list[EnginePlan]:
    """The sampler's step graphs (guided, guided with guidance rescale when the profile has CFG, and
    unguided), in the UNet's precision,
    over the profile's latent shapes: the runtime loads them by the digest of their ONNX bytes, so the lean
    runtime runs the whole denoising loop and the first step pays no build. An inpainting UNet (9 input
    channels) gets only the "concat" variants it needs; an ordinary one the plain and the "blend" ones."""
    unet = manifest.components.get("unet")
    if unet is None:
        return []
    dtype = "float16" if unet.precision == "fp16" else "float32"
    plans = []
    guidance = (True, False) if profile.cfg else (False,)
    variants = [(guided, mode, False) for mode, guided in product(step_graph_modes(manifest), guidance)]
    if profile.cfg and None in step_graph_modes(manifest):
        variants.append((True, None, True))  # guidance rescale: guided, not inpainting
    for guided, mode, rescale in variants:
        plans.append(graph_plan(step_engine_name(guided, mode, rescale), step_graph_bytes(guided, dtype, mode, rescale),
                                step_graph_shapes(profile, manifest, guided, mode), io_precision(unet.precision), options, env))
    return plans


def io_precision(precision: str) -> str:
    """The precision of the graphs the runtime makes around a component's (the step, the first input, casts):
    its inputs' and outputs' (a bf16 graph's are float32)."""
    return "fp16" if precision == "fp16" else "fp32"


def graph_plan(name: str, model: bytes, shapes: tuple[TensorShapes, ...], precision: str, options: BuildOptions,
               env: EngineEnv, source: str = "sdrt.runtime.step_graph") -> EnginePlan:
    """The plan of a graph the runtime makes in memory (no weights, so never refittable), which it finds in
    the folder by the digest of its bytes."""
    digest = hashlib.sha256(model).hexdigest()
    flags = replace(options.flags(precision), refittable=False)
    key = cache_key(name, digest, precision, shapes, flags, env)
    rec = EngineRecord(component=name, file=f"{name}.engine", precision=precision, shapes=shapes,
                       flags=flags, onnx_sha256=digest, env=env, cache_key=key)
    return EnginePlan(Path(f"<{name}: {source}>"), rec, model)


def input_graph_plans(profile: BuildProfile, manifest: ExportManifest, options: BuildOptions,
                      env: EngineEnv) -> list[EnginePlan]:
    """The first-input graphs (``s x`` for a call's first UNet step, runtime/step_graph.py), guided and
    unguided, in the UNet's precision; with a 9-channel inpainting UNet the variant appending its extra
    channels and the graphs assembling them; the encoded image's noising (img2img, inpainting); and the
    latents' cast into a VAE of another precision. The runtime has no host path for them: a folder without
    them (engine manifest schema 1) is refused."""
    unet = manifest.components.get("unet")
    if unet is None:
        return []
    dtype = "float16" if unet.precision == "fp16" else "float32"
    plans = []
    concat = "concat" in step_graph_modes(manifest)
    for guided in (True, False) if profile.cfg else (False,):
        plans.append(graph_plan(input_engine_name(guided, concat), input_graph_bytes(guided, dtype, concat),
                                input_graph_shapes(profile, manifest, guided, concat), io_precision(unet.precision), options, env))
    latents = input_graph_shapes(profile, manifest, False)
    vae = manifest.components.get("vae_decoder")
    if vae is not None and io_precision(vae.precision) != io_precision(unet.precision):  # fp16 latents, fp32 VAE
        vae_dtype = "float16" if vae.precision == "fp16" else "float32"
        plans.append(graph_plan(cast_engine_name(dtype, vae_dtype), cast_graph_bytes(dtype, vae_dtype), latents,
                                vae.precision, options, env))
    (lat,) = latents
    enc = manifest.components.get("vae_encoder")
    if enc is not None:  # the encoded image noised to the first step (img2img, inpainting)
        enc_dtype = "float16" if enc.precision == "fp16" else "float32"
        shapes = (_one_row(lat, "image_latents"), replace(lat, name="noise"))
        plans.append(graph_plan(noise_engine_name(enc_dtype, dtype), noise_graph_bytes(enc_dtype, dtype), shapes,
                                io_precision(unet.precision), options, env))
    masked = manifest.components.get(MASKED_ENCODER)
    if concat and masked is not None:  # an inpainting denoiser's [mask, masked latents] block
        src = "float16" if masked.precision == "fp16" else "float32"
        m = mask_channels(manifest)
        mask = TensorShapes("mask", (lat.min[0], m, *lat.min[2:]), (lat.opt[0], m, *lat.opt[2:]),
                            (lat.max[0], m, *lat.max[2:]))
        for guided in (True, False) if profile.cfg else (False,):
            plans.append(graph_plan(extra_engine_name(guided, src, dtype, m), extra_graph_bytes(guided, src, dtype, m),
                                    (mask, _one_row(lat, "masked_latents")), io_precision(unet.precision), options, env))
    return plans


def _one_row(shapes: TensorShapes, name: str) -> TensorShapes:
    """``shapes`` with a batch of one (the one encoded init image), renamed."""
    return TensorShapes(name, (1, *shapes.min[1:]), (1, *shapes.opt[1:]), (1, *shapes.max[1:]))


def text_join_plans(profile: BuildProfile, manifest: ExportManifest, options: BuildOptions,
                    env: EngineEnv) -> list[EnginePlan]:
    """The prompt embeddings' join graph (runtime/text_join.py) in the variant the runtime loads for this
    export, where it runs it at all (two encoders or a pooled output: SDXL; prompts over 77 tokens:
    ``profile.chunks.max > 1``; a dtype change): the text encoders' outputs then reach the UNet without a
    round trip through the host (the runtime has no host join)."""
    if not all(e in manifest.components for e in (*manifest.encoder_names, "unet")):
        return []
    if manifest.model_family.host_join:  # the family joins its embeddings itself (SD3): no join graph
        return []
    variant = join_variant(manifest)
    if not variant.needed(profile.chunks.max):
        return []
    precision = "fp16" if variant.out_dtype == "float16" else "fp32"
    return [graph_plan(variant.name, variant.graph_bytes(), text_join_shapes(profile, manifest), precision, options,
                       env, source="sdrt.runtime.text_join")]


# -- TensorRT steps ------------------------------------------------------------------------------------

def _make_monitor(trt: Any, component: str, progress: Progress) -> trt.IProgressMonitor:
    """Reports the builder's top-level phases with elapsed time."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if not parent_phase:
                progress(f"{component}: {phase_name} ({time.perf_counter() - self.t0:.0f} s)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # keep building

        def phase_finish(self, phase_name: str) -> None:
            return None

    return _Monitor()


def parse_onnx(
    trt: Any,
    builder: trt.Builder, path: Path, logger: trt.ILogger, component: str, strongly_typed: bool,
    model: bytes | None = None,
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Parse an ONNX file (external weights beside it are found by path), or ``model`` bytes when given, into
    a network. The parser is returned too: it owns weights the network points at, so it must live until the
    build is done."""
    flags = 0
    if strongly_typed or _is_rtx(trt):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # bytes with a path: external weights are found beside that file (an adapted Optimum graph's own weights)
    if model is None:
        parsed = parser.parse_from_file(str(path))
    else:
        parsed = parser.parse(model, str(path)) if path.is_file() else parser.parse(model)
    if not parsed:
        raise EngineBuildError(_parser_report(trt, parser, component, path))
    return network, parser


def _parser_report(trt: Any, parser: trt.OnnxParser, component: str, path: Path) -> str:
    lines, unsupported = [], set()
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        op = err.node_operator()
        if err.code() == trt.ErrorCode.UNSUPPORTED_NODE and op:
            unsupported.add(op)
        where = f"node {err.node_name() or err.node()} ({op or '?'})"
        lines.append(f"  - {where}: {err.desc()}")
    head = f"TensorRT could not parse {component} ({path})"
    if unsupported:
        head += (f": operators {', '.join(sorted(unsupported))} are not supported by this TensorRT "
                 f"({trt.__version__}); upgrade TensorRT or re-export with a lower --opset")
    return head + ":\n" + "\n".join(lines or ["  (the parser gave no details)"])


def make_config(trt: Any, builder: trt.Builder, flags: BuildFlags, cache: trt.ITimingCache | None) -> trt.IBuilderConfig:
    config = builder.create_builder_config()
    if flags.fp16 and not _is_rtx(trt):
        if not hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 11: every network is strongly typed
            raise InputError(f"{trt.__name__} {trt.__version__} has no weak typing (no FP16 builder flag); "
                             "drop --weakly-typed")
        config.set_flag(trt.BuilderFlag.FP16)
    if flags.tf32 and not _is_rtx(trt):
        config.set_flag(trt.BuilderFlag.TF32)
    if not _is_rtx(trt):
        config.builder_optimization_level = flags.opt_level
    if flags.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, flags.workspace_bytes)
    if _is_rtx(trt):
        # TensorRT for RTX: engines use the memory sdrt hands them (all of it is), which its stream capture needs
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)  # RTX-only flag
    if flags.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if flags.version_compatible:
        if _is_rtx(trt):  # its engines run only on the release that built them; the flag wants the lean runtime
            raise InputError(f"{trt.__name__} {trt.__version__} cannot build version-compatible engines; "
                             "drop --version-compatible")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if flags.exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if flags.hardware_compatibility == "ampere_plus":
        if _is_rtx(trt) or not hasattr(trt, "HardwareCompatibilityLevel"):
            raise InputError(f"{trt.__name__} {trt.__version__} cannot build hardware-compatible engines; "
                             "drop --hardware-compatible")
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if cache is not None:
        config.set_timing_cache(cache, False)
    return config


def add_profile(builder: trt.Builder, config: trt.IBuilderConfig, shapes: Sequence[TensorShapes]) -> None:
    profile = builder.create_optimization_profile()
    for s in shapes:
        profile.set_shape(s.name, s.min, s.opt, s.max)  # the bindings take tuples for Dims
    config.add_optimization_profile(profile)


def _is_oom(messages: Sequence[str], exc: BaseException | None) -> bool:
    text = " ".join(messages).lower() + (str(exc).lower() if exc else "")
    return isinstance(exc, MemoryError) or any(m in text for m in _OOM_MARKERS)


def build_one(
    trt: Any,
    plan: EnginePlan,
    cache: trt.ITimingCache | None,
    builder: trt.Builder,
    messages: list[str],
    progress: Progress,
) -> bytes:
    """Build one serialized engine. Raises EngineBuildError with the reason (OOM, operators, other)."""
    rec = plan.record
    logger = builder.logger
    messages.clear()
    network, parser = parse_onnx(trt, builder, plan.onnx_path, logger, rec.component, rec.flags.strongly_typed,
                                 plan.onnx_bytes)
    config = make_config(trt, builder, rec.flags, cache)
    config.progress_monitor = _make_monitor(trt, rec.component, progress)
    add_profile(builder, config, rec.shapes)
    error: BaseException | None = None
    blob = None
    try:
        blob = builder.build_serialized_network(network, config)
    except (RuntimeError, MemoryError) as e:
        error = e
    del parser
    if blob is None:
        tail = "\n".join(messages[-8:]) or str(error or "no message")
        if _is_oom(messages, error):
            raise EngineBuildError(
                f"{rec.component}: the GPU ran out of memory while building the engine. Close other programs using "
                "the GPU, lower --workspace, narrow the profile (smaller max batch or size), or use --opt-level 2.\n"
                f"TensorRT said:\n{tail}"
            ) from error
        raise EngineBuildError(f"{rec.component}: TensorRT failed to build the engine:\n{tail}") from error
    return bytes(memoryview(blob))


def _load_cache(config_for_cache: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    return config_for_cache.create_timing_cache(data)


# -- the whole folder -----------------------------------------------------------------------------------------

def _reusable(old: EngineManifest | None, old_dir: Path, rec: EngineRecord) -> EngineRecord | None:
    if old is None:
        return None
    prev = next((r for r in old.engines if r.component == rec.component), None)
    if prev is None or prev.cache_key != rec.cache_key or build_mismatches(prev, rec):
        return None
    path = old_dir / prev.file
    if not path.is_file() or (prev.size_bytes and path.stat().st_size != prev.size_bytes):
        return None
    return prev


def _read_old(out_dir: Path) -> EngineManifest | None:
    if not (out_dir / ENGINE_MANIFEST_NAME).is_file():
        return None
    try:
        return EngineManifest.read(out_dir, allow_old=True)  # a schema-1 folder's engines are reused too
    except SdrtError:
        return None  # unreadable: rebuild everything


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_assets(src: Path, dst: Path, manifest: ExportManifest, records: Mapping[str, EngineRecord]) -> None:
    for name in ASSETS:
        item = src / name
        if item.is_dir():
            shutil.copytree(item, dst / name)
        elif item.is_file():
            shutil.copy2(item, dst / name)
    comps = {n: replace(c, path=records[n].file, size_bytes=records[n].size_bytes)
             for n, c in manifest.components.items() if n in records}
    replace(manifest, components=comps, kind="tensorrt").write(dst)


ENGINES_KIND = "an sdrt engine folder"


def engine_folder_entries(folder: Path) -> set[str]:
    """What a previous engine folder's manifests name, and the assets every build copies into it."""
    return engine_entries(folder) | set(ASSETS)


def check_engine_dir(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an ``out_dir`` that a build must not replace (see ``check_output_dir``), before any work: a
    previous engine folder is replaced whole, so one that also holds files its manifests do not name is
    refused (unless ``overwrite``)."""
    return check_output_dir(out_dir, marker=ENGINE_MANIFEST_NAME, overwrite=overwrite, what=ENGINES_KIND,
                            owned=engine_folder_entries)


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    profile: BuildProfile,
    options: BuildOptions = BuildOptions(),
    progress: Progress = lambda msg: None,
    *,
    overwrite: bool = False,
) -> EngineManifest:
    """Build (or reuse) every component's engine into ``out_dir``, atomically. Needs TensorRT and a GPU.

    ``out_dir`` may be new, empty or a previous engine folder holding only what its manifests name; any
    other folder is refused unless ``overwrite``, a file or the current folder always.
    """
    check_engine_dir(out_dir, overwrite=overwrite)
    trt = load_tensorrt(options.module)
    backend = backend_name(trt)
    env = current_env(backend, str(trt.__version__))
    src, out = Path(onnx_dir), Path(out_dir)
    manifest, plans = plan_engines(src, profile, options, env, progress)
    old = _read_old(out)
    messages: list[str] = []
    builder = trt.Builder(make_logger(trt, messages))
    cache = None
    if not _is_rtx(trt):
        cache = _load_cache(builder.create_builder_config(), options.timing_cache)
    elif options.timing_cache is not None:  # a deprecated no-op there, said to rule out CPU-only builds
        progress(f"{backend}: no timing cache (TensorRT for RTX does not use one); {options.timing_cache} is not used")
    records: dict[str, EngineRecord] = {}
    with atomic_dir(out, marker=ENGINE_MANIFEST_NAME, overwrite=overwrite, what=ENGINES_KIND,
                    owned=engine_folder_entries) as tmp:
        for plan in plans:
            rec = plan.record
            prev = None if options.force else _reusable(old, out, rec)
            if prev is not None:
                _link_or_copy(out / prev.file, tmp / prev.file)
                records[rec.component] = prev
                progress(f"{rec.component}: up to date, reused ({prev.size_bytes / 1e6:.1f} MB)")
                continue
            progress(f"{rec.component}: building ({rec.precision}, {_shape_summary(rec.shapes)})")
            t0 = time.perf_counter()
            blob = build_one(trt, plan, cache, builder, messages, progress)
            seconds = time.perf_counter() - t0
            (tmp / rec.file).write_bytes(blob)
            records[rec.component] = replace(rec, size_bytes=len(blob), build_seconds=round(seconds, 2),
                                             engine_sha256=hashlib.sha256(blob).hexdigest())
            progress(f"{rec.component}: built in {seconds:.1f} s ({len(blob) / 1e6:.1f} MB)")
            if cache is not None and options.timing_cache is not None:
                atomic_write_bytes(options.timing_cache, bytes(memoryview(cache.serialize())))
        _copy_assets(src, tmp, manifest, records)
        result = EngineManifest(
            profile_name=profile.name,
            profile=profile.shapes(),
            engines=tuple(records[p.record.component] for p in plans),
            onnx_dir=str(src.resolve()),
            build_command=rebuild_command(src, out, profile, options),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            sdrt_version=__version__,
        )
        result.write(tmp)
    return result


def _shape_summary(shapes: Sequence[TensorShapes]) -> str:
    s = shapes[0]
    if s.min == s.max:
        return f"{s.name} {list(s.min)}"
    return f"{s.name} {list(s.min)}..{list(s.max)}, opt {list(s.opt)}"
