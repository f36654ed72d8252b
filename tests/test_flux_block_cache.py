"""First-block caching (runtime/feature_cache.py, ``cache="first-block"``) for FLUX.1 ([schnell] and [dev])
against diffusers' own hooks on the same seeded modules in ``FluxPipeline``.

The threshold rule's reference is diffusers unchanged: ``transformer.enable_cache(FirstBlockCacheConfig(...))``
(``apply_first_block_cache``: head ``transformer_blocks[0]``, tail ``single_transformer_blocks[-1]``); FluxPipeline
sets the hooks' cache context itself. FLUX's blocks all return ``(context, image tokens)``, so diffusers' hooks
need no shim here (SD3's last block returns no context; see tests/test_block_cache.py). A fixed schedule's
reference is the same hooks with their per-step decision replaced by the schedule's. Each step's relative change
is recorded from the hooks' own state (without changing their decision) to keep the threshold away from the
steps' changes.
"""

from __future__ import annotations

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
    cache_kw,
    first_block_cache,
    full_count,
    streamed_cached_export,
)
from .helpers.pipelines import loaded_on, shared_pipeline
from .helpers.references import flux_packed, flux_preset_pipeline

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
KW: dict[str, Any] = {"height": 64, "width": 96, "guidance_scale": 3.5}
STEPS = 8


def _latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 16, KW["height"] // 8, KW["width"] // 8), dtype=np.float32)


def _reference(preset: str, folder: Path, policy: CachePolicy | None) -> tuple[np.ndarray, list[bool], list[float]]:
    """diffusers' FluxPipeline over the preset's seeded modules (fresh: the hooks keep state), with first-block
    caching per ``policy``: its image (uint8), whether each step ran the remaining blocks, and each step's relative
    change as diffusers computed it (NaN where it compared nothing)."""
    pipe = flux_preset_pipeline("FluxPipeline", preset, folder)
    ran, changes = ([], []) if policy is None else first_block_cache(pipe.transformer, policy, STEPS)
    with torch.no_grad():
        images = pipe(PROMPT, num_inference_steps=STEPS, latents=flux_packed(_latents()), output_type="np",
                      **KW).images
    return (images[0] * 255).round().astype(np.int32), ran, changes


def _sdrt(folder: Path, policy: CachePolicy | None, backend: str = "ort-cpu") -> tuple[np.ndarray, str]:
    res = shared_pipeline(folder, backend)(PROMPT, steps=STEPS, latents=_latents(), **KW, **cache_kw(policy))
    return np.asarray(res.images[0]).astype(np.int32), res.loop


@pytest.mark.parametrize(("preset", "threshold"), [("flux-schnell-tiny", 0.3), ("flux-dev-tiny", 0.3)])
def test_threshold_rule_matches_diffusers_first_block_cache(flux_export, preset: str, threshold: float) -> None:
    """diffusers' rule, unchanged: the same steps skip the remaining blocks and the images agree within 1/255."""
    folder = flux_export(preset, block_cache=True)
    policy = CachePolicy("first-block", threshold=threshold)
    want, ran, changes = _reference(preset, folder, policy)
    # the comparison of decisions is meaningful only away from the threshold
    assert_away_from_threshold(changes, threshold)
    assert 1 < sum(ran) < STEPS, f"the threshold decides nothing here ({ran}, changes {changes}): pick another"
    got, loop = _sdrt(folder, policy)
    assert full_count(loop) == sum(ran), loop
    assert f"threshold {threshold:g}" in loop
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset}: max abs difference {diff}/255 from diffusers' first-block cache"
    assert want.std() > 5
    uncached, _ = _sdrt(folder, None)
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something


@pytest.mark.parametrize(("preset", "interval", "schedule"),
                         [("flux-schnell-tiny", 2, "uniform"), ("flux-dev-tiny", 3, "uniform"),
                          ("flux-dev-tiny", 3, "nonuniform")])
