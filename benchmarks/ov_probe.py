"""Two design questions of the openvino backend, measured: ``python -m sdrt.benchmarks.ov_probe EXPORT``.

1. **The loop's tensors.** Per-step time of the denoising loop three ways on the same export: the
   backend's loop (fixed ``ov.Tensor`` buffers, nothing allocated per step), the plain loop (each engine
   call returns fresh output tensors), and a loop that copies the UNet output and the latents to numpy
   and back every step (what a numpy-passing backend does).
2. **Static shapes.** One UNet call compiled with dynamic axes against one compiled for the exact shape:
   compile time, first call, and the median of the following calls.
3. **Static shapes on the whole image** (``--image-rounds N``): two pipelines on the same export, one compiled
   with dynamic axes and one per exact shape (``OvBackend(static_shapes=True)``), each warmed by an image at the
   size, then images alternating (dynamic, static, dynamic, static, ...) for N rounds; per image the total time
   and the share of the machine other processes used meanwhile (busy images are flagged and left out of the
   ratio).

Prints one JSON object (``--out FILE`` also writes it). Options: ``--size`` (pixels, square), ``--steps``,
``--threads``, ``--precision``, ``--cache`` (a model cache folder; default: none, so compile times are honest),
``--skip-static``, ``--skip-loop``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def loop_variants(folder: Path, size: int, steps: int, threads: int | None, precision: str,
                  cache: str | None) -> dict[str, Any]:
    """Per-step times of the three loops, each in a pipeline of its own (so no loop is reused by the next),
    through the pipeline's public stages."""
    from sdrt.runtime import pipeline as pl
    from sdrt.runtime.ov_backend import OvBackend
    from sdrt.runtime.step_loop import PlainStepLoop

    class RoundTrip(PlainStepLoop):
        """The plain loop, with the step's outputs (the next latents, x0, the next UNet input) copied to
        numpy and back every step."""

        def _run_step(self, feeds: Any, i: int) -> Any:
            out = dict(super()._run_step(feeds, i))
            be = self.backend
            for k in ("latents_next", "x0", "unet_in_next"):
                out[k] = be.to_device(be.to_host(out[k]))
            return out

    class LoopBackend(OvBackend):
        """The openvino backend, its denoising loop of the given class (None: the backend's own)."""

        def __init__(self, loop_cls: type[PlainStepLoop] | None) -> None:
            super().__init__(threads=threads, precision=precision, cache_dir=cache or False)
            self.loop_cls = loop_cls

        def step_loop(self, unet: Any, step: Any, controlnets: Any = ()) -> PlainStepLoop:
            if self.loop_cls is None:
                return super().step_loop(unet, step, controlnets)
            return self.loop_cls(self, unet, step, controlnets)

    out: dict[str, Any] = {}
    for label, loop_cls in (("fixed buffers (OvStepLoop)", None), ("fresh outputs (PlainStepLoop)", PlainStepLoop),
                            ("numpy round trip per step", RoundTrip)):
        with pl.Pipeline.load(folder, backend=LoopBackend(loop_cls)) as pipe:
            emb = pipe.encode_prompt("a lighthouse")
            plan = pipe.plan("dpmpp-2m", steps + 1)
            timings: dict[str, Any] = {}
            lat = pipe.prepare_latents(plan, size, size, seed=0)
            pipe.denoise(emb, lat, plan, guidance_scale=7.5, timings=timings)
            f, channels = pipe.manifest.vae_scale_factor, pipe.manifest.latent_channels
        ms = timings["unet_steps_ms"][1:]  # not the first step: it pays OpenVINO's first inference at a shape
        out[label] = {"step_ms_median": float(np.median(ms)), "steps_ms": ms}
    # the copies alone, at this size's shapes
    rows = 2
    be = OvBackend(threads=threads, precision=precision, cache_dir=cache or False)
    shape = (rows, channels, size // f, size // f)
    t = be.to_device(np.zeros(shape, np.float32))
    out["to_host+to_device of one UNet-sized tensor, ms"] = _median_ms(lambda: be.to_device(be.to_host(t)), 50)
    be.close()
    return out


def static_vs_dynamic(folder: Path, size: int, threads: int | None, precision: str, cache: str | None,
                      calls: int) -> dict[str, Any]:
    from sdrt.runtime.ov_backend import OvBackend

    out: dict[str, Any] = {}
    f = 8
    feeds_np = {
        "sample": np.random.default_rng(0).standard_normal((2, 4, size // f, size // f), dtype=np.float32),
        "timestep": np.full((2,), 500.0, np.float32),
    }
    for label, static in (("dynamic", False), ("static", True)):
        be = OvBackend(threads=threads, precision=precision, cache_dir=cache or False, static_shapes=static)
        t = time.perf_counter()
        unet = be.load(str(folder / "unet" / "model.onnx"), "unet")
        width = unet.inputs["encoder_hidden_states"].shape[-1]
        feeds = {**{k: be.to_device(v) for k, v in feeds_np.items()},
                 "encoder_hidden_states": be.to_device(np.zeros((2, 77, int(width or 768)), np.float32))}
        load_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        unet(feeds)
        first_ms = (time.perf_counter() - t) * 1e3
        out[label] = {"load_ms": load_ms, "first_call_ms": first_ms,
                      "call_ms_median": _median_ms(lambda u=unet, x=feeds: u(x), calls)}
        be.close()
    return out


def whole_image(folder: Path, size: int, steps: int, threads: int | None, precision: str, rounds: int
                ) -> dict[str, Any]:
    """Images alternating between a dynamic and a static pipeline (see the module's docstring, point 3)."""
    from sdrt.runtime.ov_backend import OvBackend
    from sdrt.runtime.pipeline import Pipeline

    from . import contention

    kw = {"height": size, "width": size, "steps": steps, "sampler": "euler", "guidance_scale": 7.5, "seed": 0}
    pipes: dict[str, Any] = {}
    out: dict[str, Any] = {"steps": steps, "rounds": rounds, "images": []}
    try:
        for label, static in (("dynamic", False), ("static", True)):
            t = time.perf_counter()
            pipes[label] = Pipeline.load(folder, backend=OvBackend(threads=threads, precision=precision,
                                                                    cache_dir=False, static_shapes=static))
            first = pipes[label]("a lighthouse at dawn", **kw)  # compiles (static: at this shape) and warms
            out[f"{label}_load_and_first_image_ms"] = (time.perf_counter() - t) * 1e3
            out[f"{label}_first_image_ms"] = first.timings["total_ms"]
        images = {}
        for r in range(rounds):
            for label in ("dynamic", "static"):
                before = contention.snapshot(own=True)
                res = pipes[label]("a lighthouse at dawn", **kw)
                other = contention.other_cpu(before, contention.snapshot(own=True))
                images[label] = np.asarray(res.images[0], np.int16)
                out["images"].append({"round": r + 1, "shapes": label, "total_ms": res.timings["total_ms"],
                                      "unet_step_ms": res.timings["unet_step_ms"], "other_cpu": other,
                                      "busy": other is not None and other > contention.BUSY_OTHER_CPU})
        out["image_max_abs_diff"] = int(np.abs(images["dynamic"] - images["static"]).max())
    finally:
        for p in pipes.values():
            p.close()
    quiet = {k: [i["total_ms"] for i in out["images"] if i["shapes"] == k and not i["busy"]]
             for k in ("dynamic", "static")}
    out["median_total_ms"] = {k: float(np.median(v)) if v else None for k, v in quiet.items()}
    d, s = out["median_total_ms"]["dynamic"], out["median_total_ms"]["static"]
    out["static_over_dynamic"] = None if d is None or s is None else s / d
    out["busy_images"] = sum(i["busy"] for i in out["images"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--cache", default=None)
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--image-rounds", type=int, default=0, metavar="N",
                   help="also time whole images, dynamic against static shapes, in N alternating rounds")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    a = p.parse_args(argv)
    if a.image_rounds < 0:
        p.error("--image-rounds must be 0 or more")
    from .env import fingerprint

    res: dict[str, Any] = {"export": str(a.export), "size": a.size, "threads": a.threads, "precision": a.precision,
                           "env": fingerprint()}
    if not a.skip_loop:
        res["loop"] = loop_variants(a.export, a.size, a.steps, a.threads, a.precision, a.cache)
    if not a.skip_static:
        res["unet_static_vs_dynamic"] = static_vs_dynamic(a.export, a.size, a.threads, a.precision, a.cache, a.calls)
    if a.image_rounds:
        res["image_static_vs_dynamic"] = whole_image(a.export, a.size, a.steps, a.threads, a.precision,
                                                     a.image_rounds)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out is not None:
        from sdrt.runtime.atomic import atomic_write_text

        atomic_write_text(a.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
