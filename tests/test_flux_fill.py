"""FLUX.1 Fill (inpainting) on ort-cpu against diffusers' ``FluxFillPipeline``: the tiny Fill preset's seeded
weights exported by ``export_flux``, the same image, mask and initial latents, images within 1/255.

Covers two masks (a box and a soft ramp that resizing and binarizing decide) at two sizes (one the image's own,
one a resize of image and mask), two guidance scales, a batch, partial denoising (``strength`` < 1), the
masked-image encoder against diffusers' masked latents, the refusals before any work, and the A1111 img2img
endpoint with a mask; ort-cuda's code path, openvino and the TensorRT fakes against diffusers too. sdrt's encoders take the
latent distribution's mean: diffusers is made to (``retrieve_latents`` in argmax mode), as for img2img in
tests/test_flux.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import CompatibilityError, InputError

from .helpers.inputs import image_and_mask
from .helpers.pipelines import LOOP_WORDS, module_cache, shared_pipeline
from .helpers.references import assert_diffusers_images, flux_packed

PRESET = "flux-fill-dev-tiny"
PROMPT = "a red boat on a calm lake"
_REF: list[object] = module_cache([])


@pytest.fixture
def mean_latents(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' Fill pipeline encodes to the latent distribution's mean, as sdrt's encoders do."""
    import diffusers.pipelines.flux.pipeline_flux_fill as mod

    real = mod.retrieve_latents
    monkeypatch.setattr(mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))


def _reference(folder):
    if not _REF:
        from diffusers import FluxFillPipeline
        from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTokenizer, T5TokenizerFast

        from sdrt.export.flux_presets import build_modules, get_flux_preset

        p = get_flux_preset(PRESET)
        m = build_modules(p, seed=0)
        pipe = FluxFillPipeline(transformer=m.transformer, vae=m.vae,
                                scheduler=FlowMatchEulerDiscreteScheduler.from_config(p.scheduler),
                                text_encoder=m.clip, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                                text_encoder_2=m.t5, tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))
        pipe.set_progress_bar_config(disable=True)
        _REF.append(pipe)
    return _REF[0]


def _box_mask(w: int, h: int):
    from PIL import Image

    m = np.zeros((h, w), np.uint8)
    m[h // 5: 3 * h // 5, w // 4: 3 * w // 4] = 255
    return Image.fromarray(m, mode="L")


def _compare(folder, image, mask, *, height: int, width: int, guidance: float = 30.0, steps: int = 3,
             batch: int = 1, seed: int = 0) -> np.ndarray:
    ref = _reference(folder)
    latents = np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(PROMPT, image=image, mask_image=mask, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, latents=flux_packed(latents), num_images_per_prompt=batch,
                   output_type="np").images
    want_u8 = (want * 255).round().astype(np.int32)
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, height=height, width=width, steps=steps,
                                  guidance_scale=guidance, latents=latents, batch_size=batch)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    assert got.shape == want_u8.shape
    diff = int(np.abs(got - want_u8).max())
    assert diff <= 1, f"{height}x{width} guidance {guidance} batch {batch}: max abs difference {diff}/255"
    assert want_u8.std() > 5
    return want_u8


def test_export_is_an_inpainting_model(flux_export) -> None:
    """The Fill export: a transformer of 16 + 64 + 16 input channels (latents, the mask's 8 x 8 pixels per
    latent pixel, the masked image's latents) predicting 16, and the masked image's encoder."""
    from sdrt.runtime.manifest import ExportManifest

    folder = flux_export(PRESET)
    m = ExportManifest.read(folder)
    assert "vae_encoder_masked" in m.components and m.source["guidance_embeds"] is True
    pipe = shared_pipeline(folder)
    assert pipe.is_inpainting and pipe.takes_guidance
    assert pipe.engines["unet"].inputs["sample"].shape[1] == 96
    (out,) = [o for o in m.components["unet"].outputs if o.name == "out_sample"]
    assert out.shape[1] == 16


@pytest.mark.parametrize(("mask_kind", "size"), [("box", (64, 96)), ("ramp", (80, 64))])
def test_fill_gives_diffusers_images(flux_export, mean_latents, mask_kind: str, size: tuple[int, int]) -> None:
    """A box mask at the image's own size; a soft ramp on a 120 x 80 image made 80 x 64 (image and mask resized,
    Lanczos, the mask binarized at 0.5, as FluxFillPipeline's processors do)."""
    height, width = size
    if mask_kind == "box":
        image, _ = image_and_mask(w=width, h=height)
        mask = _box_mask(width, height)
    else:
        image, mask = image_and_mask()
    _compare(flux_export(PRESET), image, mask, height=height, width=width)


