"""The TensorRT path end to end on fakes: ``build_engines`` -> engine folder -> ``Pipeline`` -> images.

The fakes of tests/helpers/trt_fakes.py (cuda-python over host memory, TensorRT "engines" that are ONNX
graphs run by onnxruntime), with just enough builder for ``build_engines``. Passing says sdrt's own
logic holds together across the build, the engine folder, the manifest checks, the pipeline's captured
denoising loop (StepLoop) and the decode: the images equal the ort-cpu pipeline's on the same export.
It says nothing about real TensorRT or a GPU (tests marked so in test_trt_backend.py / test_trt_build.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdrt.runtime.trt_backend as tb
from sdrt.export import trt_build
from sdrt.export.profiles import custom_profile
from sdrt.export.trt_build import BuildOptions, build_engines
from sdrt.runtime.engine_manifest import EngineManifest
from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.text_join import join_variant

from .helpers.trt_fakes import FakeTrt


@pytest.mark.parametrize("preset, sampler", [("sd15-tiny", "dpmpp-2m"), ("sd15-tiny", "euler-a"),
                                             ("sdxl-tiny", "ddim")])
def test_built_engines_drive_the_pipeline_like_ort_cpu(tiny_export, tmp_path: Path, fake_gpu, preset, sampler):
    """Logic check on fakes: export -> build_engines -> Pipeline(tensorrt) gives the ort-cpu images, with the
    denoising loop captured (two CUDA graphs, one launch per step) and the engine manifest honoured."""
    cudart, trt = fake_gpu
    src = tiny_export(preset)
    out = tmp_path / "engines"
    messages: list[str] = []
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                             BuildOptions(workspace_gb=1), progress=messages.append)
    assert {r.component for r in manifest.engines} == set(
        ["text_encoder", "unet", "vae_decoder", "vae_encoder", "sampler_step_cfg", "sampler_step",
         "sampler_step_cfg_blend", "sampler_step_blend", "sampler_step_cfg_rescale", "sampler_input_cfg",
         "sampler_input", "image_noise_float32_to_float32"]
        + (["text_encoder_2", "text_join_fp32_fp32_pooled_fp32_to_fp32"] if preset == "sdxl-tiny" else []))
    built = len(trt.built)
    assert trt.build_calls["monitors"] == len(manifest.engines)
    assert any("Building engine" in m for m in messages)

    ref_pipe = Pipeline.load(src, backend="ort-cpu")
    pipe = Pipeline.load(out, backend="tensorrt")
    assert isinstance(pipe.backend, tb.TrtBackend)
    kw: dict[str, Any] = {"negative_prompt": "blurry", "steps": 5, "sampler": sampler, "seed": 3,
                          "height": 64, "width": 96}
    want = ref_pipe("a red fox", **kw)
    got = pipe("a red fox", **kw)
    assert got.loop == "captured CUDA graphs" and cudart.captures == 2 and cudart.launches == 5
    assert len(trt.built) == built  # the step graph came prebuilt from the folder
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.shape == b.shape == (64, 96, 3)
    assert np.abs(a - b).max() <= 1, "the fake engines run the same ONNX graphs as ort-cpu"
    assert a.std() > 1  # a real picture, not a constant

    # same shapes again: the captured graphs are replayed, not captured anew; a batch of 2 recaptures
    again = pipe("a red fox", **kw)
    assert cudart.captures == 2 and np.array_equal(np.asarray(again.images[0]), np.asarray(got.images[0]))
    two = pipe("a red fox", batch_size=2, **kw)
    assert cudart.captures == 4 and len(two.images) == 2
    # outside the engines' profile: refused with the range, and the pipeline stays usable
    with pytest.raises(InputError, match="height"):
        pipe("a red fox", **{**kw, "height": 128})
    assert np.array_equal(np.asarray(pipe("a red fox", **kw).images[0]), np.asarray(got.images[0]))
    # guidance rescale: its prebuilt step graph variant, captured like the plain one, as ort-cpu
    want_r = ref_pipe("a red fox", guidance_rescale=0.7, **kw)
    got_r = pipe("a red fox", guidance_rescale=0.7, **kw)
    assert len(trt.built) == built and got_r.loop == "captured CUDA graphs"
    r_a, r_b = np.asarray(want_r.images[0], np.int16), np.asarray(got_r.images[0], np.int16)
    assert np.abs(r_a - r_b).max() <= 1 and np.abs(r_a - a).max() > 1


@pytest.mark.usefixtures("fake_gpu")
def test_without_capture_the_pipeline_runs_the_engines_directly(tiny_export, tmp_path: Path):
    src = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    build_engines(src, out, custom_profile(height=64), BuildOptions())
    kw: dict[str, Any] = {"steps": 3, "seed": 1, "height": 64, "width": 64}
    graphed = Pipeline.load(out, backend="tensorrt")("a cat", **kw)
    direct = Pipeline.load(out, backend="tensorrt", cuda_graph=False)("a cat", **kw)
    assert direct.loop.startswith("engines run directly (CUDA graphs are off")
    assert np.array_equal(np.asarray(direct.images[0]), np.asarray(graphed.images[0]))


def test_the_lean_runtime_runs_the_whole_loop_from_prebuilt_step_graphs(tiny_export, tmp_path: Path, fake_gpu,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """Logic check on fakes: ``sdrt build`` prebuilds the sampler step graphs, so a runtime without a
    builder (the lean runtime) runs the pipeline, and no step graph is built at run time."""
    cudart, trt = fake_gpu
    src = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height=64), BuildOptions(version_compatible=True))
    assert [r.component for r in manifest.engines][-8:] == ["sampler_step_cfg", "sampler_step",
                                                            "sampler_step_cfg_blend", "sampler_step_blend",
                                                            "sampler_step_cfg_rescale", "sampler_input_cfg",
                                                            "sampler_input", "image_noise_float32_to_float32"]
    built = len(trt.built)
    lean = FakeTrt(cudart, name="tensorrt_lean_bindings", lean=True)
    monkeypatch.setattr(tb, "import_tensorrt", lambda names: lean)
    pipe = Pipeline.load(out, backend="tensorrt")
    assert pipe.backend.lean and not hasattr(lean, "Builder")
    kw: dict[str, Any] = {"steps": 3, "seed": 2, "height": 64, "width": 64}
    # unguided at 1 image: 1 row, outside the CFG engines' 2..4; refused up front, the pipeline stays usable
    with pytest.raises(InputError, match="built for classifier-free guidance"):
        pipe("a boat", guidance_scale=1.0, **kw)
    # unguided: 2 images, so the text encoder's rows stay inside the CFG profile's 2..4
    guided, unguided = pipe("a boat", **kw), pipe("a boat", guidance_scale=1.0, batch_size=2, **kw)
    assert guided.loop == unguided.loop == "captured CUDA graphs" and len(trt.built) == built
    ref = Pipeline.load(src, backend="ort-cpu")
    for got, scale, n in ((guided, 7.5, 1), (unguided, 1.0, 2)):
        want = ref("a boat", guidance_scale=scale, batch_size=n, **kw)
        for w, g in zip(want.images, got.images, strict=True):
            assert np.abs(np.asarray(w, np.int16) - np.asarray(g, np.int16)).max() <= 1


def test_host_device_copies_per_call(tiny_export, tmp_path: Path, fake_gpu) -> None:
    """Counted on the fakes: an SD1.5 call copies to the host only the decoded pixels and their finite
    flags (the prompt's embeddings go from the text encoder to the UNet on the device), and what it
    uploads does not grow with the number of steps (every per-step input goes up before the loop, as one
    table)."""
    cudart, _ = fake_gpu
    out = tmp_path / "engines"
    build_engines(tiny_export("sd15-tiny"), out, custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64"),
                  BuildOptions(workspace_gb=1))
    with Pipeline.load(out, backend="tensorrt") as pipe:
        counts, syncs = {}, {}
        for steps in (3, 6):
            pipe("a red fox", steps=steps, seed=1, sampler="euler-a", height=64, width=64)  # warm: captured
            before, s0 = dict(cudart.copies), cudart.syncs
            res = pipe("a red fox", steps=steps, seed=1, sampler="euler-a", height=64, width=64)
            counts[steps] = {k: cudart.copies[k] - before[k] for k in before}
            syncs[steps] = cudart.syncs - s0
            assert res.timings["clock"] == "device" and len(res.timings["unet_steps_ms"]) == steps
    assert counts[3][2] == counts[6][2] == 2, counts  # device -> host: images and finite, nothing else
    assert counts[3][1] == counts[6][1], counts  # host -> device: the same whatever the step count
    assert syncs[3] == syncs[6], syncs  # device-event timing: no host wait per step
    assert cudart.alive()["allocations"] == 0  # closed: every buffer released


def test_the_first_unet_input_is_made_on_the_device(tiny_export, tmp_path: Path, fake_gpu, monkeypatch) -> None:
    """Counted on the fakes: the first-input graph turns the upload of the first UNet input (a latent-sized
    tensor per UNet row) into one of its 4-byte scale: of a call's uploads, only the starting latents are one
    image's latents or larger; the images are ort-cpu's."""
    cudart, _ = fake_gpu
    src = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    m = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64"),
                      BuildOptions(workspace_gb=1))
    assert {"sampler_input", "sampler_input_cfg"} <= {r.component for r in m.engines}
    uploads: list[int] = []
    copy = cudart.cudaMemcpyAsync

    def record(dst: Any, src: Any, n: int, kind: int, stream: Any) -> Any:
        if kind == 1:
            uploads.append(int(n))
        return copy(dst, src, n, kind, stream)

    monkeypatch.setattr(cudart, "cudaMemcpyAsync", record)
    latent = 4 * 8 * 8 * 4  # one image's latents, [4, 8, 8] float32 (the tiny fp32 export at 64 px)
    ref = Pipeline.load(src, backend="ort-cpu")
    with Pipeline.load(out, backend="tensorrt") as pipe:
        for guidance in (7.5, 1.0):  # 2 UNet rows each: the engines are built for CFG (2..4 rows)
            b = 1 if guidance > 1 else 2
            kw: dict[str, Any] = {"steps": 3, "seed": 1, "height": 64, "width": 64, "guidance_scale": guidance,
                                  "batch_size": b}
            pipe("a red fox", **kw)  # warm: captured
            uploads.clear()
            got = np.asarray(pipe("a red fox", **kw).images[0], np.int16)
            # the starting latents, and not the first UNet input (2 rows x latent) beside them
            assert [n for n in uploads if n >= latent] == [b * latent], uploads
            assert uploads.count(4) == (2 if guidance > 1 else 1), uploads  # its scale (and the guidance scale)
            want = np.asarray(ref("a red fox", **kw).images[0], np.int16)
            assert np.abs(got - want).max() <= 1


def test_an_engine_folder_built_by_an_older_sdrt_is_refused_then_rebuilt(tiny_export, tmp_path: Path, fake_gpu,
                                                                           monkeypatch) -> None:
    """A folder built by an older sdrt (engine manifest schema 1, without the small device graphs) is refused
    when loaded, before any engine is deserialized, naming the folder and the command that rebuilds it; that
    command builds only the small graphs (the engines are reused) and the folder then runs like ort-cpu."""
    from sdrt.runtime.errors import CompatibilityError

    cudart, trt = fake_gpu
    src = tiny_export("sdxl-tiny", "fp16")
    out = tmp_path / "engines"
    prof, opts = custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64"), BuildOptions(workspace_gb=1)
    with monkeypatch.context() as m:  # what an older sdrt built: no first-input, noising, cast or join graphs
        m.setattr(trt_build, "input_graph_plans", lambda *a: [])
        m.setattr(trt_build, "text_join_plans", lambda *a: [])
        old = build_engines(src, out, prof, opts)
    dataclasses.replace(old, schema=1).write(out)
    built, allocations = len(trt.built), cudart.mallocs
    with pytest.raises(CompatibilityError) as e:
        Pipeline.load(out, backend="tensorrt")
    msg = str(e.value)
    assert str(out) in msg and "built by an older sdrt" in msg and "device-side graphs" in msg
    assert f"sdrt build {src} --out {out}" in msg and old.build_command in msg
    assert cudart.mallocs == allocations  # refused before anything reached the device
    new = build_engines(src, out, prof, opts)  # the command the message names
    small = [r.component for r in new.engines if r.component not in {o.component for o in old.engines}]
    assert len(trt.built) - built == len(small) > 0 and "latents_float16_to_float32" in small
    assert any(c.startswith("text_join") for c in small) and new.schema == 2
    assert all(r in new.engines for r in old.engines)  # the engines themselves reused, records unchanged
    kw: dict[str, Any] = {"steps": 3, "seed": 1, "height": 64, "width": 64}
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = np.asarray(pipe("a red fox", **kw).images[0], np.int16)
    want = np.asarray(Pipeline.load(src, backend="ort-cpu")("a red fox", **kw).images[0], np.int16)
    assert np.abs(got - want).max() <= 1


def test_img2img_noises_the_encoded_image_on_the_device(tiny_export, tmp_path: Path, fake_gpu) -> None:
    """Counted on the fakes: img2img's encoded image is noised to the first step by the noising graph, so
    the call copies to the host only the images and their finite flags; the images are ort-cpu's."""
    from .helpers.inputs import image_and_mask

    cudart, _ = fake_gpu
    src = tiny_export("sd15-tiny")
    out = tmp_path / "engines"
    m = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64"),
                      BuildOptions(workspace_gb=1))
    assert "image_noise_float32_to_float32" in {r.component for r in m.engines}
    image, _ = image_and_mask(64, 64)
    kw: dict[str, Any] = {"steps": 4, "seed": 2, "sampler": "euler-a", "image": image, "strength": 0.7,
                          "batch_size": 2}
    with Pipeline.load(out, backend="tensorrt") as pipe:
        pipe("a red fox", **kw)  # warm: captured
        before = cudart.copies[2]
        res = pipe("a red fox", **kw)
        down, images = cudart.copies[2] - before, [np.asarray(i, np.int16) for i in res.images]
    assert down == 2, down
    ref = Pipeline.load(src, backend="ort-cpu")("a red fox", **kw).images
    for got, want in zip(images, ref, strict=True):
        assert np.abs(got - np.asarray(want, np.int16)).max() <= 1


