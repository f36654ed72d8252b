"""DeepCache with ControlNets: an export made with both ``--controlnet`` and ``--feature-cache``, against DeepCache's
own helper over diffusers' ControlNet pipelines on the same synthetic weights and latents.

The reference is the ``DeepCache`` package's ``DeepCacheSDHelper`` (it wraps diffusers' UNet blocks to return their
outputs of the last full step) over ``StableDiffusionControlNetPipeline`` / ``StableDiffusionXLControlNetPipeline``:
diffusers runs the ControlNets every step and its UNet's forward adds their residuals to every skip sample
(``down_block_additional_residuals``), the fresh ``conv_in`` one among them, as on full steps. sdrt runs the
exported shallow graph over the residuals of the skip it reads (export/wrappers.py ``UNetShallow``); the images must
agree within 1/255, on ort-cpu, ort-cuda's code path, openvino and the TensorRT fakes. Caching off with ControlNets
stays bit-identical to an export without ``--feature-cache``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.step_loop import PlainStepLoop

from .helpers.inputs import control_image, seed_for
from .helpers.pipelines import loaded_on, shared_pipeline
from .helpers.references import diffusers_pipe, diffusers_scheduler

deepcache = pytest.importorskip("DeepCache", reason="the reference is the DeepCache package (pip install DeepCache)")

PROMPT = "a house by a lake, evening light"
H, W, STEPS, INTERVAL = 64, 96, 8, 3


def _reference(preset: str, folder: Path, latents: np.ndarray, nets: list[int], scales: list[float],
               guidance: float, interval: int | None) -> np.ndarray:
    """DeepCache (every ``interval``-th step full; None: no caching) over diffusers' ControlNet pipeline with the
    nets of the given indices (each the export's net of that index: the same seed), uint8 [H, W, 3] as int32."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    from sdrt.export.controlnet_loading import random_controlnet

    base, cfg = diffusers_pipe(preset, folder)
    cn_preset = preset.removesuffix("-tiny") + "-controlnet-tiny"
    cns = [random_controlnet(cn_preset, seed=1 + j).controlnet for j in nets]
    # a UNet of its own: the helper wraps the modules' forwards in place
    parts = {**base.components, "unet": copy.deepcopy(base.unet), "scheduler": diffusers_scheduler("ddim", cfg),
             "controlnet": cns[0] if len(cns) == 1 else cns}
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLControlNetPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionControlNetPipeline(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if interval is not None:
        helper = deepcache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()
    images = [control_image(10 + j) for j in nets]
    with torch.no_grad():
        out = pipe(PROMPT, image=images if len(nets) > 1 else images[0], height=H, width=W,
                   num_inference_steps=STEPS, guidance_scale=guidance, latents=torch.from_numpy(latents),
                   output_type="np", controlnet_conditioning_scale=scales if len(nets) > 1 else scales[0]).images
    return (out[0] * 255).round().astype(np.int32)


def _sdrt(pipe: Pipeline, latents: np.ndarray, exported: int, nets: list[int], scales: list[float], guidance: float,
          **kw: Any) -> Any:
    """sdrt's call with the ``nets`` given their images and scales, the export's other nets left out."""
    images: list[Any] = [None] * exported
    given = [1.0] * exported
    for k, j in enumerate(nets):
        images[j], given[j] = control_image(10 + j), scales[k]
    return pipe(PROMPT, height=H, width=W, steps=STEPS, guidance_scale=guidance, sampler="ddim", latents=latents,
                control_images=images, control_scales=given, **kw)


def _u8(res: Any) -> np.ndarray:
    return np.asarray(res.images[0]).astype(np.int32)


CASES = {
    # both exported nets, different scales: their residuals summed in the shallow graph as in unet_control
    "sd15-two-nets": ("sd15-tiny", 2, [0, 1], [0.8, 1.3], 7.5),
    # the second net left out (its residuals zeros), unguided
    "sd15-first-net-alone": ("sd15-tiny", 2, [0], [1.1], 1.0),
    # SDXL: the shallow path reads no text; its added conditioning and the net's residual only
    "sdxl-one-net": ("sdxl-tiny", 1, [0], [0.9], 5.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deepcache_with_controlnets_matches_the_deepcache_package(tiny_controlnet_export, case: str) -> None:
    preset, exported, nets, scales, guidance = CASES[case]
    folder = tiny_controlnet_export(preset, "fp32", exported, deepcache=True)
    latents = np.random.default_rng(seed_for(case)).standard_normal((1, 4, H // 8, W // 8), np.float32)
    ref = _reference(preset, folder, latents, nets, scales, guidance, INTERVAL)
    pipe = shared_pipeline(folder)
    res = _sdrt(pipe, latents, exported, nets, scales, guidance, cache="deepcache", cache_interval=INTERVAL)
    got = _u8(res)
    assert np.abs(got - ref).max() <= 1, f"{case}: max abs difference {np.abs(got - ref).max()}/255"
    assert "3 of 8 steps ran the full UNet" in res.loop
    assert ref.std() > 5
    # the comparison means something: the shallow steps changed the controlled image, and the control the cached one
    uncached = _u8(_sdrt(pipe, latents, exported, nets, scales, guidance))
    assert np.abs(uncached - ref).max() > 2
    free = _u8(pipe(PROMPT, height=H, width=W, steps=STEPS, guidance_scale=guidance, sampler="ddim", latents=latents,
                    cache="deepcache", cache_interval=INTERVAL))
    assert np.abs(free - ref).max() > 2


@pytest.mark.parametrize("backend", ["openvino", "ort-cuda-path"])
def test_other_backends_run_the_same_cached_controlled_steps(tiny_controlnet_export, backend: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """openvino, and ort-cuda's code path on the CPU EP (IO binding; it says nothing of a GPU), against DeepCache's
    image with two nets, within 1/255."""
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True)
    latents = np.random.default_rng(seed_for(backend)).standard_normal((1, 4, H // 8, W // 8), np.float32)
    ref = _reference("sd15-tiny", folder, latents, [0, 1], [1.2, 0.6], 6.0, INTERVAL)
    with loaded_on(folder, backend, monkeypatch) as pipe:
        res = _sdrt(pipe, latents, 2, [0, 1], [1.2, 0.6], 6.0, cache="deepcache", cache_interval=INTERVAL)
        # DeepCache's shallow path beside the UNet taking the residuals; the plain UNet left unloaded
        assert {"unet_control", "unet_shallow"} <= set(pipe.engines) and "unet" not in pipe.engines
    got = _u8(res)
    assert np.abs(got - ref).max() <= 1, f"{backend}: max abs difference {np.abs(got - ref).max()}/255"
    assert "3 of 8 steps ran the full UNet" in res.loop


@pytest.mark.parametrize("preset", ["sd15-tiny", "sdxl-tiny"])
def test_the_small_graph_is_the_nets_first_residual(tiny_controlnet_export, preset: str) -> None:
    """``controlnet_0_shallow`` gives what diffusers' ``ControlNetModel`` returns first (its ``down_0``), at any
    timestep and text: two different timesteps and texts give that residual the same in PyTorch, plain and in guess
    mode (whose scale of ``down_0`` the table's column 0 carries, as for the whole net); the export's whole
    ``controlnet_0`` returns the same ``down_0``."""
    from sdrt.export.controlnet_loading import random_controlnet

    folder = tiny_controlnet_export(preset, "fp32", 1, deepcache=True)
    pipe = shared_pipeline(folder)
    small, whole = pipe.engines["controlnet_0_shallow"], pipe.engines["controlnet_0"]
    assert sorted(small.inputs) == ["conditioning_scale", "controlnet_cond", "sample"]
    assert list(small.outputs) == ["down_0"]
    cn = random_controlnet(preset.removesuffix("-tiny") + "-controlnet-tiny", seed=1).controlnet.float().eval()
    rng = np.random.default_rng(seed_for(preset))
    b, h, w, r = 2, H // 8, W // 8, len(whole.outputs)
    sample = rng.standard_normal((b, 4, h, w), np.float32)
    pixels = rng.integers(0, 256, (b, H, W, 3), dtype=np.uint8)
    cond = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    cross = int(cn.config.cross_attention_dim)
    for guess in (False, True):
        scale = 1.3
        refs = []
        for t, seed in ((17.0, 0), (901.0, 1)):  # the residual must not depend on either
            g = torch.Generator().manual_seed(seed)
            kw: dict[str, Any] = {}
            if cn.config.addition_embed_type == "text_time":
                kw["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(b, cn.add_embedding.linear_1.in_features - 6 * int(
                        cn.config.addition_time_embed_dim), generator=g),
                    "time_ids": torch.rand(b, 6, generator=g) * 1024}
            with torch.no_grad():
                down, _ = cn(torch.from_numpy(sample), torch.full((b,), t), torch.randn(b, 7, cross, generator=g),
                             cond, conditioning_scale=scale, guess_mode=guess, return_dict=False, **kw)
            refs.append(down[0].numpy())
        assert np.array_equal(refs[0], refs[1])
        # the runtime's scale table: column 0 is down_0's (guess mode: diffusers' 0.1 .. 1.0 ramp times the scale)
        col0 = 0.1 * scale if guess else scale
        table = np.full((b, r), np.nan, np.float32)
        table[:, 0] = col0
        got = small({"sample": sample, "controlnet_cond": pixels, "conditioning_scale": table})["down_0"]
        assert np.abs(np.asarray(got) - refs[0]).max() <= 1e-4 * max(1.0, float(np.abs(refs[0]).max()))
        full_table = np.where(np.isnan(table), 1.0, table).astype(np.float32)
        feeds = {"sample": sample, "timestep": np.full((b,), 17.0, np.float32),
                 "encoder_hidden_states": rng.standard_normal((b, 77, cross), np.float32),
                 "controlnet_cond": pixels, "conditioning_scale": full_table}
        feeds.update({k: rng.standard_normal(tuple(d if isinstance(d, int) else b for d in v.shape), np.float32)
                      for k, v in whole.inputs.items() if k not in feeds})
        assert np.abs(np.asarray(whole(feeds)["down_0"]) - np.asarray(got)).max() <= 1e-4
        assert float(np.abs(refs[0]).max()) > 1e-3


def _counting(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each of ``pipe``'s engines runs from now on (each still runs), those it loads on a call's demand (a
    UNet) too."""
    runs: dict[str, int] = {}

    def count(name: str, e: Any) -> Any:
        def run(feeds: Any, orig: Any = e.run) -> Any:
            runs[name] = runs.get(name, 0) + 1
            return orig(feeds)
        monkeypatch.setattr(e, "run", run)
        return e

    for name, e in pipe.engines.items():
        count(name, e)
    load = pipe.backend.load
    monkeypatch.setattr(pipe.backend, "load", lambda path, name, **kw: count(name, load(path, name, **kw)))
    return runs


def test_cheap_steps_run_the_small_graphs_and_an_export_without_them_the_whole_nets(
        tiny_controlnet_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the cheap steps each active net runs its small graph instead of the whole net (engine runs counted; the
    result says so), and a pipeline whose export lacks the small graphs (an older export) runs the whole nets there,
    as before: both within 1/255 of DeepCache's image with the first net alone."""
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True)
    latents = np.random.default_rng(seed_for("cheap-small")).standard_normal((1, 4, H // 8, W // 8), np.float32)
    ref = _reference("sd15-tiny", folder, latents, [0], [1.1], 7.0, INTERVAL)
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        runs = _counting(pipe, monkeypatch)
        res = _sdrt(pipe, latents, 2, [0], [1.1], 7.0, cache="deepcache", cache_interval=INTERVAL)
        assert np.abs(_u8(res) - ref).max() <= 1
        # 8 steps, every third full: 3 full (the whole net), 5 cheap (its small graph); the second net left out
        assert (runs.get("controlnet_0"), runs.get("controlnet_0_shallow")) == (3, 5)
        assert "controlnet_1" not in runs and "controlnet_1_shallow" not in runs
        assert (runs["unet_control"], runs["unet_shallow"]) == (3, 5)
        assert "cheap steps ran controlnet_0_shallow (each net's first residual alone)" in res.loop
    with Pipeline.load(folder, backend="ort-cpu") as old:
        for j in (0, 1):  # what an export made before the small graphs holds
            old.engines.pop(f"controlnet_{j}_shallow").close()
        runs = _counting(old, monkeypatch)
        res = _sdrt(old, latents, 2, [0], [1.1], 7.0, cache="deepcache", cache_interval=INTERVAL)
        assert np.abs(_u8(res) - ref).max() <= 1
        assert runs.get("controlnet_0") == 8
        assert "cheap steps ran the whole controlnet_0" in res.loop


def test_caching_off_with_controlnets_is_bit_identical_to_the_export_without_it(tiny_controlnet_export,
                                                                                deepcache_export) -> None:
    """The cached export's unet_control (it also returns the deep feature) gives the plain ControlNet export's
    image; interval 1 runs every step in full, the same image; and a cached call without control images on it gives
    the ControlNet-free cached export's image (its shallow path fed zero residuals), within 1/255."""
    kw: dict[str, Any] = {"height": 64, "width": 64, "steps": 6, "seed": 11, "sampler": "dpmpp-2m",
                          "control_images": [control_image(10), control_image(11)], "control_scales": [0.7, 1.2]}
    plain = np.asarray(shared_pipeline(tiny_controlnet_export("sd15-tiny", "fp32", 2))(PROMPT, **kw).images[0])
    pipe = shared_pipeline(tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True))
    assert np.array_equal(np.asarray(pipe(PROMPT, **kw).images[0]), plain)
    every = pipe(PROMPT, cache="deepcache", cache_interval=1, **kw)
    assert np.array_equal(np.asarray(every.images[0]), plain)
    assert "6 of 6 steps ran the full UNet" in every.loop
    free = {k: v for k, v in kw.items() if not k.startswith("control")}
    want = _u8(shared_pipeline(deepcache_export("sd15-tiny"))(PROMPT, cache="deepcache", **free))
    got = pipe(PROMPT, cache="deepcache", **free)
    assert np.abs(_u8(got) - want).max() <= 1 and want.std() > 5
    assert "2 of 6 steps ran the full UNet" in got.loop


def test_a_cheap_step_without_residual_inputs_is_refused_beside_controlnets(tiny_controlnet_export,
                                                                          deepcache_export,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The shallow path of an export made without ControlNets takes none of their residuals (as first-block
    caching's cached step takes none): a loop of it beside ControlNets would drop the control on cheap steps, so it
    is refused, saying what to re-export: by the call before any engine runs, and by the loop."""
    cn = shared_pipeline(tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True))
    other = shared_pipeline(deepcache_export("sd15-tiny"))
    shallow = cn.engines["unet_shallow"]  # this export's takes the residual of the skip it reads, of each net
    assert sorted(k for k in shallow.inputs if k.startswith("controlnet_")) == ["controlnet_0_down_0",
                                                                                "controlnet_1_down_0"]
    control_unet = cn._engine("unet_control")  # loaded on the first call that runs it: maybe none yet
    with pytest.raises(InputError, match="takes no ControlNet residuals.*--controlnet"):
        PlainStepLoop(cn.backend, control_unet, control_unet,
                      [cn.engines["controlnet_0"], None], shallow=other.engines["unet_shallow"])
    monkeypatch.setitem(cn.engines, "unet_shallow", other.engines["unet_shallow"])
    ran: list[str] = []
    for name, e in cn.engines.items():
        monkeypatch.setattr(e, "run", lambda feeds, name=name: ran.append(name))
    with pytest.raises(InputError, match=r"takes no ControlNet residuals.*leave cache out.*--feature-cache together"):
        cn(PROMPT, steps=2, cache="deepcache", control_images=[control_image(10)])
    assert ran == []


def test_tensorrt_captures_cached_steps_with_controlnets(tiny_controlnet_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on the TensorRT fakes: the shallow engine with residual inputs builds, and the captured loop
    (the nets then the UNet or the shallow path, each kind of step captured) gives ort-cpu's cached images with two
    nets, one net left out, and none (zero residual buffers); no device memory is left after."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    cudart, _ = fake_gpu
    folder = tiny_controlnet_export("sd15-tiny", "fp32", 2, deepcache=True)
    out = tmp_path / "engines"
    manifest = build_engines(folder, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                             BuildOptions(workspace_gb=1))
    assert {"unet_control", "unet_shallow", "controlnet_0", "controlnet_0_shallow"} <= {
        r.component for r in manifest.engines}
    kw: dict[str, Any] = {"height": 64, "width": 96, "steps": 6, "guidance_scale": 7.5, "sampler": "ddim", "seed": 2,
                          "cache": "deepcache", "cache_interval": 3}
    cases: list[dict[str, Any]] = [{"control_images": [control_image(10), control_image(11)],
                                    "control_scales": [0.8, 1.3]},
                                   {"control_images": [None, control_image(11)]}, {}]
    with Pipeline.load(out, backend="tensorrt") as pipe:
        assert {"unet", "unet_control"} <= set(pipe.engines)  # TensorRT loads every engine with the model
        for case in cases:
            want = _u8(shared_pipeline(folder)(PROMPT, **kw, **case))
            got = pipe(PROMPT, **kw, **case)
            assert got.loop.startswith("captured CUDA graphs; feature cache deepcache"), got.loop
            assert "2 of 6 steps ran the full UNet" in got.loop
            if case:  # the captured cheap step runs the active nets' small graphs
                assert "cheap steps ran controlnet_1_shallow" in got.loop or "controlnet_0_shallow, controlnet_1_shallow" \
                    in got.loop, got.loop
            assert want.std() > 5 and np.abs(_u8(got) - want).max() <= 1
    assert cudart.alive()["allocations"] == 0
