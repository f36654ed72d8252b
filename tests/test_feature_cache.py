"""Feature caching (DeepCache) against DeepCache's own code on diffusers' pipelines, and caching off unchanged.

The reference is the ``DeepCache`` package (``DeepCacheSDHelper``, which wraps diffusers' UNet blocks to return
their outputs of the last full step) over diffusers' pipelines with the same synthetic weights and initial latents;
its non-uniform schedule is its pipelines' ``sample_from_quad_center``, read from the package's source. sdrt runs
the exported shallow graph instead (export/wrappers.py ``UNetShallow``); the images must agree within 1/255.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.engine import check_full
from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.feature_cache import CachePolicy, cache_policy, nonuniform_steps
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.step_loop import PlainStepLoop

from .helpers.inputs import seed_for
from .helpers.pipelines import shared_pipeline
from .helpers.references import diffusers_pipe, diffusers_scheduler

deepcache = pytest.importorskip("DeepCache", reason="the reference is the DeepCache package (pip install DeepCache)")

PROMPT = "a watercolor fox in the snow, highly detailed"


def _quad_center():  # type: ignore[no-untyped-def]
    """DeepCache's ``sample_from_quad_center``, taken from the installed package's source (its module imports
    diffusers internals of its time, so the function alone is compiled)."""
    src = (Path(deepcache.__file__).parent / "sd" / "pipeline_stable_diffusion.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    ns: dict[str, object] = {"np": np}
    exec(compile(ast.Module([fn], []), "DeepCache.sd.pipeline_stable_diffusion", "exec"), ns)  # noqa: S102
    return ns["sample_from_quad_center"]


class _Helper(deepcache.DeepCacheSDHelper):  # type: ignore[misc, name-defined]
    """DeepCache's helper; with ``full`` (step indices), DeepCache's pipelines' rule instead of its uniform one: a
    step in the list runs in full (``if i in interval_seq: prv_features = None``)."""

    full: list[int] | None = None

    def is_skip_step(self, block_i, layer_i, blocktype="down"):  # type: ignore[no-untyped-def]
        if self.full is None:
            return super().is_skip_step(block_i, layer_i, blocktype)
        if self.cur_timestep in self.full:
            return False
        p = self.params
        if block_i > p["cache_block_id"] or blocktype == "mid":
            return True
        if block_i < p["cache_block_id"]:
            return False
        return layer_i >= p["cache_layer_id"] if blocktype == "down" else layer_i > p["cache_layer_id"]


def _reference(preset: str, folder: Path, latents: np.ndarray, steps: int, guidance: float, interval: int,
               full: list[int] | None = None, lora: tuple[Path, float] | None = None) -> np.ndarray:
    pipe, sched_cfg = diffusers_pipe(preset, folder)
    # a pipeline of its own over a copy of the UNet: the helper wraps the modules' forwards in place (and a LoRA
    # adapts the UNet and text encoder in place: then fresh modules of the same seed, not the shared pipeline's,
    # which other tests may have changed)
    parts = {**pipe.components, "unet": copy.deepcopy(pipe.unet), "scheduler": diffusers_scheduler("ddim", sched_cfg)}
    if lora is not None:
        from sdrt.export.loading import random_model

        m = random_model(preset)
        parts.update(unet=m.unet, text_encoder=m.text_encoders[0], vae=m.vae)
    pipe = type(pipe)(**parts)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora[0]), adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[lora[1]])
    helper = _Helper(pipe=pipe)
    helper.full = full
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                   height=latents.shape[2] * 8, width=latents.shape[3] * 8, output_type="np").images
    return (out * 255).round().astype(np.int32)


@pytest.mark.parametrize(("preset", "interval", "guidance"), [("sd15-tiny", 3, 7.5), ("sd15-tiny", 2, 1.0),
                                                             ("sdxl-tiny", 3, 5.0)])
def test_uniform_deepcache_matches_the_deepcache_package(deepcache_export, preset: str, interval: int,
                                                         guidance: float) -> None:
    folder = deepcache_export(preset)
    steps, (h, w) = 8, (64, 96)
    latents = np.random.default_rng(seed_for(preset, interval)).standard_normal((1, 4, h // 8, w // 8), np.float32)
    ref = _reference(preset, folder, latents, steps, guidance, interval)
    pipe = shared_pipeline(folder)
    kw = {"height": h, "width": w, "steps": steps, "guidance_scale": guidance, "sampler": "ddim", "latents": latents}
    res = pipe(PROMPT, cache="deepcache", cache_interval=interval, **kw)
    got = np.asarray(res.images[0]).astype(np.int32)[None]
    assert np.abs(got - ref).max() <= 1, f"max abs difference {np.abs(got - ref).max()}/255"
    full = math.ceil(steps / interval)
    assert f"{full} of {steps} steps ran the full UNet" in res.loop
    # the shallow steps changed the image: the comparison is with DeepCache, not with the uncached run
    plain = np.asarray(pipe(PROMPT, **kw).images[0]).astype(np.int32)[None]
    assert np.abs(plain - ref).max() > 2 and ref.std() > 5


def test_nonuniform_deepcache_matches_the_deepcache_package(deepcache_export) -> None:
    folder = deepcache_export("sd15-tiny")
    steps, interval = 20, 4
    quad = _quad_center()
    full = [int(i) for i in quad(steps, math.ceil(steps / interval), center=15, pow=1.4)[0]]
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8), np.float32)
    ref = _reference("sd15-tiny", folder, latents, steps, 7.5, interval, full=full)
    res = shared_pipeline(folder)(PROMPT, height=64, width=64, steps=steps, sampler="ddim", latents=latents,
                                  cache="deepcache", cache_interval=interval, cache_schedule="nonuniform")
    got = np.asarray(res.images[0]).astype(np.int32)[None]
    assert np.abs(got - ref).max() <= 1
    assert f"{len(full)} of {steps} steps ran the full UNet" in res.loop


@pytest.mark.parametrize("steps", [10, 20, 25, 50, 100])
@pytest.mark.parametrize("interval", [2, 3, 5])
def test_nonuniform_schedule_is_deepcaches(steps: int, interval: int) -> None:
    quad = _quad_center()
    n = math.ceil(steps / interval)
    try:
        ref = [int(i) for i in quad(steps, n, center=15, pow=1.4)[0]]
    except ValueError:  # DeepCache finds no schedule: sdrt refuses the same request, saying what to change
        with pytest.raises(InputError, match="uniform"):
            nonuniform_steps(steps, n, 15, 1.4)
        return
    assert nonuniform_steps(steps, n, 15, 1.4) == ref
    plan = CachePolicy(interval=interval, schedule="nonuniform").full_steps(steps)
    assert list(np.flatnonzero(plan)) == ref


def test_uniform_schedule() -> None:
    assert list(CachePolicy(interval=3).full_steps(10)) == [i % 3 == 0 for i in range(10)]
    assert CachePolicy(interval=1).full_steps(5).all()
    assert CachePolicy(interval=50).full_steps(4).tolist() == [True, False, False, False]


def test_caching_off_is_bit_identical_to_the_plain_export(tiny_export, deepcache_export) -> None:
    """The UNet's extra output changes nothing, and interval 1 runs every step in full."""
    kw = {"height": 64, "width": 64, "steps": 6, "seed": 11, "sampler": "dpmpp-2m"}
    plain = np.asarray(shared_pipeline(tiny_export("sd15-tiny"))(PROMPT, **kw).images[0])
    pipe = shared_pipeline(deepcache_export("sd15-tiny"))
    assert np.array_equal(np.asarray(pipe(PROMPT, **kw).images[0]), plain)
    every = pipe(PROMPT, cache="deepcache", cache_interval=1, **kw)
    assert np.array_equal(np.asarray(every.images[0]), plain)
    assert "6 of 6 steps ran the full UNet" in every.loop