def test_stages_hand_latents_over_on_the_device(tiny_export, tmp_path: Path, fake_gpu) -> None:
    """Counted on the fakes: denoise() in two windows, the second from the first's latents, copies nothing
    to the host (its latents are cloned on the device, the next window's first input made there), and
    decodes to the one-call image."""
    cudart, _ = fake_gpu
    out = tmp_path / "engines"
    build_engines(tiny_export("sd15-tiny"), out, custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64"),
                  BuildOptions(workspace_gb=1))
    with Pipeline.load(out, backend="tensorrt") as pipe:
        whole = np.asarray(pipe("a red fox", steps=4, seed=1, sampler="euler", height=64, width=64).images[0],
                           np.int16)
        plan = pipe.plan("euler", 4)
        emb = pipe.encode_prompt("a red fox")
        lat = pipe.prepare_latents(plan, 64, 64, seed=1)
        pipe.denoise(emb, lat, plan, end=0.5)  # warm: captured at this shape
        d2h = cudart.copies[2]
        mid = pipe.denoise(emb, lat, plan, end=0.5)
        done = pipe.denoise(emb, mid, plan)
        assert cudart.copies[2] == d2h and mid.step == 2 and done.step == 4
        images, _ = pipe.decode(done)
    assert np.abs(np.asarray(images[0], np.int16) - whole).max() <= 1
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sdxl_joins_its_embeddings_on_the_device(tiny_export, tmp_path: Path, fake_gpu, precision: str) -> None:
    """Counted on the fakes: SDXL's two encoders, pooled output and zeroed negatives are joined by the
    prebuilt join graph (and in fp16 the latents cast on the device for the fp32 VAE), so a call copies to
    the host only the images and their finite flags, whatever the step count; the image is ort-cpu's. A
    folder whose manifest lacks the join graph is an error naming it (no host join)."""
    cudart, trt = fake_gpu
    src, out = tiny_export("sdxl-tiny", precision), tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64"),
                             BuildOptions(workspace_gb=1))
    join = join_variant(ExportManifest.read(src)).name
    assert join in {r.component for r in manifest.engines} and (out / f"{join}.engine").is_file()
    assert ("latents_float16_to_float32" in {r.component for r in manifest.engines}) == (precision == "fp16")
    built = len(trt.built)
    kw: dict[str, Any] = {"seed": 1, "sampler": "euler-a", "height": 64, "width": 64}

    def copies(pipe: Pipeline, steps: int) -> tuple[dict[int, int], np.ndarray]:
        pipe("a red fox", steps=steps, **kw)  # warm: captured
        before = dict(cudart.copies)
        res = pipe("a red fox", steps=steps, **kw)
        return {k: cudart.copies[k] - before[k] for k in before}, np.asarray(res.images[0])

    with Pipeline.load(out, backend="tensorrt") as pipe:
        (c3, _), (c6, want) = copies(pipe, 3), copies(pipe, 6)
    assert len(trt.built) == built  # the join graph came prebuilt
    assert c3[2] == c6[2] == 2, (c3, c6)  # device -> host: images and finite, nothing else
    assert c3[1] == c6[1], (c3, c6)
    ref = Pipeline.load(src, backend="ort-cpu")("a red fox", steps=6, **kw).images[0]
    assert np.abs(np.asarray(want, np.int16) - np.asarray(ref, np.int16)).max() <= 1
    full = EngineManifest.read(out)
    dataclasses.replace(full, engines=tuple(r for r in full.engines if r.component != join)).write(out)
    (out / f"{join}.engine").unlink()
    with Pipeline.load(out, backend="tensorrt") as pipe, pytest.raises(
            ArtifactError, match=f"prompt embeddings are joined on the device by the graph {join}.*rebuild"):
        pipe("a red fox", steps=3, **kw)


