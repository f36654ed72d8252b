"""FLUX.1 Kontext (image editing) on ort-cpu against diffusers' ``FluxKontextPipeline``: the tiny Kontext preset's
seeded weights exported by ``export_flux``, the same reference image and initial latents, images within 1/255.

Covers the reference kept at its own size (rounded down to whole patches) and resized to Kontext's preferred
resolution nearest its aspect ratio (diffusers' ``_auto_resize``), two guidance scales, a batch, ``sdrt generate
--reference``, loading a diffusers ``FluxKontextPipeline`` folder and a single file with ``--arch``, and the
refusals before any work. diffusers' Kontext pipeline rescales the size asked to ``max_area``: the tests give it
the size's own area, so it keeps the size. Inpainting on Kontext (``image=`` and ``mask_image=``) against
``FluxKontextInpaintPipeline`` over the same modules, with and without a separate reference, at strengths 1 and 0.6,
and with ``padding_mask_crop`` (the box cut from the image and the reference once sized, nothing pasted back).
Editing and inpainting on ort-cuda's code path and openvino (fp32) against the same diffusers pipelines too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError

from .helpers.inputs import control_image
from .helpers.pipelines import module_cache, shared_pipeline
from .helpers.references import flux_packed, flux_preset_pipeline

PRESET = "flux-kontext-dev-tiny"
PROMPT = "make the boat red"
_REF: list[object] = module_cache([])


def _reference(folder: Path):
    if not _REF:
        _REF.append(flux_preset_pipeline("FluxKontextPipeline", PRESET, folder))
    return _REF[0]


def _compare(folder: Path, reference, *, height: int, width: int, resize: bool = False, guidance: float = 2.5,
             steps: int = 3, batch: int = 1, seed: int = 0) -> np.ndarray:
    ref = _reference(folder)
    latents = np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(image=reference, prompt=PROMPT, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, latents=flux_packed(latents), num_images_per_prompt=batch,
                   max_area=height * width, _auto_resize=resize, output_type="np").images
    want_u8 = (want * 255).round().astype(np.int32)
    res = shared_pipeline(folder)(PROMPT, reference_image=reference, reference_resize=resize, height=height,
                                  width=width, steps=steps, guidance_scale=guidance, latents=latents,
                                  batch_size=batch)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    assert got.shape == want_u8.shape
    diff = int(np.abs(got - want_u8).max())
    assert diff <= 1, f"{height}x{width} guidance {guidance} batch {batch}: max abs difference {diff}/255"
    assert want_u8.std() > 5
    return want_u8


def test_export_takes_a_reference(flux_export) -> None:
    from sdrt.runtime.manifest import ExportManifest

    folder = flux_export(PRESET)
    m = ExportManifest.read(folder)
    (ref,) = [i for i in m.components["unet"].inputs if i.name == "reference_latents"]
    assert tuple(ref.shape) == (1, 16, "reference_height", "reference_width")
    assert shared_pipeline(folder).takes_reference


@pytest.mark.parametrize(("height", "width", "guidance"), [(64, 96, 2.5), (80, 64, 5.0)])
def test_kontext_gives_diffusers_images(flux_export, height: int, width: int, guidance: float) -> None:
    """A 120 x 90 reference at its own size rounded down to whole patches (112 x 80: a resize, as diffusers'
    processor makes it), two output sizes (neither the reference's) and two guidance scales."""
    _compare(flux_export(PRESET), control_image(3, w=120, h=90), height=height, width=width, guidance=guidance)


def test_preferred_resolution(flux_export) -> None:
    """The default: the reference resized to Kontext's preferred resolution nearest its aspect ratio (a 90 x 60
    image: 1248 x 832, 4056 reference tokens beside the image's 16), as FluxKontextPipeline's ``_auto_resize``."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from sdrt.runtime.families.flux import KONTEXT_RESOLUTIONS

    assert [tuple(r) for r in KONTEXT_RESOLUTIONS] == [tuple(r) for r in PREFERRED_KONTEXT_RESOLUTIONS]
    _compare(flux_export(PRESET), control_image(4, w=90, h=60), height=64, width=64, resize=True, steps=2)


def test_batch(flux_export) -> None:
    got = _compare(flux_export(PRESET), control_image(5, w=64, h=64), height=64, width=64, batch=2, steps=2, seed=7)
    assert np.abs(got[0] - got[1]).max() > 1


def test_generate_cli(flux_export, tmp_path: Path) -> None:
    """``sdrt generate --reference IMG --no-reference-resize``: the Pipeline call's image."""
    from PIL import Image

    from sdrt.cli import main

    folder = flux_export(PRESET)
    control_image(6, w=64, h=48).save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(folder), "--prompt", PROMPT, "--reference", str(tmp_path / "ref.png"),
                 "--no-reference-resize", "--steps", "2", "--seed", "3", "--height", "64", "--width", "64",
                 "--guidance", "2.5", "--backend", "ort-cpu", "-o", str(out)]) == 0
    want = shared_pipeline(folder)(PROMPT, reference_image=Image.open(tmp_path / "ref.png"), reference_resize=False,
                                   steps=2, seed=3, height=64, width=64, guidance_scale=2.5).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_refusals_before_any_work(flux_export) -> None:
    pipe = shared_pipeline(flux_export(PRESET))
    ref = control_image(1, w=64, h=64)
    with pytest.raises(InputError, match=r"is an editing model \(FLUX.1 Kontext\): pass reference_image="):
        pipe(PROMPT, steps=2, height=64, width=64)
    with pytest.raises(InputError, match="starts from noise.*leave image= out, or add mask_image= to inpaint"):
        pipe(PROMPT, reference_image=ref, image=ref, steps=2)
    with pytest.raises(InputError, match=r"reference_image is 8x8, 0x0 once sized for the model"):
        pipe(PROMPT, reference_image=np.zeros((8, 8, 3), np.uint8), reference_resize=False, steps=2, height=64,
             width=64)
    with pytest.raises(InputError, match="reference_resize must be True or False"):
        pipe(PROMPT, reference_image=ref, reference_resize="no", steps=2, height=64, width=64)
    with pytest.raises(InputError, match="no negative prompt"):
        pipe(PROMPT, negative_prompt="blurry", reference_image=ref, steps=2, height=64, width=64)


