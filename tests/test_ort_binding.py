"""The ort-cuda backend's tensor plumbing on ONNX Runtime's real API, run in CPU memory on the CPU EP.

``ort-cuda`` keeps every tensor as an OrtValue, runs engines with IO binding and, with ``cuda_graph``,
over fixed buffers per input shape (``StaticBindings``: bound once, inputs copied in, the run options
carry the graph id). The same code runs with OrtValues in CPU memory; these tests do that with the real
onnxruntime (no fake): the bindings, the copies into fixed buffers, the OrtValue round trips and the
whole pipeline over them. Not checked here: the CUDA EP, device memory and capture itself (those run in
tests/test_ort_fusion.py on a GPU machine).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sdrt.runtime.ort_backend import OrtBackend, StaticBindings, copy_into, ort_module
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.step_graph import step_graph_bytes

from .helpers.pipelines import ort_cuda_on_cpu


def _bound_cpu(monkeypatch: pytest.MonkeyPatch, cuda_graph: bool = False, max_graphs: int = 2) -> OrtBackend:
    """An ort-cuda backend in all but the device: OrtValues and IO binding, in CPU memory, on the CPU EP."""
    return ort_cuda_on_cpu(monkeypatch, cuda_graph=cuda_graph, max_cuda_graphs=max_graphs)  # type: ignore[no-any-return]


def _feeds(rng: np.random.Generator, b: int = 1) -> dict[str, np.ndarray]:
    shape = (b, 4, 8, 8)
    return {"latents": rng.standard_normal(shape, dtype=np.float32),
            "unet_out": rng.standard_normal((2 * b, 4, 8, 8), dtype=np.float32),
            "guidance": np.array(7.5, np.float32), "coeffs": rng.standard_normal(8, dtype=np.float32),
            "x0_prev": rng.standard_normal(shape, dtype=np.float32),
            "noise": rng.standard_normal(shape, dtype=np.float32)}


def test_bound_runs_match_plain_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    graph = step_graph_bytes(True, np.float32)
    plain, bound = OrtBackend("cpu"), _bound_cpu(monkeypatch)
    e_plain, e_bound = plain.load(graph, "sampler_step"), bound.load(graph, "sampler_step")
    feeds = _feeds(rng)
    want = e_plain(feeds)
    dev = {k: bound.to_device(v) for k, v in feeds.items()}
    assert all(isinstance(v, ort_module().OrtValue) for v in dev.values())
    got = e_bound(dev)
    for name, w in want.items():
        assert isinstance(got[name], ort_module().OrtValue)
        assert bound.meta(got[name]) == (w.dtype, w.shape)
        np.testing.assert_array_equal(bound.to_host(got[name]), w)
    # outputs feed the next run as they are (device-resident chaining, as the denoising loop does)
    again = e_bound({**dev, "latents": got["latents_next"], "x0_prev": got["x0"]})
    want2 = e_plain({**feeds, "latents": want["latents_next"], "x0_prev": want["x0"]})
    np.testing.assert_array_equal(bound.to_host(again["latents_next"]), want2["latents_next"])


def test_copy_into_fixed_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    ort = ort_module()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    dst = ort.OrtValue.ortvalue_from_shape_and_type([3, 4], np.float32, "cpu", 0)
    copy_into(dst, a)  # from the host
    np.testing.assert_array_equal(dst.numpy(), a)
    src = ort.OrtValue.ortvalue_from_numpy(a * 2, "cpu", 0)
    copy_into(dst, src)  # OrtValue to OrtValue
    np.testing.assert_array_equal(dst.numpy(), a * 2)
    copy_into(dst, dst)  # itself: nothing to do
    np.testing.assert_array_equal(dst.numpy(), a * 2)


def test_static_bindings_reuse_fixed_buffers_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph path's buffers: the first call at a shape runs unbound-to-buffers and makes the slot;
    later calls copy into it and return its (reused) outputs; beyond max_graphs shapes, calls run plainly."""
    rng = np.random.default_rng(1)
    be = _bound_cpu(monkeypatch, cuda_graph=True, max_graphs=1)
    be.graph_engines = frozenset({"sampler_step"})
    engine: Any = be.load(step_graph_bytes(True, np.float32), "sampler_step")
    static = engine._static
    assert isinstance(static, StaticBindings)
    ref = OrtBackend("cpu").load(step_graph_bytes(True, np.float32), "sampler_step")
    inputs = [_feeds(rng) for _ in range(3)]
    outs = []
    for f in inputs:  # same shape: one slot; alternating inputs must never give a stale answer
        got = engine({k: be.to_device(v) for k, v in f.items()})
        outs.append(got)
        np.testing.assert_array_equal(be.to_host(got["latents_next"]), ref(f)["latents_next"])
    assert len(static.slots) == 1
    # the slot's outputs are fixed buffers: what a call returns is overwritten by the next call at that shape
    assert outs[1]["latents_next"].data_ptr() == outs[2]["latents_next"].data_ptr()
    f2 = _feeds(rng, b=2)  # a second shape, beyond max_graphs=1: runs plainly, no new slot
    np.testing.assert_array_equal(be.to_host(engine(f2)["latents_next"]), ref(f2)["latents_next"])
    assert len(static.slots) == 1


