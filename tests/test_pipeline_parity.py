"""sdrt on ort-cpu against diffusers' own pipelines: same synthetic weights, same initial latents.

Images must agree within 1/255 (max abs difference on uint8), for every family, sampler, with and
without guidance, with a negative prompt, at square and non-square sizes, and for img2img.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError

from .helpers.inputs import seed_for
from .helpers.models import TINY
from .helpers.pipelines import shared_pipeline
from .helpers.references import diffusers_pipe, diffusers_scheduler

SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler")


def _compare(preset, tiny_export, sampler, guidance, negative, height, width, steps=8, batch=1,
             spacing=None, rescale=0.0):
    folder = tiny_export(preset, "fp32")
    pipe, sched_cfg = diffusers_pipe(preset, folder)
    pipe.scheduler = diffusers_scheduler(sampler, sched_cfg if spacing is None
                                         else {**sched_cfg, "timestep_spacing": spacing})
    extra = {"guidance_rescale": rescale} if rescale else {}
    rng = np.random.default_rng(seed_for(preset, sampler, height, width))
    latents = rng.standard_normal((batch, 4, height // 8, width // 8), dtype=np.float32)
    prompt = "a watercolor fox in the snow, highly detailed"
    with torch.no_grad():
        ref = pipe(prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="np",
                   num_images_per_prompt=batch, **extra).images
    ref_u8 = (ref * 255).round().astype(np.int32)
    res = shared_pipeline(folder)(prompt, negative_prompt=negative, height=height, width=width, steps=steps,
                                  guidance_scale=guidance, sampler=sampler, latents=latents, batch_size=batch,
                                  timestep_spacing=spacing, **extra)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    assert got.shape == ref_u8.shape
    diff = np.abs(got - ref_u8).max()
    assert diff <= 1, f"{preset} {sampler}: max abs difference {diff}/255"
    assert 5 < ref_u8.std()  # the images are not flat: the comparison means something
    return res


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("preset", TINY)
def test_guided_negative_nonsquare(tiny_export, preset: str, sampler: str) -> None:
    _compare(preset, tiny_export, sampler, 7.5, "blurry, low quality", 64, 128)


@pytest.mark.parametrize("preset", TINY)
def test_without_guidance_square(tiny_export, preset: str) -> None:
    res = _compare(preset, tiny_export, "dpmpp-2m", 1.0, None, 64, 64)
    assert len(res.timings["unet_steps_ms"]) == 8


@pytest.mark.parametrize("preset", TINY)
def test_guided_default_negative_batch2(tiny_export, preset: str) -> None:
    # SDXL: no negative prompt means zero negative embeddings (force_zeros_for_empty_prompt)
    _compare(preset, tiny_export, "euler", 5.0, None, 96, 64, steps=6, batch=2)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("preset", ["sd21-tiny", "sdxl-tiny"])
def test_spacing_override_and_guidance_rescale(tiny_export, preset: str, sampler: str) -> None:
    """timestep_spacing="trailing" over the model's config, and guidance_rescale=0.7, as diffusers."""
    _compare(preset, tiny_export, sampler, 7.5, None, 64, 64, steps=4, spacing="trailing", rescale=0.7)


def test_guidance_rescale_changes_the_image(tiny_export) -> None:
    folder = tiny_export("sd15-tiny", "fp32")
    kw = {"steps": 4, "guidance_scale": 7.5, "sampler": "ddim", "seed": 3, "height": 64, "width": 64}
    a, b = (np.asarray(shared_pipeline(folder)("a fox", guidance_rescale=r, **kw).images[0])
            for r in (0.0, 1.0))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 2
    for bad in (-0.1, 1.5, "0.7"):
        with pytest.raises(InputError, match="guidance_rescale"):
            shared_pipeline(folder)("a fox", guidance_rescale=bad, **kw)
    with pytest.raises(InputError, match="timestep_spacing"):
        shared_pipeline(folder)("a fox", timestep_spacing="karras", **kw)


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler"])
def test_img2img(tiny_export, monkeypatch: pytest.MonkeyPatch, sampler: str, strength: float) -> None:
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_mod
    from PIL import Image

    # sdrt's img2img starts from the latent mean (deterministic); make diffusers do the same
    real = img2img_mod.retrieve_latents
    monkeypatch.setattr(img2img_mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    folder = tiny_export("sd15-tiny", "fp32")
    pipe, cfg = diffusers_pipe("sd15-tiny", folder, img2img=True)
    pipe.scheduler = diffusers_scheduler(sampler, cfg)
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(11))  # diffusers' first draw
    with torch.no_grad():
        ref = pipe("a red house", image=init, strength=strength, num_inference_steps=10, guidance_scale=6.0,
                   generator=gen, output_type="np").images
    res = shared_pipeline(folder)("a red house", image=init, strength=strength, steps=10, guidance_scale=6.0,
                                  sampler=sampler, latents=noise.numpy())
    got = np.asarray(res.images[0]).astype(np.int32)
    diff = np.abs(got - (ref[0] * 255).round().astype(np.int32)).max()
    assert diff <= 1, f"img2img {sampler} strength {strength}: {diff}/255"
    assert len(res.timings["unet_steps_ms"]) == min(int(10 * strength), 10)
