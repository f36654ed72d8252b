"""Inpainting on ort-cpu against diffusers' inpainting pipelines: same synthetic weights, same noise.

A 9-channel inpainting UNet (mask and masked-image latents concatenated in the step graph) and an
ordinary 4-channel UNet (the unmasked region blended back in the step graph), SD 1.5 and SDXL; images
within 1/255 of ``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline`` in fp32, over the
whole picture and with ``padding_mask_crop`` (only the mask's region, cut out, generated and pasted back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.export.loading import random_model

from .helpers.inputs import box_mask, image_and_mask
from .helpers.pipelines import module_cache, shared_pipeline
from .helpers.references import diffusers_scheduler

_DIFFUSERS: dict[str, object] = module_cache({})


def _diffusers(preset: str, folder: Path):
    if preset not in _DIFFUSERS:
        from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
        from transformers import CLIPTokenizer

        m = random_model(preset)
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        common = {"vae": m.vae, "unet": m.unet,
                  "scheduler": diffusers_scheduler("ddim", m.scheduler_config)}
        if m.preset.family == "sdxl":
            pipe = StableDiffusionXLInpaintPipeline(
                text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1], tokenizer=tok,
                tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"), requires_aesthetics_score=False,
                force_zeros_for_empty_prompt=True, **common)
        else:
            pipe = StableDiffusionInpaintPipeline(text_encoder=m.text_encoders[0], tokenizer=tok, safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False, **common)
        pipe.set_progress_bar_config(disable=True)
        _DIFFUSERS[preset] = (pipe, m.scheduler_config)
    return _DIFFUSERS[preset]


@pytest.fixture
def argmax_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdrt encodes images to the latent mean (deterministic); make diffusers do the same."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as sd
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as xl

    for mod in (sd, xl):
        real = mod.retrieve_latents
        monkeypatch.setattr(mod, "retrieve_latents",
                            lambda out, generator=None, sample_mode="sample", real=real: real(out, generator, "argmax"))


CASES = [
    # preset, sampler, guidance, strength
    ("sd15-inpaint-tiny", "ddim", 7.5, 1.0),
    ("sd15-inpaint-tiny", "euler", 1.0, 0.7),
    ("sd15-inpaint-tiny", "dpmpp-2m", 5.0, 1.0),
    ("sd15-tiny", "ddim", 7.5, 1.0),
    ("sd15-tiny", "euler", 1.0, 0.75),
    ("sd15-tiny", "dpmpp-2m", 6.0, 0.6),
    ("sdxl-inpaint-tiny", "euler", 6.0, 1.0),
    ("sdxl-inpaint-tiny", "dpmpp-2m", 1.0, 0.8),
    ("sdxl-tiny", "ddim", 5.0, 0.8),
]


@pytest.mark.parametrize(("preset", "sampler", "guidance", "strength"), CASES)
def test_inpaint_matches_diffusers(tiny_export, argmax_vae, preset: str, sampler: str, guidance: float,
                                   strength: float) -> None:
    folder = tiny_export(preset, "fp32")
    pipe, cfg = _diffusers(preset, folder)
    pipe.scheduler = diffusers_scheduler(sampler, cfg)
    image, mask = image_and_mask()
    height, width, steps = 64, 96, 8
    noise = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = pipe("a red house", image=image, mask_image=mask, height=height, width=width, strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(7),
                   output_type="np").images
    res = shared_pipeline(folder)("a red house", image=image, mask_image=mask, height=height, width=width,
                                  strength=strength, steps=steps, guidance_scale=guidance, sampler=sampler,
                                  latents=noise.numpy())
    ref_u8 = (ref[0] * 255).round().astype(np.int32)
    got = np.asarray(res.images[0]).astype(np.int32)
    assert got.shape == ref_u8.shape == (height, width, 3)
    diff = np.abs(got - ref_u8).max()
    assert diff <= 1, f"{preset} {sampler} guidance {guidance} strength {strength}: {diff}/255"
    assert ref_u8.std() > 5
    assert len(res.timings["unet_steps_ms"]) == min(int(steps * strength), steps)


CROP_CASES = [
    # preset, sampler, guidance, strength, padding, height, width
    ("sd15-tiny", "ddim", 7.5, 1.0, 8, 64, 96),  # the padded box 72 x 48: exactly the output's aspect ratio
    ("sd15-tiny", "euler", 1.0, 0.75, 5, 96, 64),  # portrait: the box grown down from the image's top edge
    ("sd15-inpaint-tiny", "euler", 6.0, 1.0, 5, 64, 96),  # a 67 x 45 box: resized, then its edge columns stretched
    ("sd15-inpaint-tiny", "dpmpp-2m", 1.0, 0.8, 0, 96, 64),
    ("sdxl-tiny", "ddim", 5.0, 0.8, 5, 64, 96),
    ("sdxl-inpaint-tiny", "euler", 6.0, 1.0, 8, 96, 64),
]


def _crop_reference(preset: str, folder, sampler: str, image, mask, height: int, width: int, strength: float,
                    steps: int, guidance: float, pad: int, *, seed: int):
    """diffusers' inpaint pipeline with ``padding_mask_crop`` on the export's weights: its image, and the noise its
    generator drew first (the call's size), which sdrt is given."""
    pipe, cfg = _diffusers(preset, folder)
    pipe.scheduler = diffusers_scheduler(sampler, cfg)
    noise = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = pipe("a red house", image=image, mask_image=mask, height=height, width=width, strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                   padding_mask_crop=pad).images[0]
    return ref, noise


@pytest.mark.parametrize(("preset", "sampler", "guidance", "strength", "pad", "height", "width"), CROP_CASES)
def test_padding_mask_crop_matches_diffusers(tiny_export, argmax_vae, preset: str, sampler: str, guidance: float,
                                             strength: float, pad: int, height: int, width: int) -> None:
    """``padding_mask_crop``: diffusers' images (PIL, the original's size: the only output it allows) within 1/255,
    the original's own pixels wherever the mask is black; the noise has the call's size, not the image's."""
    folder = tiny_export(preset, "fp32")
    image, mask, steps = image_and_mask()[0], box_mask(), 6
    ref, noise = _crop_reference(preset, folder, sampler, image, mask, height, width, strength, steps, guidance, pad,
                                 seed=11)
    res = shared_pipeline(folder)("a red house", image=image, mask_image=mask, height=height, width=width,
                                  strength=strength, steps=steps, guidance_scale=guidance, sampler=sampler,
                                  latents=noise.numpy(), padding_mask_crop=pad)
    want = np.asarray(ref).astype(np.int32)
    got = np.asarray(res.images[0]).astype(np.int32)
    assert got.shape == want.shape == (80, 120, 3)
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} {sampler} padding {pad} {height}x{width}: {diff}/255"
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(got[keep], np.asarray(image).astype(np.int32)[keep])
    assert np.abs(got[~keep] - np.asarray(image).astype(np.int32)[~keep]).mean() > 5  # the box was repainted


