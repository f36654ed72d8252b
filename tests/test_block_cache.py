"""First-block caching (runtime/feature_cache.py, ``cache="first-block"``) for SD 3 / 3.5 against diffusers' own
``apply_first_block_cache`` hooks on the same seeded modules in ``StableDiffusion3Pipeline``, and in
``StableDiffusion3Img2ImgPipeline`` and ``StableDiffusion3InpaintPipeline`` (an ordinary transformer inpainting by
blending, and a 33-channel inpainting one).

The reference is diffusers' implementation (tests/helpers/flux_cache.py) with one shim: its tail-block hook
subtracts the last block's ``encoder_hidden_states`` output, which SD3's last block (``context_pre_only``) returns as
None, so diffusers 0.42 raises a TypeError on ``SD3Transformer2DModel``. The shim makes that block return its input
context instead of None; ``SD3Transformer2DModel.forward`` never reads the last block's context, so the model's
outputs are unchanged (checked below, uncached). The fixed schedules are diffusers' hooks with their per-step
decision replaced by the schedule's; the threshold rule is theirs unchanged. diffusers' SD 3 pipelines set no cache
context for the hooks: the reference sets one around the call (their one transformer call per step, both guidance
rows in it). Every reference decodes its latents as ``StableDiffusion3Pipeline`` does (the inpainting pipeline
leaves out the VAE's shift; tests/test_sd3_inpaint.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import ArtifactError, InputError
from sdrt.runtime.feature_cache import CHANGE, SHALLOW_UNET, CachePolicy
from sdrt.runtime.manifest import ExportManifest
from sdrt.runtime.pipeline import Pipeline

from .helpers.flux_cache import (
    assert_away_from_threshold,
    assert_threshold_decides,
    cache_kw,
    first_block_cache,
    full_count,
    hooks_context,
)
from .helpers.pipelines import loaded_on, shared_pipeline
from .helpers.references import sd3_decode, sd3_pipeline

PROMPT = "a red fox in the snow, highly detailed"
KW: dict[str, Any] = {"negative_prompt": "blurry, low quality", "height": 64, "width": 96, "guidance_scale": 5.0}
STEPS = 10


def _reference(preset: str, folder: Path, policy: CachePolicy | None, cls: str = "StableDiffusion3Pipeline",
               runs: int = STEPS, t5: bool = True, **call: Any) -> tuple[np.ndarray, list[bool], list[float]]:
    """diffusers' pipeline ``cls`` over the preset's seeded modules (fresh: the hooks keep state), with first-block
    caching per ``policy`` (tests/helpers/flux_cache.py; ``runs``: the transformer calls of the loop): its image
    (uint8), whether each step ran the remaining blocks, and each step's relative change as diffusers computed it
    (NaN where it compared nothing). ``call``: the pipeline call's keywords (default: the txt2img latents)."""
    import diffusers

    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    p = get_sd3_preset(preset)
    pipe = sd3_pipeline(getattr(diffusers, cls), build_modules(p, seed=0), Path(folder), p.scheduler, t5=t5)
    ran, changes = ([], []) if policy is None else first_block_cache(pipe.transformer, policy, runs)
    call = call or {"latents": torch.from_numpy(_latents())}
    context = hooks_context(pipe.transformer) if policy is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        # the inpainting pipeline decodes without the VAE's shift: its latents, decoded as the others decode
        out = pipe(PROMPT, num_inference_steps=STEPS, output_type="latent", **{**KW, **call}).images
    return sd3_decode(pipe, out)[0], ran, changes


def _latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 16, KW["height"] // 8, KW["width"] // 8), dtype=np.float32)


def _sdrt(folder: Path, policy: CachePolicy | None, backend: str = "ort-cpu", **call: Any) -> tuple[np.ndarray, str]:
    res = shared_pipeline(folder, backend)(PROMPT, steps=STEPS, **{"latents": _latents(), **KW, **call},
                                           **cache_kw(policy))
    return np.asarray(res.images[0]).astype(np.int32), res.loop


@pytest.mark.parametrize(("preset", "threshold"), [("sd3-tiny", 0.2), ("sd35-medium-tiny", 0.3)])
def test_threshold_rule_matches_diffusers_first_block_cache(sd3_export, preset: str, threshold: float) -> None:
    """diffusers' rule, unchanged: the same steps skip the remaining blocks and the images agree within 1/255."""
    folder = sd3_export(preset, block_cache=True)
    policy = CachePolicy("first-block", threshold=threshold)
    want, ran, changes = _reference(preset, folder, policy)
    # the comparison of decisions is meaningful only away from the threshold
    assert_away_from_threshold(changes, threshold)
    assert 1 < sum(ran) < STEPS, f"the threshold decides nothing here ({ran}): pick another"
    got, loop = _sdrt(folder, policy)
    assert full_count(loop) == sum(ran), loop
    assert f"threshold {threshold:g}" in loop
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset}: max abs difference {diff}/255 from diffusers' first-block cache"
    assert want.std() > 5


