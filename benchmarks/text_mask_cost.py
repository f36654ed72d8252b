"""What the text encoders' ``attention_mask`` input costs, measured: ``python -m sdrt.benchmarks.text_mask_cost``.

Every SD 1.x / 2.x / SDXL export's CLIP text encoders take an ``attention_mask`` beside ``input_ids`` (compel's
default downweighting hides a fragment with it). This exports one CLIP text encoder of random weights twice with
sdrt's exporter, without the mask (the graph sdrt wrote before) and with it, and reports:

1. **The graph**: its nodes (by operator type, the ones the mask adds) and the size of the ONNX file.
2. **Per call**: the median milliseconds of ``--repeats`` calls at ``--batch`` rows of 77 tokens on ONNX Runtime
   CPU (and OpenVINO f32 where installed): the graph without the mask, and the graph with it fed all ones (what
   every prompt but compel's downweighted variants reads), the two alternated call by call so a drift of the
   machine falls on both alike.
3. **Equality**: the largest difference between the two graphs' outputs with an all-ones mask (0: the same
   computation).

``--encoder``: ``tiny`` (the tiny presets' encoder, the tests' size) or ``sd15`` (SD 1.5's CLIP ViT-L/14: 123 M
parameters). The other work on the host while the calls ran is recorded (benchmarks/contention.py), flagged
``busy`` past a tenth of the machine. Prints a table and one JSON object (``--out FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .contention import BUSY_OTHER_CPU, other_cpu, snapshot

ENCODERS = {"tiny": "sd15-tiny", "sd15": "sd15"}


def _export(encoder: Any, mask: bool, folder: Path) -> Path:
    from sdrt.export import wrappers
    from sdrt.export.onnx_export import ComponentSpec, export_component

    inputs: list[tuple[str, str, tuple[int | str, ...]]] = [("input_ids", "int32", ("batch", 77))]
    if mask:
        inputs.append(("attention_mask", "int32", ("batch", 77)))
    hidden = int(encoder.config.hidden_size)
    spec = ComponentSpec(
        name="text_encoder", module=wrappers.TextEncoder(encoder, penultimate=False, pooled=False), weights=encoder,
        inputs=inputs, outputs=[("hidden_states", "float", ("batch", 77, hidden))],
        example=wrappers.clip_ids_example(int(encoder.config.vocab_size), 77, mask=mask))
    export_component(spec, "fp32", folder, opset=17, parity_shape=(2, 8, 8))
    return folder / "model.onnx"


def _graph(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path))
    return {"nodes": len(model.graph.node), "ops": dict(Counter(n.op_type for n in model.graph.node)),
            "bytes": path.stat().st_size}


def _runners(paths: dict[str, Path], backend: str) -> dict[str, Any]:
    if backend == "ort-cpu":
        import onnxruntime as ort

        sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
        return {k: (lambda feeds, s=s: s.run(None, feeds)[0]) for k, s in sessions.items()}
    import openvino as ov

    core = ov.Core()
    compiled = {k: core.compile_model(str(p), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) for k, p in paths.items()}
    return {k: (lambda feeds, c=c: np.array(c(feeds)[0])) for k, c in compiled.items()}


def measure(encoder_name: str, batch: int, repeats: int) -> dict[str, Any]:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrt.export.presets import get_preset

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(**get_preset(ENCODERS[encoder_name]).text_encoders[0])).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49406, (batch, 77)).astype(np.int32)
    ids[:, 0], ids[:, 20:] = 49406, 49407
    plain_feeds = {"input_ids": ids}
    mask_feeds = {"input_ids": ids, "attention_mask": np.ones((batch, 77), np.int32)}
    backends = ["ort-cpu"]
    try:
        import openvino  # noqa: F401

        backends.append("openvino")
    except ImportError:
        pass
    out: dict[str, Any] = {"encoder": encoder_name, "parameters": sum(p.numel() for p in encoder.parameters()),
                           "batch": batch, "repeats": repeats, "host": platform.node(), "cpus": os.cpu_count(),
                           "created": time.strftime("%Y%m%dT%H%M%S", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"without": _export(encoder, False, Path(tmp) / "without"),
                 "with": _export(encoder, True, Path(tmp) / "with")}
        graphs = {k: _graph(p) for k, p in paths.items()}
        added = Counter(graphs["with"]["ops"]) - Counter(graphs["without"]["ops"])
        removed = Counter(graphs["without"]["ops"]) - Counter(graphs["with"]["ops"])
        out["graph"] = {**{k: {"nodes": g["nodes"], "bytes": g["bytes"]} for k, g in graphs.items()},
                        "ops_added": dict(added), "ops_removed": dict(removed)}
        out["backends"] = {}
        for be in backends:
            run = _runners(paths, be)
            a, b = run["without"](plain_feeds), run["with"](mask_feeds)
            times: dict[str, list[float]] = {"without": [], "with": []}
            for _ in range(2):  # warm both
                run["without"](plain_feeds)
                run["with"](mask_feeds)
            before = snapshot()
            for _ in range(repeats):
                for key, feeds in (("without", plain_feeds), ("with", mask_feeds)):
                    t0 = time.perf_counter()
                    run[key](feeds)
                    times[key].append((time.perf_counter() - t0) * 1000)
            busy = other_cpu(before, snapshot())
            med = {k: statistics.median(v) for k, v in times.items()}
            out["backends"][be] = {"median_ms": med, "ratio": med["with"] / med["without"],
                                   "ones_max_abs_diff": float(np.abs(a - b).max()),
                                   "other_cpu": busy, "busy": busy is not None and busy > BUSY_OTHER_CPU}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.text_mask_cost", description=__doc__.split("\n")[0])
    p.add_argument("--encoder", choices=sorted(ENCODERS), default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    res = measure(args.encoder, args.batch, args.repeats)
    g = res["graph"]
    print(f"{args.encoder} CLIP text encoder ({res['parameters'] / 1e6:.1f} M parameters), batch {args.batch}")
    print(f"graph: {g['without']['nodes']} nodes without the mask, {g['with']['nodes']} with it "
          f"(added {g['ops_added']}, removed {g['ops_removed']}); "
          f"{g['without']['bytes']} -> {g['with']['bytes']} bytes")
    for be, r in res["backends"].items():
        print(f"{be:9s} without {r['median_ms']['without']:.2f} ms, with all ones {r['median_ms']['with']:.2f} ms "
              f"(x{r['ratio']:.3f}); outputs differ by {r['ones_max_abs_diff']:.1e}"
              f"{'  BUSY host' if r['busy'] else ''}")
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