def test_pipelines_loaded_and_closed_ten_times_leave_nothing_on_the_device(tiny_export, tmp_path: Path,
                                                                            fake_gpu) -> None:
    """close() releases every engine, buffer, stream, event and captured graph of a pipeline; the next
    load starts from an empty device, so ten load/close cycles do not grow; a dropped pipeline (no close)
    frees its device memory without the garbage collector (no reference cycles)."""
    import gc

    cudart, _ = fake_gpu
    out = tmp_path / "engines"
    build_engines(tiny_export("sd15-tiny"), out, custom_profile(batch="1:1:1", height="64:64:64", width="64:64:64"),
                  BuildOptions(workspace_gb=1))
    peaks = []
    for _ in range(10):
        pipe = Pipeline.load(out, backend="tensorrt")
        pipe("a red fox", steps=2, seed=1, height=64, width=64)
        peaks.append(cudart.alive())
        pipe.close()
        assert cudart.alive() == {"allocations": 0, "streams": 0, "graphs": 0, "events": 0}
        with pytest.raises(InputError, match="closed"):
            pipe("a red fox", steps=2, seed=1, height=64, width=64)
    assert all(p == peaks[0] for p in peaks) and peaks[0]["allocations"] > 0
    gc.disable()
    try:
        pipe = Pipeline.load(out, backend="tensorrt")
        pipe("a red fox", steps=2, seed=1, height=64, width=64)
        del pipe
        assert cudart.alive()["allocations"] == 0
    finally:
        gc.enable()


