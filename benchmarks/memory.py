"""Peak memory of a process: GPU memory through NVML and host RSS, sampled by a background thread.

The bench runs each measurement in a child process and samples it from the parent, so the sampling
thread never competes for the measured process's interpreter lock. Two GPU figures are kept:

- ``peak_process_bytes``: the most NVML ever reported as used by that process (its CUDA context,
  allocator pools and workspaces included). NVML cannot see a process's pid from inside some
  containers; the figure is then None and a note says so.
- ``device_delta_bytes``: the peak of the whole device's used memory minus its value when sampling
  started, which also counts work of other processes that ran meanwhile.

Sampling misses peaks shorter than its interval (10 ms by default); the child's own high-water mark
(``peak_rss_self``), which the kernel keeps exactly, is the host figure of record.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Self


@dataclass
class MemoryPeaks:
    peak_process_bytes: int | None = None
    device_delta_bytes: int | None = None
    device_used_start_bytes: int | None = None
    rss_peak_bytes: int | None = None
    samples: int = 0
    notes: list[str] = field(default_factory=list)


class _Nvml:
    """The few NVML calls the sampler needs; ``None`` from ``open`` when there is no NVML or GPU."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml = nvml
        self.handle = handle

    @classmethod
    def open(cls, index: int) -> tuple[_Nvml | None, str | None]:
        try:
            import pynvml
        except ImportError:
            return None, "no GPU memory figures: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)), None
        except Exception as e:  # noqa: BLE001 - NVMLError subclasses: no driver, no such GPU
            return None, f"no GPU memory figures: NVML is unavailable ({e})"

    def device_used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def process_used(self, pid: int) -> int | None:
        procs = list(self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle))
        with contextlib.suppress(Exception):  # graphics processes: not supported on every GPU
            procs += list(self.nvml.nvmlDeviceGetGraphicsRunningProcesses(self.handle))
        for p in procs:
            if int(p.pid) == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already shut down
            self.nvml.nvmlShutdown()


class MemorySampler:
    """Samples a process's GPU memory and RSS every ``interval_s`` until ``stop()``.

    Use as a context manager around the process's lifetime: ``with MemorySampler(pid) as s: ...``;
    ``s.peaks`` holds the result afterwards.
    """

    def __init__(self, pid: int, *, gpu_index: int | None = 0, interval_s: float = 0.01) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.gpu_index = gpu_index
        self.peaks = MemoryPeaks()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None
        self._proc: Any = None
        self._device_peak: int | None = None
        self._seen_process = False

    def start(self) -> MemorySampler:
        try:
            import psutil

            self._proc = psutil.Process(self.pid)
        except ImportError:
            self.peaks.notes.append("no sampled RSS: psutil is not installed")
        except Exception as e:  # noqa: BLE001 - psutil.NoSuchProcess: the child already exited
            self.peaks.notes.append(f"no sampled RSS: {e}")
        if self.gpu_index is not None:
            self._nvml, note = _Nvml.open(self.gpu_index)
            if note:
                self.peaks.notes.append(note)
            if self._nvml is not None:
                self.peaks.device_used_start_bytes = self._nvml.device_used()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="sdrt-bench-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        p = self.peaks
        if self._proc is not None:
            try:
                rss = int(self._proc.memory_info().rss)
                p.rss_peak_bytes = max(p.rss_peak_bytes or 0, rss)
            except Exception:  # noqa: BLE001 - the process has exited
                self._proc = None
        if self._nvml is not None:
            try:
                used = self._nvml.device_used()
                self._device_peak = max(self._device_peak or 0, used)
                mine = self._nvml.process_used(self.pid)
                if mine is not None:
                    self._seen_process = True
                    p.peak_process_bytes = max(p.peak_process_bytes or 0, mine)
            except Exception as e:  # noqa: BLE001 - NVML errors mid-run: keep what was sampled
                p.notes.append(f"NVML sampling stopped: {e}")
                self._nvml.close()
                self._nvml = None
        p.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> MemoryPeaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        p = self.peaks
        if self._device_peak is not None and p.device_used_start_bytes is not None:
            p.device_delta_bytes = self._device_peak - p.device_used_start_bytes
        if self._nvml is not None:
            if not self._seen_process:
                p.notes.append(
                    f"NVML never listed pid {self.pid} (inside a container NVML sees host pids); "
                    "only the device-level delta is available"
                )
            self._nvml.close()
            self._nvml = None
        return p

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_rss_self() -> int | None:
    """This process's peak RSS in bytes since it started its program (None where unknown).

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this program's own address space.
    Not ``ru_maxrss``: the kernel carries that across fork and exec, so a worker started by a large
    parent would report the parent's size. Elsewhere ``ru_maxrss``, with that caveat.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)  # macOS reports bytes, Linux kibibytes