def test_a_reference_for_a_model_without_one_is_refused(flux_export) -> None:
    pipe = shared_pipeline(flux_export("flux-dev-tiny"))
    assert not pipe.takes_reference
    with pytest.raises(InputError, match=r"reference_image conditions an editing model .* takes none"):
        pipe(PROMPT, reference_image=control_image(1, w=64, h=64), steps=2, height=64, width=64)


def test_diffusers_folder_and_single_file_are_kontext(tmp_path: Path) -> None:
    """A diffusers ``FluxKontextPipeline`` folder loads as Kontext (its transformer is [dev]'s: the pipeline class
    tells them apart); a single file has [dev]'s shapes, so it is [dev] unless ``--arch`` names Kontext."""
    from diffusers import FluxKontextPipeline
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdrt.export.flux_loading import load_flux
    from sdrt.export.flux_presets import build_modules, get_flux_preset
    from sdrt.export.flux_single_file import load_flux_single_file
    from sdrt.export.t5_tokenizer_assets import write_t5_tokenizer
    from sdrt.export.tokenizer_assets import write_clip_tokenizer

    from .helpers.flux_layout import comfy_file
    from .helpers.sd3_layout import write

    p = get_flux_preset(PRESET)
    m = build_modules(p, seed=0)
    write_clip_tokenizer(tmp_path / "tok", pad_token=p.pad_token)
    write_t5_tokenizer(tmp_path / "tok2")
    FluxKontextPipeline(transformer=m.transformer, vae=m.vae,
                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(p.scheduler), text_encoder=m.clip,
                        tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tok"), text_encoder_2=m.t5,
                        tokenizer_2=T5TokenizerFast.from_pretrained(tmp_path / "tok2"),
                        ).save_pretrained(tmp_path / "kontext")
    assert load_flux(tmp_path / "kontext").preset.name == PRESET
    path = write(comfy_file(m), tmp_path / "flux1-kontext-dev.safetensors")
    assert load_flux_single_file(path).preset.name == "flux-dev-tiny"
    assert load_flux_single_file(path, arch=PRESET).preset.name == PRESET


