"""ort-cuda's fused step loop (UNet + sampler step composed into one ORT session) run on the CPU EP.

The loop class is the one ort-cuda runs (``FusedStepLoop``, IO binding over fixed OrtValue buffers, the
double-buffered state), forced on over OrtValues in host memory with ``fused_step=True``; the reference
is the two separate graphs run step by step on ort-cpu's numpy path. Not checked here: the CUDA EP and
ORT's capture of the composed session (no GPU here).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.ort_backend import GRAPH_ID_KEY, OrtBackend
from sdrt.runtime.ort_compose import compose_step_model
from sdrt.runtime.ort_loop import FusedStepLoop, fused_step_reason, make_step_loop
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.step_graph import build_step_graph, step_graph_bytes
from sdrt.runtime.step_loop import PlainStepLoop

from .helpers.pipelines import ort_cuda_on_cpu


def _bound(monkeypatch: pytest.MonkeyPatch, *, cuda_graph: bool = False, fused: bool | None = True,
           max_graphs: int = 2) -> OrtBackend:
    """ort-cuda in all but the device: OrtValues and IO binding in CPU memory on the CPU EP."""
    be = ort_cuda_on_cpu(monkeypatch, cuda_graph=cuda_graph, max_cuda_graphs=max_graphs)
    be.fused_step = fused
    return be  # type: ignore[no-any-return]


def _inputs(unet: Any, guided: bool, b: int, hw: int, noise: bool, steps: int, rng: np.random.Generator,
            plan: Any) -> dict[str, Any]:
    rows = 2 * b if guided else b
    cond = {}
    for name, spec in unet.inputs.items():
        if name in ("sample", "timestep"):
            continue
        dims = [rows] + [d if isinstance(d, int) else 7 for d in spec.shape[1:]]
        cond[name] = rng.standard_normal(dims).astype(spec.dtype)
    x = rng.standard_normal((b, 4, hw, hw)).astype(np.float32)
    u = np.concatenate([x, x]) if guided else x
    return {"latents": x, "unet_in": (u * 0.5).astype(np.float32), "cond": cond,
            "timesteps": plan.timesteps[:steps], "coeffs": plan.table[:steps],
            "guidance": np.array(6.0, np.float32) if guided else None,
            "noise": rng.standard_normal((steps, b, 4, hw, hw)).astype(np.float32) if noise else None}


def _run(loop: Any, be: OrtBackend, inp: dict[str, Any], on_device: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    dev = (lambda a: be.to_device(a)) if on_device else (lambda a: a)
    loop.start(latents=dev(inp["latents"]), unet_in=dev(inp["unet_in"]),
               cond={k: dev(v) for k, v in inp["cond"].items()}, timesteps=inp["timesteps"], coeffs=inp["coeffs"],
               guidance=None if inp["guidance"] is None else dev(inp["guidance"]), noise=inp["noise"])
    states = []
    for i in range(len(inp["timesteps"])):
        loop.step(i)
        states.append((be.to_host(loop.latents).copy(), be.to_host(loop.x0).copy()))
    return states


@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "euler-a"])
def test_composed_step_gives_the_separate_graphs_latents(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                         preset: str, guided: bool, sampler: str) -> None:
    """Every step's latents and x0 (so the double-buffered state carried across steps, and the multistep
    history) are bit-identical to UNet then step graph run apart on ort-cpu, twice in a row (a second
    start() on the same buffers)."""
    folder = tiny_export(preset)
    ref = Pipeline.load(folder, backend="ort-cpu")
    be = _bound(monkeypatch)
    unet = be.load(str(folder / "unet" / "model.onnx"), "unet")
    step = be.load(step_graph_bytes(guided, np.float32), "sampler_step")
    loop = be.step_loop(unet, step)
    assert isinstance(loop, FusedStepLoop)
    plain = PlainStepLoop(ref.backend, ref.engines["unet"], ref.backend.load(step_graph_bytes(guided, np.float32), "s"))
    plan = ref.plan(sampler, 5)
    rng = np.random.default_rng(3)
    for _ in range(2):
        inp = _inputs(unet, guided, 1, 8, plan.needs_noise, 5, rng, plan)
        want, got = _run(plain, ref.backend, inp, False), _run(loop, be, inp, True)
        for (wx, w0), (gx, g0) in zip(want, got):
            np.testing.assert_array_equal(gx, wx)
            np.testing.assert_array_equal(g0, w0)
        assert not np.array_equal(want[0][0], want[-1][0])  # the steps did move the latents
    assert len(loop.slots) == 1
    assert loop.describe().startswith("UNet + sampler step as one ONNX Runtime session")


def test_composition_references_the_original_weights_and_writes_nothing(tiny_export) -> None:
    folder = tiny_export("sd15-tiny")
    unet_dir = folder / "unet"
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in unet_dir.iterdir())
    data = compose_step_model(str(unet_dir / "model.onnx"), str(unet_dir), build_step_graph(True, np.float32))
    weights = (unet_dir / "model.onnx_data").stat().st_size
    model = onnx.load_from_string(data)
    inline = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(i.raw_data) <= 1024 for i in inline)  # the export's own size threshold
    assert {e.value for i in external for e in i.external_data if e.key == "location"} == {"model.onnx_data"}
    assert len(data) < weights / 4  # the graph, not the weights (the tiny UNet's weights are ~9.7 MB)
    assert before == sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in unet_dir.iterdir())
    names = [i.name for i in model.graph.input]
    assert "unet/sample" in names and "step/latents" in names and "step/unet_out" not in names


def test_selection_which_loop_runs_and_why(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_export("sd15-tiny")
    unet_path, graph = str(folder / "unet" / "model.onnx"), step_graph_bytes(False, np.float32)

    def loop_for(be: OrtBackend) -> Any:
        return be.step_loop(be.load(unet_path, "unet"), be.load(graph, "sampler_step"))

    cpu = loop_for(OrtBackend("cpu"))  # ort-cpu: step by step, nothing declined
    assert isinstance(cpu, PlainStepLoop) and cpu.describe() == "engines run step by step"
    off = loop_for(_bound(monkeypatch, fused=None))  # ort-cuda, cuda_graph off
    assert isinstance(off, PlainStepLoop) and "CUDA graphs are off" in off.describe()
    disabled = loop_for(_bound(monkeypatch, cuda_graph=True, fused=False))
    assert isinstance(disabled, PlainStepLoop) and "fused_step=False" in disabled.describe()
    on = loop_for(_bound(monkeypatch, cuda_graph=True, fused=None))  # ort-cuda with cuda_graph: fused
    assert isinstance(on, FusedStepLoop)
    be = on.backend
    unet = on.unet
    inp = _inputs(unet, False, 1, 8, False, 2, np.random.default_rng(0), Pipeline.load(folder, backend="ort-cpu").plan("euler", 2))
    for _ in range(3):  # 3 runs per graph id: where ORT could capture, it would have by now
        _run(on, be, inp, True)
    # the CPU EP captures nothing, whatever the run options ask: the loop says so rather than "captured"
    assert not on.captured
    assert on.describe() == ("UNet + sampler step as one ONNX Runtime session, not captured (the session runs on "
                             "CPUExecutionProvider, which captures no CUDA graphs)")
    slot = next(iter(on.slots.values()))
    assert [o.get_run_config_entry(GRAPH_ID_KEY) for o in slot.run_options] == ["0", "1"]
    # a step graph without the input the composition joins: the plain loop, with the reason
    other = _bound(monkeypatch, cuda_graph=True, fused=None)
    u = other.load(unet_path, "unet")
    assert fused_step_reason(other, u, u) is not None and isinstance(make_step_loop(other, u, u), PlainStepLoop)


def test_composition_failure_falls_back_with_the_reason(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """A UNet graph whose weights file is not beside it: refused by the composition, the engines run."""
    import shutil

    folder = tiny_export("sd15-tiny")
    be = _bound(monkeypatch, cuda_graph=True, fused=None)
    unet = be.load(str(folder / "unet" / "model.onnx"), "unet")
    step = be.load(step_graph_bytes(False, np.float32), "sampler_step")
    unet.source = str(shutil.copy(folder / "unet" / "model.onnx", tmp_path / "model.onnx"))
    loop = be.step_loop(unet, step)
    assert isinstance(loop, PlainStepLoop)
    assert "could not run as one session" in loop.describe() and "model.onnx_data is missing" in loop.describe()


def test_shapes_beyond_max_cuda_graphs_run_engine_by_engine(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_export("sd15-tiny")
    ref = Pipeline.load(folder, backend="ort-cpu")
    be = _bound(monkeypatch, max_graphs=1)
    unet = be.load(str(folder / "unet" / "model.onnx"), "unet")
    loop = be.step_loop(unet, be.load(step_graph_bytes(True, np.float32), "sampler_step"))
    plain = PlainStepLoop(ref.backend, ref.engines["unet"], ref.backend.load(step_graph_bytes(True, np.float32), "s"))
    plan, rng = ref.plan("dpmpp-2m", 3), np.random.default_rng(1)
    for hw, fused in ((8, True), (12, False), (8, True)):
        inp = _inputs(unet, True, 1, hw, False, 3, rng, plan)
        got, want = _run(loop, be, inp, True), _run(plain, ref.backend, inp, False)
        np.testing.assert_array_equal(got[-1][0], want[-1][0])
        assert ("max_cuda_graphs=1" in loop.describe()) != fused
    assert len(loop.slots) == 1


def test_close_drops_the_composed_session(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_export("sd15-tiny")
    monkeypatch.setattr("sdrt.runtime.backends.make_backend", lambda *a, **k: _bound(monkeypatch))
    pipe = Pipeline.load(folder, backend="ort-cuda")
    res = pipe("a harbor", steps=2, sampler="euler-a", seed=1, height=64, width=64)
    assert res.loop.startswith("UNet + sampler step as one ONNX Runtime session")
    loop = next(iter(pipe._loops.values()))
    assert isinstance(loop, FusedStepLoop)
    session = weakref.ref(loop.fused.session)
    tmp_before = set(os.listdir(folder))
    pipe.close()
    assert session() is None and loop.fused.closed
    assert set(os.listdir(folder)) == tmp_before
    with pytest.raises(InputError, match="closed"):
        loop.start(latents=np.zeros((1, 4, 8, 8), np.float32), unet_in=np.zeros((1, 4, 8, 8), np.float32),
                   cond={}, timesteps=[1.0], coeffs=np.zeros((1, 8), np.float32))


def test_controlnets_run_engine_by_engine_with_the_images_of_ort_cpu(tiny_controlnet_export,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The composition covers UNet + step only: a call with control images runs the plain loop (saying why),
    and a call without them on the same pipeline still runs fused."""
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    control = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kw: dict[str, Any] = {"steps": 3, "sampler": "dpmpp-2m", "seed": 2, "height": 64, "width": 64}
    with Pipeline.load(folder, backend="ort-cpu") as ref:
        want = np.asarray(ref("a harbor", control_images=[control, None], **kw).images[0])
        want_plain = np.asarray(ref("a harbor", **kw).images[0])
    monkeypatch.setattr("sdrt.runtime.backends.make_backend", lambda *a, **k: _bound(monkeypatch))
    with Pipeline.load(folder, backend="ort-cuda") as pipe:
        res = pipe("a harbor", control_images=[control, None], **kw)
        assert "not ControlNets" in res.loop
        np.testing.assert_array_equal(np.asarray(res.images[0]), want)
        assert "unet" not in pipe.engines  # loaded by the first call without control images
        plain = pipe("a harbor", **kw)
        assert plain.loop.startswith("UNet + sampler step as one ONNX Runtime session")
        np.testing.assert_array_equal(np.asarray(plain.images[0]), want_plain)