@pytest.mark.parametrize(("preset", "sampler", "guidance", "strength", "pad", "height", "width"), [
    ("sd15-inpaint-tiny", "euler", 6.0, 1.0, 5, 64, 96),
    ("sd15-tiny", "dpmpp-2m", 5.0, 0.8, 8, 96, 64),
])
def test_staged_padding_mask_crop_matches_diffusers(tiny_export, argmax_vae, preset: str, sampler: str,
                                                    guidance: float, strength: float, pad: int, height: int,
                                                    width: int) -> None:
    """The four stages with ``prepare_latents(..., padding_mask_crop=)``: ``decode`` pastes the box back into the
    original, diffusers' images within 1/255; the bare latents decode to the box's picture at the call's size."""
    folder = tiny_export(preset, "fp32")
    image, mask, steps = image_and_mask()[0], box_mask(), 5
    ref, noise = _crop_reference(preset, folder, sampler, image, mask, height, width, strength, steps, guidance, pad,
                                 seed=13)
    sd = shared_pipeline(folder)
    emb = sd.encode_prompt("a red house")
    plan = sd.plan(sampler, steps, strength=strength)
    lat = sd.prepare_latents(plan, height, width, latents=noise.numpy(), image=image, mask_image=mask,
                             strength=strength, padding_mask_crop=pad)
    lat = sd.denoise(emb, lat, plan, guidance_scale=guidance)
    images, _ = sd.decode(lat)
    want = np.asarray(ref).astype(np.int32)
    got = np.asarray(images[0]).astype(np.int32)
    assert got.shape == want.shape == (80, 120, 3)
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} {sampler} padding {pad} {height}x{width}: {diff}/255"
    keep = np.asarray(mask) == 0
    assert np.abs(got[~keep] - np.asarray(image).astype(np.int32)[~keep]).mean() > 5  # the box was repainted
    box, _ = sd.decode(lat.x)
    assert box[0].size == (width, height)


def _rgba(image):
    """``image`` with an alpha channel that varies inside the mask's box and out of it: a ramp across the image,
    random noise on it and a few fully transparent pixels."""
    from PIL import Image

    rng = np.random.default_rng(17)
    w, h = image.size
    alpha = np.linspace(30, 255, w)[None, :] + rng.normal(0, 40, (h, w))
    alpha[rng.random((h, w)) < 0.05] = 0
    rgba = np.dstack([np.asarray(image), np.clip(alpha, 0, 255).astype(np.uint8)])
    return Image.fromarray(rgba, mode="RGBA")


@pytest.mark.parametrize(("preset", "sampler", "pad", "height", "width"), [
    ("sd15-inpaint-tiny", "euler", 5, 64, 96),
    ("sd15-tiny", "ddim", 8, 96, 64),
])
def test_padding_mask_crop_of_a_transparent_image_matches_diffusers(tiny_export, argmax_vae, preset: str,
                                                                    sampler: str, pad: int, height: int,
                                                                    width: int) -> None:
    """An RGBA init image with ``padding_mask_crop``, as diffusers takes it: the box cut and resized with its alpha
    (colours weighted by it) before the alpha is dropped, and the original pasted back through its alpha; images
    within 1/255 of diffusers'."""
    folder = tiny_export(preset, "fp32")
    pipe, cfg = _diffusers(preset, folder)
    pipe.scheduler = diffusers_scheduler(sampler, cfg)
    image = _rgba(image_and_mask()[0])
    mask = box_mask()
    steps, guidance = 4, 6.0
    noise = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(19))
    with torch.no_grad():
        ref = pipe("a red house", image=image, mask_image=mask, height=height, width=width, strength=1.0,
                   num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(19),
                   padding_mask_crop=pad).images[0]
    res = shared_pipeline(folder)("a red house", image=image, mask_image=mask, height=height, width=width,
                                  steps=steps, guidance_scale=guidance, sampler=sampler, latents=noise.numpy(),
                                  padding_mask_crop=pad)
    want = np.asarray(ref).astype(np.int32)
    got = np.asarray(res.images[0]).astype(np.int32)
    assert got.shape == want.shape == (80, 120, 3)
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} {sampler} padding {pad} {height}x{width}: {diff}/255"