def test_openvino_runs_the_same_cached_steps(deepcache_export) -> None:
    pytest.importorskip("openvino", reason="the openvino backend needs openvino (pip install openvino)")
    folder = deepcache_export("sd15-tiny")
    kw = {"height": 64, "width": 64, "steps": 7, "seed": 5, "cache": "deepcache", "cache_interval": 3}
    ort = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0]).astype(int)
    ov = shared_pipeline(folder, "openvino", lambda: __import__("sdrt.runtime.pipeline", fromlist=["Pipeline"])
                         .Pipeline.load(folder, backend="openvino", precision="fp32"))
    res = ov(PROMPT, **kw)
    assert np.abs(np.asarray(res.images[0]).astype(int) - ort).max() <= 1
    assert "3 of 7 steps ran the full UNet" in res.loop


def test_windows_and_img2img_start_each_loop_full(deepcache_export) -> None:
    """A call's window (img2img's strength; denoise's start/end, as a refiner hand-off) starts with a full step."""
    pipe = shared_pipeline(deepcache_export("sd15-tiny"))
    img = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    res = pipe(PROMPT, image=img, strength=0.5, steps=10, seed=2, cache="deepcache", cache_interval=2)
    assert "3 of 5 steps ran the full UNet" in res.loop
    plan = pipe.plan("ddim", 10)
    emb = pipe.encode_prompt(PROMPT)
    lat = pipe.prepare_latents(plan, 64, 64, seed=4)
    k = pipe.handoff_row(plan.timesteps, 0.5)
    assert 2 < k < 8
    t: dict[str, object] = {}
    lat = pipe.denoise(emb, lat, plan, end=0.5, cache="deepcache", timings=t)
    assert f"{math.ceil(k / 3)} of {k} steps" in str(t["loop"])
    pipe.denoise(emb, lat, plan, start=0.5, cache=CachePolicy(interval=4), timings=t)
    assert f"{math.ceil((10 - k) / 4)} of {10 - k} steps" in str(t["loop"])


