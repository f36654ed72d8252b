"""``sdrt info``: what this machine offers sdrt."""

from __future__ import annotations

import argparse
import importlib
import platform


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="optionally, a folder to describe: an sdrt export, an Optimum ONNX export, an engine folder or a diffusers folder")


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"not available ({type(e).__name__})"
    # a namespace package without a version (e.g. left by type stubs) is not the library
    return str(getattr(m, "__version__", "not available (no module, only a namespace)"))


def _tensorrt_lines() -> list[str]:
    """Every TensorRT module the tensorrt backend could use, what it can do, and cuda-python."""
    import importlib.util

    from sdrt.runtime.trt_backend import FULL_TENSORRT_HINT, LEAN_MODULES, RTX_MODULES, RUNTIME_MODULES

    found = []
    for name in RUNTIME_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        version = _version(name)
        if version.startswith("not"):
            continue
        what = ("lean runtime: runs version-compatible engines, cannot build" if name in LEAN_MODULES else
                "TensorRT for RTX: builds (no GPU needed) and runs engines for compute capability 8.0+"
                if name in RTX_MODULES else "builds and runs engines")
        found.append(f"{name} {version} ({what})")
    cuda = _version("cuda.bindings")
    found = found or [f"no: {FULL_TENSORRT_HINT}"]
    lines = [f"  {'tensorrt' if i == 0 else '':11s} {f}" for i, f in enumerate(found)]
    lines.append(f"  {'':11s} cuda-python {cuda if not cuda.startswith('not') else 'no: pip install cuda-python'}")
    return lines


def _auto_backend(cuda: bool, openvino: bool) -> str:
    """What ``--backend auto`` picks for an ONNX export (runtime.pipeline.make_backend's order); an engine
    folder always runs on tensorrt."""
    if cuda:
        return "ort-cuda (onnxruntime-gpu sees a GPU)"
    if openvino:
        return "openvino (no GPU for ONNX Runtime; OpenVINO is installed)"
    return "ort-cpu (no GPU for ONNX Runtime, no OpenVINO)"


def run(args: argparse.Namespace) -> int:
    from sdrt.cli import version
    from sdrt.runtime.errors import InputError

    if args.path:  # before the slow part: a mistyped path is said at once
        from pathlib import Path

        if not Path(args.path).exists():
            raise InputError(f"{args.path} does not exist; pass a model folder (an sdrt export, an Optimum ONNX "
                             "export, an engine folder or a diffusers folder), or no path for this machine's "
                             "backends alone")
        if not Path(args.path).is_dir():
            raise InputError(f"{args.path} is not a folder; pass a model folder (an sdrt export, an Optimum ONNX "
                             "export, an engine folder or a diffusers folder)")
    print(f"sdrt {version()}, Python {platform.python_version()}, {platform.machine()}")
    print("\nbackends:")
    cuda = openvino = False
    try:
        import onnxruntime as ort

        from sdrt.runtime.ort_backend import cuda_available

        print(f"  ort-cpu     yes (onnxruntime {ort.__version__})")
        cuda = cuda_available()
        print(f"  ort-cuda    {'yes' if cuda else 'no: pip install onnxruntime-gpu (needs CUDA)'}")
    except ImportError:
        print("  ort-cpu     no: pip install onnxruntime")
    try:
        import openvino as ov

        core = ov.Core()
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") if "CPU" in core.available_devices else []
        print(f"  openvino    yes (OpenVINO {ov.__version__.split('-')[0]}; devices {', '.join(core.available_devices)}; "
              f"CPU bf16 {'yes' if 'BF16' in caps else 'no'})")
        from sdrt.runtime.ov_backend import available, default_cache_dir
        from sdrt.runtime.ov_blobs import cache_files, max_gb

        openvino = available()  # what auto tests
        folder = default_cache_dir()
        used = sum(size for _, _, size in cache_files(folder)) / 1e9
        try:
            bound = f"the least recently used past {max_gb():g} GB go"
        except InputError as e:
            bound = str(e)
        print(f"              model cache {folder}: {used:.1f} GB ({bound})")
    except ImportError:
        print("  openvino    no: pip install 'sdrt[openvino]'")
    for line in _tensorrt_lines():
        print(line)
    print(f"  auto        an ONNX export: {_auto_backend(cuda, openvino)}; an engine folder: tensorrt")
    print("\nGPU:")
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            print(f"  {i}: {pynvml.nvmlDeviceGetName(h)}, {mem.total / 2**30:.0f} GiB, "
                  f"driver {pynvml.nvmlSystemGetDriverVersion()}")
    except Exception:  # noqa: BLE001 - no NVML, no driver, or no GPU
        print("  none found (NVML unavailable)")
    print("\nexport tools (the [export] extra):")
    for mod in ("torch", "diffusers", "transformers", "onnx", "onnxscript"):
        print(f"  {mod:12s} {_version(mod)}")
    if args.path:
        from sdrt.runtime.folders import DIFFUSERS_FOLDER, UNKNOWN, folder_kind, read_manifest, runs_on

        kind = folder_kind(args.path)
        article = "an" if kind[0] in "aeiouAEIOU" else "a"
        if kind in (DIFFUSERS_FOLDER, UNKNOWN):
            print(f"\n{args.path}: {article} {kind} folder" if kind == UNKNOWN else f"\n{args.path}: a {kind}")
            print(f"  {runs_on(kind, args.path)}")
            return 0 if kind == DIFFUSERS_FOLDER else 1
        m = read_manifest(args.path)
        made = f", made {m.created}" if m.created else ""
        print(f"\n{args.path}: {m.preset} ({m.family}, {m.prediction_type}){made}")
        print(f"  {article} {kind}; {runs_on(kind, args.path)}")
        for name, c in m.components.items():
            print(f"  {name:16s} {c.precision:5s} {c.size_bytes / 1e6:9.1f} MB")
    return 0