def test_streamed_transformer_takes_references_of_any_size(tmp_path: Path) -> None:
    """A full-size Kontext transformer is streamed (torch.export on fake tensors, the reference's sides dynamic):
    the streamed graph of the tiny structure equals the same weights in PyTorch at two image and reference sizes
    (neither the traced one)."""
    import onnxruntime as ort

    from sdrt.export.flux_loading import weight_shapes
    from sdrt.export.flux_presets import get_flux_preset
    from sdrt.export.flux_specs import streamed_transformer_spec
    from sdrt.export.flux_wrappers import FluxTransformer
    from sdrt.export.streamed import export_streamed, materialize, synthetic_weights

    p = get_flux_preset(PRESET)
    cfg = p.config("transformer")
    weights = synthetic_weights(0, weight_shapes(cfg, p.config("t5"))["transformer"])
    spec = streamed_transformer_spec(cfg, 8, reference=True)
    export_streamed(spec, weights, "fp32", tmp_path / "unet")
    module = FluxTransformer(materialize(spec, weights), torchscript=False, reference=True)  # the same weights
    sess = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for (h, w), (rh, rw) in (((8, 12), (6, 4)), ((4, 6), (12, 10))):
        feeds = {"sample": torch.randn(2, 16, h, w, generator=g), "timestep": torch.tensor([900.0, 900.0]),
                 "encoder_hidden_states": torch.randn(2, 8, 48, generator=g),
                 "pooled_projections": torch.randn(2, 16, generator=g), "guidance": torch.tensor([2.5, 4.0]),
                 "reference_latents": torch.randn(1, 16, rh, rw, generator=g)}
        with torch.no_grad():
            want = module(*feeds.values()).numpy()
        (got,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert got.shape == want.shape == (2, 16, h, w)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


_BACKEND_REF: dict[bool, np.ndarray] = {}


@pytest.mark.parametrize(("backend", "cuda_graph", "inpaint"), [
    ("ort-cuda-path", False, False), ("ort-cuda-path", True, False), ("ort-cuda-path", True, True),
    ("openvino", False, False), ("openvino", False, True)])
def test_other_backends_give_diffusers_images(flux_export, monkeypatch: pytest.MonkeyPatch, backend: str,
                                              cuda_graph: bool, inpaint: bool) -> None:
    """ort-cuda's code path on the CPU EP (IO binding; with cuda_graph the composed transformer + step session, the
    reference's latents bound as a conditioning input; ``inpaint``: the blending step's inputs too) and openvino
    (fp32): editing a 64 x 48 reference kept at its own size, FluxKontextPipeline's image; inpainting a 120 x 80
    image with a 90 x 70 reference at strength 0.75, FluxKontextInpaintPipeline's. Each reference computed once for
    every backend. None says anything of a GPU."""
    from .helpers.inputs import image_and_mask
    from .helpers.pipelines import loaded_on
    from .helpers.references import assert_diffusers_images

    folder = flux_export(PRESET)
    if inpaint:
        image, mask = image_and_mask()
        reference = control_image(11, w=90, h=70)
        noise = torch.randn((1, 16, 80 // 8, 112 // 8), generator=torch.Generator().manual_seed(9)).numpy()
        kw = {"image": image, "mask_image": mask, "reference_image": reference, "strength": 0.75, "steps": 3,
              "latents": noise}
        if inpaint not in _BACKEND_REF:
            _BACKEND_REF[inpaint] = _inpaint_want(folder, image, mask, reference, strength=0.75, steps=3, seed=9)
    else:
        reference = control_image(8, w=64, h=48)
        latents = np.random.default_rng(9).standard_normal((1, 16, 8, 8), dtype=np.float32)
        kw = {"reference_image": reference, "height": 64, "width": 64, "steps": 2, "latents": latents}
        if inpaint not in _BACKEND_REF:
            with torch.no_grad():
                _BACKEND_REF[inpaint] = _reference(folder)(
                    image=reference, prompt=PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=2.5,
                    latents=flux_packed(latents), max_area=64 * 64, _auto_resize=False, output_type="np").images
    with loaded_on(folder, backend, monkeypatch, cuda_graph=cuda_graph) as pipe:
        res = pipe(PROMPT, guidance_scale=2.5, reference_resize=False, **kw)
    assert_diffusers_images(res.images, _BACKEND_REF[inpaint], f"{'inpainting' if inpaint else 'editing'} on "
                                                                f"{backend} (cuda_graph {cuda_graph})")
    assert res.loop.startswith("UNet + sampler step as one ONNX Runtime session" if cuda_graph
                               else "engines run "), res.loop


def test_served_on_the_openai_edits_endpoint(flux_export) -> None:
    """``sdrt serve`` on a Kontext export: ``/v1/images/edits``' image is the reference (the pipeline's own call
    with it, resized to the preferred resolution); with a mask (alpha 0 = edit) the image is inpainted, with a
    strength (the pipeline's call with image= and mask_image=); a strength without a mask is a 422 naming the field;
    A1111's img2img with a mask inpaints too (at the image's own size, A1111's mask blur the paste-back's), its
    inpaint_full_res refused (a 422 naming it); the server's warm-up passes with a reference."""
    import base64
    import io

    from PIL import Image

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    pipe = shared_pipeline(flux_export(PRESET))
    ref = control_image(9, w=48, h=32)
    want = np.asarray(pipe(PROMPT, reference_image=ref, height=64, width=64, steps=2, seed=4,
                           guidance_scale=2.5).images[0])
    region = np.zeros((32, 48), bool)
    region[8:24, 16:40] = True
    rgba = np.full((32, 48, 4), 255, np.uint8)
    rgba[..., 3] = np.where(region, 0, 255)
    want_inpaint = np.asarray(pipe(PROMPT, image=ref, mask_image=Image.fromarray(np.where(region, 255, 0).astype(
        np.uint8)), strength=0.7, height=64, width=64, steps=2, seed=4, guidance_scale=2.5).images[0])

    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    init, box = control_image(10, w=80, h=64), np.zeros((64, 80), np.uint8)
    box[16:48, 24:64] = 255  # black and white: A1111's binarization (> 128) keeps it
    want_a1111 = np.asarray(pipe(PROMPT, image=init, mask_image=Image.fromarray(box), strength=0.75, height=64,
                                 width=80, steps=2, seed=4, guidance_scale=2.5, paste_back=4.0).images[0])
    files = {"image": ("ref.png", png(ref), "image/png")}
    form = {"prompt": PROMPT, "size": "64x64", "steps": "2", "seed": "4", "guidance_scale": "2.5"}
    with LiveServer(create_app(pipe, max_batch=2, batch_window_ms=5, max_steps=4, max_pixels=128 * 128)) as server:
        r = httpx.post(f"{server.url}/v1/images/edits", files=files, data=form, timeout=120)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        r = httpx.post(f"{server.url}/v1/images/edits", files=files, data={**form, "strength": "0.5"}, timeout=120)
        assert r.status_code == 422 and "strength" in r.text and "Kontext" in r.text, r.text
        r = httpx.post(f"{server.url}/v1/images/edits", data={**form, "strength": "0.7"}, timeout=120,
                       files={**files, "mask": ("mask.png", png(Image.fromarray(rgba)), "image/png")})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want_inpaint)
        body = {"prompt": PROMPT, "init_images": [base64.b64encode(png(init)).decode()], "steps": 2, "seed": 4,
                "cfg_scale": 2.5, "denoising_strength": 0.75, "mask": base64.b64encode(png(Image.fromarray(box))).decode()}
        r = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=120, json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want_a1111)
        # A1111's "only masked" pastes the region back into the whole image; Kontext's crop returns the region
        r = httpx.post(f"{server.url}/sdapi/v1/img2img", timeout=120,
                       json={**body, "inpaint_full_res": True, "inpaint_full_res_padding": 8})
        assert r.status_code == 422 and r.json()["error"]["param"] == "inpaint_full_res", r.text


def test_staged_calls_give_the_one_call_image(flux_export) -> None:
    """``prepare_latents(..., reference_image=)`` then ``denoise`` and ``decode``: the one call's image;
    ``prepare_latents`` without a reference is refused, naming it."""
    pipe = shared_pipeline(flux_export(PRESET))
    ref = control_image(2, w=64, h=64)
    want = np.asarray(pipe(PROMPT, reference_image=ref, reference_resize=False, steps=2, seed=6, height=64, width=64,
                           guidance_scale=2.5).images[0])
    emb = pipe.encode_prompt(PROMPT)
    plan = pipe.plan(None, 2, height=64, width=64)
    lat = pipe.prepare_latents(plan, 64, 64, seed=6, reference_image=ref, reference_resize=False)
    images, _ = pipe.decode(pipe.denoise(emb, lat, plan, guidance_scale=2.5))
    np.testing.assert_array_equal(np.asarray(images[0]), want)
    with pytest.raises(InputError, match=r"is an editing model \(FLUX.1 Kontext\): pass reference_image="):
        pipe.prepare_latents(plan, 64, 64, seed=6)


# -- inpainting on Kontext (FluxKontextInpaintPipeline) ------------------------------------------------------
def _inpaint_reference(folder: Path):
    from diffusers import FluxKontextInpaintPipeline

    return FluxKontextInpaintPipeline.from_pipe(_reference(folder))  # the same modules


def _inpaint_want(folder: Path, image, mask, reference, *, strength: float, steps: int, seed: int, batch: int = 1,
                  guidance: float = 2.5, padding_mask_crop: int | None = None) -> np.ndarray:
    """FluxKontextInpaintPipeline's images, its image and reference kept at their own sizes (``_auto_resize``
    False); its noise is the generator's first draw (the image encodes to its mean: no draw before it)."""
    with torch.no_grad():
        out = _inpaint_reference(folder)(
            prompt=PROMPT, image=image, mask_image=mask, image_reference=reference, strength=strength,
            num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=batch,
            generator=torch.Generator().manual_seed(seed), _auto_resize=False, padding_mask_crop=padding_mask_crop,
            output_type="np" if padding_mask_crop is None else "pil").images  # a mask crop's output is PIL only
    if padding_mask_crop is not None:
        return np.stack([np.asarray(im) for im in out]) / 255.0
    return out


@pytest.mark.parametrize(("separate", "strength", "batch"), [(False, 1.0, 1), (True, 1.0, 1), (False, 0.6, 1),
                                                             (True, 0.6, 2)])
def test_inpaint_gives_diffusers_images(flux_export, separate: bool, strength: float, batch: int) -> None:
    """``image=`` and ``mask_image=`` on Kontext: FluxKontextInpaintPipeline's images. The 120 x 80 image is sized as
    a reference (112 x 80, the output's size) and, without ``reference_image``, is the reference; with one (a 90 x
    70 image: 80 x 64) that is (diffusers' ``image_reference``). The unmasked region is blended back after every
    step, re-noised to the next sigma; strength < 1 starts from the noised image, on diffusers' steps."""
    from .helpers.inputs import image_and_mask
    from .helpers.references import assert_diffusers_images

    folder = flux_export(PRESET)
    image, mask = image_and_mask()
    ref = control_image(11, w=90, h=70) if separate else None
    steps, seed = 4, 12
    want = _inpaint_want(folder, image, mask, ref, strength=strength, steps=steps, seed=seed, batch=batch)
    noise = torch.randn((batch, 16, 80 // 8, 112 // 8), generator=torch.Generator().manual_seed(seed)).numpy()
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, reference_image=ref, reference_resize=False,
                                  strength=strength, steps=steps, guidance_scale=2.5, batch_size=batch, latents=noise)
    assert len(res.timings["unet_steps_ms"]) == steps - int(steps - steps * strength)  # diffusers' get_timesteps
    got, _ = assert_diffusers_images(res.images, want, f"reference {separate} strength {strength} batch {batch}")
    if batch > 1:
        assert np.abs(got[0] - got[1]).max() > 1


def test_inpaint_at_the_size_asked(flux_export) -> None:
    """height= and width= resize the image and the mask to them, as any inpainting (FluxKontextInpaintPipeline paints
    at the image's size: its images of the image and the mask resized to 96 x 64 first, Lanczos)."""
    from PIL import Image

    from .helpers.inputs import image_and_mask
    from .helpers.references import assert_diffusers_images

    folder = flux_export(PRESET)
    image, mask = image_and_mask()
    lanczos = Image.Resampling.LANCZOS
    want = _inpaint_want(folder, image.resize((96, 64), lanczos), mask.resize((96, 64), lanczos), None, strength=0.8,
                         steps=3, seed=5)
    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(5)).numpy()
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, height=64, width=96, strength=0.8, steps=3,
                                  guidance_scale=2.5, latents=noise)
    assert_diffusers_images(res.images, want, "96 x 64 asked")


