"""What a ControlNet export would cost txt2img if it ran ``unet_control`` instead of the plain ``unet``.

Both graphs of one export, side by side in one process on ONNX Runtime CPU: the plain UNet, and
``unet_control`` fed zero residuals (the buffers allocated once, as a runtime would keep them), called
alternately so drift in a shared machine's load hits both alike. Per-call medians and their ratio, and the fastest
call of each (the least disturbed by other load) and theirs.

    python -m sdrt.benchmarks.controlnet_overhead --size medium --pixels 512 --repeats 7

Sizes: ``tiny`` (sd15-tiny), ``medium`` (the SD 1.5 UNet architecture at half width, 160..640
channels: about a quarter of its compute), ``full`` (SD 1.5). Graphs are fp32 (CPU), batch 2 (CFG).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"tiny": None, "medium": [160, 320, 640, 640], "full": [320, 640, 1280, 1280]}


def _model(size: str) -> Any:
    from diffusers import UNet2DConditionModel

    from sdrt.export.loading import random_model, randomize_norms
    from sdrt.export.presets import get_preset

    if size == "tiny":
        return random_model("sd15-tiny")
    import torch

    model = random_model("sd15-tiny")  # its text encoder and VAE are not timed: only the UNet is swapped
    cfg = get_preset("sd15").config("unet")
    cfg["block_out_channels"] = SIZES[size]
    torch.manual_seed(0)
    model.unet = UNet2DConditionModel(**cfg).eval()
    randomize_norms(model.unet, 0)
    return model


def measure(size: str = "medium", pixels: int = 512, nets: int = 1, repeats: int = 7, warmup: int = 2,
            threads: int | None = None, progress: Any = print) -> dict[str, Any]:
    import onnxruntime as ort

    from sdrt.export.controlnet_loading import controlnet_from_unet
    from sdrt.export.exporter import component_specs
    from sdrt.export.onnx_export import export_component

    model = _model(size)
    cns = [controlnet_from_unet(model, seed=j) for j in range(nets)]
    specs = {s.name: s for s in component_specs(model, controlnets=cns)}
    lat = pixels // 8
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="sdrt-cn-bench-") as tmp:
        comps = {}
        for name in ("unet", "unet_control"):
            comps[name] = export_component(specs[name], "fp32", Path(tmp) / name, opset=17,
                                           parity_shape=(2, 16, 24), progress=progress)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = {n: ort.InferenceSession(str(Path(tmp) / n / "model.onnx"), opts, providers=["CPUExecutionProvider"])
                for n in comps}
        rng = np.random.default_rng(0)
        cross = int(model.unet.config.cross_attention_dim)
        base = {"sample": rng.standard_normal((2, 4, lat, lat), dtype=np.float32),
                "timestep": np.array([500.0, 500.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, cross), dtype=np.float32)}
        zeros = {}
        for t in comps["unet_control"].inputs[len(base):]:
            shape = [2 if d == "batch" else d if isinstance(d, int) else
                     -(-lat // int(d.partition("/")[2] or 1)) for d in t.shape]
            zeros[t.name] = np.zeros(shape, np.float32)
        feeds = {"unet": base, "unet_control": {**base, **zeros}}
        times: dict[str, list[float]] = {"unet": [], "unet_control": []}
        progress(f"timing {size} UNet at {pixels} px, batch 2, {threads} threads: {warmup} warm-up + {repeats} "
                 "calls each, alternating")
        for i in range(warmup + repeats):
            for name in ("unet", "unet_control") if i % 2 == 0 else ("unet_control", "unet"):
                t0 = time.perf_counter()
                out = sess[name].run(["out_sample"], feeds[name])[0]
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
                assert np.isfinite(out).all()
        same = float(np.abs(sess["unet"].run(["out_sample"], base)[0]
                            - sess["unet_control"].run(["out_sample"], feeds["unet_control"])[0]).max())
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "size": size, "pixels": pixels, "nets": nets, "threads": threads, "repeats": repeats,
        "unet_ms": round(med["unet"] * 1e3, 1), "unet_control_ms": round(med["unet_control"] * 1e3, 1),
        "ratio": round(med["unet_control"] / med["unet"], 3),
        # the fastest call of each: what a quiet machine gives, the least disturbed by other load
        "unet_min_ms": round(min(times["unet"]) * 1e3, 1),
        "unet_control_min_ms": round(min(times["unet_control"]) * 1e3, 1),
        "min_ratio": round(min(times["unet_control"]) / min(times["unet"]), 3),
        "load_average": round(os.getloadavg()[0], 2),
        "unet_ms_all": [round(t * 1e3, 1) for t in times["unet"]],
        "unet_control_ms_all": [round(t * 1e3, 1) for t in times["unet_control"]],
        "max_abs_diff_zero_residuals": same,
        "residual_inputs": len(zeros),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="medium")
    p.add_argument("--pixels", type=int, default=512)
    p.add_argument("--nets", type=int, default=1, help="ControlNets whose residuals unet_control takes")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", default=None, help="also write the result as JSON")
    args = p.parse_args(argv)
    r = measure(args.size, args.pixels, args.nets, args.repeats, args.warmup, args.threads)
    print(f"\n{r['size']} UNet, {r['pixels']} px, batch 2, {r['threads']} threads, median of {r['repeats']}:")
    print(f"  unet          {r['unet_ms']:9.1f} ms per call")
    print(f"  unet_control  {r['unet_control_ms']:9.1f} ms per call ({r['residual_inputs']} zero residuals, "
          f"{r['nets']} net{'s' if r['nets'] > 1 else ''})")
    print(f"  ratio         {r['ratio']:9.3f}   (outputs differ by at most {r['max_abs_diff_zero_residuals']:.1e})")
    print(f"  fastest calls {r['unet_min_ms']:9.1f} / {r['unet_control_min_ms']:.1f} ms, ratio {r['min_ratio']:.3f}; "
          f"load average {r['load_average']}")
    if args.output:
        Path(args.output).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
