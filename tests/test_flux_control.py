"""FLUX.1 Depth / Canny (a control image read by the transformer itself) on ort-cpu against diffusers'
``FluxControlPipeline``, ``FluxControlImg2ImgPipeline`` and ``FluxControlInpaintPipeline``: the tiny Depth preset's
seeded weights exported by ``export_flux``, the same control image and initial latents, images within 1/255.

Covers two output sizes (non-square, neither the control image's: it is resized) and guidance scales, a batch,
the output size from the control image, img2img, inpainting at three strengths, ``sdrt generate --control-image``,
the staged API, loading a diffusers ``FluxControlPipeline`` folder, the streamed transformer graph against PyTorch,
ort-cuda's code path and openvino, inpainting on ort-cuda's code path, openvino and the TensorRT fakes against
diffusers, and the refusals before any work. sdrt's encoders take the latent distribution's mean: diffusers is made
to (it samples the control image's latents).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import CompatibilityError, InputError

from .helpers.inputs import control_image, image_and_mask
from .helpers.pipelines import LOOP_WORDS, loaded_on, module_cache, shared_pipeline
from .helpers.references import assert_diffusers_images, flux_packed, flux_pipeline, flux_preset_pipeline

PRESET = "flux-depth-dev-tiny"
PROMPT = "a red boat on a calm lake"
_REF: dict[str, object] = module_cache({})


def _reference(folder: Path, kind: str = ""):
    """diffusers' ``FluxControl{kind}Pipeline`` (kind: "", "Img2Img" or "Inpaint") over the preset's weights."""
    if kind not in _REF:
        _REF[kind] = flux_preset_pipeline(f"FluxControl{kind}Pipeline", PRESET, folder)
    return _REF[kind]


def _compare(folder: Path, control, *, height: int, width: int, guidance: float = 10.0, steps: int = 3,
             batch: int = 1, seed: int = 0, sized: bool = True) -> np.ndarray:
    """diffusers' image and sdrt's for the same control image and latents (``sized`` False: sdrt's call gives no
    size, so the output takes the control image's, rounded down to whole patches)."""
    ref = _reference(folder)
    latents = np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(PROMPT, control_image=control, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, latents=flux_packed(latents), num_images_per_prompt=batch,
                   output_type="np").images
    size = {"height": height, "width": width} if sized else {}
    res = shared_pipeline(folder)(PROMPT, control_images=[control], steps=steps, guidance_scale=guidance,
                                  latents=latents, batch_size=batch, **size)
    return assert_diffusers_images(res.images, want, f"{height}x{width} guidance {guidance} batch {batch}")[1]


def test_export_takes_a_control_image(flux_export) -> None:
    """The transformer takes the latents (16 channels) as ``sample`` and the control image's latents beside
    them, one image at the latents' size; the export records its variant and passed its parity gate (the graph
    against the transformer in PyTorch)."""
    from sdrt.runtime.manifest import ExportManifest

    folder = flux_export(PRESET)
    m = ExportManifest.read(folder)
    unet = m.components["unet"]
    (ctl,) = [i for i in unet.inputs if i.name == "control_latents"]
    assert tuple(ctl.shape) == (1, 16, "height", "width")
    assert m.source["variant"] == "control" and m.source["guidance_embeds"] is True
    assert unet.parity is not None and unet.parity.max_abs_err <= unet.parity.bound
    pipe = shared_pipeline(folder)
    assert pipe.takes_control_image and not pipe.is_inpainting and not pipe.takes_reference
    assert pipe.engines["unet"].inputs["sample"].shape[1] == 16
    assert ExportManifest.read(flux_export("flux-dev-tiny")).source["variant"] == "base"


@pytest.mark.parametrize(("height", "width", "guidance"), [(64, 96, 10.0), (80, 64, 3.5)])
def test_control_gives_diffusers_images(flux_export, mean_vae, height: int, width: int,
                                        guidance: float) -> None:
    """A 120 x 90 control image resized to two output sizes (Lanczos, as diffusers' processor), two guidance
    scales."""
    _compare(flux_export(PRESET), control_image(3, w=120, h=90), height=height, width=width, guidance=guidance)


def test_output_takes_the_control_images_size(flux_export, mean_vae) -> None:
    """No size given: a 100 x 70 control image makes a 96 x 64 image (rounded down to whole patches), diffusers'
    image at that size."""
    _compare(flux_export(PRESET), control_image(4, w=100, h=70), height=64, width=96, sized=False, steps=2)


def test_batch(flux_export, mean_vae) -> None:
    got = _compare(flux_export(PRESET), control_image(5, w=64, h=64), height=64, width=64, batch=2, steps=2, seed=7)
    assert np.abs(got[0] - got[1]).max() > 1


def test_img2img(flux_export, mean_vae) -> None:
    """``image=`` and ``strength`` 0.6 with a control image: FluxControlImg2ImgPipeline's image (its noise: the
    generator's first draw, [1, 16, h, w])."""
    folder = flux_export(PRESET)
    image, _ = image_and_mask(w=96, h=64)
    control = control_image(6, w=90, h=60)
    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(11)).numpy()
    with torch.no_grad():
        want = _reference(folder, "Img2Img")(
            PROMPT, image=image, control_image=control, strength=0.6, height=64, width=96, num_inference_steps=5,
            guidance_scale=10.0, generator=torch.Generator().manual_seed(11), output_type="np").images
    res = shared_pipeline(folder)(PROMPT, image=image, control_images=[control], strength=0.6, height=64, width=96,
                                  steps=5, guidance_scale=10.0, latents=noise)
    assert len(res.timings["unet_steps_ms"]) == 3
    got = np.asarray(res.images[0]).astype(np.int32)
    diff = int(np.abs(got - (want[0] * 255).round().astype(np.int32)).max())
    assert diff <= 1, f"img2img strength 0.6: max abs difference {diff}/255"