def test_guidance_is_embedded(flux_export, mean_latents) -> None:
    """Two guidance scales (Fill is guidance-distilled: diffusers' default is 30), two images, each diffusers'."""
    image, mask = image_and_mask(w=64, h=64)
    a = _compare(flux_export(PRESET), image, mask, height=64, width=64, guidance=2.0, steps=2)
    b = _compare(flux_export(PRESET), image, mask, height=64, width=64, guidance=30.0, steps=2)
    assert np.abs(a - b).max() > 1


def test_batch(flux_export, mean_latents) -> None:
    image, mask = image_and_mask(w=64, h=64)
    got = _compare(flux_export(PRESET), image, mask, height=64, width=64, batch=2, steps=2, seed=3)
    assert np.abs(got[0] - got[1]).max() > 1


def test_partial_denoising(flux_export, mean_latents) -> None:
    """``strength`` 0.6: the image encoded and noised to the first step of the shortened schedule, as diffusers'
    ``prepare_latents`` does (its noise: the generator's first draw, [1, 16, h, w])."""
    folder = flux_export(PRESET)
    image, mask = image_and_mask(w=64, h=64)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(11)).numpy()
    with torch.no_grad():
        want = _reference(folder)(PROMPT, image=image, mask_image=mask, height=64, width=64, strength=0.6,
                                  num_inference_steps=5, guidance_scale=30.0, output_type="np",
                                  generator=torch.Generator().manual_seed(11)).images
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, strength=0.6, steps=5, guidance_scale=30.0,
                                  latents=noise)
    assert len(res.timings["unet_steps_ms"]) == 3
    got = np.asarray(res.images[0]).astype(np.int32)
    diff = int(np.abs(got - (want[0] * 255).round().astype(np.int32)).max())
    assert diff <= 1, f"strength 0.6: max abs difference {diff}/255"


_BACKEND_REF: list[np.ndarray] = []


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino", "tensorrt"])
def test_other_backends_give_diffusers_images(flux_export, mean_latents, request: pytest.FixtureRequest,
                                              tmp_path: Path, backend: str) -> None:
    """ort-cuda's code path (on the CPU EP, the composed transformer + step session with the mask channels),
    openvino (fp32, step by step) and the TensorRT fakes (the captured loop): a box mask at 64 x 96,
    FluxFillPipeline's image, computed once for all three. None says anything of a GPU."""
    from .helpers.pipelines import loaded_on_any

    folder = flux_export(PRESET)
    image, _ = image_and_mask(w=96, h=64)
    mask = _box_mask(96, 64)
    latents = np.random.default_rng(5).standard_normal((1, 16, 8, 12), dtype=np.float32)
    call = {"image": image, "mask_image": mask, "height": 64, "width": 96, "guidance_scale": 30.0}
    if not _BACKEND_REF:
        with torch.no_grad():
            _BACKEND_REF.append(_reference(folder)(PROMPT, num_inference_steps=3, latents=flux_packed(latents),
                                                   output_type="np", **call).images)
    with loaded_on_any(folder, backend, request, tmp_path / "engines", cfg=False) as pipe:
        res = pipe(PROMPT, steps=3, latents=latents, **call)
    assert_diffusers_images(res.images, _BACKEND_REF[0], f"Fill on {backend}")
    assert res.loop.startswith(LOOP_WORDS[backend]), res.loop


def test_masked_image_latents_are_diffusers(flux_export, mean_latents) -> None:
    """The export's masked-image encoder and the runtime's mask channels against FluxFillPipeline's
    ``prepare_mask_latents`` (packed: what the transformer reads beside the latents)."""
    from sdrt.runtime import inpaint

    folder = flux_export(PRESET)
    ref = _reference(folder)
    image, mask = image_and_mask(w=96, h=64)
    init = ref.image_processor.preprocess(image, height=64, width=96)
    mask_t = ref.mask_processor.preprocess(mask, height=64, width=96)
    with torch.no_grad():
        want_mask, want_masked = ref.prepare_mask_latents(mask_t, init * (1 - mask_t), 1, 16, 1, 64, 96,
                                                          torch.float32, "cpu", None)
    pipe = shared_pipeline(folder)
    mask_px = inpaint.binarize(inpaint.resize_mask(inpaint.mask_to_pil(mask), 64, 96))
    be = pipe.backend
    masked = pipe.engines["vae_encoder_masked"]({
        "image": be.to_device(np.asarray(image.convert("RGB"))[None]),
        "mask": be.to_device(mask_px.astype(np.uint8)[None, :, :, None])})["latent"]
    np.testing.assert_allclose(flux_packed(be.to_host(masked)).numpy(), want_masked.numpy(), atol=2e-5)
    np.testing.assert_array_equal(flux_packed(inpaint.latent_mask(mask_px, 8, 1, 64)).numpy(), want_mask.numpy())


