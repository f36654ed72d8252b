"""What LoRA slots cost, measured: ``python -m sdrt.benchmarks.lora_slots --plain DIR --slotted DIR``.

1. **Per UNet call**: the plain export's UNet against the slotted one with no adapter (zero factors) and with
   one LoRA, on ONNX Runtime CPU and OpenVINO (where installed), the three alternated call by call (ABCABC...)
   so a drift of the machine falls on all of them alike; median milliseconds of ``--repeats`` calls each.
2. **Switching adapters**: reading a LoRA file and making the slots' factors from it (what a request with a new
   LoRA costs before its first step; the upload to a GPU is not included), against the export time of the
   slotted model (``--export-s``, what merging the LoRA at export costs instead).
3. **Memory**: the bytes of one adapter as the library keeps it, and of the factor inputs a call uploads.
4. **ONNX Runtime's own adapter mechanism** (ort-cpu): the same factors written once as an ONNX Runtime adapter
   file (``onnxruntime.AdapterFormat``), loaded as ``onnxruntime.LoraAdapter`` and made active per run
   (``RunOptions.add_active_adapter``), so a call binds none of them itself; alternated with the other three,
   with the time to write and load the adapter file.

The two exports must be of the same model (``sdrt export --random sd15 --fp32`` with and without
``--lora-slots``); the LoRA is synthetic, rank ``--lora-rank`` on every slotted layer (a LoCon on an
``attn-ff-conv`` export: its convolutions' factors are convolutions). ``--no-ort-adapter`` leaves part 4 out.
Each backend's timed calls are checked for other work on the host meanwhile (benchmarks/contention.py): the
share of the machine other processes took is recorded, and flagged ``busy`` past a tenth. Prints a table and
one JSON object (``--out FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _unet_feeds(inputs: dict[str, Any], size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A guided call's inputs at ``size`` pixels: batch 2, 77 tokens."""
    lat = size // 8
    feeds: dict[str, np.ndarray] = {}
    for name, spec in inputs.items():
        if name.startswith("lora."):
            continue
        dt = spec.dtype
        if name == "sample":
            feeds[name] = rng.standard_normal((2, spec.shape[1], lat, lat)).astype(dt)
        elif name == "timestep":
            feeds[name] = np.full((2,), 500.0, np.float32)
        elif name == "encoder_hidden_states":
            feeds[name] = rng.standard_normal((2, 77, spec.shape[2])).astype(dt)
        else:
            raise SystemExit(f"the UNet takes {name}; this benchmark measures SD 1.x/2.x UNets")
    return feeds


def _synthetic_lora(path: Path, slots: dict[str, Any], rank: int, seed: int = 0) -> None:
    """A kohya-layout LoRA of ``rank`` on every slotted layer (a convolution's: LoCon's [r, in, kh, kw] and
    [out, r, 1, 1])."""
    from safetensors.numpy import save_file

    g = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}
    for module, s in slots.items():
        key = "lora_unet_" + module.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (g.standard_normal((rank, *s.down_shape[1:])) * 0.02).astype(np.float32)
        sd[f"{key}.lora_up.weight"] = (g.standard_normal((s.features_out, rank, *s.up_shape[2:])) * 0.02
                                       ).astype(np.float32)
        sd[f"{key}.alpha"] = np.array(rank, np.float32)
    save_file(sd, str(path))