def test_close_drops_sessions_and_bindings_and_refuses_further_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from sdrt.runtime.errors import InputError

    rng = np.random.default_rng(2)
    be = _bound_cpu(monkeypatch, cuda_graph=True)
    be.graph_engines = frozenset({"sampler_step"})
    engine: Any = be.load(step_graph_bytes(True, np.float32), "sampler_step")
    f = {k: be.to_device(v) for k, v in _feeds(rng).items()}
    engine(f)
    session, static = weakref.ref(engine.session), weakref.ref(engine._static)
    be.close()
    be.close()  # idempotent
    assert session() is None and static() is None  # nothing else held them: released now, not at a collection
    for use in (lambda: engine(f), lambda: be.load(step_graph_bytes(True, np.float32), "s"),
                lambda: be.to_device(np.zeros(2, np.float32))):
        with pytest.raises(InputError, match="closed; load it again"):
            use()


@pytest.mark.parametrize("cuda_graph,fused", [(False, None), (True, False), (True, None)])
def test_pipeline_over_ortvalues_gives_the_ort_cpu_images(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                          cuda_graph: bool, fused: bool | None) -> None:
    """The whole pipeline with every tensor an OrtValue (ort-cuda's code path, CPU memory): the same
    images as the numpy path, for a guided ancestral sampler at two sizes (two static-binding slots per
    engine, or, with cuda_graph's default composed step, two slots of the one UNet + step session)."""
    from sdrt.runtime.ort_loop import FusedStepLoop

    folder = tiny_export("sd15-tiny")
    ref = Pipeline.load(folder, backend="ort-cpu")

    def backend(*a: Any, **k: Any) -> OrtBackend:
        be = _bound_cpu(monkeypatch, cuda_graph=cuda_graph)
        be.fused_step = fused
        return be

    monkeypatch.setattr("sdrt.runtime.backends.make_backend", backend)
    pipe = Pipeline.load(folder, backend="ort-cuda")
    assert pipe.backend.io_binding and pipe.engines["unet"]._bound
    assert (pipe.engines["unet"]._static is not None) == cuda_graph
    for h, w in ((64, 64), (64, 96), (64, 64)):
        kw: dict[str, Any] = {"steps": 4, "sampler": "euler-a", "seed": 5, "height": h, "width": w,
                              "negative_prompt": "fog"}
        want, got = ref("a harbor", **kw), pipe("a harbor", **kw)
        np.testing.assert_array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
    loop = next(iter(pipe._loops.values()))
    if cuda_graph and fused is None:
        assert isinstance(loop, FusedStepLoop) and len(loop.slots) == 2
        # graph ids asked for, but the CPU EP captures no CUDA graph: the loop does not claim one
        assert got.loop == ("UNet + sampler step as one ONNX Runtime session, not captured (the session runs on "
                            "CPUExecutionProvider, which captures no CUDA graphs)")
    elif cuda_graph:
        assert len(pipe.engines["unet"]._static.slots) == 2
        assert "fused_step=False" in got.loop