def test_a_pipeline_on_gpu_1_runs_there_from_any_thread(tiny_export, tmp_path: Path, fake_gpu,
                                                         monkeypatch) -> None:
    """Pipeline.load(device_id=1): a call from a thread that never selected a device allocates, copies and
    launches with GPU 1 current in that thread, and close() from a third one frees there (the fake records
    the calling thread's device per operation)."""
    import threading

    cudart, _ = fake_gpu
    cudart.gpus = 2
    out = tmp_path / "engines"
    build_engines(tiny_export("sd15-tiny"), out, custom_profile(batch="1:1:1", height="64:64:64", width="64:64:64"),
                  BuildOptions(workspace_gb=1))
    seen: list[tuple[int, int | None]] = []
    for op in ("cudaMallocAsync", "cudaMemcpyAsync", "cudaGraphLaunch", "cudaFreeAsync"):
        real = getattr(cudart, op)

        def record(*a: Any, _real: Any = real) -> Any:
            seen.append((threading.get_ident(), cudart.current.get(threading.get_ident())))
            return _real(*a)

        monkeypatch.setattr(cudart, op, record)
    pipe = Pipeline.load(out, backend="tensorrt", device_id=1)
    pipe("a red fox", steps=2, seed=1, height=64, width=64)  # warm: captured on this thread
    worker: dict[str, Any] = {}

    def call() -> None:
        worker["id"] = threading.get_ident()
        worker["images"] = pipe("a red fox", steps=2, seed=1, height=64, width=64).images

    def close() -> None:
        worker["closer"] = threading.get_ident()
        pipe.close()

    for target in (call, close):
        th = threading.Thread(target=target)
        th.start()
        th.join()
    ops = [dev for tid, dev in seen if tid == worker["id"]]
    assert len(worker["images"]) == 1 and len(ops) > 3 and set(ops) == {1}, ops
    frees = [dev for tid, dev in seen if tid == worker["closer"]]
    assert frees and set(frees) == {1} and cudart.alive()["allocations"] == 0, frees


