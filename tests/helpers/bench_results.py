"""A benchmark result file written by hand: what ``sdrt bench report`` and the result checks read."""

from __future__ import annotations

from typing import Any

from sdrt.benchmarks import schema


def synthetic_results(gpu: str, backend: str, its: float, vram: int) -> dict[str, Any]:
    """A result file written by hand: a baseline and one backend on one GPU, and a skipped backend."""

    def measurement(name: str, role: str, step_ms: float, mem: int) -> dict[str, Any]:
        s = {"p50": step_ms, "p90": step_ms * 1.1, "min": step_ms, "max": step_ms * 1.2, "mean": step_ms, "n": 20}
        t = {k: (v * 20 if k != "n" else 1) for k, v in s.items()}
        return {
            "backend": name, "role": role, "device": "cuda", "status": "ok", "reason": None, "height": 512,
            "width": 512, "batch_size": 1, "sampler": "dpmpp-2m", "steps": 20, "guidance_scale": 7.5, "guided": True,
            "unet_batch": 2, "warmup": 1, "repeats": 1, "import_ms": 1.0, "load_ms": 1000.0, "first_image_ms": 900.0,
            "cold_start_ms": 1900.0, "text_encoder_ms": s, "unet_step_ms": s, "vae_decoder_ms": s, "total_ms": t,
            "its": 1000 / step_ms, "images_per_s": 1000 / t["p50"], "peak_vram_bytes": mem,
            "device_mem_delta_bytes": mem, "torch_peak_allocated_bytes": None, "peak_rss_bytes": 2**31,
            "rss_sampled_peak_bytes": 2**31, "memory_notes": [], "artifact_bytes": 2 * 10**9, "raw": None,
            "flops": None, "floor_ms": None, "of_floor": None, "baseline": None, "vs_baseline": None,
            "image_vs_baseline": None, "host_load_avg": [0.5, 0.5, 0.5],
            "cache": None, "full_steps": 20, "unet_full_step_ms": step_ms, "unet_shallow_step_ms": None,
            "unet_equivalent_steps": 20.0, "vs_uncached": None, "image_vs_uncached": None,
            "rounds": None, "spread": None, "contended": None,
        }

    base = measurement("torch-cuda", "baseline", 20.0, 5 * 2**30)
    mine = measurement(backend, "sdrt", 1000 / its, vram)
    mine["baseline"] = "torch-cuda"
    mine["vs_baseline"] = {k: 1.0 for k in schema.RATIO_METRICS}
    mine["vs_baseline"]["its"] = its / base["its"]

    def be(name: str, role: str, status: str = "ok", reason: str | None = None) -> dict[str, Any]:
        return {"name": name, "role": role, "device": "cuda", "status": status, "reason": reason,
                "precision": "fp16", "threads": {}, "versions": {}, "timing_method": None, "build_s": None,
                "artifact_bytes": None}

    return {
        "schema": "sdrt-bench", "schema_version": schema.SCHEMA_VERSION, "created": "2030-01-01T00:00:00+00:00",
        "env": {"sdrt_version": "0.1.0", "sdrt_commit": "abcdef0123", "sdrt_dirty": False,
                "date": "2030-01-01T00:00:00+00:00", "python": "3.12", "os": "Linux",
                "cpu": {"model": "Some CPU", "physical_cores": 16}, "gpus": [
                    {"index": 0, "name": gpu, "compute_capability": "9.0", "memory_bytes": 80 * 2**30}],
                "cuda": {"driver": "580", "driver_cuda": "13.0", "torch_cuda": "13.0", "source": "nvml"},
                "versions": {"onnxruntime-gpu": "1.31.1", "torch": "2.11"}, "load_avg": [0.1, 0.2, 0.3]},
        "config": {"preset": "sd15", "artifact": None, "engines": None, "resolutions": [[512, 512]], "steps": [20],
                   "batch_sizes": [1], "samplers": ["dpmpp-2m"], "backends": [backend, "tensorrt"],
                   "baseline": "torch", "compile": False, "cuda_graph": False, "warmup": 1, "repeats": 1, "threads": 16,
                   "guidance_scale": 7.5, "prompt": "p", "seed": 0, "isolation": "subprocess",
                   "workload": "txt2img", "caches": [], "rounds": 1, "quiet": None},
        "model": {"family": "sd1", "preset": "sd15", "precision": "fp16", "folder": "x", "export_s": None,
                  "components": {}, "artifact_bytes": 0, "source": {}, "flops": {}},
        "ceilings": [{"device": "cuda", "dtype": "float16", "n": 8192, "tflops": 800.0, "ms_p50": 1.4,
                      "method": "m", "status": "ok", "reason": None}],
        "backends": [be(backend, "sdrt"), be("tensorrt", "sdrt", "skipped", "TensorRT is not installed here"),
                     be("torch-cuda", "baseline")],
        "measurements": [base, mine],
        "notes": [],
        "device_labels": {"cuda": gpu},
    }