def test_inpaint_cli_and_staged_calls(flux_export, tmp_path: Path) -> None:
    """``sdrt generate --init-image --mask --reference --no-reference-resize`` (a 120 x 80 image: 112 x 80 once sized
    as a reference, which the CLI's own size check leaves to the pipeline), and ``prepare_latents(image=,
    mask_image=, reference_image=)`` at that size then ``denoise`` and ``decode``: the one Pipeline call's image."""
    from PIL import Image

    from sdrt.cli import main

    from .helpers.inputs import image_and_mask

    folder = flux_export(PRESET)
    pipe = shared_pipeline(folder)
    image, mask = image_and_mask()
    for name, im in (("init", image), ("mask", mask), ("ref", control_image(6, w=60, h=40))):
        im.save(tmp_path / f"{name}.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(folder), "--prompt", PROMPT, "--init-image", str(tmp_path / "init.png"), "--mask",
                 str(tmp_path / "mask.png"), "--reference", str(tmp_path / "ref.png"), "--no-reference-resize",
                 "--strength", "0.7", "--steps", "3", "--seed", "3", "--guidance", "2.5", "--backend", "ort-cpu",
                 "-o", str(out)]) == 0
    kw = {"image": Image.open(tmp_path / "init.png"), "mask_image": Image.open(tmp_path / "mask.png"),
          "reference_image": Image.open(tmp_path / "ref.png"), "reference_resize": False}
    want = np.asarray(pipe(PROMPT, strength=0.7, steps=3, seed=3, guidance_scale=2.5, **kw).images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want)
    emb = pipe.encode_prompt(PROMPT)
    plan = pipe.plan(None, 3, strength=0.7, height=80, width=112)
    lat = pipe.prepare_latents(plan, 80, 112, seed=3, strength=0.7, **kw)
    images, _ = pipe.decode(pipe.denoise(emb, lat, plan, guidance_scale=2.5))
    np.testing.assert_array_equal(np.asarray(images[0]), want)