def test_a_call_that_fails_midway_leaves_no_clock_events_behind(tiny_export, tmp_path: Path, fake_gpu) -> None:
    """The call's device clock (CUDA events) is released when the call raises, not only when it returns (nor
    only once the garbage collector drops the failed call's frame)."""
    cudart, _ = fake_gpu
    out = tmp_path / "engines"
    build_engines(tiny_export("sd15-tiny"), out, custom_profile(batch="1:1:1", height="64:64:64", width="64:64:64"),
                  BuildOptions(workspace_gb=1))
    kw: dict[str, Any] = {"steps": 3, "seed": 1, "height": 64, "width": 64}

    def stop(i: int, n: int) -> None:
        if i == 2:
            raise KeyboardInterrupt

    with Pipeline.load(out, backend="tensorrt") as pipe:
        pipe("a red fox", **kw)
        idle = cudart.alive()["events"]
        with pytest.raises(KeyboardInterrupt) as info:  # its traceback keeps the call's frame alive
            pipe("a red fox", callback=stop, **kw)
        assert info.traceback and cudart.alive()["events"] == idle
        assert len(pipe("a red fox", **kw).images) == 1


def test_pipelines_sharing_a_device_take_turns(tiny_export, tmp_path: Path, fake_gpu) -> None:
    """Two pipelines on one device stream (share_with) never interleave their calls: a call of the second,
    from another thread, waits until the first's call is over (else its work would land inside the first's
    captured graph and clock)."""
    import threading
    import time

    out = tmp_path / "engines"
    build_engines(tiny_export("sd15-tiny"), out, custom_profile(batch="1:1:1", height="64:64:64", width="64:64:64"),
                  BuildOptions(workspace_gb=1))
    kw: dict[str, Any] = {"steps": 3, "seed": 1, "height": 64, "width": 64}
    order: list[str] = []
    inside = threading.Event()

    def first_steps(i: int, n: int) -> None:
        order.append(f"a{i}")
        if i == 1:
            inside.set()
            time.sleep(0.5)  # the other thread's call, were it not waiting, would run its steps now

    with Pipeline.load(out, backend="tensorrt") as a, Pipeline.load(out, backend="tensorrt", share_with=a) as b:
        th = threading.Thread(target=lambda: a("a red fox", callback=first_steps, **kw))
        th.start()
        inside.wait(10)
        b("a red fox", callback=lambda i, n: order.append(f"b{i}"), **kw)
        th.join()
    assert order == ["a1", "a2", "a3", "b1", "b2", "b3"], order