def test_fixed_schedules_match_diffusers_hooks(flux_export, preset: str, interval: int, schedule: str) -> None:
    """A fixed schedule: diffusers' hooks with their decision replaced by the schedule's; the cached steps reuse
    the same residual and the images agree within 1/255, away from the uncached image."""
    folder = flux_export(preset, block_cache=True)
    policy = CachePolicy("first-block", interval=interval, schedule=schedule)
    want, ran, _ = _reference(preset, folder, policy)
    assert ran == list(policy.full_steps(STEPS))
    got, loop = _sdrt(folder, policy)
    assert full_count(loop) == sum(ran) < STEPS
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} every {interval} ({schedule}): max abs difference {diff}/255"
    uncached, _ = _sdrt(folder, None)
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something


def test_the_hooks_change_nothing_with_every_step_full(flux_export) -> None:
    """The fixed-schedule reference's hooks, every step full, give diffusers' plain image bit for bit (the
    hooks themselves change nothing on a full step)."""
    folder = flux_export("flux-schnell-tiny", block_cache=True)
    plain, _, _ = _reference("flux-schnell-tiny", folder, None)
    every, ran, _ = _reference("flux-schnell-tiny", folder, CachePolicy("first-block", interval=1))
    assert all(ran) and len(ran) == STEPS and np.array_equal(plain, every)


@pytest.mark.parametrize("preset", ["flux-schnell-tiny", "flux-dev-tiny"])
def test_caching_off_is_bit_identical_to_the_plain_export(flux_export, preset: str) -> None:
    """A ``--feature-cache`` export run uncached, or cached with every step full, gives the plain export's image."""
    plain, _ = _sdrt(flux_export(preset), None)
    folder = flux_export(preset, block_cache=True)
    off, loop = _sdrt(folder, None)
    every, _ = _sdrt(folder, CachePolicy("first-block", interval=1))
    assert np.array_equal(plain, off) and np.array_equal(plain, every)
    assert "feature cache" not in loop and plain.std() > 5


def test_the_export_records_the_cached_step(flux_export) -> None:
    """``--feature-cache`` adds ``unet_shallow`` (in transformer_shallow/), parity-gated, taking the transformer's
    inputs ([dev]'s guidance too) and its two residuals on the patch grid, returning the change the threshold
    rule reads."""
    for preset, guided in (("flux-schnell-tiny", False), ("flux-dev-tiny", True)):
        man = ExportManifest.read(flux_export(preset, block_cache=True))
        unet, cached = man.components["unet"], man.components[SHALLOW_UNET]
        assert cached.path.startswith("transformer_shallow/")
        assert [o.name for o in unet.outputs] == ["out_sample", "deep_feature", "head_residual"]
        assert unet.outputs[1].shape == ("batch", "height/2", "width/2", 16)  # 2x2 patches, 2 heads x 8
        assert {i.name for i in cached.inputs} == {i.name for i in unet.inputs} | {"deep_feature", "head_residual"}
        assert ("guidance" in {i.name for i in cached.inputs}) == guided
        assert [o.name for o in cached.outputs] == ["out_sample", CHANGE]
        assert cached.parity is not None and cached.parity.rel_err <= cached.parity.bound


@pytest.mark.parametrize("policy", [CachePolicy("first-block", interval=2),
                                    CachePolicy("first-block", threshold=0.3)])
def test_openvino_runs_the_same_cached_steps(flux_export, policy: CachePolicy) -> None:
    folder = flux_export("flux-dev-tiny", block_cache=True)
    with loaded_on(folder, "openvino") as ov:
        want, want_loop = _sdrt(folder, policy)
        got = ov(PROMPT, steps=STEPS, latents=_latents(), **KW, **cache_kw(policy))
    assert full_count(got.loop) == full_count(want_loop) < STEPS
    assert np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max() <= 1