def test_inpaint_refusals_before_any_work(flux_export) -> None:
    from .helpers.inputs import image_and_mask

    pipe = shared_pipeline(flux_export(PRESET))
    image, mask = image_and_mask()
    ref = control_image(1, w=64, h=64)
    with pytest.raises(InputError, match=r"mask_image needs the image to inpaint: pass image="):
        pipe(PROMPT, mask_image=mask, reference_image=ref, steps=2)
    with pytest.raises(InputError, match=r"mask_image needs the image to inpaint"):
        pipe(PROMPT, mask_image=mask, steps=2)
    with pytest.raises(InputError, match=r"mask_image is 64x64 but the image is 120x80"):
        pipe(PROMPT, image=image, mask_image=mask.resize((64, 64)), steps=2)
    with pytest.raises(InputError, match=r"image is 72x40, 64x32 once sized for the model: each side must be 64 to"):
        pipe(PROMPT, image=np.zeros((40, 72, 3), np.uint8), mask_image=np.zeros((40, 72), np.uint8),
             reference_resize=False, steps=2)
    with pytest.raises(InputError, match=r"strength"):
        pipe(PROMPT, image=image, mask_image=mask, reference_resize=False, strength=1.5, steps=2)
    with pytest.raises(InputError, match=r"guidance_rescale with inpainting is not supported"):
        pipe(PROMPT, image=image, mask_image=mask, reference_resize=False, guidance_rescale=0.5, steps=2)
    with pytest.raises(InputError, match=r"padding_mask_crop crops around the mask's white region, but mask_image "
                                         r"is all black"):
        pipe(PROMPT, image=image, mask_image=np.zeros((80, 120), np.uint8), reference_resize=False,
             padding_mask_crop=8, steps=2)