@pytest.mark.parametrize("preset", ["sd15-inpaint-tiny", "sd15-tiny"])
def test_inpainting_on_built_engines_like_ort_cpu(tiny_export, tmp_path: Path, fake_gpu, preset: str) -> None:
    """Logic check on fakes: a 9-channel UNet (concat step graph, masked-image encoder) and a 4-channel one
    (blend step graph) inpaint on tensorrt as on ort-cpu, captured, with only prebuilt step graphs."""
    from .helpers.inputs import image_and_mask

    _, trt = fake_gpu
    src = tiny_export(preset)
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                             BuildOptions())
    steps = {r.component for r in manifest.engines if r.component.startswith("sampler_step")}
    nine = preset == "sd15-inpaint-tiny"
    assert steps == ({"sampler_step_cfg_concat", "sampler_step_concat"} if nine else
                     {"sampler_step_cfg", "sampler_step", "sampler_step_cfg_blend", "sampler_step_blend",
                      "sampler_step_cfg_rescale"})
    assert ("vae_encoder_masked" in {r.component for r in manifest.engines}) == nine
    built = len(trt.built)
    image, mask = image_and_mask(96, 64)
    kw: dict[str, Any] = {"steps": 4, "sampler": "dpmpp-2m", "seed": 3, "image": image, "mask_image": mask,
                          "strength": 0.9}
    want = Pipeline.load(src, backend="ort-cpu")("a red fox", **kw)
    got = Pipeline.load(out, backend="tensorrt")("a red fox", **kw)
    assert got.loop == "captured CUDA graphs" and len(trt.built) == built
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.shape == b.shape == (64, 96, 3) and np.abs(a - b).max() <= 1 and a.std() > 1