def test_refusals_before_any_work(flux_export) -> None:
    from PIL import Image

    pipe = shared_pipeline(flux_export(PRESET))
    image, mask = image_and_mask(w=64, h=64)
    with pytest.raises(InputError, match="is an inpainting model .*pass image= and mask_image="):
        pipe(PROMPT, steps=2, height=64, width=64)
    with pytest.raises(InputError, match="is an inpainting model .*pass image= and mask_image="):
        pipe(PROMPT, image=image, steps=2)
    with pytest.raises(InputError, match="mask_image needs the image to inpaint"):
        pipe(PROMPT, mask_image=mask, steps=2, height=64, width=64)
    with pytest.raises(InputError, match="mask_image is 32x32 but the image is 64x64"):
        pipe(PROMPT, image=image, mask_image=Image.new("L", (32, 32)), steps=2)
    with pytest.raises(InputError, match="no negative prompt"):
        pipe(PROMPT, negative_prompt="blurry", image=image, mask_image=mask, steps=2)
    with pytest.raises(InputError, match="multiple of 16"):
        pipe(PROMPT, image=image, mask_image=mask, steps=2, height=72, width=64)
    # a control image is a control model's (FLUX.1 Depth / Canny, which inpaints by blending), not Fill's
    with pytest.raises(CompatibilityError, match="exported without ControlNets"):
        pipe(PROMPT, image=image, mask_image=mask, control_images=[image], steps=2)


def test_a1111_img2img_with_a_mask(flux_export) -> None:
    """``sdrt serve``'s A1111 img2img endpoint with a mask on the Fill export: the pipeline's own call with that
    mask (A1111's default mask blur 4 as the paste-back blur); without a mask, a 422 naming the mask."""
    import base64
    import io

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    def b64(im) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    pipe = shared_pipeline(flux_export(PRESET))
    image, _ = image_and_mask(w=64, h=64)
    mask = _box_mask(64, 64)  # black and white: A1111's own binarization (> 128) keeps it as it is
    want = np.asarray(pipe(PROMPT, image=image, mask_image=mask, steps=2, seed=4, guidance_scale=30.0,
                           paste_back=4.0).images[0])
    app = create_app(pipe, max_batch=2, batch_window_ms=5, max_steps=4, max_pixels=128 * 128)
    with LiveServer(app) as server:
        body = {"prompt": PROMPT, "init_images": [b64(image)], "steps": 2, "seed": 4, "cfg_scale": 30.0,
                "denoising_strength": 1.0}
        r = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=120, json={**body, "mask": b64(mask)})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
        r = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=120, json=body)
        assert r.status_code == 422 and "mask" in r.text, r.text


def test_padding_mask_crop_is_diffusers_crop_fill_and_overlay(flux_export, mean_latents) -> None:
    """``padding_mask_crop`` on Fill, whose diffusers pipeline has no such argument: the reference is composed of
    diffusers' own pieces as its other inpainting pipelines compose them: ``get_crop_region`` around an off-centre
    box, the crop resized by ``resize_mode="fill"`` (image and mask), ``FluxFillPipeline`` at 64 x 96 on them, and
    ``apply_overlay`` back into the 120 x 80 original."""
    from diffusers.image_processor import VaeImageProcessor

    from .helpers.inputs import box_mask

    folder = flux_export(PRESET)
    ref = _reference(folder)
    image, _ = image_and_mask()
    mask = box_mask()
    height, width, pad, steps = 64, 96, 5, 3
    latents = np.random.default_rng(8).standard_normal((1, 16, height // 8, width // 8), dtype=np.float32)
    proc = ref.image_processor
    box = VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
    crop_image = proc.resize(image.crop(box), height, width, resize_mode="fill")
    crop_mask = proc.resize(mask.crop(box), height, width, resize_mode="fill").convert("L")
    with torch.no_grad():
        out = ref(PROMPT, image=crop_image, mask_image=crop_mask, height=height, width=width,
                  num_inference_steps=steps, guidance_scale=30.0, latents=flux_packed(latents)).images[0]
    want = np.asarray(proc.apply_overlay(mask, image, out, box)).astype(np.int32)
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, height=height, width=width, steps=steps,
                                  guidance_scale=30.0, latents=latents, padding_mask_crop=pad)
    got = np.asarray(res.images[0]).astype(np.int32)
    assert got.shape == want.shape == (80, 120, 3)
    assert int(np.abs(got - want).max()) <= 1
    keep = np.asarray(mask) == 0
    assert np.abs(got[~keep] - np.asarray(image).astype(np.int32)[~keep]).mean() > 5