@pytest.mark.parametrize(("separate", "width", "strength", "pad"), [(False, 120, 0.7, 6), (True, 120, 1.0, 4),
                                                                     (True, 112, 0.7, 0)])
def test_inpaint_with_padding_mask_crop_gives_diffusers_images(flux_export, separate: bool, width: int,
                                                               strength: float, pad: int) -> None:
    """``padding_mask_crop`` on Kontext: FluxKontextInpaintPipeline's images. The box around an off-centre mask
    (against the top edge), padded and widened to the sized image's aspect ratio, is cut from the image once sized
    (a 120 x 80 image: 112 x 80, the box still taken in the mask's own pixels, as diffusers; a 112 x 80 one: kept)
    and from the reference once sized (90 x 70: 80 x 64), each resized back to its size by filling; the reference is
    the cut image where none is given. The output is the box's picture at 112 x 80: nothing is pasted back."""
    from .helpers.inputs import box_mask, image_and_mask
    from .helpers.references import assert_diffusers_images

    folder = flux_export(PRESET)
    image, _ = image_and_mask(w=width)
    mask = box_mask(w=width)
    ref = control_image(13, w=90, h=70) if separate else None
    steps, seed = 3, 14
    want = _inpaint_want(folder, image, mask, ref, strength=strength, steps=steps, seed=seed, padding_mask_crop=pad)
    noise = torch.randn((1, 16, 80 // 8, 112 // 8), generator=torch.Generator().manual_seed(seed)).numpy()
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, reference_image=ref, reference_resize=False,
                                  strength=strength, steps=steps, guidance_scale=2.5, latents=noise,
                                  padding_mask_crop=pad)
    assert res.images[0].size == (112, 80)
    assert_diffusers_images(res.images, want, f"reference {separate} width {width} padding {pad}")


class _Counted:
    """An engine that counts its calls."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, 0

    def __call__(self, feeds):
        self.calls += 1
        return self.engine(feeds)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def test_an_image_that_is_its_own_reference_is_encoded_once(flux_export, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inpainting without ``reference_image``: the VAE encoder runs once, its latents both the blend's image and the
    reference; the image is the one given by passing the same image as ``reference_image`` too (encoded twice, the
    reference sized and cut as the image is), with and without ``padding_mask_crop``."""
    from .helpers.inputs import box_mask, image_and_mask

    pipe = shared_pipeline(flux_export(PRESET))
    image, _ = image_and_mask()
    mask = box_mask()
    counted = _Counted(pipe.engines["vae_encoder"])
    monkeypatch.setitem(pipe.engines, "vae_encoder", counted)
    kw = {"image": image, "mask_image": mask, "reference_resize": False, "strength": 0.7, "steps": 2, "seed": 8,
          "guidance_scale": 2.5}
    for pad in (None, 6):
        counted.calls = 0
        own = np.asarray(pipe(PROMPT, padding_mask_crop=pad, **kw).images[0])
        assert counted.calls == 1, pad
        counted.calls = 0
        two = np.asarray(pipe(PROMPT, padding_mask_crop=pad, reference_image=image, **kw).images[0])
        assert counted.calls == 2, pad
        np.testing.assert_array_equal(own, two)


@pytest.mark.slow
def test_inpaint_at_the_preferred_resolution(flux_export) -> None:
    """The default sizing: a 60 x 40 image (and its mask) resized to the preferred resolution nearest its aspect
    ratio, 1248 x 832, the output's size (FluxKontextInpaintPipeline's ``_auto_resize``); one step of two. Slow (80 s
    on 2 cores): 8,112 tokens, the image's and the same image's as the reference."""
    from .helpers.inputs import image_and_mask
    from .helpers.references import assert_diffusers_images

    folder = flux_export(PRESET)
    image, mask = image_and_mask(w=60, h=40)
    with torch.no_grad():
        want = _inpaint_reference(folder)(
            prompt=PROMPT, image=image, mask_image=mask, strength=0.5, num_inference_steps=2, guidance_scale=2.5,
            generator=torch.Generator().manual_seed(3), output_type="np").images
    noise = torch.randn((1, 16, 832 // 8, 1248 // 8), generator=torch.Generator().manual_seed(3)).numpy()
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, strength=0.5, steps=2, guidance_scale=2.5,
                                  latents=noise)
    assert res.images[0].size == (1248, 832)
    assert_diffusers_images(res.images, want, "the preferred resolution")


def test_served_edits_with_padding_mask_crop(flux_export) -> None:
    """``/v1/images/edits`` on a Kontext export with a mask (alpha 0 = edit) and ``padding_mask_crop``: the
    pipeline's call with image=, mask_image= and padding_mask_crop= at the size asked (the box's picture); without a
    mask ``padding_mask_crop`` is still a 422 naming the field."""
    import io

    from PIL import Image

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.inputs import box_mask
    from .helpers.serve_live import LiveServer, pixels

    pipe = shared_pipeline(flux_export(PRESET))
    image, mask = control_image(15, w=96, h=64), box_mask(w=96, h=64)
    want = np.asarray(pipe(PROMPT, image=image, mask_image=mask, strength=0.7, height=64, width=96, steps=2, seed=4,
                           guidance_scale=2.5, padding_mask_crop=4).images[0])
    rgba = np.full((64, 96, 4), 255, np.uint8)
    rgba[..., 3] = np.where(np.asarray(mask) > 0, 0, 255)

    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    files = {"image": ("image.png", png(image), "image/png")}
    form = {"prompt": PROMPT, "size": "96x64", "steps": "2", "seed": "4", "guidance_scale": "2.5",
            "strength": "0.7", "padding_mask_crop": "4"}
    with LiveServer(create_app(pipe, max_batch=2, batch_window_ms=5, max_steps=4, max_pixels=128 * 128)) as server:
        r = httpx.post(f"{server.url}/v1/images/edits", data=form, timeout=120,
                       files={**files, "mask": ("mask.png", png(Image.fromarray(rgba)), "image/png")})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        r = httpx.post(f"{server.url}/v1/images/edits", data={**form, "strength": None}, files=files, timeout=120)
        assert r.status_code == 422 and r.json()["error"]["param"] == "padding_mask_crop", r.text
