"""SD 3 / 3.5 inpainting on ort-cpu against diffusers' ``StableDiffusion3InpaintPipeline``: the tiny presets' seeded
weights, the same noise, images within 1/255.

Both ways the pipeline inpaints: an ordinary 16-channel transformer (the unmasked region blended back after every
step, re-noised with ``scale_noise`` to the next sigma) and a 33-channel one (``sd3-inpaint-tiny``: latents, the
mask and the masked image's latents concatenated at every step), at strength 1 and below, with two masks.

diffusers 0.42's SD3 inpaint pipeline decodes ``latents / scaling_factor`` without the VAE's ``shift_factor`` (its
txt2img and img2img pipelines add it); the reference here takes its latents (``output_type="latent"``) and decodes
them as those pipelines do, which is what sdrt's VAE decoder does. With ``padding_mask_crop`` (only the mask's
region, cut out, generated and pasted back) diffusers returns only PIL images, so there the reference's VAE decode
is given the shift (``_shifted_decode``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError

from .helpers.inputs import box_mask, image_and_mask
from .helpers.pipelines import module_cache, shared_pipeline
from .helpers.references import sd3_decode, sd3_pipeline

PROMPT = "a red fox in the snow"
NEGATIVE = "blurry"
_REFS: dict[tuple[str, bool], object] = module_cache({})


def _reference(preset: str, folder: Path, t5: bool):
    key = (preset, t5)
    if key not in _REFS:
        from diffusers import StableDiffusion3InpaintPipeline

        from sdrt.export.sd3_presets import build_modules, get_sd3_preset

        p = get_sd3_preset(preset)
        _REFS[key] = sd3_pipeline(StableDiffusion3InpaintPipeline, build_modules(p, seed=0), folder, p.scheduler, t5=t5)
    return _REFS[key]


@pytest.fixture
def argmax_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdrt encodes images to the latent mean (deterministic); make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint as mod

    real = mod.retrieve_latents
    monkeypatch.setattr(mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))


def _second_mask(w: int = 120, h: int = 80):
    """A small off-centre box (a different region, no soft edge)."""
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[5:40, 60:110] = 255
    return Image.fromarray(m, mode="L")


CASES = [
    # preset, t5, guidance, strength, mask
    ("sd3-tiny", True, 5.0, 1.0, "ramp"),
    ("sd3-tiny", True, 4.0, 0.6, "box"),
    ("sd3-tiny", True, 1.0, 0.8, "ramp"),
    ("sd3-inpaint-tiny", False, 5.0, 1.0, "ramp"),
    ("sd3-inpaint-tiny", False, 4.0, 0.7, "box"),
]


@pytest.mark.parametrize(("preset", "t5", "guidance", "strength", "which"), CASES)
def test_inpaint_matches_diffusers(sd3_export, argmax_vae, preset: str, t5: bool, guidance: float, strength: float,
                                   which: str) -> None:
    folder = sd3_export(preset, t5)
    ref = _reference(preset, folder, t5)
    image, ramp = image_and_mask()
    mask = ramp if which == "ramp" else _second_mask()
    height, width, steps = 64, 96, 6
    # diffusers draws the noise from the generator (the image encodes to its mean: no draw before it)
    noise = torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(3))
    negative = NEGATIVE if guidance > 1 else None
    with torch.no_grad():
        lat = ref(PROMPT, negative_prompt=negative, image=image, mask_image=mask, height=height, width=width,
                  strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    want = sd3_decode(ref, lat)[0]
    pipe = shared_pipeline(folder)
    assert pipe.is_inpainting == (preset == "sd3-inpaint-tiny")
    res = pipe(PROMPT, negative_prompt=negative, image=image, mask_image=mask, height=height, width=width,
               strength=strength, steps=steps, guidance_scale=guidance, latents=noise.numpy())
    got = np.asarray(res.images[0]).astype(np.int32)
    assert got.shape == want.shape == (height, width, 3)
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} guidance {guidance} strength {strength} {which}: {diff}/255"
    assert want.std() > 5
    assert len(res.timings["unet_steps_ms"]) == steps - int(steps - steps * strength)  # as diffusers' get_timesteps


@pytest.fixture
def shifted_decode(monkeypatch: pytest.MonkeyPatch):
    """The reference pipeline's VAE decodes ``latents / scaling + shift`` (what its inpaint pipeline leaves out)."""

    def fix(pipe) -> None:
        real, shift = pipe.vae.decode, pipe.vae.config.shift_factor
        monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **k: real(z + shift, *a, **k))

    return fix