@pytest.mark.parametrize(("preset", "interval", "schedule"),
                         [("sd3-tiny", 2, "uniform"), ("sd35-medium-tiny", 3, "uniform"),
                          ("sd3-tiny", 3, "nonuniform")])
def test_fixed_schedules_match_diffusers_hooks(sd3_export, preset: str, interval: int, schedule: str) -> None:
    """A fixed schedule: diffusers' hooks with their decision replaced by the schedule's; the cached steps reuse
    the same residual and the images agree within 1/255, away from the uncached image."""
    folder = sd3_export(preset, block_cache=True)
    policy = CachePolicy("first-block", interval=interval, schedule=schedule)
    want, ran, _ = _reference(preset, folder, policy)
    assert ran == list(policy.full_steps(STEPS))
    got, loop = _sdrt(folder, policy)
    assert full_count(loop) == sum(ran) < STEPS
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} every {interval} ({schedule}): max abs difference {diff}/255"
    uncached, _ = _sdrt(folder, None)
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something


# img2img and inpainting: diffusers' pipeline (preset, T5 or not), the image (and mask) at the output's size, strength
# 0.8 (8 of the 10 steps run); diffusers' noise is the generator's first draw (the images encode to their means)
EDITS: dict[str, tuple[str, str, bool]] = {
    "img2img": ("StableDiffusion3Img2ImgPipeline", "sd3-tiny", True),
    "inpaint": ("StableDiffusion3InpaintPipeline", "sd3-tiny", True),  # an ordinary transformer: blending
    "inpaint-33": ("StableDiffusion3InpaintPipeline", "sd3-inpaint-tiny", False),  # the mask in its channels
}
STRENGTH, RUNS, SEED = 0.8, 8, 3  # RUNS: diffusers' get_timesteps, STEPS - int(STEPS - STEPS * STRENGTH)


