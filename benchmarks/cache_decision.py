"""Where first-block caching's threshold rule is computed, measured: ``python -m sdrt.benchmarks.cache_decision``.

The rule compares the first block's residual ``r`` [rows, patches, width] with the one of the last full step,
``mean|r - ref| / mean|ref|``, against the threshold, every cached step. Two ways to compute it:

- **in the graph** (what sdrt does): the cached step's own graph reduces the two residuals to one number,
  ``change``; the loop reads those 4 bytes back;
- **on the host**: the cached step returns ``r``, the loop reads it back and reduces it with numpy.

Each is timed here on the backends of this machine (ort-cpu and openvino; ort-cuda where a GPU is present),
at the residual shapes of real models (SD 3 Medium / 3.5 Medium and SD 3.5 Large at 1024 x 1024, guided: 2 rows
of 4096 patches), as the extra time per cached step on top of the graph that produced ``r``: in the graph, the
reduction nodes and the read of one number; on the host, the read of ``r`` and numpy's reduction. The model's
weights play no part in it, so a graph of the reduction alone stands for it.

Prints a table and one JSON object (``--out FILE`` writes it too). Options: ``--repeats``, ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

# (label, rows, patches, width): the transformer's inner width (heads x head dim) of each model
SHAPES = (("SD 3 / 3.5 Medium, 1024 px, guided", 2, 4096, 1536), ("SD 3.5 Large, 1024 px, guided", 2, 4096, 2432))


def _graph(width: int, reduce: bool) -> bytes:
    """A graph passing ``r`` through (standing for the cached step that computes it) and, with ``reduce``, also
    ``change = mean|r - ref| / mean|ref|``."""
    from onnx import TensorProto, helper

    dims = ["rows", "patches", width]
    nodes = [helper.make_node("Identity", ["r"], ["r_out"])]
    outputs = [helper.make_tensor_value_info("r_out", TensorProto.FLOAT, dims)]
    if reduce:
        outputs.append(helper.make_tensor_value_info("change", TensorProto.FLOAT, [1]))
        nodes += [
            helper.make_node("Sub", ["r", "ref"], ["d"]),
            helper.make_node("Abs", ["d"], ["ad"]),
            helper.make_node("ReduceMean", ["ad"], ["md"], keepdims=0),
            helper.make_node("Abs", ["ref"], ["ar"]),
            helper.make_node("ReduceMean", ["ar"], ["mr"], keepdims=0),
            helper.make_node("Div", ["md", "mr"], ["c"]),
            helper.make_node("Reshape", ["c", "one"], ["change"]),
        ]
    graph = helper.make_graph(
        nodes, "change",
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, dims),
         helper.make_tensor_value_info("ref", TensorProto.FLOAT, dims)],
        outputs, initializer=[helper.make_tensor("one", TensorProto.INT64, [1], [1])] if reduce else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def _median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _host_change(r: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(r - ref).mean() / np.abs(ref).mean())


def measure(backend: str, rows: int, patches: int, width: int, repeats: int, threads: int | None) -> dict[str, Any]:
    """Median ms of: the graph returning ``r`` alone (the base), the graph also returning ``change`` with the read
    of that number, and the base with the read of ``r`` and numpy's reduction; the two extras over the base."""
    rng = np.random.default_rng(0)
    r = rng.standard_normal((rows, patches, width), dtype=np.float32)
    ref = (r + 0.1 * rng.standard_normal(r.shape, dtype=np.float32)).astype(np.float32)
    want = _host_change(r, ref)
    runs = {k: _runner(backend, _graph(width, k), r, ref, threads) for k in (False, True)}

    def base() -> None:
        runs[False]()

    def in_graph() -> float:
        return float(np.asarray(runs[True]()["change"]).reshape(-1)[0])

    def on_host() -> float:
        return _host_change(np.array(runs[False]()["r_out"], copy=True), ref)

    got_graph, got_host = in_graph(), on_host()
    assert abs(got_graph - want) <= 1e-4 * abs(want) and abs(got_host - want) <= 1e-6 * abs(want), \
        (got_graph, got_host, want)
    b_ms, g_ms, h_ms = (_median_ms(f, repeats) for f in (base, in_graph, on_host))
    return {"backend": backend, "shape": [rows, patches, width], "base_ms": b_ms,
            "in_graph_ms": g_ms - b_ms, "on_host_ms": h_ms - b_ms}


def _runner(backend: str, model: bytes, r: np.ndarray, ref: np.ndarray, threads: int | None) -> Any:
    """A function running ``model`` on ``backend`` over fixed inputs, returning its outputs as host arrays where
    read (openvino's and ort's own output buffers, read only when asked)."""
    if backend == "openvino":
        import openvino as ov

        cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        compiled = core.compile_model(core.read_model(model), "CPU", cfg)
        req = compiled.create_infer_request()
        takes = {n for port in compiled.inputs for n in port.get_names()}
        for name, value in (("r", r), ("ref", ref)):
            if name in takes:  # (openvino drops an input the graph does not read: the base graph's ref)
                req.set_tensor(name, ov.Tensor(value))

        class _Ov:
            def __call__(self) -> _Ov:
                req.infer()
                return self

            def __getitem__(self, name: str) -> np.ndarray:
                return np.asarray(req.get_tensor(name).data)

        return _Ov()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    dev = "cuda" if backend == "ort-cuda" else "cpu"
    sess = ort.InferenceSession(model, opts, providers=["CUDAExecutionProvider" if dev == "cuda" else
                                                        "CPUExecutionProvider"])
    binding = sess.io_binding()
    takes = {i.name for i in sess.get_inputs()}
    for name, value in (("r", r), ("ref", ref)):
        if name in takes:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, dev))
    names = [o.name for o in sess.get_outputs()]
    for o in names:
        binding.bind_output(o, dev)

    class _Ort:
        def __call__(self) -> _Ort:
            sess.run_with_iobinding(binding)
            self.out = dict(zip(names, binding.get_outputs(), strict=True))
            return self

        def __getitem__(self, name: str) -> np.ndarray:
            return np.asarray(self.out[name].numpy())

    return _Ort()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.cache_decision", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    import importlib.util

    import onnxruntime as ort

    backends = ["ort-cpu"]
    if importlib.util.find_spec("openvino") is not None:
        backends.append("openvino")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        backends.append("ort-cuda")
    rows = []
    for label, n, patches, width in SHAPES:
        for be in backends:
            m = measure(be, n, patches, width, args.repeats, args.threads)
            m["model"] = label
            rows.append(m)
            print(f"{label:38s} {be:9s} base {m['base_ms']:7.2f} ms   + in the graph, read 4 bytes "
                  f"{m['in_graph_ms']:6.2f} ms   + read r, reduce with numpy {m['on_host_ms']:6.2f} ms", flush=True)
    doc = {"what": "first-block caching's threshold rule: extra ms per cached step, computed in the graph (read "
                   "one number) or on the host (read the residual, reduce with numpy)",
           "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
           "repeats": args.repeats, "rows": rows}
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
