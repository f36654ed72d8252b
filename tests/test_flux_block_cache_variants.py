"""First-block caching (``cache="first-block"``) for FLUX.1 Kontext (a reference image's tokens joined to the image's)
and FLUX.1 Depth / Canny (a control image's latents joined to the latents' channels), against diffusers' own hooks
on the same seeded modules in ``FluxKontextPipeline`` and ``FluxControlPipeline`` (tests/helpers/flux_cache.py);
and for the calls that start from an image: FLUX.1 Fill (``FluxFillPipeline``: the mask and the masked image's
latents in the transformer's channels), [dev]'s img2img and inpainting by blending (``FluxImg2ImgPipeline``,
``FluxInpaintPipeline``) and Depth's img2img and inpainting (``FluxControlImg2ImgPipeline``,
``FluxControlInpaintPipeline``).

Kontext: diffusers' hooks keep the residuals of the whole sequence the blocks see, the image's tokens and the
reference's; the threshold rule's change is a mean over both. sdrt's export returns the first block's residual over
the reference's tokens beside the image's (``head_residual_reference``, on the reference's patch grid) and its
cached step takes the change over the two, in the sequence's order; the deep feature's reference part reaches no
output (the output layers work token by token and the pipeline keeps the image's tokens), so only the image's is
kept. Depth / Canny: the control latents join the latents on the feature axis before the first layer, so the blocks
see the image's tokens alone and the residuals are the base model's.

Images within 1/255 (as every parity test here: one 8-bit level of rounding, the graphs' float32 against PyTorch's),
the count of full steps in ``Result.loop`` equal to the hooks' own count; caching off: the plain export's image bit
for bit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdrt.runtime.feature_cache import CHANGE, SHALLOW_UNET, CachePolicy
from sdrt.runtime.manifest import ExportManifest

from .helpers.flux_cache import (
    assert_away_from_threshold,
    assert_threshold_decides,
    cache_kw,
    first_block_cache,
    full_count,
    hooks_context,
    streamed_cached_export,
)
from .helpers.inputs import control_image
from .helpers.pipelines import loaded_on, shared_pipeline
from .helpers.references import flux_packed, flux_preset_pipeline

KONTEXT, DEPTH = "flux-kontext-dev-tiny", "flux-depth-dev-tiny"
PROMPT = "make the boat red"
HEIGHT, WIDTH, STEPS = 64, 96, 8
# the conditioning image of each model (a 120 x 90 image: the reference kept at its size rounded down to whole
# patches, 112 x 80; the control image resized to the output's) and the diffusers pipeline that reads it
MODELS: dict[str, tuple[str, str, float]] = {KONTEXT: ("FluxKontextPipeline", "reference_image", 2.5),
                                             DEPTH: ("FluxControlPipeline", "control_images", 10.0)}


def _latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 16, HEIGHT // 8, WIDTH // 8), dtype=np.float32)


def _image() -> Any:
    return control_image(3, w=120, h=90)


def _image_only(transformer: torch.nn.Module, changes: list[float]) -> None:
    """Record in ``changes`` what each step's change would be over the image's tokens alone (the first of the
    sequence the hooks see), beside the hooks' own decision, which it leaves as it is."""
    from diffusers.hooks import HookRegistry

    head = HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    decide, n = head._should_compute_remaining_blocks, (HEIGHT // 16) * (WIDTH // 16)

    def record(residual: torch.Tensor) -> bool:
        last = head.state_manager.get_state().head_block_residual
        changes.append(float("nan") if last is None else
                       float((residual[:, :n] - last[:, :n]).abs().mean() / last[:, :n].abs().mean()))
        return bool(decide(residual))

    head._should_compute_remaining_blocks = record


def _reference(preset: str, folder: Path, policy: CachePolicy | None,
               image_only: list[float] | None = None) -> tuple[np.ndarray, list[bool], list[float]]:
    """diffusers' pipeline of the model over its seeded modules (fresh: the hooks keep state), with first-block
    caching per ``policy``: its image (uint8), whether each step ran the remaining blocks, each step's change
    (``image_only``: filled with each step's change over the image's tokens alone)."""
    cls, _, guidance = MODELS[preset]
    pipe = flux_preset_pipeline(cls, preset, folder)
    ran, changes = ([], []) if policy is None else first_block_cache(pipe.transformer, policy, STEPS)
    if image_only is not None:
        _image_only(pipe.transformer, image_only)
    kw: dict[str, Any] = ({"image": _image(), "max_area": HEIGHT * WIDTH, "_auto_resize": False}
                          if preset == KONTEXT else {"control_image": _image()})
    # diffusers 0.42's Kontext and Control pipelines set no cache context for the hooks (FluxPipeline sets "cond"
    # around its transformer call): one context around the call, their one transformer call per step
    context = hooks_context(pipe.transformer) if policy is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        images = pipe(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=guidance,
                      latents=flux_packed(_latents()), output_type="np", **kw).images
    return (images[0] * 255).round().astype(np.int32), ran, changes


def _call(preset: str, policy: CachePolicy | None) -> dict[str, Any]:
    """An sdrt call's keywords: the model's conditioning image, the size, steps, guidance, latents and caching."""
    _, field, guidance = MODELS[preset]
    image: dict[str, Any] = ({"reference_image": _image(), "reference_resize": False} if field == "reference_image"
                             else {"control_images": [_image()]})
    return {"height": HEIGHT, "width": WIDTH, "steps": STEPS, "guidance_scale": guidance, "latents": _latents(),
            **image, **cache_kw(policy)}


def _sdrt(folder: Path, preset: str, policy: CachePolicy | None) -> tuple[np.ndarray, str]:
    res = shared_pipeline(folder)(PROMPT, **_call(preset, policy))
    return np.asarray(res.images[0]).astype(np.int32), res.loop


@pytest.mark.parametrize(("preset", "threshold"), [(KONTEXT, 0.27), (DEPTH, 0.3)])
def test_threshold_rule_matches_diffusers_first_block_cache(flux_export, mean_vae, preset: str,
                                                             threshold: float) -> None:
    """diffusers' rule, unchanged: the same steps run in full (Kontext's change over the image's and the
    reference's tokens) and the images agree within 1/255. Kontext's threshold is one where a change over the
    image's tokens alone would decide a step otherwise, so the count shows that the reference's count too."""
    folder = flux_export(preset, block_cache=True)
    policy = CachePolicy("first-block", threshold=threshold)
    image_only: list[float] = []
    want, ran, changes = _reference(preset, folder, policy, image_only if preset == KONTEXT else None)
    assert_away_from_threshold(changes, threshold)
    if preset == KONTEXT:
        assert any((a > threshold) != (b > threshold) for a, b in zip(changes[1:], image_only[1:], strict=True)), \
            (changes, image_only)
    assert 1 < sum(ran) < STEPS, f"the threshold decides nothing here ({ran}, changes {changes}): pick another"
    got, loop = _sdrt(folder, preset, policy)
    assert full_count(loop) == sum(ran), (loop, ran)
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset}: max abs difference {diff}/255 from diffusers' first-block cache"
    assert want.std() > 5
    uncached, _ = _sdrt(folder, preset, None)
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something


