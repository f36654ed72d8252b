"""Intel's own CPU pipelines as bench rows, run by the interpreter of their own environment (``--intel-python``):
``optimum-intel``'s ``OVStableDiffusionPipeline`` and OpenVINO GenAI's ``Text2ImagePipeline``, on one OpenVINO
export of the baseline's diffusers folder (``optimum-cli export openvino``).

Self-contained on purpose: that environment has optimum-intel, openvino-genai, numpy and Pillow, not sdrt (its
torchvision would replace the CPU torch of sdrt's own environment). ``python intel_worker.py SPEC RESULT``
reads the job spec sdrt's bench writes and writes a result in the sdrt worker's format (import, load and first
image times, then timed repeats with per-stage times), with the same starting latents: optimum-intel takes them
as ``latents=``, GenAI through a ``Generator`` that returns them. ``export`` jobs run the export itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path
from typing import Any

PREFIX = "@@sdrt-bench "  # the progress line prefix sdrt's worker uses
SCHEDULERS = {"euler": ("EulerDiscreteScheduler", "EULER_DISCRETE"), "ddim": ("DDIMScheduler", "DDIM"),
              "euler-a": ("EulerAncestralDiscreteScheduler", "EULER_ANCESTRAL_DISCRETE")}


def emit(**event: Any) -> None:
    print(PREFIX + json.dumps(event), flush=True)


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # noqa: BLE001 - not every platform has it
        return None


def _loop(call: Any, warmup: int, repeats: int) -> list[dict[str, Any]]:
    for i in range(warmup):
        emit(phase="warmup", i=i + 1, n=warmup)
        call()
    runs = []
    for i in range(repeats):
        emit(phase="repeat", i=i + 1, n=repeats)
        cpu, wall = time.process_time(), time.perf_counter()
        run = call()
        run["cpu_ms"], run["run_wall_ms"] = (time.process_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3
        runs.append(run)
    return runs


def inference_precision(spec: dict[str, Any]) -> str:
    """OpenVINO's inference precision for the row, as sdrt's openvino backend picks its own in the same run
    (``ov_precision``): ``auto`` is bf16 where the CPU reports it (AVX512_BF16, AMX) and f32 elsewhere, as
    OpenVINO's own default is; ``bf16`` on a CPU without it is refused."""
    import openvino

    want = {"fp32": "f32"}.get(spec.get("ov_precision") or "f32", spec.get("ov_precision") or "f32")
    if want == "f32":
        return "f32"
    has_bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if want == "bf16" and not has_bf16:
        raise ValueError("this CPU has no bf16 support (OpenVINO's OPTIMIZATION_CAPABILITIES lists no BF16); "
                         "measure with --openvino-precision fp32 or auto")
    return "bf16" if has_bf16 else "f32"


def export(spec: dict[str, Any]) -> dict[str, Any]:
    """``optimum-cli export openvino`` of the diffusers folder, fp32 weights (the comparison's precision), into
    ``out``: sdrt's bench gives a temporary folder and renames it into place once this returns ok."""
    t0 = time.perf_counter()
    cli = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(cli), "export", "openvino", "--model", spec["folder"], "--task", "text-to-image", "--weight-format",
           "fp32", spec["out"]]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"status": "failed", "reason": f"optimum-cli export openvino failed: {done.stderr[-2000:]}"}
    return {"status": "ok", "export_s": time.perf_counter() - t0}


def run_optimum(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import numpy as np
    import openvino
    from optimum.intel import OVStableDiffusionPipeline

    import_ms = (time.perf_counter() - t0) * 1e3
    emit(phase="load")
    t0 = time.perf_counter()
    hint = inference_precision(spec)
    pipe = OVStableDiffusionPipeline.from_pretrained(
        spec["folder"], compile=False,
        ov_config={"INFERENCE_NUM_THREADS": str(spec["threads"]), "INFERENCE_PRECISION_HINT": hint})
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[spec["sampler"]][0]).from_config(pipe.scheduler.config)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    load_ms = (time.perf_counter() - t0) * 1e3
    marks: dict[str, list[float]] = {}

    def timed(part: Any, name: str, method: str) -> None:
        inner = getattr(part, method)

        def wrapper(*a: Any, **k: Any) -> Any:
            s = time.perf_counter()
            out = inner(*a, **k)
            marks.setdefault(name, []).append((time.perf_counter() - s) * 1e3)
            return out

        setattr(part, method, wrapper)

    timed(pipe.text_encoder, "text", "forward")  # each part's __call__ runs its forward
    timed(pipe.unet, "unet", "forward")
    timed(pipe.vae_decoder, "vae", "forward")
    import torch  # optimum-intel's pipeline is diffusers' (torch tensors between its OpenVINO models)

    latents = torch.from_numpy(np.load(spec["latents"]))

    def call() -> dict[str, Any]:
        marks.clear()
        s = time.perf_counter()
        out = pipe(spec["prompt"], negative_prompt=None, height=spec["height"], width=spec["width"],
                   num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"],
                   num_images_per_prompt=spec["batch_size"], latents=latents, output_type="np")
        total = (time.perf_counter() - s) * 1e3
        return {"text_encoder_ms": sum(marks.get("text", [0.0])), "unet_steps_ms": marks.get("unet", []),
                "vae_decoder_ms": sum(marks.get("vae", [0.0])), "total_ms": total, "wall_ms": total,
                "images": out.images, "clock": "host", "total_clock": "host", "nonfinite": []}

    return _finish(spec, call, import_ms, load_ms, {"optimum-intel": version("optimum-intel"),
                                                     "openvino": openvino.__version__}, hint)