@pytest.mark.parametrize(("height", "width", "strength", "batch"), [(64, 96, 0.6, 1), (80, 64, 1.0, 1),
                                                                   (64, 64, 0.8, 2)])
def test_inpaint_gives_diffusers_images(flux_export, mean_vae, height: int, width: int, strength: float,
                                        batch: int) -> None:
    """``image=`` and ``mask_image=`` with a control image: FluxControlInpaintPipeline's images at three strengths,
    the 120 x 80 image and its soft-edged mask resized to the output size. diffusers' noise is the generator's first
    draw, [B, 16, h, w] (the masked image, the control image and the image encode to their means: no draw before
    it); the unmasked region is blended back after every step, re-noised to the next sigma."""
    folder = flux_export(PRESET)
    image, mask = image_and_mask()
    control = control_image(8, w=90, h=60)
    steps, seed = 5, 12
    noise = torch.randn((batch, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed)).numpy()
    with torch.no_grad():
        want = _reference(folder, "Inpaint")(
            PROMPT, image=image, mask_image=mask, control_image=control, strength=strength, height=height,
            width=width, num_inference_steps=steps, guidance_scale=10.0, num_images_per_prompt=batch,
            generator=torch.Generator().manual_seed(seed), output_type="np").images
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, control_images=[control], strength=strength,
                                  height=height, width=width, steps=steps, guidance_scale=10.0, latents=noise,
                                  batch_size=batch)
    assert len(res.timings["unet_steps_ms"]) == steps - int(steps - steps * strength)  # diffusers' get_timesteps
    got, _ = assert_diffusers_images(res.images, want, f"{height}x{width} strength {strength} batch {batch}")
    if batch == 2:
        assert np.abs(got[0] - got[1]).max() > 1


_INPAINT_REF: list[np.ndarray] = []


@pytest.mark.parametrize("backend", ["ort-cuda-path", "openvino", "tensorrt"])
def test_inpaint_on_other_backends_gives_diffusers_images(flux_export, mean_vae, request: pytest.FixtureRequest,
                                                          tmp_path: Path, backend: str) -> None:
    """A control image with ``image=``, ``mask_image=`` and strength 0.6 on ort-cuda's code path (on the CPU EP, the
    composed transformer + step session with the control latents, the masked blend after each step), openvino
    (fp32, step by step) and the TensorRT fakes (the captured loop): FluxControlInpaintPipeline's image, computed
    once for all three. None says anything of a GPU."""
    from .helpers.pipelines import loaded_on_any

    folder = flux_export(PRESET)
    image, mask = image_and_mask()
    control = control_image(8, w=90, h=60)
    call = {"image": image, "mask_image": mask, "strength": 0.6, "height": 64, "width": 96, "guidance_scale": 10.0}
    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(12))
    if not _INPAINT_REF:
        with torch.no_grad():
            _INPAINT_REF.append(_reference(folder, "Inpaint")(
                PROMPT, control_image=control, num_inference_steps=5, generator=torch.Generator().manual_seed(12),
                output_type="np", **call).images)
    with loaded_on_any(folder, backend, request, tmp_path / "engines", cfg=False) as pipe:
        res = pipe(PROMPT, control_images=[control], steps=5, latents=noise.numpy(), **call)
    assert len(res.timings["unet_steps_ms"]) == 3  # diffusers' get_timesteps: 5 - int(5 - 5 * 0.6)
    assert_diffusers_images(res.images, _INPAINT_REF[0], f"control + mask on {backend}")
    assert res.loop.startswith(LOOP_WORDS[backend]), res.loop