def test_bad_requests_are_refused_before_work(tiny_export, deepcache_export) -> None:
    plain = shared_pipeline(tiny_export("sd15-tiny"))
    with pytest.raises(ArtifactError, match="--feature-cache"):
        plain(PROMPT, steps=2, cache="deepcache")
    pipe = shared_pipeline(deepcache_export("sd15-tiny"))
    for kw, what in (({"cache": "teacache"}, "deepcache"), ({"cache_interval": 0}, "1 to"),
                     ({"cache_interval": 2.5}, "integer"), ({"cache_schedule": "pow"}, "uniform, nonuniform")):
        with pytest.raises(InputError, match=what):
            pipe(PROMPT, steps=2, **{"cache": "deepcache", **kw})
    assert cache_policy(None) is None and cache_policy("deepcache", 4, "nonuniform") == CachePolicy(interval=4,
                                                                                                   schedule="nonuniform")


def test_loop_checks_its_plan(deepcache_export) -> None:
    with pytest.raises(InputError, match="first step"):
        check_full([False, True], 2, True)
    with pytest.raises(InputError, match="one boolean per step"):
        check_full([True], 2, True)
    with pytest.raises(InputError, match="without a shallow engine"):
        check_full([True, False], 2, False)
    pipe = shared_pipeline(deepcache_export("sd15-tiny"))
    unet, shallow = pipe.engines["unet"], pipe.engines["unet_shallow"]
    with pytest.raises(InputError, match="ControlNet"):
        PlainStepLoop(pipe.backend, unet, unet, [unet], shallow=shallow)
    with pytest.raises(InputError, match="deep_feature"):
        PlainStepLoop(pipe.backend, shallow, unet, shallow=shallow)


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONVS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
# slots, whether the file adapts the text encoder, make_lora's other arguments, the latents' seed, what the shallow
# path's slot inputs must show, and whether openvino runs too
SLOTTED_CASES = {
    # the shallow path has slots for the layers it runs (its last up block's attention), fed the call's factors as
    # the UNet is; a LoRA of the UNet and text encoder
    "lora": ("8", True, {"seed": 3, "alpha": 2.0, "unet_targets": ATTENTION,
                         "text_targets": ("q_proj", "k_proj", "v_proj", "out_proj")}, 5,
             lambda shallow: shallow and all(".up_blocks." in n for n in shallow), True),
    # LoCon slots: the shallow path's convolutions (its first down and last up blocks' ResNets) take their factors
    # too; a LoCon file adapting the convolutions and the attention
    "locon": ("8:attn-ff-conv", False, {"seed": 6, "rank": 2, "conv_rank": 4, "alpha": 1.0,
                                        "unet_targets": (*ATTENTION, *CONVS)}, 7,
              lambda shallow: any(".resnets." in n and n.endswith(".conv1.down") for n in shallow), False),
}


