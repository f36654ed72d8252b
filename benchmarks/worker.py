"""One measurement in its own process: ``python -m sdrt.benchmarks.worker SPEC.json RESULT.json``.

The bench starts one worker per (backend, resolution, batch size, sampler, steps), so each one's cold
start, peak RSS and GPU memory are its own. A worker reports progress on stdout as lines starting with
``PREFIX`` followed by JSON, and writes its result (or the reason it failed) to RESULT.json.

Jobs: ``sdrt`` (the sdrt Pipeline on one backend; never imports torch), ``diffusers`` (the PyTorch
baseline), ``matmul`` (the device's matrix-multiply rate), ``serve`` (one side of a round of the server benchmark,
``serve_bench.run_side``: the bare pipeline, or the server under load). With ``refiner_folder`` in the spec, ``sdrt``
runs an SDXL base + refiner pair (the refiner loaded with ``share_with`` the base) and ``diffusers`` its
base(denoising_end) + img2img(denoising_start) pair; each run then records its stages. Thread counts come from the spec and the
environment the parent sets (OMP_NUM_THREADS and friends), identically for every job.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX = "@@sdrt-bench "


def emit(**event: Any) -> None:
    print(PREFIX + json.dumps(event), flush=True)


def _runs_loop(call: Callable[[], dict[str, Any]], warmup: int, repeats: int) -> list[dict[str, Any]]:
    for i in range(warmup):
        emit(phase="warmup", i=i + 1, n=warmup)
        call()
    runs = []
    for i in range(repeats):
        emit(phase="repeat", i=i + 1, n=repeats)
        cpu, wall = time.process_time(), time.perf_counter()
        run = call()
        # this process's CPU time over the run's wall time (every thread): what the host let it use
        run["cpu_ms"], run["run_wall_ms"] = (time.process_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3
        runs.append(run)
    return runs


# -- sdrt -------------------------------------------------------------------------------------------------

def _measure(call: Callable[[], dict[str, Any]], spec: dict[str, Any],
             settle: Callable[[], float] = lambda: 0.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The cold call (load to first image; its image saved if asked), then warm-up and timed repeats, after
    ``settle`` (the backend's background work after a first load, recorded as ``settle_ms`` in the cold call's
    record). Images are dropped from the returned records: only timings travel back to the parent."""
    emit(phase="cold")
    first = call()
    if spec.get("image_out"):
        first["images"][0].save(spec["image_out"])
    first["settle_ms"] = settle() * 1e3
    runs = _runs_loop(call, spec["warmup"], spec["repeats"])
    for r in [first, *runs]:
        r.pop("images")
    return first, runs


