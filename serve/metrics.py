"""Prometheus metrics (the official client library), one registry per app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self, depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("sdrt_queue_depth", "requests waiting for a batch", registry=r).set_function(depth)
        Gauge("sdrt_batches_in_flight", "batches running on the devices", registry=r).set_function(in_flight)
        self.batch_images = Histogram("sdrt_batch_images", "images per UNet batch", registry=r,
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.batch_requests = Histogram("sdrt_batch_requests", "requests per UNet batch", registry=r,
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16))
        self.stage = Histogram("sdrt_stage_seconds", "pipeline stage latency per batch", ["stage"], registry=r,
                               buckets=_LATENCY)
        self.request = Histogram("sdrt_request_seconds", "end-to-end request latency", ["route"], registry=r,
                                 buckets=_LATENCY)
        self.queue_wait = Histogram("sdrt_queue_wait_seconds", "time a request waited for its batch",
                                    registry=r, buckets=_LATENCY)
        self.images = Counter("sdrt_images", "images served", registry=r)
        self.errors = Counter("sdrt_errors", "refused or failed requests by kind", ["kind"], registry=r)
        r.register(_DeviceMemory())

    def observe_batch(self, jobs: list[Any], timings: dict[str, Any]) -> None:
        self.batch_images.observe(timings.get("batch_images", 0))
        self.batch_requests.observe(len(jobs))
        for k, v in timings.items():
            if k.endswith("_ms") and isinstance(v, (int, float)):
                self.stage.labels(k[:-3]).observe(v / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DeviceMemory:
    """Device memory in use per GPU, where NVML (nvidia-ml-py) and a GPU are present; nothing otherwise."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no NVML, no GPU: the metric is simply absent
            self._nvml = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        if self._nvml is None:
            return []
        nv = self._nvml
        g = GaugeMetricFamily("sdrt_device_memory_used_bytes", "device memory in use (NVML)", labels=["device"])
        for i in range(nv.nvmlDeviceGetCount()):
            g.add_metric([str(i)], float(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).used))
        return [g]