def test_generate_cli(flux_export, tmp_path: Path) -> None:
    """``sdrt generate --control-image IMG`` without a size: the Pipeline call's image, at the control image's size
    rounded down to whole patches (a 100 x 70 image: 96 x 64)."""
    from PIL import Image

    from sdrt.cli import main

    folder = flux_export(PRESET)
    control_image(7, w=100, h=70).save(tmp_path / "depth.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(folder), "--prompt", PROMPT, "--control-image", str(tmp_path / "depth.png"),
                 "--steps", "2", "--seed", "3", "--guidance", "10", "--backend", "ort-cpu", "-o", str(out)]) == 0
    want = shared_pipeline(folder)(PROMPT, control_images=[Image.open(tmp_path / "depth.png")], steps=2, seed=3,
                                   guidance_scale=10.0).images[0]
    assert Image.open(out).size == (96, 64)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_generate_cli_with_a_mask(flux_export, tmp_path: Path) -> None:
    """``sdrt generate --control-image --init-image --mask --strength``: the Pipeline call's image."""
    from PIL import Image

    from sdrt.cli import main

    folder = flux_export(PRESET)
    image, mask = image_and_mask(w=96, h=64)
    control_image(9, w=90, h=60).save(tmp_path / "depth.png")
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(folder), "--prompt", PROMPT, "--control-image", str(tmp_path / "depth.png"),
                 "--init-image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--strength",
                 "0.8", "--steps", "3", "--seed", "3", "--guidance", "10", "--backend", "ort-cpu", "-o", str(out)]) == 0
    want = shared_pipeline(folder)(PROMPT, control_images=[Image.open(tmp_path / "depth.png")],
                                   image=Image.open(tmp_path / "image.png"), mask_image=Image.open(tmp_path / "mask.png"),
                                   strength=0.8, steps=3, seed=3, guidance_scale=10.0).images[0]
    assert Image.open(out).size == (96, 64)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_refusals_before_any_work(flux_export) -> None:
    pipe = shared_pipeline(flux_export(PRESET))
    ctl = control_image(1, w=64, h=64)
    with pytest.raises(InputError, match=r"is a control model \(FLUX.1 Depth / Canny\).*pass control_images="):
        pipe(PROMPT, steps=2, height=64, width=64)
    with pytest.raises(InputError, match=r"is a control model \(FLUX.1 Depth / Canny\).*pass control_images="):
        pipe(PROMPT, control_images=[None], steps=2, height=64, width=64)
    with pytest.raises(InputError, match="2 control images for a control model .* which reads one"):
        pipe(PROMPT, control_images=[ctl, ctl], steps=2)
    with pytest.raises(InputError, match="control_images must be a list"):
        pipe(PROMPT, control_images=ctl, steps=2)
    with pytest.raises(InputError, match="control_scales applies to ControlNets.*leave control_scales out"):
        pipe(PROMPT, control_images=[ctl], control_scales=0.5, steps=2)
    with pytest.raises(InputError, match="guess_mode applies to ControlNets"):
        pipe(PROMPT, control_images=[ctl], guess_mode=True, steps=2)
    with pytest.raises(InputError, match="control_preprocess 'depth' is not one of canny"):
        pipe(PROMPT, control_images=[ctl], control_preprocess="depth", steps=2)
    with pytest.raises(InputError, match="no negative prompt"):
        pipe(PROMPT, negative_prompt="blurry", control_images=[ctl], steps=2)
    with pytest.raises(InputError, match=r"control_images\[0\] is 8x8 pixels, 0x0 rounded down .* must be 64 to"):
        pipe(PROMPT, control_images=[np.zeros((8, 8, 3), np.uint8)], steps=2)