def test_a_failed_run_under_a_graph_id_runs_that_shape_uncaptured(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """With cuda_graph and the composed loop off, the UNet runs over its own fixed buffers under a graph id.
    A run there that fails (as a failed capture does) is not fatal: that call and the later ones at that shape
    run uncaptured (graph id -1, ORT's own outputs), with ort-cpu's images, and Result.loop says why."""
    from sdrt.runtime.ort_backend import GRAPH_ID_KEY

    folder = tiny_export("sd15-tiny")

    def backend(*a: Any, **k: Any) -> OrtBackend:
        be = _bound_cpu(monkeypatch, cuda_graph=True)
        be.fused_step = False
        return be

    monkeypatch.setattr("sdrt.runtime.backends.make_backend", backend)
    kw: dict[str, Any] = {"steps": 3, "sampler": "dpmpp-2m", "seed": 4, "height": 64, "width": 64}
    with Pipeline.load(folder, backend="ort-cpu") as ref, Pipeline.load(folder, backend="ort-cuda") as pipe:
        want = np.asarray(ref("a harbor", **kw).images[0])
        unet = pipe.engines["unet"]
        real = unet.session.run_with_iobinding
        graph_runs: list[str] = []

        def run(binding: Any, options: Any = None) -> None:
            graph = options.get_run_config_entry(GRAPH_ID_KEY) if options is not None else "-1"
            if graph != "-1":
                graph_runs.append(graph)
                raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
            real(binding, options)

        monkeypatch.setattr(unet.session, "run_with_iobinding", run)
        for _ in range(2):
            got = pipe("a harbor", **kw)
            np.testing.assert_array_equal(np.asarray(got.images[0]), want)
        # step 1 makes the shape's buffers (uncaptured), step 2 runs under graph 0 and fails; none after that
        assert graph_runs == ["0"]
        assert got.loop == ("engines run directly (the composed UNet + step loop is off (fused_step=False)); runs "
                            "under a CUDA graph failed, those shapes run uncaptured (unet: RuntimeError: CUDA "
                            "failure 900: operation not permitted when stream is capturing)")


def test_an_onnxruntime_without_device_copies_says_so_once(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Before onnxruntime 1.26 OrtValue.update_inplace takes numpy only: the copies into the fixed buffers then go
    through the host. The images are the same; the log says so once, and Result.loop says so on every call.
    The cuda extra asks for the version that has the device copy."""
    import logging
    from pathlib import Path

    import tomllib

    from sdrt.runtime import ort_backend, ort_engine

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert f"onnxruntime-gpu>={ort_backend.DEVICE_COPY_SINCE}" in pyproject["project"]["optional-dependencies"]["cuda"]
    folder = tiny_export("sd15-tiny")
    kw: dict[str, Any] = {"steps": 3, "sampler": "euler-a", "seed": 4, "height": 64, "width": 64}
    monkeypatch.setattr("sdrt.runtime.backends.make_backend", lambda *a, **k: _bound_cpu(monkeypatch, cuda_graph=True))
    with Pipeline.load(folder, backend="ort-cpu") as ref, Pipeline.load(folder, backend="ort-cuda") as pipe:
        want = np.asarray(ref("a harbor", **kw).images[0])
        ok = pipe("a harbor", **kw)  # this onnxruntime copies on the device: nothing to say
        assert "through the host" not in ok.loop and ort_engine._host_copy_reason is None
        real = ort_module().OrtValue.update_inplace

        def numpy_only(self: Any, data: Any) -> None:  # onnxruntime 1.25's OrtValue.update_inplace
            if not isinstance(data, np.ndarray):
                raise TypeError("update_inplace(): incompatible function arguments")
            real(self, data)

        monkeypatch.setattr(ort_module().OrtValue, "update_inplace", numpy_only)
        monkeypatch.setattr(ort_engine, "_host_copy_reason", None)
        with caplog.at_level(logging.WARNING, logger="sdrt.runtime.ort_backend"):
            results = [pipe("a harbor", **kw) for _ in range(2)]
        for res in results:
            np.testing.assert_array_equal(np.asarray(res.images[0]), want)
            assert res.loop.endswith("; copies between OrtValues go through the host: onnxruntime "
                                     f"{ort_module().__version__}'s OrtValue.update_inplace takes no OrtValue (it does from "
                                     "1.26); pip install 'onnxruntime-gpu>=1.26'")
        said = [r for r in caplog.records if "through the host" in r.getMessage()]
        assert len(said) == 1
