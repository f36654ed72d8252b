"""What a model folder is, and what can run it (``sdrt info DIR``, and commands that take any of them)."""

from __future__ import annotations

from pathlib import Path

from .engine_manifest import ENGINE_MANIFEST_NAME
from .manifest import ANY_FOLDER, MANIFEST_NAME, ExportManifest
from .optimum import INDEX, is_optimum_folder, read_optimum

SDRT_EXPORT, OPTIMUM_EXPORT, ENGINE_FOLDER, DIFFUSERS_FOLDER, UNKNOWN = (
    "sdrt export", "Optimum ONNX export", "sdrt engine folder", "diffusers folder", "unknown")


def folder_kind(path: str | Path) -> str:
    f = Path(path)
    if (f / ENGINE_MANIFEST_NAME).is_file():
        return ENGINE_FOLDER
    if (f / MANIFEST_NAME).is_file():
        return SDRT_EXPORT
    if is_optimum_folder(f):
        return OPTIMUM_EXPORT
    if (f / INDEX).is_file() and (f / "unet" / "config.json").is_file():
        return DIFFUSERS_FOLDER
    return UNKNOWN


def runs_on(kind: str, path: str | Path) -> str:
    """One line: which backends run a folder of ``kind``, or the command that makes one they run."""
    return {
        ENGINE_FOLDER: "runs on: tensorrt (the engines' own GPU and TensorRT; see `sdrt info` above)",
        SDRT_EXPORT: f"runs on: ort-cpu, ort-cuda; for tensorrt, build engines: sdrt build {path} --out ENGINES",
        OPTIMUM_EXPORT: ("runs on: ort-cpu, ort-cuda (its graphs adapted to sdrt's contracts at load, no "
                         f"re-export); for tensorrt: sdrt build {path} --out ENGINES; also Optimum's "
                         "ORTDiffusionPipeline"),
        DIFFUSERS_FOLDER: f"PyTorch weights: export them first, sdrt export --model {path} --out ONNX_DIR",
    }.get(kind, "not a model folder sdrt knows: pass an sdrt export, an Optimum ONNX export, an engine "
                "folder or a diffusers folder")


def read_manifest(path: str | Path, *, wanted: str = ANY_FOLDER) -> ExportManifest:
    """The sdrt manifest of an sdrt export or engine folder, or the one synthesized for an Optimum export."""
    if is_optimum_folder(path):
        return read_optimum(path).manifest
    return ExportManifest.read(path, wanted=wanted)