@pytest.mark.parametrize(("preset", "t5", "guidance", "strength", "pad", "height", "width"), [
    ("sd3-tiny", True, 5.0, 1.0, 8, 64, 96),
    ("sd3-tiny", True, 1.0, 0.7, 0, 96, 64),
    ("sd3-inpaint-tiny", False, 4.0, 0.8, 5, 64, 96),
])
def test_padding_mask_crop_matches_diffusers(sd3_export, argmax_vae, shifted_decode, preset: str, t5: bool,
                                             guidance: float, strength: float, pad: int, height: int,
                                             width: int) -> None:
    """``padding_mask_crop`` around an off-centre box: diffusers' images (the original's size) within 1/255."""
    folder = sd3_export(preset, t5)
    ref = _reference(preset, folder, t5)
    shifted_decode(ref)
    image, _ = image_and_mask()
    mask = box_mask()
    steps = 5
    noise = torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = np.asarray(ref(PROMPT, image=image, mask_image=mask, height=height, width=width, strength=strength,
                              num_inference_steps=steps, guidance_scale=guidance, padding_mask_crop=pad,
                              generator=torch.Generator().manual_seed(4)).images[0]).astype(np.int32)
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, height=height, width=width, strength=strength,
                                  steps=steps, guidance_scale=guidance, latents=noise.numpy(), padding_mask_crop=pad)
    got = np.asarray(res.images[0]).astype(np.int32)
    assert got.shape == want.shape == (80, 120, 3)
    diff = int(np.abs(got - want).max())
    assert diff <= 1, f"{preset} padding {pad} {height}x{width}: {diff}/255"
    keep = np.asarray(mask) == 0
    assert np.abs(got[~keep] - np.asarray(image).astype(np.int32)[~keep]).mean() > 5


def test_bad_masks_are_refused_before_work(sd3_export) -> None:
    from PIL import Image

    pipe = shared_pipeline(sd3_export("sd3-tiny", True))
    image, mask = image_and_mask()
    with pytest.raises(InputError, match="mask_image is 60x40 but the image is 120x80"):
        pipe(PROMPT, image=image, mask_image=mask.resize((60, 40)), steps=2)
    with pytest.raises(InputError, match="needs the image to inpaint"):
        pipe(PROMPT, mask_image=mask, steps=2)
    with pytest.raises(InputError, match="mode RGBA"):
        pipe(PROMPT, image=image, mask_image=Image.new("RGBA", (120, 80)), steps=2)
    with pytest.raises(InputError, match="guidance_rescale with inpainting"):
        pipe(PROMPT, image=image, mask_image=mask, steps=2, guidance_rescale=0.5)
    inpainting = shared_pipeline(sd3_export("sd3-inpaint-tiny", False))
    with pytest.raises(InputError, match="is an inpainting model"):
        inpainting(PROMPT, steps=2, height=64, width=64)


def test_cli_generate_with_a_mask(sd3_export, tmp_path: Path) -> None:
    """``sdrt generate --init-image --mask --strength`` gives the Python call's image."""
    from PIL import Image

    from sdrt.cli import main

    folder = sd3_export("sd3-tiny", True)
    image, mask = image_and_mask()
    init, mpath, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "out.png"
    image.save(init)
    mask.save(mpath)
    assert main(["generate", str(folder), "--prompt", PROMPT, "--steps", "4", "--seed", "2", "--guidance", "4",
                 "--backend", "ort-cpu", "--init-image", str(init), "--mask", str(mpath), "--strength", "0.75",
                 "--height", "64", "--width", "96", "-o", str(out)]) == 0
    want = shared_pipeline(folder)(PROMPT, steps=4, seed=2, guidance_scale=4.0, image=image, mask_image=mask,
                                   strength=0.75, height=64, width=96).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
