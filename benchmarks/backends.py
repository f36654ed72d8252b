"""The sdrt backends a bench run can measure: their names, their devices, and whether each can run here."""

from __future__ import annotations

from collections.abc import Sequence

from sdrt.runtime.errors import InputError

KNOWN_BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "openvino")
CPU_BACKENDS = ("ort-cpu", "openvino")


def check_backends(names: Sequence[str]) -> None:
    """Raise InputError for a name that is no sdrt backend, listing the valid ones."""
    unknown = [n for n in names if n not in KNOWN_BACKENDS]
    if unknown:
        raise InputError(f"unknown backend {', '.join(map(repr, unknown))}; the backends are: "
                         f"{', '.join(KNOWN_BACKENDS)} (the PyTorch baseline is chosen with --baseline)")


def backend_device(name: str) -> str:
    """The device a backend runs on: "cpu" or "cuda"."""
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