@pytest.mark.parametrize("preset", [KONTEXT, DEPTH])
def test_a_fixed_schedule_matches_diffusers_hooks(flux_export, mean_vae, preset: str) -> None:
    """Every second step full: diffusers' hooks with their decision replaced by the schedule's."""
    folder = flux_export(preset, block_cache=True)
    policy = CachePolicy("first-block", interval=2)
    want, ran, _ = _reference(preset, folder, policy)
    assert ran == list(policy.full_steps(STEPS))
    got, loop = _sdrt(folder, preset, policy)
    assert full_count(loop) == sum(ran) < STEPS
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} every 2: max abs difference {diff}/255"


# FLUX.1 Fill, img2img and inpainting by blending, Depth's too: diffusers' pipeline, the preset, whether the call has a
# mask, the strength (Fill: 1, its usual) and the guidance scale (Fill's: diffusers' default 30); the image and mask
# at the output's size, diffusers' noise the generator's first draw (the images encode to their means: ``mean_vae``)
EDITS: dict[str, tuple[str, str, bool, float, float]] = {
    "fill": ("FluxFillPipeline", "flux-fill-dev-tiny", True, 1.0, 30.0),
    "img2img": ("FluxImg2ImgPipeline", "flux-dev-tiny", False, 0.75, 3.5),
    "inpaint": ("FluxInpaintPipeline", "flux-dev-tiny", True, 0.75, 3.5),
    "depth-img2img": ("FluxControlImg2ImgPipeline", DEPTH, False, 0.75, 10.0),
    "depth-inpaint": ("FluxControlInpaintPipeline", DEPTH, True, 0.75, 10.0),
}
SEED = 4