def run_sdrt(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import numpy as np

    from sdrt.runtime.pipeline import Pipeline

    import_ms = (time.perf_counter() - t0) * 1e3
    emit(phase="load")
    t0 = time.perf_counter()
    if spec["backend"] == "openvino":
        pipe = _openvino_pipeline(spec)
    else:
        # --cuda-graph is ort-cuda's; None elsewhere: the backend's default (tensorrt captures its denoising loop)
        pipe = Pipeline.load(spec["folder"], backend=spec["backend"], threads=spec["threads"],
                             cuda_graph=True if spec.get("cuda_graph") and spec["backend"] == "ort-cuda" else None)
    refiner = None
    if spec.get("refiner_folder"):  # one device and one scratch block for both models
        refiner = Pipeline.load(spec["refiner_folder"], backend=pipe.backend.name, threads=spec["threads"],
                                share_with=pipe)
    load_ms = (time.perf_counter() - t0) * 1e3
    latents = np.load(spec["latents"]) if spec.get("latents") else None
    images = workload_images(spec)
    extra: dict[str, Any] = {}
    if "control_image" in images:
        extra["control_images"] = [images["control_image"]]
    if "mask_image" in images:
        extra.update(image=images["init_image"], mask_image=images["mask_image"])
    pair = {} if refiner is None else {"refiner": refiner, "refiner_start": spec["refiner_start"]}
    cache = spec.get("cache")  # {kind, interval, schedule}: feature caching (DeepCache), else none
    if cache:
        extra.update(cache=cache["kind"], cache_interval=cache["interval"], cache_schedule=cache["schedule"])

    def call() -> dict[str, Any]:
        t = time.perf_counter()
        r = pipe(spec["prompt"], height=spec["height"], width=spec["width"], steps=spec["steps"],
                 guidance_scale=spec["guidance_scale"], sampler=spec["sampler"], seed=spec["seed"],
                 batch_size=spec["batch_size"], latents=latents, **extra, **pair)
        wall = (time.perf_counter() - t) * 1e3
        tm = r.timings
        out = {"text_encoder_ms": float(tm["text_encoder_ms"]), "unet_steps_ms": [float(x) for x in tm["unet_steps_ms"]],
               "vae_decoder_ms": float(tm["vae_decoder_ms"]), "total_ms": float(tm["total_ms"]), "wall_ms": wall,
               "images": r.images, "nonfinite": list(r.nonfinite), "loop": r.loop,
               # the stages and steps on the pipeline's clock; total_ms and wall_ms on the host's
               "clock": tm.get("clock", "host"), "total_clock": "host"}
        if refiner is not None:
            out["stages"] = {"base_text_encoder_ms": float(tm["base_text_encoder_ms"]),
                             "refiner_text_encoder_ms": float(tm["refiner_text_encoder_ms"]),
                             "base_denoise_ms": float(sum(tm["base_steps_ms"])),
                             "refiner_denoise_ms": float(sum(tm["refiner_steps_ms"])),
                             "vae_decoder_ms": float(tm["vae_decoder_ms"])}
        return out

    if spec.get("cold_only"):  # a second cold start (the model cache filled): load and first image only
        first, runs = _measure(call, {**spec, "warmup": 0, "repeats": 0}, pipe.backend.settle)
    else:
        first, runs = _measure(call, spec, pipe.backend.settle)
    versions: dict[str, Any] = {}
    import onnxruntime

    versions["onnxruntime"] = onnxruntime.__version__
    ov = getattr(pipe.backend, "ov", None)
    if ov is not None:
        versions["openvino"] = str(ov.__version__)
    trt_module = getattr(pipe.backend, "trt", None)  # tensorrt, its lean runtime, or TensorRT for RTX
    if trt_module is not None:
        versions[str(trt_module.__name__)] = str(trt_module.__version__)
    gpu = spec["device"] == "cuda"
    return {
        "status": "ok", "backend_name": pipe.backend.name, "import_ms": import_ms, "load_ms": load_ms,
        # where the load went (the pipeline's own account; a refiner's parts prefixed "refiner.")
        "load_breakdown_ms": {**pipe.load_ms, **({} if refiner is None else
                                                 {f"refiner.{k}": v for k, v in refiner.load_ms.items()})},
        "first_image_ms": first["wall_ms"], "first": first, "runs": runs, "versions": versions,
        "threads": {"intra_op": spec["threads"], "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "timing_method": (("sdrt Pipeline timings: device clock (CUDA events on the stream, no per-step "
                           "synchronization)" if first["clock"] == "device" else
                           "sdrt Pipeline timings: host clock (ONNX Runtime synchronizes its CUDA stream at the "
                           "end of every run)") if gpu else "sdrt Pipeline timings: host clock (CPU)")
                         + f"; denoising loop: {first['loop']}",
        "torch_peak_allocated_bytes": None,
        # the UNet's graph dtype (a bf16 export's interface is float32: its manifest says bf16)
        "precision": (f"{'bfloat16' if pipe.manifest.components['unet'].precision == 'bf16' else pipe.dtype.name} "
                      f"graphs, {pipe.backend.precision} inference"  # type: ignore[attr-defined]
                      # the graphs it loaded exact (the text encoders: f32 in a bf16 run)
                      + (f" ({', '.join(pipe.backend.exact)} at f32)" if pipe.backend.exact  # type: ignore[attr-defined]
                         else "")
                      if spec["backend"] == "openvino" else None),
    }


def workload_images(spec: dict[str, Any]) -> dict[str, Any]:
    """The workload's input images (PIL), read from the files the bench wrote."""
    from PIL import Image

    out = {}
    for key in ("control_image", "init_image", "mask_image"):
        if spec.get(key):
            with Image.open(spec[key]) as im:
                out[key] = im.copy()
    return out


def _openvino_pipeline(spec: dict[str, Any]) -> Any:
    """The Pipeline over an openvino backend made here, with the run's own model cache and precision."""
    from sdrt.runtime import pipeline
    from sdrt.runtime.ov_backend import OvBackend

    backend = OvBackend(threads=spec["threads"], precision=spec.get("ov_precision") or "auto",
                        cache_dir=spec.get("ov_cache_dir"))
    return pipeline.Pipeline.load(spec["folder"], backend=backend)


# -- diffusers (the PyTorch baseline) -----------------------------------------------------------------

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    # flow-matching models (SD 3 / 3.5): the pipeline's own FlowMatchEulerDiscreteScheduler, and DPM-Solver++
    # 2M on flow sigmas, its flow_shift the model's shift (added where it is made)
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-dpmpp-2m": ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "use_flow_sigmas": True,
        "prediction_type": "flow_prediction"}),
}