@pytest.mark.parametrize("preset", ["sd15-inpaint-tiny", "sd15-tiny"])
def test_inpainting_keeps_the_encoded_image_on_the_device(tiny_export, tmp_path: Path, fake_gpu,
                                                          preset: str) -> None:
    """Counted on the fakes: an inpainting call (a 9-channel UNet's masked-image latents assembled with the
    mask by the extra-channels graph; a 4-channel UNet's image latents for the blend made by the noising
    graph) copies to the host only the images and their finite flags, at strength 0.8 and at 1; the images
    are ort-cpu's."""
    from .helpers.inputs import image_and_mask

    cudart, _ = fake_gpu
    src = tiny_export(preset)
    out = tmp_path / "engines"
    prof = custom_profile(batch="1:1:2", height="64:64:64", width="64:64:64")
    names = {r.component for r in build_engines(src, out, prof, BuildOptions(workspace_gb=1)).engines}
    nine = preset == "sd15-inpaint-tiny"
    assert "image_noise_float32_to_float32" in names
    assert ({"unet_extra_cfg_float32_to_float32", "unet_extra_float32_to_float32"} <= names) == nine
    image, mask = image_and_mask(64, 64)
    down = {}
    for strength in (0.8, 1.0):
        kw: dict[str, Any] = {"steps": 3, "seed": 2, "sampler": "euler-a", "image": image, "mask_image": mask,
                              "strength": strength, "batch_size": 2}
        with Pipeline.load(out, backend="tensorrt") as pipe:
            pipe("a red fox", **kw)  # warm: captured
            before = cudart.copies[2]
            res = pipe("a red fox", **kw)
            down[strength] = cudart.copies[2] - before
            images = [np.asarray(i, np.int16) for i in res.images]
        ref = Pipeline.load(src, backend="ort-cpu")("a red fox", **kw).images
        for got, want in zip(images, ref, strict=True):
            assert np.abs(got - np.asarray(want, np.int16)).max() <= 1
    assert down == {0.8: 2, 1.0: 2}, down


