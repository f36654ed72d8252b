"""The environment fingerprint stored with every run: what a number was measured on and with.

Reads the GPU through NVML (or ``nvidia-smi``) so that taking the fingerprint never creates a CUDA
context in the parent process, whose memory would then sit on the GPU during the measurements.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

# distributions whose versions a result records (absent ones as None), and name prefixes of the
# platform-specific builds (tensorrt-cu12, tensorrt-lean-cu13-libs, onnxruntime-gpu, ...) recorded when present
PACKAGES = ("onnxruntime", "torch", "diffusers", "transformers", "onnx", "numpy", "nvidia-ml-py")
PREFIXES = ("onnxruntime", "tensorrt", "cuda-python", "cuda-bindings", "polygraphy")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith(PREFIXES):
            out.setdefault(name, d.version)  # sys.path order: the first one found is the one imported
    try:
        import onnxruntime as ort

        # with two builds installed (a CPU one and onnxruntime-gpu on PYTHONPATH, say), the one imported
        out["onnxruntime"] = str(getattr(ort, "__version__", out.get("onnxruntime")))
        out["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    except ImportError:
        out["onnxruntime_providers"] = None
    return out


def git_commit(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the tree has uncommitted changes) of the sdrt checkout, or (None, None)."""
    where = where or Path(__file__).resolve().parent
    git = shutil.which("git")
    if git is None:
        return None, None
    try:
        head = subprocess.run([git, "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
                              check=False)
        if head.returncode != 0:
            return None, None
        dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=False)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"model": model, "arch": platform.machine(), "logical_cores": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        info["usable_cores"] = os.cpu_count()
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        info["physical_cores"] = None
        info["memory_bytes"] = None
    return info


def _decode(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def gpu_info() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one entry per GPU: index, name, compute capability, memory; driver and CUDA facts)."""
    gpus: list[dict[str, Any]] = []
    cuda: dict[str, Any] = {"driver": None, "driver_cuda": None, "torch_cuda": None, "source": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            cuda["driver"] = _decode(pynvml.nvmlSystemGetDriverVersion())
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            cuda["driver_cuda"] = f"{v // 1000}.{(v % 1000) // 10}"
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                gpus.append({
                    "index": i,
                    "name": _decode(pynvml.nvmlDeviceGetName(h)),
                    "compute_capability": f"{major}.{minor}",
                    "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                })
            cuda["source"] = "nvml"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library, no driver or no GPU: try nvidia-smi
        gpus, cuda["source"] = _nvidia_smi(cuda), None
        if gpus:
            cuda["source"] = "nvidia-smi"
    try:
        import torch

        cuda["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return gpus, cuda


def _nvidia_smi(cuda: dict[str, Any]) -> list[dict[str, Any]]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        r = subprocess.run([smi, "--query-gpu=index,name,compute_cap,memory.total,driver_version",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30,
                           check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5:
            gpus.append({"index": int(parts[0]), "name": parts[1], "compute_capability": parts[2],
                         "memory_bytes": int(float(parts[3]) * 2**20)})
            cuda["driver"] = parts[4]
    return gpus


def fingerprint() -> dict[str, Any]:
    """The ``env`` object of a result file."""
    from sdrt import __version__

    commit, dirty = git_commit()
    gpus, cuda = gpu_info()
    return {
        "sdrt_version": __version__,
        "sdrt_commit": commit,
        "sdrt_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": cpu_info(),
        "gpus": gpus,
        "cuda": cuda,
        "versions": package_versions(),
        "load_avg": load_average(),
    }


def physical_cores() -> int:
    """The host's physical cores (psutil's count; the logical count without psutil): the default thread count."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The host's 1, 5 and 15 minute load averages: CPU figures from a busy machine are not comparable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on this platform
        return None


def device_label(env: dict[str, Any], device: str) -> str:
    """What a chart or table calls the device a measurement ran on: the GPU's name, or the CPU model."""
    if device.startswith("cuda"):
        return str(env["gpus"][0]["name"]) if env.get("gpus") else "no GPU found"
    cpu = env.get("cpu", {})
    cores = cpu.get("physical_cores") or cpu.get("logical_cores")
    return f"{cpu.get('model', 'CPU')} ({cores} cores)" if cores else str(cpu.get("model", "CPU"))