def test_a_cache_request_without_the_cached_step_is_refused(flux_export) -> None:
    """A FLUX.1 export made without ``--feature-cache`` refuses ``cache="first-block"`` before any work, naming
    the re-export; DeepCache (a UNet's) is no FLUX.1 kind."""
    plain = shared_pipeline(flux_export("flux-schnell-tiny"))
    with pytest.raises(ArtifactError, match=r"no cheap step for feature caching.*sdrt export \.\.\. --feature-cache"):
        plain(PROMPT, steps=2, height=64, width=64, cache="first-block")
    cached = shared_pipeline(flux_export("flux-schnell-tiny", block_cache=True))
    with pytest.raises(InputError, match="FLUX.1 models have no deepcache feature caching"):
        cached(PROMPT, steps=2, height=64, width=64, cache="deepcache")


def test_a_one_block_transformer_is_refused_at_export(tmp_path: Path) -> None:
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux

    model = load_flux(random_preset="flux-schnell-tiny")
    tr = model.modules.transformer
    tr.single_transformer_blocks = torch.nn.ModuleList()
    tr.register_to_config(num_single_layers=0)
    with pytest.raises(InputError, match="has one block"):
        export_flux(model, tmp_path / "out", block_cache=True)
    assert not (tmp_path / "out").exists()


def test_tensorrt_captures_fixed_schedules_and_refuses_a_threshold(flux_export, tmp_path: Path, fake_gpu) -> None:
    """Logic check on the TensorRT fakes (tests/helpers/trt_fakes.py): the cached step builds over the profile's
    patch grid, the captured loop runs a fixed schedule with ort-cpu's images, and a threshold is refused before
    any work (the captured loop reads nothing back per step)."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines

    src = flux_export("flux-dev-tiny", block_cache=True)
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96", cfg=False),
                             BuildOptions(workspace_gb=1))
    shallow = next(r for r in manifest.engines if r.component == SHALLOW_UNET)
    feature = next(s for s in shallow.shapes if s.name == "deep_feature")
    assert feature.min == (1, 4, 4, 16) and feature.max == (2, 6, 6, 16)  # one row per image; 64/16 .. 96/16
    kw = {"steps": 4, "seed": 5, "height": 64, "width": 96, "guidance_scale": 3.5}
    want = shared_pipeline(src)(PROMPT, **kw, cache="first-block", cache_interval=2)
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = pipe(PROMPT, **kw, cache="first-block", cache_interval=2)
        with pytest.raises(InputError, match="fixed schedule"):
            pipe(PROMPT, **kw, cache="first-block", cache_threshold=0.3)
    assert got.loop.startswith("captured CUDA graphs") and "2 of 4 steps ran the full transformer" in got.loop
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.std() > 1 and np.abs(a - b).max() <= 1


def test_a_streamed_transformer_exports_the_same_cached_step(flux_export, tmp_path: Path) -> None:
    """A transformer too large to hold (streamed from a diffusers folder, as FLUX.1's 12B one is): its cached step
    is streamed too, holding only ``transformer_blocks[0]``'s weights (and the embeddings' and output layers'),
    gated on the reduced-depth copy; the cached images equal the in-memory export's (same weights)."""
    ref_folder = flux_export("flux-dev-tiny", block_cache=True)
    out = streamed_cached_export("FluxPipeline", "flux-dev-tiny", ref_folder, tmp_path)
    # the cached step holds the first double block and the edges, no other block
    import onnx

    held = {t.name for t in onnx.load(str(out / "transformer_shallow" / "model.onnx"),
                                      load_external_data=False).graph.initializer}
    assert any("transformer_blocks.0." in n for n in held) and any("proj_out" in n for n in held)
    assert not any("single_transformer_blocks" in n for n in held), sorted(held)
    for policy in (CachePolicy("first-block", interval=2), CachePolicy("first-block", threshold=0.3)):
        want, want_loop = _sdrt(ref_folder, policy)
        with Pipeline.load(out, backend="ort-cpu") as pipe:
            got = pipe(PROMPT, steps=STEPS, latents=_latents(), **KW, **cache_kw(policy))
        assert full_count(got.loop) == full_count(want_loop) < STEPS
        assert np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max() <= 1