def run_genai(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    import_ms = (time.perf_counter() - t0) * 1e3
    emit(phase="load")
    t0 = time.perf_counter()
    hint = inference_precision(spec)
    pipe = ov_genai.Text2ImagePipeline(spec["folder"])
    sched = ov_genai.Scheduler.from_config(str(Path(spec["folder"]) / "scheduler" / "scheduler_config.json"),
                                           getattr(ov_genai.Scheduler.Type, SCHEDULERS[spec["sampler"]][1]))
    pipe.set_scheduler(sched)
    pipe.compile("CPU", INFERENCE_NUM_THREADS=spec["threads"], INFERENCE_PRECISION_HINT=hint)
    load_ms = (time.perf_counter() - t0) * 1e3
    latents = np.load(spec["latents"])

    class Latents(ov_genai.Generator):  # type: ignore[misc]
        """The run's starting latents, as GenAI draws its noise (scaled by the scheduler's init sigma after)."""

        def __init__(self) -> None:
            ov_genai.Generator.__init__(self)

        def next(self) -> float:
            raise RuntimeError("only the starting latents are drawn from this generator")

        def randn_tensor(self, shape: Any) -> Any:
            if tuple(shape) != latents.shape:
                raise RuntimeError(f"GenAI asked for latents {tuple(shape)}, the run has {latents.shape}")
            return ov.Tensor(latents.copy())

    def call() -> dict[str, Any]:
        s = time.perf_counter()
        image = pipe.generate(spec["prompt"], width=spec["width"], height=spec["height"],
                              num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"],
                              num_images_per_prompt=spec["batch_size"], generator=Latents())
        total = (time.perf_counter() - s) * 1e3
        pm = pipe.get_performance_metrics()
        steps = [float(x) / 1e3 for x in pm.raw_metrics.unet_inference_durations]  # microseconds -> ms
        text = pm.get_text_encoder_infer_duration()  # {encoder: ms}
        text_ms = sum(float(v) for v in text.values()) if isinstance(text, dict) else float(text)
        return {"text_encoder_ms": text_ms, "unet_steps_ms": steps,
                "vae_decoder_ms": float(pm.get_vae_decoder_infer_duration()), "total_ms": total, "wall_ms": total,
                "images": [x.astype("float32") / 255.0 for x in np.asarray(image.data)], "clock": "host",
                "total_clock": "host", "nonfinite": []}

    return _finish(spec, call, import_ms, load_ms, {"openvino-genai": version("openvino-genai"),
                                                     "openvino": ov.__version__}, hint)


def _finish(spec: dict[str, Any], call: Any, import_ms: float, load_ms: float,
            versions: dict[str, str], hint: str) -> dict[str, Any]:
    """The cold first image (saved as the row's image), then warm-up and timed repeats; sdrt's result format."""
    import numpy as np
    from PIL import Image

    emit(phase="cold")
    first = call()
    if spec.get("image_out"):
        Image.fromarray((np.clip(first["images"][0], 0, 1) * 255).round().astype(np.uint8)).save(spec["image_out"])
    runs = _loop(call, spec["warmup"], spec["repeats"])
    for r in [first, *runs]:
        r.pop("images", None)
    return {"status": "ok", "import_ms": import_ms, "load_ms": load_ms, "first_image_ms": first["wall_ms"],
            "first": first, "runs": runs, "versions": versions, "peak_rss_bytes": _peak_rss(),
            "threads": {"inference_num_threads": spec["threads"]},
            "precision": f"fp32 OpenVINO IR, {hint} inference"}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    kind = spec["job"]
    try:
        if kind == "intel-export":
            res = export(spec)
        elif spec["sampler"] not in SCHEDULERS:
            res = {"status": "skipped", "reason": f"the Intel pipelines are measured with {', '.join(SCHEDULERS)}; "
                                                  f"not {spec['sampler']!r}"}
        elif spec["backend"] == "optimum-intel":
            res = run_optimum(spec)
        else:
            res = run_genai(spec)
    except Exception as e:  # noqa: BLE001 - the bench records the failure and goes on
        res = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    Path(argv[2]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