def test_a_control_image_for_a_model_without_one_is_refused(flux_export) -> None:
    pipe = shared_pipeline(flux_export("flux-dev-tiny"))
    assert not pipe.takes_control_image
    with pytest.raises(CompatibilityError, match="exported without ControlNets"):
        pipe(PROMPT, control_images=[control_image(1, w=64, h=64)], steps=2, height=64, width=64)


def test_staged_calls_give_the_one_call_image(flux_export) -> None:
    """``prepare_latents`` then ``denoise(control_images=...)`` and ``decode``: the one call's image, with a mask
    too; ``denoise`` without the control image is refused, naming it."""
    pipe = shared_pipeline(flux_export(PRESET))
    ctl = control_image(2, w=80, h=64)
    want = np.asarray(pipe(PROMPT, control_images=[ctl], steps=2, seed=6, height=64, width=64,
                           guidance_scale=10.0).images[0])
    emb = pipe.encode_prompt(PROMPT)
    plan = pipe.plan(None, 2, height=64, width=64)
    lat = pipe.prepare_latents(plan, 64, 64, seed=6)
    images, _ = pipe.decode(pipe.denoise(emb, lat, plan, guidance_scale=10.0, control_images=[ctl]))
    np.testing.assert_array_equal(np.asarray(images[0]), want)
    with pytest.raises(InputError, match=r"is a control model \(FLUX.1 Depth / Canny\)"):
        pipe.denoise(emb, lat, plan, guidance_scale=10.0)
    # inpainting: the image and mask go to prepare_latents, the control image to denoise
    image, mask = image_and_mask(w=64, h=64)
    want = np.asarray(pipe(PROMPT, image=image, mask_image=mask, strength=0.8, control_images=[ctl], steps=3, seed=6,
                           guidance_scale=10.0).images[0])
    plan = pipe.plan(None, 3, strength=0.8, height=64, width=64)
    lat = pipe.prepare_latents(plan, 64, 64, seed=6, image=image, mask_image=mask, strength=0.8)
    images, _ = pipe.decode(pipe.denoise(emb, lat, plan, guidance_scale=10.0, control_images=[ctl]))
    np.testing.assert_array_equal(np.asarray(images[0]), want)


def test_warmup_request_runs(flux_export) -> None:
    """The server's warm-up call gives a control model a control image."""
    pipe = shared_pipeline(flux_export(PRESET))
    req = pipe.warmup_request()
    assert req.control_images is not None and len(req.control_images) == 1
    assert len(pipe.generate(req).images) == 1


def test_diffusers_folder_loads_as_a_control_model(tmp_path: Path) -> None:
    """A diffusers ``FluxControlPipeline`` folder loads as FLUX.1 Depth / Canny (the two share their shapes, so
    the preset takes the folder's name)."""
    from diffusers import FluxControlPipeline

    from sdrt.export.flux_loading import load_flux
    from sdrt.export.flux_presets import build_modules, controls, get_flux_preset
    from sdrt.export.t5_tokenizer_assets import write_t5_tokenizer
    from sdrt.export.tokenizer_assets import write_clip_tokenizer

    p = get_flux_preset(PRESET)
    m = build_modules(p, seed=0)
    write_clip_tokenizer(tmp_path / "tokenizer", pad_token=p.pad_token)
    write_t5_tokenizer(tmp_path / "tokenizer_2")
    flux_pipeline(FluxControlPipeline, m, tmp_path, p.scheduler).save_pretrained(tmp_path / "flux-canny")
    loaded = load_flux(tmp_path / "flux-canny")
    assert loaded.preset.name == "flux-canny" and loaded.preset.pipeline_class == "FluxControlPipeline"
    assert controls(loaded.preset.transformer) and loaded.preset.test_scale