def _edit(case: str, sd3_export: Any, policy: CachePolicy) -> tuple[np.ndarray, list[bool], list[float],
                                                                     np.ndarray, str]:
    """diffusers' image, which calls ran in full and their changes (``_reference``), and sdrt's image and loop."""
    from .helpers.inputs import image_and_mask

    cls, preset, t5 = EDITS[case]
    folder = sd3_export(preset, t5, block_cache=True)
    image, mask = image_and_mask(w=KW["width"], h=KW["height"])
    call: dict[str, Any] = {"image": image, "strength": STRENGTH, **({"mask_image": mask} if "inpaint" in case else {})}
    want, ran, changes = _reference(preset, folder, policy, cls, RUNS, t5, generator=torch.Generator().manual_seed(SEED),
                                    **call)
    noise = torch.randn((1, 16, KW["height"] // 8, KW["width"] // 8), generator=torch.Generator().manual_seed(SEED))
    got, loop = _sdrt(folder, policy, latents=noise.numpy(), **call)
    return want, ran, changes, got, loop


@pytest.mark.parametrize(("case", "threshold"), [("img2img", 0.23), ("inpaint", 0.2), ("inpaint-33", 0.2)])
def test_img2img_and_inpainting_threshold_rule_match_diffusers(sd3_export, mean_vae, case: str,
                                                               threshold: float) -> None:
    """diffusers' rule, unchanged, in its img2img and inpainting pipelines: the same calls run in full and the
    images agree within 1/255."""
    want, ran, changes, got, loop = _edit(case, sd3_export, CachePolicy("first-block", threshold=threshold))
    assert_threshold_decides(ran, changes, threshold, RUNS, loop)
    diff = int(np.abs(got - want).max())
    assert diff <= 1 and want.std() > 5, f"{case}: max abs difference {diff}/255 from diffusers' first-block cache"


@pytest.mark.parametrize("case", list(EDITS))
def test_img2img_and_inpainting_fixed_schedule_match_diffusers_hooks(sd3_export, mean_vae, case: str) -> None:
    """Every second call full, from the first call the strength leaves: diffusers' hooks with their decision
    replaced by the schedule's; images within 1/255, away from the uncached image."""
    policy = CachePolicy("first-block", interval=2)
    want, ran, _, got, loop = _edit(case, sd3_export, policy)
    assert ran == list(policy.full_steps(RUNS))
    assert full_count(loop) == sum(ran) < RUNS
    diff = int(np.abs(got - want).max())
    assert diff <= 1 and want.std() > 5, f"{case} every 2: max abs difference {diff}/255"
    uncached, _, _, _, _ = _edit(case, sd3_export, CachePolicy("first-block", interval=1))
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something


def test_the_shim_changes_nothing_uncached(sd3_export) -> None:
    """The reference's shim (the last block returns its context) leaves diffusers' images as they are: the hooks
    with every step full give the plain pipeline's image, bit for bit."""
    folder = sd3_export("sd3-tiny", block_cache=True)
    plain, _, _ = _reference("sd3-tiny", folder, None)
    every, ran, _ = _reference("sd3-tiny", folder, CachePolicy("first-block", interval=1))
    assert all(ran) and np.array_equal(plain, every)


def test_caching_off_is_bit_identical_to_the_plain_export(sd3_export) -> None:
    """A ``--feature-cache`` export run uncached, or cached with every step full, gives the plain export's image."""
    plain, _ = _sdrt(sd3_export("sd3-tiny"), None)
    folder = sd3_export("sd3-tiny", block_cache=True)
    off, loop = _sdrt(folder, None)
    every, _ = _sdrt(folder, CachePolicy("first-block", interval=1))
    assert np.array_equal(plain, off) and np.array_equal(plain, every)
    assert "feature cache" not in loop


@pytest.mark.parametrize("policy", [CachePolicy("first-block", interval=2),
                                    CachePolicy("first-block", threshold=0.2)])
def test_openvino_runs_the_same_cached_steps(sd3_export, policy: CachePolicy) -> None:
    folder = sd3_export("sd3-tiny", block_cache=True)
    with loaded_on(folder, "openvino") as pipe:
        want, want_loop = _sdrt(folder, policy)
        got = pipe(PROMPT, steps=STEPS, latents=_latents(), **KW, **cache_kw(policy))
    assert full_count(got.loop) == full_count(want_loop)
    assert np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max() <= 1


def test_the_export_records_the_cached_step(sd3_export) -> None:
    """``--feature-cache`` adds ``unet_shallow`` (in transformer_shallow/), parity-gated, taking the transformer's
    two residuals and returning the change the threshold rule reads; a small part of the transformer."""
    folder = sd3_export("sd3-tiny", block_cache=True)
    man = ExportManifest.read(folder)
    unet, cached = man.components["unet"], man.components[SHALLOW_UNET]
    assert cached.path.startswith("transformer_shallow/")
    assert [o.name for o in unet.outputs] == ["out_sample", "deep_feature", "head_residual"]
    assert [i.name for i in cached.inputs][-2:] == ["deep_feature", "head_residual"]
    assert [o.name for o in cached.outputs] == ["out_sample", CHANGE]
    assert cached.parity is not None and cached.parity.rel_err <= cached.parity.bound


def test_bad_requests_are_refused_before_work(sd3_export, deepcache_export) -> None:
    plain = shared_pipeline(sd3_export("sd3-tiny"))
    with pytest.raises(ArtifactError, match="--feature-cache"):
        plain(PROMPT, steps=2, cache="first-block")
    cached = shared_pipeline(sd3_export("sd3-tiny", block_cache=True))
    with pytest.raises(InputError, match="no deepcache feature caching"):
        cached(PROMPT, steps=2, cache="deepcache")
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(InputError, match="cache_threshold must be"):
            cached(PROMPT, steps=2, cache="first-block", cache_threshold=bad)
    unet = shared_pipeline(deepcache_export("sd15-tiny"))
    with pytest.raises(InputError, match="cache_threshold goes with cache='first-block'"):
        unet("a fox", steps=2, cache="deepcache", cache_threshold=0.1)
    with pytest.raises(InputError, match="no first-block feature caching"):
        unet("a fox", steps=2, cache="first-block")


def test_a_one_block_transformer_is_refused_at_export(tmp_path: Path) -> None:
    from dataclasses import replace

    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3

    model = load_sd3(random_preset="sd3-tiny")
    blocks = model.modules.transformer.transformer_blocks
    del blocks[1:]
    model.modules.transformer.register_to_config(num_layers=1)
    model = replace(model)
    with pytest.raises(InputError, match="has one block"):
        export_sd3(model, tmp_path / "out", block_cache=True)
    assert not (tmp_path / "out").exists()


def test_tensorrt_captures_fixed_schedules_and_refuses_a_threshold(sd3_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on the TensorRT fakes (tests/helpers/trt_fakes.py): the cached step builds over the profile's
    patch counts, the captured loop runs a fixed schedule with ort-cpu's images, and a threshold is refused
    before any work (the captured loop reads nothing back per step)."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    src = sd3_export("sd3-tiny", block_cache=True)
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96"),
                             BuildOptions(workspace_gb=1))
    shallow = next(r for r in manifest.engines if r.component == SHALLOW_UNET)
    feature = next(s for s in shallow.shapes if s.name == "deep_feature")
    assert feature.min[:3] == (2, 4, 4) and feature.max[:3] == (4, 6, 6)  # CFG rows; 64 / 16 .. 96 / 16 patches
    kw = {"negative_prompt": "blurry", "steps": 4, "seed": 5, "height": 64, "width": 96, "guidance_scale": 4.0}
    want = shared_pipeline(src)("a red fox", **kw, cache="first-block", cache_interval=2)
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = pipe("a red fox", **kw, cache="first-block", cache_interval=2)
        with pytest.raises(InputError, match="fixed schedule"):
            pipe("a red fox", **kw, cache="first-block", cache_threshold=0.2)
    assert got.loop.startswith("captured CUDA graphs") and "2 of 4 steps ran the full transformer" in got.loop
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.std() > 1 and np.abs(a - b).max() <= 1


def test_a_streamed_transformer_exports_the_same_cached_step(sd3_export, tmp_path: Path) -> None:
    """A transformer too large to hold (streamed from a diffusers folder, as SD 3 Medium and larger are): its
    cached step is streamed too, holding only the first block's weights (and the embeddings' and output
    layers'), gated exactly; the cached images equal the in-memory export's (same weights)."""
    from diffusers import StableDiffusion3Pipeline

    from sdrt.export.sd3_export import export_sd3
    from sdrt.export.sd3_loading import load_sd3
    from sdrt.export.sd3_presets import build_modules, get_sd3_preset

    ref_folder = sd3_export("sd35-medium-tiny", block_cache=True)
    p = get_sd3_preset("sd35-medium-tiny")
    m = build_modules(p, seed=0)
    src = tmp_path / "diffusers"
    sd3_pipeline(StableDiffusion3Pipeline, m, ref_folder, p.scheduler, t5=True).save_pretrained(
        src, safe_serialization=True)
    out = tmp_path / "streamed"
    manifest = export_sd3(load_sd3(src, stream=True), out, fp16=False, block_cache=True)
    assert "unet" in manifest.source["streamed"]
    cached = manifest.components[SHALLOW_UNET]
    assert cached.parity is not None and "reduced depth" in cached.parity.reference
    assert cached.parity.rel_err <= cached.parity.bound
    blocks = len(m.transformer.transformer_blocks)
    data = {n: sum(f.stat().st_size for f in (out / n).iterdir()) for n in ("transformer", "transformer_shallow")}
    assert data["transformer_shallow"] < data["transformer"] * 2 / blocks  # one block and the edges, not all
    for policy in (CachePolicy("first-block", interval=2), CachePolicy("first-block", threshold=0.3)):
        want, want_loop = _sdrt(ref_folder, policy)
        with Pipeline.load(out, backend="ort-cpu") as pipe:
            got = pipe(PROMPT, steps=STEPS, latents=_latents(), **KW, **cache_kw(policy))
        assert full_count(got.loop) == full_count(want_loop) < STEPS
        assert np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max() <= 1


def test_the_residual_width_is_diffusers_inner_dim() -> None:
    """``inner_width`` (the residuals' and ControlNet samples' last axis) of every SD 3 / 3.5 and FLUX.1 preset, full
    size included, against the ``inner_dim`` diffusers' transformer computes for the same config (built on the meta
    device: nothing allocated)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from sdrt.export.flux_presets import FLUX_PRESETS
    from sdrt.export.sd3_presets import SD3_PRESETS
    from sdrt.export.transformer_config import inner_width

    cases = [*((SD3Transformer2DModel, p.config("transformer")) for p in SD3_PRESETS.values()),
             *((FluxTransformer2DModel, p.config("transformer")) for p in FLUX_PRESETS.values())]
    assert len(cases) > 4
    with torch.device("meta"):
        for cls, config in cases:
            assert inner_width(config) == cls(**config).inner_dim, config