def _edit(case: str, flux_export: Any, policy: CachePolicy) -> tuple[np.ndarray, list[bool], list[float],
                                                                     np.ndarray, str, int]:
    """diffusers' image with its hooks per ``policy``, which calls ran in full and their changes; sdrt's image and
    loop; the number of steps the strength leaves (diffusers' ``get_timesteps``)."""
    from .helpers.inputs import image_and_mask

    cls, preset, masked, strength, guidance = EDITS[case]
    folder = flux_export(preset, block_cache=True)
    runs = STEPS - int(STEPS - STEPS * strength)
    pipe = flux_preset_pipeline(cls, preset, folder)
    ran, changes = first_block_cache(pipe.transformer, policy, runs)
    image, mask = image_and_mask(w=WIDTH, h=HEIGHT)
    call: dict[str, Any] = {"image": image, "strength": strength, "height": HEIGHT, "width": WIDTH,
                            "guidance_scale": guidance, **({"mask_image": mask} if masked else {})}
    control = preset == DEPTH
    with torch.no_grad(), hooks_context(pipe.transformer):  # the pipelines set no context (as Kontext's)
        images = pipe(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                      output_type="np", **call, **({"control_image": _image()} if control else {})).images
    noise = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(SEED)).numpy()
    res = shared_pipeline(folder)(PROMPT, steps=STEPS, latents=noise, **call, **cache_kw(policy),
                                  **({"control_images": [_image()]} if control else {}))
    got = np.asarray(res.images[0]).astype(np.int32)
    return (images[0] * 255).round().astype(np.int32), ran, changes, got, res.loop, runs


@pytest.mark.parametrize(("case", "threshold"), [("fill", 0.3), ("img2img", 0.3), ("inpaint", 0.32),
                                                  ("depth-img2img", 0.3), ("depth-inpaint", 0.3)])
def test_fill_img2img_and_inpainting_threshold_rule_match_diffusers(flux_export, mean_vae, case: str,
                                                                    threshold: float) -> None:
    """diffusers' rule, unchanged, in FluxFillPipeline (the mask and the masked image's latents in the
    transformer's channels), FluxImg2ImgPipeline, FluxInpaintPipeline and Depth's FluxControlImg2ImgPipeline and
    FluxControlInpaintPipeline: the same calls run in full and the images agree within 1/255."""
    want, ran, changes, got, loop, runs = _edit(case, flux_export, CachePolicy("first-block", threshold=threshold))
    assert_threshold_decides(ran, changes, threshold, runs, loop)
    diff = int(np.abs(got - want).max())
    assert diff <= 1 and want.std() > 5, f"{case}: max abs difference {diff}/255 from diffusers' first-block cache"


@pytest.mark.parametrize("case", list(EDITS))
def test_fill_img2img_and_inpainting_fixed_schedule_match_diffusers_hooks(flux_export, mean_vae, case: str) -> None:
    """Every second call full, from the first call the strength leaves: diffusers' hooks with their decision
    replaced by the schedule's; images within 1/255, away from the uncached image."""
    policy = CachePolicy("first-block", interval=2)
    want, ran, _, got, loop, runs = _edit(case, flux_export, policy)
    assert ran == list(policy.full_steps(runs))
    assert full_count(loop) == sum(ran) < runs
    diff = int(np.abs(got - want).max())
    assert diff <= 1 and want.std() > 5, f"{case} every 2: max abs difference {diff}/255"
    uncached, _, _, _, _, _ = _edit(case, flux_export, CachePolicy("first-block", interval=1))
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something


