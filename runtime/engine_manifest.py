"""The engine manifest (``sdrt-engines.json``): what each TensorRT engine was built from, for and with.

Read by the runtime *before* it deserializes anything, so an engine built for another GPU, TensorRT
version, profile or ONNX graph is explained (every mismatch, and the command that rebuilds it) instead
of crashing inside TensorRT. Imports nothing heavier than the standard library.

Compatibility rules (TensorRT 10):
- the backend module (``tensorrt`` or ``tensorrt_rtx``) must match;
- the TensorRT version must match exactly, unless the engine is version-compatible: then any later
  TensorRT of the same major version (or the lean runtime) runs it;
- the GPU must match (name and compute capability), unless the engine is hardware-compatible:
  ``ampere_plus`` runs on compute capability 8.0 and newer, ``same_compute_capability`` on any GPU
  of the same compute capability. A side that could not be detected is not compared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import ArtifactError, CompatibilityError, InputError
from .manifest import MANIFEST_NAME, export_entries

ENGINE_MANIFEST_NAME = "sdrt-engines.json"
# 2: ``sdrt build`` prebuilds every small graph the runtime loads (sampler steps, first inputs, noising, casts,
# the text join); a schema-1 folder lacks some of them and is refused (``old_folder_error``)
# 3: the build profile records a T5 range (``t5_tokens``). An sdrt reading 2 would ignore it and feed engines
# built for other lengths the default, so a folder with a range is written as 3 (refused there, naming the
# upgrade) and one without stays 2, which every sdrt since reads alike
ENGINE_SCHEMA_VERSION = 3
BASE_SCHEMA = 2
T5_RANGE_SCHEMA = 3
# what an engine's cache key hashes: unchanged by the manifest's schema, so a rebuild over a schema-1 folder
# reuses its engines and builds only the small graphs it lacks
CACHE_KEY_SCHEMA = 1
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")

Triple = tuple[int, int, int]  # (min, opt, max)


def _triple(v: Sequence[int]) -> Triple:
    a, b, c = (int(x) for x in v)
    return (a, b, c)


@dataclass(frozen=True)
class ProfileShapes:
    """The request range an engine folder serves: images per call, pixels, 77-token prompt chunks, and on a
    model with a T5 encoder its tokens per prompt (a call's ``max_sequence_length``).

    With ``cfg`` the UNet (and the text encoders) run twice the batch: conditional and unconditional
    halves in one call. ``t5_tokens`` None: the family's default length alone (what every folder built before
    the range was recorded holds; a model without T5 records none either).
    """

    batch: Triple
    height: Triple  # pixels
    width: Triple  # pixels
    chunks: Triple = (1, 1, 1)
    cfg: bool = True
    t5_tokens: Triple | None = None

    @property
    def static(self) -> bool:
        ranges = (self.batch, self.height, self.width, self.chunks, *((self.t5_tokens,) if self.t5_tokens else ()))
        return all(r[0] == r[2] for r in ranges)

    def describe(self) -> str:
        def r(t: Triple) -> str:
            return str(t[0]) if t[0] == t[2] else f"{t[0]}..{t[2]} (opt {t[1]})"

        t5 = "" if self.t5_tokens is None else f", T5 tokens {r(self.t5_tokens)}"
        return (f"batch {r(self.batch)}, height {r(self.height)} px, width {r(self.width)} px, "
                f"prompt chunks {r(self.chunks)}{t5}{', CFG (UNet batch doubled)' if self.cfg else ''}")

    def check_request(self, batch: int, height: int, width: int, chunks: int = 1, guided: bool | None = None) -> None:
        """Raise InputError naming the range when a request falls outside this profile. ``guided``: whether the
        call uses classifier-free guidance (None: not checked), which sets the UNet's rows (2 x batch or batch)."""
        lo, hi = self.batch[0], self.batch[2]
        if guided is False and self.cfg and not 2 * lo <= batch <= 2 * hi:
            raise InputError(
                f"a guidance scale of 1 or less runs the UNet and text encoders at {batch} rows, but these engines "
                f"were built for classifier-free guidance ({2 * lo}..{2 * hi} rows): use a guidance scale above 1, "
                "or build engines without CFG (`sdrt build ONNX_DIR --out ENGINE_DIR --no-cfg`)"
            )
        if guided and not self.cfg and not lo <= 2 * batch <= hi:
            raise InputError(
                f"a guidance scale above 1 runs the UNet at 2 x {batch} rows, but these engines were built without "
                f"classifier-free guidance (--no-cfg: {lo}..{hi} rows): use a guidance scale of 1, or rebuild them "
                "without --no-cfg"
            )
        bad = [
            f"{label} {v} (engines take {t[0]}" + (f"..{t[2]})" if t[2] != t[0] else ")")
            for label, v, t in (("batch", batch, self.batch), ("height", height, self.height),
                                ("width", width, self.width), ("prompt chunks", chunks, self.chunks))
            if not t[0] <= v <= t[2]
        ]
        if bad:
            raise InputError(
                f"no engine profile covers {', '.join(bad)}; rebuild with a profile that does, e.g. "
                "`sdrt build ONNX_DIR --out ENGINE_DIR --dynamic 256:512:1024 --batch 1:1:4`"
            )

    def t5_range(self, default: int) -> Triple:
        """T5's tokens per prompt the engines take; ``default``: the family's (where the folder records none)."""
        return self.t5_tokens if self.t5_tokens is not None else (default, default, default)

    def check_t5_tokens(self, tokens: int, default: int) -> None:
        """Raise InputError naming the engines' range and the fix when a call's T5 tokens per prompt (its
        ``max_sequence_length``, else ``default``: the family's) fall outside them."""
        lo, opt, hi = self.t5_range(default)
        if lo <= tokens <= hi:
            return
        took, give = (str(lo), f"{lo}") if lo == hi else (f"{lo}..{hi}", f"from {lo} to {hi}")
        note = " (the model's default where a call gives none)" if tokens == default else ""

        def message(name: str) -> str:
            return (f"{name} {tokens}{note} is outside the T5 tokens per prompt these engines were built for "
                    f"({took}): give {name} {give}, or rebuild the engines with a T5 range that covers it, e.g. "
                    f"`sdrt build ONNX_DIR --out ENGINE_DIR --t5-tokens {min(lo, tokens)}:{opt}:{max(hi, tokens)}`")

        raise InputError(message("max_sequence_length"), cli=message("--max-sequence-length"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProfileShapes:
        t5 = d.get("t5_tokens")  # absent in a folder built before the range was recorded: the family's default
        return cls(_triple(d["batch"]), _triple(d["height"]), _triple(d["width"]),
                   _triple(d.get("chunks", (1, 1, 1))), bool(d.get("cfg", True)),
                   None if t5 is None else _triple(t5))


@dataclass(frozen=True)
class TensorShapes:
    """One engine input's optimization-profile shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorShapes:
        return cls(d["name"], tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class BuildFlags:
    """Builder settings that change what an engine is (and so belong in its cache key)."""

    fp16: bool = False  # the FP16 builder flag (weakly typed networks only)
    tf32: bool = True
    strongly_typed: bool = True  # precision exactly as the ONNX graph types it
    opt_level: int = 3
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    refittable: bool = False
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compatibility: str = "none"  # one of HARDWARE_LEVELS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildFlags:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class EngineEnv:
    """Where an engine was built, or where one is about to be loaded."""

    backend: str  # "tensorrt" | "tensorrt_rtx"
    version: str  # e.g. "10.13.0.35"
    gpu_name: str | None = None
    compute_capability: str | None = None  # e.g. "9.0"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineEnv:
        return cls(d["backend"], d["version"], d.get("gpu_name"), d.get("compute_capability"))


@dataclass(frozen=True)
class EngineRecord:
    """One engine file and everything it depends on."""

    component: str  # "unet", "text_encoder", ...
    file: str  # relative to the engine folder, e.g. "unet.engine"
    precision: str  # "fp16" | "fp32" | "bf16" (fp32 components may use TF32)
    shapes: tuple[TensorShapes, ...]
    flags: BuildFlags
    onnx_sha256: str
    env: EngineEnv
    cache_key: str
    size_bytes: int = 0
    engine_sha256: str = ""
    build_seconds: float = 0.0
    weights: str = "base"  # "base", or what a refit put in: LoRAs with scales, a checkpoint digest

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineRecord:
        return cls(
            component=d["component"],
            file=d["file"],
            precision=d["precision"],
            shapes=tuple(TensorShapes.from_dict(s) for s in d["shapes"]),
            flags=BuildFlags.from_dict(d["flags"]),
            onnx_sha256=d["onnx_sha256"],
            env=EngineEnv.from_dict(d["env"]),
            cache_key=d["cache_key"],
            size_bytes=int(d.get("size_bytes", 0)),
            engine_sha256=d.get("engine_sha256", ""),
            build_seconds=float(d.get("build_seconds", 0.0)),
            weights=d.get("weights", "base"),
        )


@dataclass(frozen=True)
class EngineManifest:
    profile_name: str
    profile: ProfileShapes
    engines: tuple[EngineRecord, ...]
    onnx_dir: str  # the export the engines were built from
    build_command: str  # the command that rebuilds this folder
    created: str = ""
    sdrt_version: str = ""
    schema: int = BASE_SCHEMA  # the oldest schema that can read this folder (raised to T5_RANGE_SCHEMA by a T5 range)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile.t5_tokens is not None and self.schema < T5_RANGE_SCHEMA:
            object.__setattr__(self, "schema", T5_RANGE_SCHEMA)

    def record(self, component: str) -> EngineRecord:
        for r in self.engines:
            if r.component == component:
                return r
        raise ArtifactError(
            f"the engine folder has no {component} engine (it has {', '.join(r.component for r in self.engines)}); "
            f"rebuild it: {self.build_command}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / ENGINE_MANIFEST_NAME, self.to_json())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, folder: str | Path | None = None,
                  allow_old: bool = False) -> EngineManifest:
        """``allow_old``: read a schema-1 manifest too (a rebuild reusing its engines); the runtime refuses it."""
        schema = int(d.get("schema", 0))
        if schema > ENGINE_SCHEMA_VERSION:
            raise CompatibilityError(
                f"engine manifest schema {schema} is newer than this sdrt understands ({ENGINE_SCHEMA_VERSION}); "
                f"upgrade sdrt, or rebuild: {d.get('build_command', 'sdrt build ONNX_DIR --out ENGINE_DIR')}"
            )
        if schema < BASE_SCHEMA and not allow_old:
            raise old_folder_error(d, folder)
        return cls(
            profile_name=d["profile_name"],
            profile=ProfileShapes.from_dict(d["profile"]),
            engines=tuple(EngineRecord.from_dict(e) for e in d["engines"]),
            onnx_dir=d["onnx_dir"],
            build_command=d["build_command"],
            created=d.get("created", ""),
            sdrt_version=d.get("sdrt_version", ""),
            schema=schema,
            extra=dict(d.get("extra", {})),
        )

    @classmethod
    def read(cls, folder: str | Path, *, allow_old: bool = False) -> EngineManifest:
        path = Path(folder) / ENGINE_MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(
                f"{path} is missing: {folder} is not an sdrt engine folder; build one with "
                f"`sdrt build ONNX_DIR --out {folder}`"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()), folder=folder, allow_old=allow_old)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"{path} is unreadable or incomplete ({e!r}); rebuild the engines with `sdrt build`"
            ) from e


def old_folder_error(d: Mapping[str, Any], folder: str | Path | None = None) -> CompatibilityError:
    """A schema-1 engine folder: built by an older sdrt, without the small graphs the runtime now runs on the
    device (it keeps no host path for them). The rebuild reuses the folder's engines."""
    where = f"{folder}" if folder is not None else "this engine folder"
    onnx_dir = d.get("onnx_dir") or "ONNX_DIR"
    out = folder if folder is not None else "ENGINES"
    command = d.get("build_command") or f"sdrt build {onnx_dir} --out {out}"
    return CompatibilityError(
        f"{where} was built by an older sdrt (engine manifest schema {d.get('schema', 0)}, this sdrt reads "
        f"{BASE_SCHEMA} to {ENGINE_SCHEMA_VERSION}), without the device-side graphs this runtime runs (first UNet input, image "
        f"noising, latent casts, prompt join); rebuild it, which reuses its engines:\n  {command}"
    )


# -- cache keys and compatibility ---------------------------------------------------------------------

def cache_key(
    component: str,
    onnx_sha256: str,
    precision: str,
    shapes: Sequence[TensorShapes],
    flags: BuildFlags,
    env: EngineEnv,
) -> str:
    """A digest of everything that determines an engine. Equal keys: the engine can be reused."""
    payload = {
        "schema": CACHE_KEY_SCHEMA,
        "component": component,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "shapes": [asdict(s) for s in shapes],
        "flags": asdict(flags),
        "env": asdict(env),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _cc_tuple(cc: str) -> tuple[int, ...]:
    return _version_tuple(cc)


def env_mismatches(record: EngineRecord, env: EngineEnv) -> list[str]:
    """Why ``record``'s engine cannot run in ``env`` (empty: it can)."""
    built, now, flags = record.env, env, record.flags
    out: list[str] = []
    if built.backend != now.backend:
        out.append(f"built for {built.backend}, but this runtime uses {now.backend}")
    if flags.version_compatible:
        b, n = _version_tuple(built.version), _version_tuple(now.version)
        if b[:1] != n[:1] or n < b:
            out.append(f"TensorRT {now.version} cannot run a version-compatible engine built with {built.version} "
                       f"(it needs TensorRT {b[0] if b else '?'}.x, {built.version} or later)")
    elif built.version != now.version:
        out.append(f"built with TensorRT {built.version}, this is TensorRT {now.version}")
    level = flags.hardware_compatibility
    if built.backend == "tensorrt_rtx" == now.backend:
        # TensorRT for RTX compiles ahead of time for every GPU of compute capability 8.0 and later (no GPU
        # is needed to build) and specializes the engine to this GPU when it loads
        if now.compute_capability and _cc_tuple(now.compute_capability) < (8, 0):
            out.append(f"TensorRT for RTX engines run on compute capability 8.0 or newer; this GPU has "
                       f"{now.compute_capability} ({now.gpu_name or 'unknown GPU'})")
        return out
    if built.compute_capability and now.compute_capability:
        if level == "ampere_plus":
            if _cc_tuple(now.compute_capability) < (8, 0):
                out.append(f"hardware-compatible (Ampere+) engine, but this GPU has compute capability "
                           f"{now.compute_capability} (needs 8.0 or newer)")
        elif built.compute_capability != now.compute_capability:
            out.append(f"built for compute capability {built.compute_capability} ({built.gpu_name or 'unknown GPU'}), "
                       f"this GPU has {now.compute_capability} ({now.gpu_name or 'unknown GPU'})")
    if level == "none" and built.gpu_name and now.gpu_name and built.gpu_name != now.gpu_name:
        out.append(f"built on {built.gpu_name}, this GPU is {now.gpu_name}")
    return out


def build_mismatches(record: EngineRecord, wanted: EngineRecord) -> list[str]:
    """Why an existing engine is not the one a build asks for (empty: reuse it)."""
    out: list[str] = []
    if record.onnx_sha256 != wanted.onnx_sha256:
        out.append(f"the ONNX graph changed (sha256 {record.onnx_sha256[:12]} -> {wanted.onnx_sha256[:12]})")
    if record.precision != wanted.precision:
        out.append(f"precision {record.precision} -> {wanted.precision}")
    if record.shapes != wanted.shapes:
        out.append("profile shapes differ: " + _shape_diff(record.shapes, wanted.shapes))
    if record.flags != wanted.flags:
        a, b = asdict(record.flags), asdict(wanted.flags)
        out.append("build flags differ: " + ", ".join(f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]))
    if record.weights != "base":
        out.append(f"the engine holds refitted weights ({record.weights}), not the export's")
    out += env_mismatches(record, wanted.env)
    return out


def _shape_diff(a: Sequence[TensorShapes], b: Sequence[TensorShapes]) -> str:
    da, db = {s.name: s for s in a}, {s.name: s for s in b}
    parts = []
    for name in sorted(set(da) | set(db)):
        x, y = da.get(name), db.get(name)
        if x != y:
            fmt = (lambda s: "absent" if s is None else f"{list(s.min)}/{list(s.opt)}/{list(s.max)}")
            parts.append(f"{name} {fmt(x)} -> {fmt(y)}")
    return "; ".join(parts)


def check_engine(
    manifest: EngineManifest,
    env: EngineEnv,
    *,
    components: Sequence[str] | None = None,
    folder: str | Path | None = None,
) -> None:
    """Raise CompatibilityError listing every reason the engines cannot be loaded here, with the command
    that rebuilds them. With ``folder``, also check that each engine file is present and whole."""
    problems: list[str] = []
    for rec in manifest.engines:
        if components is not None and rec.component not in components:
            continue
        problems += [f"{rec.component}: {m}" for m in env_mismatches(rec, env)]
        if folder is not None:
            path = Path(folder) / rec.file
            if not path.is_file():
                problems.append(f"{rec.component}: {rec.file} is missing")
            elif rec.size_bytes and path.stat().st_size != rec.size_bytes:
                problems.append(f"{rec.component}: {rec.file} is {path.stat().st_size} bytes, the manifest says "
                                f"{rec.size_bytes} (a partial copy?)")
    if components is not None:
        have = {r.component for r in manifest.engines}
        problems += [f"{c}: no engine in this folder" for c in components if c not in have]
    if problems:
        raise CompatibilityError(
            "the engines cannot be used here:\n  - " + "\n  - ".join(problems)
            + f"\nrebuild them on this machine with:\n  {manifest.build_command}"
        )


# -- the current environment ----------------------------------------------------------------------------

def detect_gpu(device: int = 0) -> tuple[str | None, str | None]:
    """(GPU name, compute capability "major.minor") of ``device`` via NVML or cuda-python; (None, None)
    when neither is available."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device)
        name = pynvml.nvmlDeviceGetName(h)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        return (name.decode() if isinstance(name, bytes) else str(name)), f"{major}.{minor}"
    except Exception:  # noqa: BLE001, S110 - no NVML, driver or GPU: try the next source
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, prop = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            raw = prop.name
            name = raw.decode(errors="replace").rstrip("\x00") if isinstance(raw, bytes) else str(raw)
            return name, f"{prop.major}.{prop.minor}"
    except Exception:  # noqa: BLE001, S110 - cuda-python absent or no device
        pass
    return None, None


def current_env(backend: str, version: str, device: int = 0) -> EngineEnv:
    """The environment an engine is about to be built or loaded in (``version``: ``trt.__version__``)."""
    name, cc = detect_gpu(device)
    return EngineEnv(backend=backend, version=version, gpu_name=name, compute_capability=cc)


def engine_entries(folder: Path) -> set[str]:
    """The top-level names an sdrt engine folder's ``sdrt-engines.json`` (its engine files) and
    ``sdrt.json`` (the assets copied from the export) account for; raises as ``manifest.export_entries``."""
    data = json.loads((folder / ENGINE_MANIFEST_NAME).read_text())
    names = {ENGINE_MANIFEST_NAME, *(Path(e["file"]).parts[0] for e in data["engines"])}
    if (folder / MANIFEST_NAME).is_file():
        names |= export_entries(folder)
    return names