# -- TensorRT, on the fakes of tests/test_trt_pipeline.py ----------------------------------------------------

@pytest.mark.slow  # about 2 min on 2 busy cores
def test_controlnets_on_built_engines_like_ort_cpu(tiny_controlnet_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on fakes: the ControlNet engines and unet_control are built, share the scratch block, and
    the captured step (nets, unet_control, step graph: one launch per step) gives the ort-cpu images; a net
    left out, and no control at all, each run their own captured loop; what a call uploads does not grow
    with the steps and only the images come back."""
    from .helpers.inputs import control_image

    cudart, _ = fake_gpu
    src = tiny_controlnet_export("sd15-tiny", "fp32", 2)
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:80", width="64:64:80"),
                             BuildOptions(workspace_gb=1))
    assert {"controlnet_0", "controlnet_1", "unet_control", "unet"} <= {r.component for r in manifest.engines}
    ref = Pipeline.load(src, backend="ort-cpu")
    pipe = Pipeline.load(out, backend="tensorrt")
    users = {e.name for e in pipe.backend.scratch.users}  # type: ignore[attr-defined]
    assert {"controlnet_0", "controlnet_1", "unet_control"} <= users
    imgs = [control_image(10), control_image(11)]
    kw: dict[str, Any] = {"steps": 5, "sampler": "dpmpp-2m", "seed": 3, "height": 64, "width": 80}
    cases = [{"control_images": imgs, "control_scales": [0.7, 1.2], "control_start": [0, 0.4]},
             {"control_images": [None, imgs[1]], "guess_mode": True},
             {}]
    seen = []
    for i, case in enumerate(cases):
        want = ref("a red fox", **kw, **case)
        launches, captures = cudart.launches, cudart.captures
        got = pipe("a red fox", **kw, **case)
        assert got.loop == "captured CUDA graphs"
        assert cudart.launches - launches == 5 and cudart.captures - captures == 2  # a loop of its own, captured
        a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
        assert a.shape == b.shape == (64, 80, 3) and np.abs(a - b).max() <= 1, f"case {i}"
        seen.append(a)
    assert np.abs(seen[0] - seen[2]).max() > 3 and np.abs(seen[1] - seen[2]).max() > 3  # the control acts
    counts = {}
    for steps in (3, 6):
        call = {**kw, "steps": steps, **cases[0]}
        pipe("a red fox", **call)  # warm: captured at this shape
        before = dict(cudart.copies)
        pipe("a red fox", **call)
        counts[steps] = {k: cudart.copies[k] - before[k] for k in before}
    assert counts[3][2] == counts[6][2] == 2, counts  # device -> host: images and finite only
    assert counts[3][1] == counts[6][1], counts  # host -> device: one table per call, whatever the steps
    pipe.close()
    assert cudart.alive()["allocations"] == 0