def denoiser_of(pipe: Any) -> Any:
    """A diffusers pipeline's denoiser: its ``unet``, or an MMDiT pipeline's ``transformer`` (SD 3 / 3.5)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def set_denoiser(pipe: Any, module: Any) -> None:
    """Replace a pipeline's denoiser (a compiled one) under the name the pipeline calls it by."""
    setattr(pipe, "unet" if getattr(pipe, "unet", None) is not None else "transformer", module)


class _Clock:
    """Marks on the device stream (CUDA events) or the host clock, read after the call."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[Any, Any] = {}

    def mark(self, key: Any, first_only: bool = False) -> None:
        if first_only and key in self.marks:
            return
        if self.cuda:
            import torch

            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks[key] = e
        else:
            self.marks[key] = time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        x, y = self.marks[a], self.marks[b]
        return float(x.elapsed_time(y)) if self.cuda else (y - x) * 1e3


def run_diffusers(spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    import diffusers

    import_ms = (time.perf_counter() - t0) * 1e3
    sampler = spec["sampler"]
    if sampler not in SCHEDULERS:
        return {"status": "skipped", "reason": f"diffusers has no scheduler mapped to sdrt sampler {sampler!r} "
                                               f"(mapped: {', '.join(SCHEDULERS)})"}
    cuda = spec["device"] == "cuda"
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if spec["precision"] == "fp16" else torch.float32
    from sdrt.runtime.families import family_named

    sdxl = len(family_named(spec["family"]).encoders) == 2  # diffusers' two-encoder (XL) pipelines
    emit(phase="load")
    t0 = time.perf_counter()
    from .baselines import pipeline_class

    workload = spec.get("workload", "txt2img")
    cls = pipeline_class(spec["family"], workload)
    accepted = inspect.signature(cls.__init__).parameters  # SD 3 / 3.5's pipeline has no safety checker
    # a component saved as None (an export without SD 3's T5: text_encoder_3) is passed as None again, which
    # from_pretrained does not do by itself for a component the pipeline does not call optional
    index = json.loads((Path(spec["folder"]) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if k in accepted and v == [None, None]}
    if sdxl:
        pipe = cls.from_pretrained(spec["folder"], torch_dtype=dtype,
                                   **({} if workload == "inpaint" else {"add_watermarker": False}))
    elif "safety_checker" in accepted:
        pipe = cls.from_pretrained(spec["folder"], torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    else:
        pipe = cls.from_pretrained(spec["folder"], torch_dtype=dtype, **absent)
    pipe = pipe.to(device)  # torch_dtype: deprecated in diffusers 0.42 for dtype=, but every version reads it
    refiner = None
    if spec.get("refiner_diffusers_folder"):
        refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
            spec["refiner_diffusers_folder"], torch_dtype=dtype, add_watermarker=False).to(device)
    cls_name, extra = SCHEDULERS[sampler]
    for p in (pipe, refiner):
        if p is None:
            continue
        if denoiser_of(p).dtype != dtype:
            raise RuntimeError(f"diffusers loaded the denoiser as {denoiser_of(p).dtype}, not {dtype}; "
                               "the baseline would be wrong")
        options = dict(extra)
        if options.get("use_flow_sigmas"):  # the model's shift (SD3: 3.0), as sdrt's flow-dpmpp-2m takes it
            options["flow_shift"] = float(p.scheduler.config.get("shift", 1.0))
        # each its own config
        p.scheduler = getattr(diffusers, cls_name).from_config(p.scheduler.config, **options)
        p.set_progress_bar_config(disable=True)
        if spec.get("compile"):
            set_denoiser(p, torch.compile(denoiser_of(p), mode=spec.get("compile_mode") or None))
    if cuda:
        torch.cuda.synchronize()
    load_ms = (time.perf_counter() - t0) * 1e3
    weight_bytes = sum(q.numel() * q.element_size() for p in (pipe, refiner) if p is not None
                       for m in (denoiser_of(p), p.vae, p.text_encoder, getattr(p, "text_encoder_2", None),
                                 getattr(p, "text_encoder_3", None))
                       if m is not None for q in m.parameters())

    clock = _Clock(cuda)

    def instrument(p: Any, tag: str) -> Callable[..., dict[str, Any]]:
        """Marks around the pipeline's text encoding, VAE decode, first UNet call and each step; returns its
        step-end callback."""
        encode, decode = p.encode_prompt, p.vae.decode

        def timed_encode(*a: Any, **k: Any) -> Any:
            clock.mark(f"{tag}text0")
            out = encode(*a, **k)
            clock.mark(f"{tag}text1")
            return out

        def timed_decode(*a: Any, **k: Any) -> Any:
            clock.mark("vae0")
            out = decode(*a, **k)
            clock.mark("vae1")
            return out

        p.encode_prompt = timed_encode
        p.vae.decode = timed_decode
        denoiser_of(p).register_forward_pre_hook(
            lambda module, args: clock.mark(f"{tag}unet0", first_only=True))

        def on_step_end(_: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            clock.mark((f"{tag}step", i))
            return kwargs

        return on_step_end

    base_steps = instrument(pipe, "")
    refiner_steps = None if refiner is None else instrument(refiner, "r")
    if getattr(pipe, "controlnet", None) is not None:  # a step starts with the ControlNet, before the UNet
        pipe.controlnet.register_forward_pre_hook(lambda module, args: clock.mark("unet0", first_only=True))
    images = workload_images(spec)
    inputs: dict[str, Any] = {}
    if "control_image" in images:
        inputs["image"] = images["control_image"]
    if "mask_image" in images:
        inputs.update(image=images["init_image"], mask_image=images["mask_image"])

    def autocast() -> Any:
        """bf16 autocast (fp32 weights; matmuls and convolutions in bf16), or nothing."""
        if spec.get("autocast") != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)

    latents = None
    if spec.get("latents"):
        latents = torch.from_numpy(np.load(spec["latents"])).to(device=device, dtype=dtype)
        pack = getattr(type(pipe), "_pack_latents", None)
        if pack is not None:  # a pipeline that takes its latents as patch tokens (FLUX.1's): the same noise, packed
            latents = pack(latents, *latents.shape)

    def step_times(tag: str) -> list[float]:
        steps = sorted(k[1] for k in clock.marks if isinstance(k, tuple) and k[0] == f"{tag}step")
        out: list[float] = []
        prev: Any = f"{tag}unet0"
        for i in steps:
            out.append(clock.ms(prev, (f"{tag}step", i)))
            prev = (f"{tag}step", i)
        return out

    def call() -> dict[str, Any]:
        clock.marks.clear()
        gen = torch.Generator(device=device).manual_seed(spec["seed"])
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        common = {"num_inference_steps": spec["steps"], "guidance_scale": spec["guidance_scale"],
                  "num_images_per_prompt": spec["batch_size"], "generator": gen}
        with torch.inference_mode(), autocast():
            if refiner is None:
                out = pipe(spec["prompt"], height=spec["height"], width=spec["width"], latents=latents,
                           callback_on_step_end=base_steps, **common, **inputs)
            else:  # diffusers' ensemble of expert denoisers: latents, not pixels, pass between the two
                f = spec["refiner_start"]
                handoff = pipe(spec["prompt"], height=spec["height"], width=spec["width"], latents=latents,
                               denoising_end=f, output_type="latent", callback_on_step_end=base_steps,
                               **common).images
                out = refiner(spec["prompt"], image=handoff, denoising_start=f, callback_on_step_end=refiner_steps,
                              **common)
        if cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - t) * 1e3
        base_ms, ref_ms = step_times(""), step_times("r")
        record = {"text_encoder_ms": clock.ms("text0", "text1"), "unet_steps_ms": base_ms + ref_ms,
                  "vae_decoder_ms": clock.ms("vae0", "vae1"), "total_ms": total, "wall_ms": total,
                  "images": out.images, "nonfinite": [], "clock": "device" if cuda else "host", "total_clock": "host"}
        if refiner is not None:
            rtext = clock.ms("rtext0", "rtext1")
            record["text_encoder_ms"] += rtext
            record["stages"] = {"base_text_encoder_ms": clock.ms("text0", "text1"), "refiner_text_encoder_ms": rtext,
                                "base_denoise_ms": sum(base_ms), "refiner_denoise_ms": sum(ref_ms),
                                "vae_decoder_ms": record["vae_decoder_ms"]}
        return record

    first, runs = _measure(call, spec)
    attn = sorted({type(p).__name__ for p in denoiser_of(pipe).attn_processors.values()})
    import transformers

    return {
        "status": "ok", "backend_name": f"diffusers {diffusers.__version__} on torch {torch.__version__}",
        "import_ms": import_ms, "load_ms": load_ms, "first_image_ms": first["wall_ms"], "first": first,
        "runs": runs, "weight_bytes": int(weight_bytes),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torch_cuda": torch.version.cuda,
                     "attention": ",".join(attn), "compile_mode": spec.get("compile_mode") if spec.get("compile") else None,
                     "autocast": spec.get("autocast")},
        "threads": {"torch_num_threads": torch.get_num_threads(),
                    "torch_interop_threads": torch.get_num_interop_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "timing_method": ("stages timed with CUDA events on the current stream (no added synchronization); "
                          "total by host clock between device synchronizations" if cuda else
                          "host clock (CPU)") + ("; fp32 weights under torch.autocast(bfloat16)"
                                                 if spec.get("autocast") else ""),
        "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
    }


# -- matmul rate ----------------------------------------------------------------------------------------------

def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from .flops import matmul_rate

    torch.set_num_threads(spec["threads"])
    emit(phase="matmul")
    device = "cuda" if spec["device"] == "cuda" else "cpu"
    rate = matmul_rate(device, spec["dtype"], spec["n"], warmup=spec.get("warmup", 3), repeats=spec.get("repeats", 10))
    return {"status": "ok", **rate}


# -- the server benchmark's sides --------------------------------------------------------------------------

def run_serve(spec: dict[str, Any]) -> dict[str, Any]:
    from .serve_bench import run_side

    return run_side(spec)


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sdrt": run_sdrt, "diffusers": run_diffusers, "matmul": run_matmul, "serve": run_serve}


def main(argv: list[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        result = JOBS[spec["job"]](spec)
    except Exception as e:  # noqa: BLE001 - any failure becomes the measurement's recorded reason
        from sdrt.runtime.errors import SdrtError

        tail = "" if isinstance(e, SdrtError) else "\n" + "".join(traceback.format_exc().splitlines(True)[-6:])
        result = {"status": "failed", "reason": f"{type(e).__name__}: {e}{tail}"}
    from .memory import peak_rss_self

    result["peak_rss_bytes"] = peak_rss_self()
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