def test_composed_sessions_are_bounded(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each composed session holds a copy of the UNet's weights: beyond max_composed_sessions a step-graph
    variant runs the plain loop, saying why, with the same latents; closing a composed loop makes room."""
    folder = tiny_export("sd15-tiny")
    be = _bound(monkeypatch)
    be.max_composed_sessions = 1
    unet = be.load(str(folder / "unet" / "model.onnx"), "unet")
    guided_step = be.load(step_graph_bytes(True, np.float32), "sampler_step_cfg")
    plain_step = be.load(step_graph_bytes(False, np.float32), "sampler_step")
    first = be.step_loop(unet, guided_step)
    second = be.step_loop(unet, plain_step)
    assert isinstance(first, FusedStepLoop) and isinstance(second, PlainStepLoop)
    assert "max_composed_sessions=1" in second.describe()
    ref = Pipeline.load(folder, backend="ort-cpu")
    plan, rng = ref.plan("euler", 2), np.random.default_rng(3)
    inp = _inputs(unet, False, 1, 8, False, 2, rng, plan)
    want = _run(PlainStepLoop(ref.backend, ref.engines["unet"], ref.backend.load(step_graph_bytes(False, np.float32),
                                                                                   "s")), ref.backend, inp, False)
    np.testing.assert_array_equal(_run(second, be, inp, True)[-1][0], want[-1][0])
    first.close()
    third = be.step_loop(unet, plain_step)
    assert isinstance(third, FusedStepLoop)
    np.testing.assert_array_equal(_run(third, be, inp, True)[-1][0], want[-1][0])
    with pytest.raises(InputError, match="max_composed_sessions must be 0 or more"):
        OrtBackend("cpu", max_composed_sessions=-1)


def _failing_runs(monkeypatch: pytest.MonkeyPatch, session: Any, fail_at: set[int]) -> list[int]:
    """Make ``session.run_with_iobinding`` raise, as a failed CUDA graph capture does, on the given runs
    (counted from 0); returns the list of runs it was asked for."""
    runs: list[int] = []
    real = session.run_with_iobinding

    def run(binding: Any, options: Any = None) -> None:
        runs.append(len(runs))
        if runs[-1] in fail_at:
            raise RuntimeError("CUDA failure 901: operation failed due to a previous error during capture")
        real(binding, options)

    monkeypatch.setattr(session, "run_with_iobinding", run)
    return runs


@pytest.mark.parametrize("sampler,fail_step", [("dpmpp-2m", 2), ("euler-a", 0)])
def test_a_failed_composed_run_falls_back_to_the_engines(tiny_export, monkeypatch: pytest.MonkeyPatch,
                                                         sampler: str, fail_step: int) -> None:
    """The composed session's run fails mid-call (or on its very first run at a shape): the call goes on with
    the engines one by one from the state that run read and gives ort-cpu's images; later calls at that
    shape run the engines from the start, a new shape runs composed again, and Result.loop says why."""
    folder = tiny_export("sd15-tiny")
    monkeypatch.setattr("sdrt.runtime.backends.make_backend",
                        lambda *a, **k: _bound(monkeypatch, cuda_graph=True, fused=None))
    kw: dict[str, Any] = {"steps": 4, "sampler": sampler, "seed": 3, "negative_prompt": "fog"}
    with Pipeline.load(folder, backend="ort-cpu") as ref, Pipeline.load(folder, backend="ort-cuda") as pipe:
        want = {hw: np.asarray(ref("a harbor", height=hw[0], width=hw[1], **kw).images[0])
                for hw in ((64, 64), (64, 96))}
        small = {"height": 64, "width": 64}
        if fail_step:  # a first call that works: the failure comes on a shape that ran composed before
            assert pipe("a harbor", **small, **kw).loop.startswith("UNet + sampler step as one ONNX Runtime session")
        loop = pipe._loop(True, pipe.dtype)  # the guided loop the calls run (made here when not yet made)
        assert isinstance(loop, FusedStepLoop)
        runs = _failing_runs(monkeypatch, loop.fused.session, {fail_step})
        got = pipe("a harbor", **small, **kw)
        np.testing.assert_array_equal(np.asarray(got.images[0]), want[64, 64])
        assert len(runs) == fail_step + 1  # the composed runs up to and with the failed one, then none
        assert got.loop.startswith(f"engines run directly (the composed UNet + step session failed at step "
                                   f"{fail_step + 1} (RuntimeError: CUDA failure 901")
        assert "this shape runs the engines one after the other" in got.loop and not loop.captured
        again = pipe("a harbor", **small, **kw)  # the same shape: the engines from the start
        np.testing.assert_array_equal(np.asarray(again.images[0]), want[64, 64])
        assert len(runs) == fail_step + 1 and "failed at this shape (RuntimeError: CUDA failure 901" in again.loop
        other = pipe("a harbor", height=64, width=96, **kw)  # another shape: composed again
        np.testing.assert_array_equal(np.asarray(other.images[0]), want[64, 96])
        assert len(runs) == fail_step + 1 + 4
        assert other.loop.startswith("UNet + sampler step as one ONNX Runtime session")


def test_captured_only_after_runs_under_the_graphs_succeed(tiny_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the session could capture (its EP taken as the CUDA EP's with CUDA graphs), ``captured`` comes from
    runs that succeeded, not from the flag: not after one call of 2 steps (one run per graph id), only after
    CAPTURE_RUNS runs of each graph id; a shape whose run then fails is no longer reported captured."""
    from sdrt.runtime.ort_loop import CAPTURE_RUNS

    monkeypatch.setattr(FusedStepLoop, "_graph_reason", lambda self: "")
    folder = tiny_export("sd15-tiny")
    be = _bound(monkeypatch, cuda_graph=True, fused=None)
    unet = be.load(str(folder / "unet" / "model.onnx"), "unet")
    loop = be.step_loop(unet, be.load(step_graph_bytes(False, np.float32), "sampler_step"))
    assert isinstance(loop, FusedStepLoop) and not loop.captured
    plan = Pipeline.load(folder, backend="ort-cpu").plan("euler", 2)
    inp = _inputs(unet, False, 1, 8, False, 2, np.random.default_rng(0), plan)
    for call in range(1, CAPTURE_RUNS + 1):
        _run(loop, be, inp, True)
        assert loop.captured == (call == CAPTURE_RUNS == 3), call  # 2 steps a call: one run per graph id
        if not loop.captured:
            assert loop.describe() == ("UNet + sampler step as one ONNX Runtime session, not captured (CUDA graphs "
                                       "requested: ONNX Runtime captures each after one or two uncaptured runs at a "
                                       f"shape, and this shape's have run {call} of the 3 times that make sure)")
    assert loop.describe() == "captured CUDA graphs: UNet + sampler step as one ONNX Runtime session"
    _failing_runs(monkeypatch, loop.fused.session, {1})
    _run(loop, be, inp, True)
    assert not loop.captured and "failed at step 2" in loop.describe()


def test_deepcache_runs_engine_by_engine_and_uncached_calls_stay_fused(deepcache_export,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """ort-cuda's code path on a ``--deepcache`` export: a cached call runs the engines one by one (saying why)
    with ort-cpu's images; an uncached call composes the UNet (with its extra deep-feature output) and the step
    graph as usual, with ort-cpu's uncached images."""
    folder = deepcache_export("sd15-tiny")
    kw: dict[str, Any] = {"steps": 5, "sampler": "dpmpp-2m", "seed": 2, "height": 64, "width": 64}
    cached = {"cache": "deepcache", "cache_interval": 2}
    with Pipeline.load(folder, backend="ort-cpu") as ref:
        want_cached = np.asarray(ref("a harbor", **kw, **cached).images[0])
        want = np.asarray(ref("a harbor", **kw).images[0])
    monkeypatch.setattr("sdrt.runtime.backends.make_backend", lambda *a, **k: _bound(monkeypatch))
    with Pipeline.load(folder, backend="ort-cuda") as pipe:
        res = pipe("a harbor", **kw, **cached)
        assert "not a feature cache's cheap steps" in res.loop and "3 of 5 steps ran the full UNet" in res.loop
        np.testing.assert_array_equal(np.asarray(res.images[0]), want_cached)
        plain = pipe("a harbor", **kw)
        assert plain.loop.startswith("UNet + sampler step as one ONNX Runtime session")
        np.testing.assert_array_equal(np.asarray(plain.images[0]), want)
