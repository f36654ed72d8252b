"""The artifacts a run measures: the export (a preset's, made once into the work folder, or the one given), an
SDXL refiner's export, and TensorRT engines (given, or built from an export here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.families import family_named
from sdrt.runtime.feature_cache import SHALLOW_UNET

from .config import BenchConfig
from .jobs import tail

WEIGHTS_SEED = 0  # synthetic weights of a preset: the exporter's default seed

Emit = Callable[..., None]  # (stage, message, **extra): the run's progress


def export_for(cfg: BenchConfig, work: Path, precision: str, emit: Emit, notes: list[str], fuse: bool = False,
               preset: str | None = None, artifact: str | None = None) -> tuple[Path, Any, float | None]:
    """The export to measure: the artifact given, or the preset's (exported once into ``work``, then
    reused): (its folder, its manifest, the seconds exporting took in this run, or None). ``fuse``: the
    preset's export also gets the UNet with ONNX Runtime's fused CUDA operators (``sdrt export --ort-cuda``),
    which the ort-cuda backend then runs. ``preset`` / ``artifact``: another model than the config's (the
    refiner). What the run should know (an export reused, a fused UNet missing) goes into ``notes``."""
    from sdrt.runtime.manifest import ExportManifest

    if preset is None and artifact is None:
        preset, artifact = cfg.preset, cfg.artifact
    if artifact is not None:
        manifest = ExportManifest.read(artifact)
        if cfg.workload == "controlnet" and not manifest.controlnets:
            raise InputError(f"the controlnet workload needs an export with a ControlNet; {artifact} has "
                             "none: re-export it with `sdrt export ... --controlnet CONTROLNET`, or use --preset")
        if cfg.caches and SHALLOW_UNET not in manifest.components and not manifest.refiner:
            raise ArtifactError(f"{artifact} has no cheap step for feature caching ({SHALLOW_UNET}), which caches="
                                f"{list(cfg.caches)} measures: re-export it with `sdrt export ... --feature-cache`, "
                                "or leave caches out",
                                cli=f"{artifact} has no cheap step for feature caching ({SHALLOW_UNET}), which "
                                    f"--cache {','.join(cfg.caches)} measures: re-export it with `sdrt export ... "
                                    "--feature-cache`, or leave --cache out")
        if fuse and "ort-cuda" not in manifest.components["unet"].variants:
            notes.append(f"{artifact} has no fused ort-cuda UNet (sdrt export --ort-cuda): ort-cuda "
                         "runs the portable graph")
        return Path(artifact), manifest, None
    from sdrt.export.preset_tables import export_loaded, get_any_preset, is_transformer_preset, load_random

    assert preset is not None
    get_any_preset(preset)  # unknown preset: InputError listing the presets of both tables
    if cfg.workload in ("controlnet", "inpaint") and is_transformer_preset(preset):
        label = family_named(get_any_preset(preset).family).label
        raise InputError(f"the {cfg.workload} workload is not there yet for {label} ({preset}): "
                         "measure it with --workload txt2img")
    deepcache = bool(cfg.caches)  # the cheap step the cached jobs run (sdrt export --feature-cache)
    fam = family_named(get_any_preset(preset).family)
    for policy in cfg.cache_policies:
        if policy.kind not in fam.feature_caches:
            has = ", ".join(fam.feature_caches) or "none"
            raise InputError(f"{preset} is an {fam.label} model: it has no {policy.kind} feature caching (it has: "
                             f"{has}); measure its own kind, or leave caches out",
                             cli=f"{preset} is an {fam.label} model: it has no {policy.kind} feature caching (it "
                                 f"has: {has}); use --cache {fam.feature_caches[0] if fam.feature_caches else ''}"
                                 ":INTERVAL, or leave --cache out")
    if cfg.without_t5 and not any(fam.tokenizer_kind(e) == "t5" for e in fam.optional_encoders):
        raise InputError(f"{preset} is an {fam.label} model: it has no optional T5 to leave out; measure it "
                         "without --without-t5")
    folder = work / (f"export-{preset}{'-controlnet' if cfg.workload == 'controlnet' else ''}"
                     f"{'-deepcache' if deepcache else ''}{'-without-t5' if cfg.without_t5 else ''}-{precision}")

    t0, export_s = time.perf_counter(), None
    if (folder / "sdrt.json").is_file():
        notes.append(f"the export in {folder} was reused; its export time is not in this run")
        manifest = ExportManifest.read(folder)
    else:
        emit("export", f"exporting {preset} ({precision}) to ONNX")
        model = load_random(preset, seed=WEIGHTS_SEED)
        nets = [workload_controlnet(model)] if cfg.workload == "controlnet" else []
        manifest = export_loaded(model, folder, fp16=precision == "fp16", controlnets=nets, deepcache=deepcache,
                                 without_t5=cfg.without_t5, progress=lambda msg: emit("export", msg))
        del model
        export_s = time.perf_counter() - t0
    if fuse and "ort-cuda" not in manifest.components["unet"].variants:
        if is_transformer_preset(preset):  # ONNX Runtime's fusion rewrites UNet attention, not a transformer's
            notes.append(f"no fused ort-cuda denoiser for {preset}: ONNX Runtime's UNet fusion does not "
                         "apply to a transformer denoiser; ort-cuda runs the portable graph")
            return folder, manifest, export_s
        from sdrt.export.loading import load_model
        from sdrt.export.ort_fusion import add_ort_cuda_variant

        emit("export", "adding the UNet with ONNX Runtime's fused CUDA operators (sdrt export --ort-cuda)")
        add_ort_cuda_variant(folder, load_model(random_preset=preset, seed=WEIGHTS_SEED),
                             progress=lambda msg: emit("export", msg))
        manifest = ExportManifest.read(folder)
        export_s = time.perf_counter() - t0 if export_s is not None else None
    return folder, manifest, export_s


def refiner_export(cfg: BenchConfig, work: Path, precision: str, emit: Emit, notes: list[str]) -> tuple[Path, Any]:
    """The refiner's export: a preset's (exported once into ``work``) or the folder given."""
    ref = cfg.refiner
    assert ref is not None
    if Path(ref).is_dir():
        folder, manifest, _ = export_for(cfg, work, precision, emit, notes, artifact=ref)
    else:
        folder, manifest, _ = export_for(cfg, work, precision, emit, notes, preset=ref)
    if not manifest.refiner:
        raise InputError(f"--refiner {ref} is not an SDXL refiner ({manifest.preset}); pass a refiner preset "
                         "(sdxl-refiner, sdxl-refiner-tiny) or export")
    return folder, manifest


def build_engines(cfg: BenchConfig, onnx_folder: Path, work: Path, resolutions: Sequence[tuple[int, int]],
                  emit: Emit, name: str = "engines") -> tuple[Path | None, float | None, str | None, str | None]:
    """(engine folder, build seconds, where that figure comes from, reason when there is no folder): the
    config's engine folder, or one built here with ``sdrt build`` (a subprocess) for the run's shapes."""
    from sdrt.runtime.engine_manifest import EngineManifest

    if cfg.engines and name == "engines":
        m = EngineManifest.read(cfg.engines)
        secs = sum(e.build_seconds for e in m.engines)
        return Path(cfg.engines), (secs or None), "the engine folder's manifest (built before this run)", None
    if importlib.util.find_spec("sdrt.commands.build") is None:
        return None, None, None, ("no engine folder was given (--engines DIR) and this sdrt has no `sdrt build` "
                                  "command to build one")
    out = work / name

    def span(values: Sequence[int]) -> str:  # N, or MIN:OPT:MAX with the first requested value as OPT
        return str(values[0]) if min(values) == max(values) else f"{min(values)}:{values[0]}:{max(values)}"

    cmd = [sys.executable, "-m", "sdrt", "build", str(onnx_folder), "--out", str(out),
           "--height", span([h for h, _ in resolutions]), "--width", span([w for _, w in resolutions]),
           "--batch", span(list(cfg.batch_sizes))]
    if cfg.guidance_scale <= 1.0:
        cmd.append("--no-cfg")
    emit("build", "building TensorRT engines: " + " ".join(cmd[3:]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        return None, None, None, f"`sdrt build` failed (exit {r.returncode}): {tail(r.stderr or r.stdout)}"
    return out, secs, "measured in this run (`sdrt build`, a subprocess)", None


def engine_bytes(folder: Path) -> int:
    """The size of an engine folder's engines."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".engine", ".plan"))


def export_precision(manifest: Any) -> str:
    """The precision of an export's UNet ("?" without one)."""
    unet = manifest.components.get("unet")
    return str(unet.precision) if unet is not None else "?"


def manifest_spacing(folder: Path) -> str | None:
    """The timestep spacing of an export's scheduler configuration."""
    try:
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("timestep_spacing")
    except (OSError, ValueError):
        return None


def workload_controlnet(model: Any) -> Any:
    """The controlnet workload's net: the tiny preset's pair (seed 1), or one copied from the UNet."""
    from sdrt.export.controlnet_loading import controlnet_from_unet, random_controlnet
    from sdrt.export.controlnet_presets import CONTROLNET_PRESETS

    pair = model.preset.name.removesuffix("-tiny") + "-controlnet" + ("-tiny" if model.preset.name.endswith("-tiny")
                                                                      else "")
    return random_controlnet(pair, seed=1) if pair in CONTROLNET_PRESETS else controlnet_from_unet(model, seed=1)