@pytest.mark.parametrize("preset", [KONTEXT, DEPTH])
def test_caching_off_is_bit_identical_to_the_plain_export(flux_export, mean_vae, preset: str) -> None:
    """A ``--feature-cache`` export run uncached, or cached with every step full, gives the plain export's image;
    which is diffusers' within 1/255."""
    plain, _ = _sdrt(flux_export(preset), preset, None)
    folder = flux_export(preset, block_cache=True)
    off, loop = _sdrt(folder, preset, None)
    every, _ = _sdrt(folder, preset, CachePolicy("first-block", interval=1))
    assert np.array_equal(plain, off) and np.array_equal(plain, every)
    assert "feature cache" not in loop and plain.std() > 5
    want, _, _ = _reference(preset, folder, None)
    assert np.abs(plain - want).max() <= 1


def test_the_exports_record_the_cached_steps(flux_export) -> None:
    """Kontext's transformer also returns the first block's residual over the reference's tokens, on the
    reference's patch grid, and its cached step takes it with the reference's latents; Depth / Canny's cached step
    takes the control latents. Both parity-gated."""
    for preset, extra, residuals in (
            (KONTEXT, "reference_latents", ["deep_feature", "head_residual", "head_residual_reference"]),
            (DEPTH, "control_latents", ["deep_feature", "head_residual"])):
        man = ExportManifest.read(flux_export(preset, block_cache=True))
        unet, cached = man.components["unet"], man.components[SHALLOW_UNET]
        assert [o.name for o in unet.outputs] == ["out_sample", *residuals]
        assert {i.name for i in cached.inputs} == {i.name for i in unet.inputs} | set(residuals)
        assert extra in {i.name for i in cached.inputs}
        assert [o.name for o in cached.outputs] == ["out_sample", CHANGE]
        for comp in (unet, cached):
            assert comp.parity is not None and comp.parity.rel_err <= comp.parity.bound
    kontext = ExportManifest.read(flux_export(KONTEXT, block_cache=True)).components["unet"]
    (ref,) = [o for o in kontext.outputs if o.name == "head_residual_reference"]
    assert tuple(ref.shape) == ("batch", "reference_height/2", "reference_width/2", 16)


@pytest.mark.parametrize("preset", [KONTEXT, DEPTH])
def test_a_streamed_transformer_exports_the_same_cached_step(flux_export, tmp_path: Path, preset: str) -> None:
    """The transformer streamed from a diffusers folder of the model's pipeline (as a full-size one is): its cached
    step is streamed too (the reference's sides, or the control latents, dynamic), gated on the reduced-depth copy,
    and gives the in-memory export's cached images (same weights), on a schedule and by the threshold."""
    ref_folder = flux_export(preset, block_cache=True)
    out = streamed_cached_export(MODELS[preset][0], preset, ref_folder, tmp_path)
    for policy in (CachePolicy("first-block", interval=2), CachePolicy("first-block", threshold=0.3)):
        want, want_loop = _sdrt(ref_folder, preset, policy)
        got, loop = _sdrt(out, preset, policy)
        assert full_count(loop) == full_count(want_loop) < STEPS
        assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("preset", [KONTEXT, DEPTH])
def test_openvino_runs_the_same_cached_steps(flux_export, preset: str) -> None:
    """openvino (fp32) keeps the third residual (Kontext's reference tokens') and the control latents as ort-cpu
    does: the same full steps by the threshold, the same image within 1/255."""
    folder = flux_export(preset, block_cache=True)
    policy = CachePolicy("first-block", threshold=0.3)
    with loaded_on(folder, "openvino") as ov:
        want, want_loop = _sdrt(folder, preset, policy)
        got = ov(PROMPT, **_call(preset, policy))
    assert full_count(got.loop) == full_count(want_loop) < STEPS
    assert np.abs(np.asarray(got.images[0]).astype(np.int32) - want).max() <= 1