@pytest.mark.parametrize("case", list(SLOTTED_CASES))
def test_deepcache_with_lora_slots_matches_the_deepcache_package_with_the_file(slotted_export, tmp_path: Path,
                                                                               case: str) -> None:
    """An export made with both --deepcache and --lora-slots (attention, or LoCon's with convolutions): a LoRA (or
    LoCon) file on cached steps gives DeepCache's image with the same file loaded in diffusers, within 1/255, on
    ort-cpu (and openvino, for the LoRA)."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")
    from sdrt.export.loading import random_model

    from .helpers.models import make_lora

    slots, text, made, latent_seed, shallow_shows, openvino = SLOTTED_CASES[case]
    folder = slotted_export("sd15-tiny", slots, deepcache=True)
    shallow = {i for i in shared_pipeline(folder).engines["unet_shallow"].inputs if i.startswith("lora.")}
    assert shallow_shows(shallow)
    m = random_model("sd15-tiny")
    lora = make_lora(tmp_path / f"{case}.safetensors", m.unet, m.text_encoders[0] if text else None, "kohya", **made)
    steps, (h, w), interval = 6, (64, 96), 3
    latents = np.random.default_rng(latent_seed).standard_normal((1, 4, h // 8, w // 8), np.float32)
    ref = _reference("sd15-tiny", folder, latents, steps, 7.5, interval, lora=(lora, 0.8))
    kw = {"height": h, "width": w, "steps": steps, "guidance_scale": 7.5, "sampler": "ddim", "latents": latents,
          "cache": "deepcache", "cache_interval": interval}
    res = shared_pipeline(folder)(PROMPT, loras=[(lora, 0.8)], **kw)
    got = np.asarray(res.images[0]).astype(np.int32)[None]
    assert np.abs(got - ref).max() <= 1, f"max abs difference {np.abs(got - ref).max()}/255"
    assert "2 of 6 steps ran the full UNet" in res.loop
    no_lora = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0]).astype(np.int32)[None]
    assert np.abs(no_lora - ref).max() > 2 and ref.std() > 5  # the file mattered
    if openvino and importlib.util.find_spec("openvino") is not None:
        with Pipeline.load(folder, backend="openvino", precision="fp32") as ov:
            got_ov = np.asarray(ov(PROMPT, loras=[(lora, 0.8)], **kw).images[0]).astype(np.int32)[None]
        assert np.abs(got_ov - got).max() <= 2


def test_tensorrt_captures_cached_steps_with_lora_slots(slotted_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on the TensorRT fakes: the slotted shallow engine builds (its factor inputs static), and the
    captured loop, which copies its conditioning (the factors with it) into fixed buffers, gives ort-cpu's
    cached images with a LoRA and without."""
    from sdrt.export.loading import random_model
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    from .helpers.models import make_lora

    folder = slotted_export("sd15-tiny", "8", deepcache=True)
    m = random_model("sd15-tiny")
    lora = make_lora(tmp_path / "style.safetensors", m.unet, None, "diffusers", seed=4, rank=4,
                     unet_targets=("to_q", "to_k", "to_v", "to_out.0"))
    out = tmp_path / "engines"
    build_engines(folder, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                  BuildOptions(workspace_gb=1))
    kw = {"height": 64, "width": 96, "steps": 6, "guidance_scale": 7.5, "sampler": "ddim", "seed": 2,
          "cache": "deepcache", "cache_interval": 3}
    with Pipeline.load(out, backend="tensorrt") as pipe:
        for loras in ([(lora, 0.9)], None):
            want = np.asarray(shared_pipeline(folder)(PROMPT, loras=loras, **kw).images[0]).astype(np.int32)
            got = pipe(PROMPT, loras=loras, **kw)
            assert got.loop.startswith("captured CUDA graphs; feature cache deepcache")
            assert np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max() <= 1
