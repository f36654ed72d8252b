"""``sdrt info``: what this machine offers sdrt."""

from __future__ import annotations

import argparse
import importlib
import platform


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="optionally, an export or engine folder to describe")


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"not available ({type(e).__name__})"
    # a namespace package without a version (e.g. left by type stubs) is not the library
    return str(getattr(m, "__version__", "not available (no module, only a namespace)"))


def run(args: argparse.Namespace) -> int:
    from sdrt import __version__

    print(f"sdrt {__version__}, Python {platform.python_version()}, {platform.machine()}")
    print("\nbackends:")
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        print(f"  ort-cpu     yes (onnxruntime {ort.__version__})")
        cuda = "CUDAExecutionProvider" in providers
        print(f"  ort-cuda    {'yes' if cuda else 'no: pip install onnxruntime-gpu (needs CUDA)'}")
    except ImportError:
        print("  ort-cpu     no: pip install onnxruntime")
    trt = _version("tensorrt")
    print(f"  tensorrt    {trt if not trt.startswith('not') else 'no: pip install tensorrt --extra-index-url https://pypi.nvidia.com'}")
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
        from sdrt.runtime.manifest import ExportManifest

        m = ExportManifest.read(args.path)
        print(f"\n{args.path}: {m.preset} ({m.family}, {m.prediction_type}), made {m.created}")
        for name, c in m.components.items():
            print(f"  {name:16s} {c.precision:5s} {c.size_bytes / 1e6:9.1f} MB")
    return 0