@pytest.mark.parametrize("preset", [KONTEXT, DEPTH])
def test_tensorrt_fakes_capture_a_fixed_schedule(flux_export, tmp_path: Path, fake_gpu, preset: str) -> None:
    """Logic check on the TensorRT fakes (tests/helpers/trt_fakes.py), which says nothing of real TensorRT: the
    cached step builds over the profile's grids (Kontext's reference residual over the reference's, from the
    profile's image sizes, as ``reference_latents``), and the captured loop runs a schedule with ort-cpu's image."""
    from sdrt.export.profiles import custom_profile
    from sdrt.export.trt_build import BuildOptions, build_engines
    from sdrt.runtime.pipeline import Pipeline

    from .helpers.inputs import image_and_mask

    src = flux_export(preset, block_cache=True)
    out = tmp_path / "engines"
    manifest = build_engines(src, out, custom_profile(batch="1:1:2", height="64:64:96", width="64:64:96", cfg=False),
                             BuildOptions(workspace_gb=1))
    shallow = next(r for r in manifest.engines if r.component == SHALLOW_UNET)
    shapes = {s.name: (s.min, s.max) for s in shallow.shapes}
    assert shapes["deep_feature"] == ((1, 4, 4, 16), (2, 6, 6, 16))
    if preset == KONTEXT:
        assert shapes["head_residual_reference"] == ((1, 4, 4, 16), (2, 6, 6, 16))
    image, _ = image_and_mask(w=64, h=64)
    kw: dict[str, Any] = ({"reference_image": image, "reference_resize": False, "guidance_scale": 2.5}
                          if preset == KONTEXT else {"control_images": [image], "guidance_scale": 10.0})
    kw.update(steps=4, seed=5, height=64, width=96, cache="first-block", cache_interval=2)
    want = shared_pipeline(src)("a red fox", **kw)
    with Pipeline.load(out, backend="tensorrt") as pipe:
        got = pipe("a red fox", **kw)
    assert got.loop.startswith("captured CUDA graphs") and "2 of 4 steps ran the full transformer" in got.loop
    a, b = np.asarray(want.images[0], np.int16), np.asarray(got.images[0], np.int16)
    assert a.std() > 1 and np.abs(a - b).max() <= 1


def _kontext_inpaint(flux_export: Any, policy: CachePolicy) -> tuple[np.ndarray, list[bool], list[float], np.ndarray,
                                                                      str]:
    """Kontext inpainting (the image, 96 x 64, its own reference), strength 0.75 (6 of the 8 steps):
    FluxKontextInpaintPipeline's image with the hooks per ``policy`` (the image kept at its size, ``_auto_resize``
    False; its noise the generator's first draw), which calls ran in full and their changes; sdrt's image and loop."""
    from .helpers.inputs import image_and_mask

    folder = flux_export(KONTEXT, block_cache=True)
    pipe = flux_preset_pipeline("FluxKontextInpaintPipeline", KONTEXT, folder)
    ran, changes = first_block_cache(pipe.transformer, policy, 6)
    image, mask = image_and_mask(w=WIDTH, h=HEIGHT)
    with torch.no_grad(), hooks_context(pipe.transformer):  # the pipeline sets no context (as Kontext's)
        images = pipe(prompt=PROMPT, image=image, mask_image=mask, strength=0.75, num_inference_steps=STEPS,
                      guidance_scale=2.5, generator=torch.Generator().manual_seed(SEED), _auto_resize=False,
                      output_type="np").images
    noise = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(SEED)).numpy()
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, reference_resize=False, strength=0.75,
                                  steps=STEPS, guidance_scale=2.5, latents=noise, **cache_kw(policy))
    return (images[0] * 255).round().astype(np.int32), ran, changes, np.asarray(res.images[0]).astype(np.int32), res.loop


@pytest.mark.parametrize("policy", [CachePolicy("first-block", interval=2), CachePolicy("first-block", threshold=0.3)])
def test_kontext_inpainting_matches_diffusers_hooks(flux_export, policy: CachePolicy) -> None:
    """Kontext with a mask: FluxKontextInpaintPipeline with the hooks, on a schedule and by the threshold (the
    change over the image's and the reference's tokens): the same calls run in full, images within 1/255, away from
    the uncached image."""
    want, ran, changes, got, loop = _kontext_inpaint(flux_export, policy)
    if policy.threshold is None:
        assert ran == list(policy.full_steps(6))
    else:
        assert_away_from_threshold(changes, policy.threshold)
    assert 1 < sum(ran) < 6 and full_count(loop) == sum(ran), (loop, ran, changes)
    diff = int(np.abs(got - want).max())
    assert diff <= 1 and want.std() > 5, f"Kontext with a mask ({policy.describe(ran)}): max abs difference {diff}/255"
    uncached, _, _, _, _ = _kontext_inpaint(flux_export, CachePolicy("first-block", interval=1))
    assert np.abs(uncached - want).max() > 1  # the cache changed the image: the comparison means something