def _ort_adapter_call(unet_onnx: Path, base: dict[str, np.ndarray], factors: dict[str, np.ndarray],
                      tmp: Path, threads: int | None) -> tuple[Any, float]:
    """A call of the slotted UNet with ``factors`` as an active ``onnxruntime.LoraAdapter`` (written once with
    ``AdapterFormat``), the other inputs fed as usual; and the ms to write and load the adapter.

    ONNX Runtime binds an adapter's parameters to inputs that have a default (an initializer of the same name:
    overridable); a slotted export's factors are required inputs (the Python API refuses a run without them), so
    the graph measured here is the slotted one with zero initializers added for its factor inputs, in a temporary folder (the export's weights hard-linked where
    the file system allows, else copied)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(unet_onnx), load_external_data=False)
    for inp in model.graph.input:
        if inp.name in factors:
            model.graph.initializer.append(numpy_helper.from_array(np.zeros_like(factors[inp.name]), inp.name))
    work = tmp / "adapter-graph"
    work.mkdir(exist_ok=True)
    for f in unet_onnx.parent.iterdir():  # the external weights, where the graph's relative paths find them
        if f.name != unet_onnx.name and not (work / f.name).exists():
            try:  # a hard link (ONNX Runtime refuses external data that resolves outside the graph's folder)
                os.link(f, work / f.name)
            except OSError:  # another file system: a copy
                shutil.copy2(f, work / f.name)
    onnx.save(model, str(work / "model.onnx"))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(work / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in factors.items()})
    path = tmp / "lora.onnx_adapter"
    fmt.export_adapter(str(path))
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    load_ms = (time.perf_counter() - t0) * 1e3
    out = [session.get_outputs()[0].name]

    def call(keep: Any = adapter) -> Any:  # the run options do not keep the adapter alive: the closure does
        return session.run(out, base, options)[0]

    return call, load_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.lora_slots", description=__doc__.splitlines()[0])
    p.add_argument("--plain", required=True, help="an export without LoRA slots")
    p.add_argument("--slotted", required=True, help="the same model exported with --lora-slots")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--export-s", type=float, default=None, help="the slotted export's time, for the comparison")
    p.add_argument("--backends", default="ort-cpu,openvino")
    p.add_argument("--threads", type=int, default=None, help="threads per session (default: the backend's)")
    p.add_argument("--no-ort-adapter", action="store_true",
                   help="leave out onnxruntime's LoraAdapter (part 4; another session of the slotted UNet)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from sdrt.runtime.backends import make_backend
    from sdrt.runtime.errors import SdrtError
    from sdrt.runtime.lora_adapters import Adapter, adapter_factors, slots_of
    from sdrt.runtime.lora_files import read_lora

    from .contention import BUSY_OTHER_CPU, other_cpu, snapshot

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sdrt-lora-bench-") as tmp:
        lora_path = Path(tmp) / "lora.safetensors"
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            try:
                be = make_backend(backend, Path(args.slotted), threads=args.threads)
            except SdrtError as e:  # an extra not installed: say so and go on
                print(f"{backend}: skipped ({e})")
                continue
            try:
                plain = be.load(str(Path(args.plain) / "unet" / "model.onnx"), "unet")
                slotted = be.load(str(Path(args.slotted) / "unet" / "model.onnx"), "unet")
                slots = slots_of(slotted.inputs)
                if not slots:
                    raise SystemExit(f"{args.slotted} has no LoRA slots")
                if not lora_path.exists():
                    _synthetic_lora(lora_path, slots, args.lora_rank)
                dtype = slotted.inputs["sample"].dtype
                t0 = time.perf_counter()
                adapter = Adapter("lora", read_lora(lora_path))
                with_lora = adapter_factors({"unet": slots}, [(adapter, 0.8)], dtype)["unet"]
                switch_ms = (time.perf_counter() - t0) * 1e3
                zeros = adapter_factors({"unet": slots}, [], dtype)["unet"]
                base = _unet_feeds(plain.inputs, args.size, np.random.default_rng(0))
                configs = {"plain": (plain, {}), "slotted, no LoRA": (slotted, zeros),
                           f"slotted, one LoRA (rank {args.lora_rank})": (slotted, with_lora)}
                dev = {k: ({n: be.to_device(v) for n, v in {**base, **f}.items()}, e) for k, (e, f) in configs.items()}
                calls: dict[str, Any] = {k: (lambda f=feeds, e=engine, b=be: b.to_host(e(f)["out_sample"]))
                                         for k, (feeds, engine) in dev.items()}
                if backend == "ort-cpu" and not args.no_ort_adapter:
                    label = f"slotted, one LoRA (rank {args.lora_rank}, ORT LoraAdapter)"
                    calls[label], adapter_load_ms = _ort_adapter_call(
                        Path(args.slotted) / "unet" / "model.onnx", base, with_lora, Path(tmp), args.threads)
                # warm: the first call of a session allocates
                warm = {k: np.asarray(call(), np.float32) for k, call in calls.items()}
                times: dict[str, list[float]] = {k: [] for k in calls}
                load0, before = os.getloadavg()[0], snapshot(own=True)  # the calls run in this process
                for _ in range(args.repeats):
                    for k, call in calls.items():
                        t = time.perf_counter()
                        call()
                        times[k].append((time.perf_counter() - t) * 1e3)
                other = other_cpu(before, snapshot(own=True))
                busy = None if other is None else other > BUSY_OTHER_CPU
                plain_ms = float(np.median(times["plain"]))
                for k, ts in times.items():
                    ms = float(np.median(ts))
                    rows.append({"backend": backend, "config": k, "unet_ms_p50": ms, "vs_plain": ms / plain_ms,
                                 "unet_ms": ts})
                    print(f"{backend:9s} {k:34s} {ms:9.1f} ms per UNet call  x{ms / plain_ms:.3f} of plain",
                          flush=True)
                rows.append({"backend": backend, "config": "host", "other_cpu": other, "busy": busy,
                             "load_average_at_start": round(load0, 2)})
                if busy:
                    print(f"{backend:9s} the host was busy: other work took {other:.0%} of its CPU during the timed "
                          "calls (the times are not clean)", flush=True)
                if backend == "ort-cpu" and not args.no_ort_adapter:
                    # the adapter's output against the same factors fed as inputs: the same computation
                    same = float(np.abs(warm[label] - warm[f"slotted, one LoRA (rank {args.lora_rank})"]).max())
                    rows.append({"backend": backend, "config": "ORT LoraAdapter: write + load", "switch_ms":
                                 adapter_load_ms, "max_abs_diff_vs_inputs": same})
                    print(f"{backend:9s} writing and loading the ORT adapter file: {adapter_load_ms:.1f} ms", flush=True)
                factor_bytes = sum(v.nbytes for v in with_lora.values())
                rows.append({"backend": backend, "config": "switch", "switch_ms": switch_ms,
                             "adapter_bytes": adapter.nbytes, "factor_input_bytes": factor_bytes})
                print(f"{backend:9s} switching to a new LoRA: {switch_ms:.1f} ms (read + factors); the adapter "
                      f"keeps {adapter.nbytes / 2**20:.1f} MiB; a call's factor inputs are {factor_bytes / 2**20:.1f} "
                      "MiB", flush=True)
            finally:
                be.close()
    doc = {"what": "LoRA slots: the slotted UNet against the plain one per call (alternated), adapter switch time, "
                   "adapter memory", "size": args.size, "repeats": args.repeats, "lora_rank": args.lora_rank,
           "slot_rank": next(iter(slots.values())).rank if rows else None, "slots": len(slots) if rows else 0,
           "conv_slots": sum(1 for s in slots.values() if s.kernel) if rows else 0,
           "export_s": args.export_s,
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
           "plain": str(args.plain), "slotted": str(args.slotted), "rows": rows}
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