def test_streamed_transformer_gives_the_pytorch_outputs(tmp_path: Path) -> None:
    """A full-size Depth / Canny transformer is streamed (torch.export on fake tensors): the streamed graph of the
    tiny structure equals the same weights in PyTorch at two sizes (neither the traced one), the control latents'
    sides following the latents'."""
    import onnxruntime as ort

    from sdrt.export.flux_loading import weight_shapes
    from sdrt.export.flux_presets import get_flux_preset
    from sdrt.export.flux_specs import streamed_transformer_spec
    from sdrt.export.flux_wrappers import FluxControlTransformer
    from sdrt.export.streamed import export_streamed, materialize, synthetic_weights

    p = get_flux_preset(PRESET)
    cfg = p.config("transformer")
    weights = synthetic_weights(0, weight_shapes(cfg, p.config("t5"))["transformer"])
    spec = streamed_transformer_spec(cfg, 8)
    assert [i[0] for i in spec.inputs][-1] == "control_latents"
    export_streamed(spec, weights, "fp32", tmp_path / "unet")
    module = FluxControlTransformer(materialize(spec, weights), torchscript=False)  # the same weights
    sess = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for h, w in ((8, 12), (6, 4)):
        feeds = {"sample": torch.randn(2, 16, h, w, generator=g), "timestep": torch.tensor([900.0, 900.0]),
                 "encoder_hidden_states": torch.randn(2, 8, 48, generator=g),
                 "pooled_projections": torch.randn(2, 16, generator=g), "guidance": torch.tensor([2.5, 10.0]),
                 "control_latents": torch.randn(1, 16, h, w, generator=g)}
        with torch.no_grad():
            want = module(*feeds.values()).numpy()
        (got,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert got.shape == want.shape == (2, 16, h, w)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_the_graph_is_diffusers_transformer_on_concatenated_tokens(flux_export) -> None:
    """The exported transformer against ``FluxTransformer2DModel`` called as FluxControlPipeline's loop calls it:
    the packed latents and packed control latents concatenated on the feature axis, the image and text ids."""
    from diffusers import FluxPipeline

    from sdrt.export.flux_presets import build_modules, get_flux_preset

    folder = flux_export(PRESET)
    tr = build_modules(get_flux_preset(PRESET), seed=0).transformer
    pipe = shared_pipeline(folder)
    rng = np.random.default_rng(1)
    b, h, w = 2, 8, 12
    sample = rng.standard_normal((b, 16, h, w), dtype=np.float32)
    ctl = rng.standard_normal((1, 16, h, w), dtype=np.float32)
    text = rng.standard_normal((b, 8, 48), dtype=np.float32)
    pooled = rng.standard_normal((b, 16), dtype=np.float32)
    t, g = np.array([700.0, 700.0], np.float32), np.array([10.0, 3.5], np.float32)
    be = pipe.backend
    got = be.to_host(pipe.engines["unet"]({k: be.to_device(v) for k, v in {
        "sample": sample, "timestep": t, "encoder_hidden_states": text, "pooled_projections": pooled,
        "guidance": g, "control_latents": ctl}.items()})["out_sample"])
    hidden = torch.cat([flux_packed(sample), flux_packed(np.repeat(ctl, b, axis=0))], dim=2)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad():
        out = tr(hidden_states=hidden, timestep=torch.from_numpy(t) / 1000, guidance=torch.from_numpy(g),
                 pooled_projections=torch.from_numpy(pooled), encoder_hidden_states=torch.from_numpy(text),
                 txt_ids=torch.zeros(8, 3), img_ids=img_ids, return_dict=False)[0]
    want = FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_code_path_gives_the_ort_cpu_images(flux_export, monkeypatch: pytest.MonkeyPatch,
                                                     cuda_graph: bool) -> None:
    """ort-cuda's code path (IO binding; with cuda_graph the composed transformer + step session, the control
    latents bound as a conditioning input) on the CPU EP: the ort-cpu images. Says nothing of a GPU."""
    folder = flux_export(PRESET)
    kw = {"steps": 2, "seed": 9, "height": 64, "width": 64, "guidance_scale": 10.0,
          "control_images": [control_image(8, w=64, h=48)]}
    want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0])
    with loaded_on(folder, "ort-cuda-path", monkeypatch, cuda_graph=cuda_graph) as pipe:
        got = np.asarray(pipe(PROMPT, **kw).images[0])
    np.testing.assert_array_equal(got, want)


def test_openvino_fp32_gives_the_ort_cpu_images(flux_export) -> None:
    """OpenVINO at fp32 within OpenVINO's fp32 rounding of ort-cpu's images (2 levels, as tests/test_flux.py)."""
    folder = flux_export(PRESET)
    kw = {"steps": 3, "seed": 4, "height": 64, "width": 96, "guidance_scale": 10.0,
          "control_images": [control_image(9, w=96, h=64)]}
    want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0]).astype(np.int32)
    with loaded_on(folder, "openvino") as ov:
        got = np.asarray(ov(PROMPT, **kw).images[0]).astype(np.int32)
    assert want.std() > 5 and int(np.abs(got - want).max()) <= 2


def test_export_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main

    assert main(["export", "--list"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"flux-depth-dev", "flux-canny-dev", "flux-depth-dev-tiny", "flux-canny-dev-tiny"} <= names
