"""FLUX.1 end to end on ort-cpu against diffusers' ``FluxPipeline`` (and ``FluxImg2ImgPipeline``): the tiny
presets' seeded weights exported by ``export_flux``, the same initial latents, images within 1/255.

Covers both structures ([schnell]: no guidance input, a fixed schedule; [dev]: the embedded guidance scale and
the schedule shifted by the image's token count, at two sizes), non-square sizes, several step counts, batches
with per-image seeds, img2img, the openvino backend, a streamed export (as a full-size model's), and the bad
input the family refuses before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError

from .helpers.pipelines import loaded_on, module_cache, shared_pipeline
from .helpers.references import assert_diffusers_images, flux_packed, flux_pipeline, flux_preset_pipeline

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
_REFS: dict[tuple[str, bool], object] = module_cache({})


def _reference(preset: str, folder: Path, img2img: bool = False):
    """diffusers' pipeline over the same seeded modules, with the export's own tokenizer files."""
    key = (preset, img2img)
    if key not in _REFS:
        _REFS[key] = flux_preset_pipeline("FluxImg2ImgPipeline" if img2img else "FluxPipeline", preset, folder)
    return _REFS[key]


def _compare(flux_export, preset: str, *, guidance: float = 3.5, height: int = 64, width: int = 96,
             steps: int = 4, batch: int = 1, seed: int = 0, stream: bool = False, prompt: str = PROMPT,
             max_sequence_length: int | None = None):
    folder = flux_export(preset, stream)
    ref = _reference(preset, folder)
    latents = np.random.default_rng(seed).standard_normal((batch, 16, height // 8, width // 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=flux_packed(latents), output_type="np", num_images_per_prompt=batch,
                   **({} if max_sequence_length is None else {"max_sequence_length": max_sequence_length})).images
    res = shared_pipeline(folder)(prompt, height=height, width=width, steps=steps, guidance_scale=guidance,
                                  latents=latents, batch_size=batch, max_sequence_length=max_sequence_length)
    _, want_u8 = assert_diffusers_images(res.images, want, f"{preset} {height}x{width} {steps} steps guidance {guidance}")
    return res, want_u8


@pytest.mark.parametrize("steps", [1, 4])
def test_schnell(flux_export, steps: int) -> None:
    res, _ = _compare(flux_export, "flux-schnell-tiny", steps=steps)
    assert len(res.timings["unet_steps_ms"]) == steps


@pytest.mark.parametrize(("height", "width"), [(64, 96), (128, 64)])
def test_dev_dynamic_shift_at_two_sizes(flux_export, height: int, width: int) -> None:
    """[dev]'s schedule is shifted by the image's token count: two sizes, two shifts, each as diffusers'."""
    _compare(flux_export, "flux-dev-tiny", height=height, width=width, steps=5)


def test_dev_guidance_is_embedded(flux_export) -> None:
    """[dev]'s guidance scale is an input of the transformer (one row per image), not classifier-free guidance:
    two scales give two images, each diffusers'."""
    _, a = _compare(flux_export, "flux-dev-tiny", guidance=1.5, steps=3)
    _, b = _compare(flux_export, "flux-dev-tiny", guidance=6.0, steps=3)
    assert np.abs(a - b).max() > 1
    pipe = shared_pipeline(flux_export("flux-dev-tiny"))
    assert "guidance" in pipe.engines["unet"].inputs and not pipe.uses_guidance(6.0)


def test_schedule_shift_grows_with_the_image(flux_export) -> None:
    """The plan's sigmas are FlowMatchEulerDiscreteScheduler's for FluxPipeline's sigmas and mu, at each size."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    from sdrt.export.flux_presets import get_flux_preset

    pipe = shared_pipeline(flux_export("flux-dev-tiny"))
    config = get_flux_preset("flux-dev-tiny").scheduler
    for size in (64, 256, 1024):
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        tokens = (size // 16) ** 2
        mu = calculate_shift(tokens, config["base_image_seq_len"], config["max_image_seq_len"],
                             config["base_shift"], config["max_shift"])
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
        plan = pipe.plan(None, 6, height=size, width=size)
        np.testing.assert_allclose(plan.timesteps, sched.timesteps.numpy(), rtol=1e-6)


def test_batch_with_per_image_seeds(flux_export) -> None:
    """Image k of a seeded batch is the image of its seed alone; the batch equals diffusers' on its latents."""
    _compare(flux_export, "flux-schnell-tiny", batch=2, steps=2)
    pipe = shared_pipeline(flux_export("flux-schnell-tiny"))
    both = pipe(PROMPT, steps=2, seed=[5, 9], batch_size=2, height=64, width=64)
    assert both.seed == [5, 9]
    for k, s in enumerate((5, 9)):
        alone = np.asarray(pipe(PROMPT, steps=2, seed=s, height=64, width=64).images[0], np.int16)
        assert np.abs(np.asarray(both.images[k], np.int16) - alone).max() <= 1
    assert not np.array_equal(np.asarray(both.images[0]), np.asarray(both.images[1]))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img(flux_export, monkeypatch: pytest.MonkeyPatch, strength: float) -> None:
    """img2img against FluxImg2ImgPipeline (sdrt encodes to the latent mean: diffusers made to)."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as mod
    from PIL import Image

    real = mod.retrieve_latents
    monkeypatch.setattr(mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    folder = flux_export("flux-dev-tiny")
    ref = _reference("flux-dev-tiny", folder, img2img=True)
    image = Image.fromarray((np.random.default_rng(7).random((64, 96, 3)) * 255).astype(np.uint8))
    # diffusers draws the noise from the generator (unpacked, [1, 16, h, w]): its first draw
    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(11)).numpy()
    with torch.no_grad():
        want = ref(PROMPT, image=image, strength=strength, num_inference_steps=6, guidance_scale=3.5, height=64,
                   width=96, generator=torch.Generator().manual_seed(11), output_type="np").images
    res = shared_pipeline(folder)(PROMPT, image=image, strength=strength, steps=6, guidance_scale=3.5,
                                  latents=noise)
    assert_diffusers_images(res.images, want, f"img2img strength {strength}")


def test_openvino_fp32_gives_the_ort_cpu_images(flux_export) -> None:
    """OpenVINO at fp32 (its CPU default may run bf16) within OpenVINO's fp32 rounding of ort-cpu's images."""
    folder = flux_export("flux-dev-tiny")
    kw = {"steps": 3, "seed": 4, "height": 64, "width": 96, "guidance_scale": 3.5}
    with loaded_on(folder, "openvino") as ov:
        want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0]).astype(np.int32)
        got = np.asarray(ov(PROMPT, **kw).images[0]).astype(np.int32)
    assert want.std() > 5 and int(np.abs(got - want).max()) <= 2


def test_streamed_export_gives_diffusers_images(flux_export) -> None:
    """The transformer and T5 streamed from their weights (the full-size models' path, gated on reduced-depth
    copies) give diffusers' images on the streamed weights."""
    folder = flux_export("flux-schnell-tiny", stream=True)
    from sdrt.runtime.manifest import ExportManifest

    m = ExportManifest.read(folder)
    assert m.source["streamed"] == ["text_encoder_2", "unet"]
    assert all(m.components[n].parity is not None and "reduced depth" in m.components[n].parity.reference
               for n in ("unet", "text_encoder_2"))
    # the streamed random weights are seeded per tensor: diffusers gets the same ones through the same source
    from sdrt.export.flux_loading import load_flux

    model = load_flux(random_preset="flux-schnell-tiny", stream=True)
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tr = FluxTransformer2DModel(**model.streamed["transformer"].config)
    tr.load_state_dict({k: model.streamed["transformer"].weights(k) for k in tr.state_dict()})
    t5 = T5EncoderModel(T5Config(**model.streamed["text_encoder_2"].config))
    t5_names = [n for n, _ in [*t5.named_parameters(), *t5.named_buffers()]]  # a tied weight once, by its name
    t5.load_state_dict({k: model.streamed["text_encoder_2"].weights(k) for k in t5_names}, strict=False)
    held = model.held()  # what the bench's baseline builds: the same weights, T5's embedding still tied
    for mine, theirs in ((tr, held.transformer), (t5, held.t5)):
        assert theirs is not None and mine.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
    assert held.t5 is not None and held.t5.encoder.embed_tokens.weight is held.t5.shared.weight
    ref = flux_pipeline(FluxPipeline, dataclasses.replace(model.modules, transformer=tr.eval(), t5=t5.eval()), folder,
                        model.scheduler_config)
    latents = np.random.default_rng(3).standard_normal((1, 16, 8, 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(PROMPT, height=64, width=64, num_inference_steps=2, latents=flux_packed(latents),
                   output_type="np").images
    assert_diffusers_images(shared_pipeline(folder)(PROMPT, height=64, width=64, steps=2, latents=latents).images,
                            want, "streamed flux-schnell-tiny")


def test_bad_input_is_refused_before_work(flux_export) -> None:
    pipe = shared_pipeline(flux_export("flux-schnell-tiny"))
    assert pipe.manifest.limits.multiple_of == 16
    with pytest.raises(InputError, match="no negative prompt"):
        pipe(PROMPT, negative_prompt="blurry", steps=2, height=64, width=64)
    with pytest.raises(InputError, match="no negative prompt"):
        pipe.encode_prompt(PROMPT, "blurry")
    with pytest.raises(InputError, match="guided=False"):
        pipe.encode_prompt(PROMPT, guided=True)
    with pytest.raises(InputError, match="multiple of 16"):
        pipe(PROMPT, height=72, width=64, steps=2)
    with pytest.raises(InputError, match="flow-euler"):
        pipe(PROMPT, sampler="ddim", steps=2, height=64, width=64)


def test_a_prompt_past_the_encoders_is_cut_and_said(flux_export) -> None:
    """A prompt longer than CLIP's 77 tokens is cut, as diffusers does, with a warning naming the encoder and
    the tokens cut (T5's 511 are not reached by this one)."""
    pipe = shared_pipeline(flux_export("flux-schnell-tiny"))
    long = " ".join(["lighthouse"] * 90)
    with pytest.warns(UserWarning, match=r"text_encoder: prompt 0 has 90 tokens; the 15 past 75 are cut"):
        pipe.encode_prompt(long)


def test_fp16_export_is_refused(tmp_path: Path) -> None:
    from sdrt.export.flux_export import export_flux
    from sdrt.export.flux_loading import load_flux

    with pytest.raises(InputError, match="fp32"):
        export_flux(load_flux(random_preset="flux-schnell-tiny"), tmp_path / "out", fp16=True)
    assert not (tmp_path / "out").exists()


def test_served_over_both_apis(flux_export) -> None:
    """``sdrt serve`` on a FLUX.1 [dev] export: the A1111 endpoint (its clients' default empty negative prompt)
    and the OpenAI endpoint give the pipeline's images, ``guidance_scale`` reaching the embedded guidance; a
    negative prompt is a 422 naming the field."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    folder = flux_export("flux-dev-tiny")
    pipe = shared_pipeline(folder)
    want = {g: np.asarray(pipe(PROMPT, steps=3, seed=5, height=64, width=64, guidance_scale=g).images[0])
            for g in (2.0, 5.0)}
    assert not np.array_equal(want[2.0], want[5.0])
    app = create_app(pipe, max_batch=4, batch_window_ms=50, max_steps=8, max_pixels=128 * 128, warmup=False)
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                       json={"prompt": PROMPT, "negative_prompt": "", "steps": 3, "seed": 5, "width": 64,
                             "height": 64, "cfg_scale": 2.0})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want[2.0])
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPT, "size": "64x64", "steps": 3, "seed": 5, "guidance_scale": 5.0})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want[5.0])
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPT, "size": "64x64", "steps": 3, "negative_prompt": "blurry"})
        assert r.status_code == 422 and "negative prompt" in r.text and "negative_prompt" in r.text, r.text


def test_bench_counts_the_transformer_flops() -> None:
    """The bench's FLOP count of one FLUX.1 [dev] step at 1024x1024 (4096 image + 512 text tokens, one row: no
    classifier-free guidance) against a hand count: 2 FLOPs per weight per token for the blocks' linear layers,
    plus attention's two matmuls (4 x tokens^2 x width per block); elementwise work is not counted."""
    from sdrt.benchmarks.flops import FLUX, architecture_of_preset, module_flops

    arch = architecture_of_preset("flux-dev")
    assert arch.denoiser_class == FLUX
    step = module_flops(arch, 1024, 1024, 1, guided=False)["unet_step"]
    tokens, width, blocks = 4096 + 512, 3072, 19 + 38
    # the blocks' weights a token passes through: a double block's own stream (image or text) has q, k, v and
    # the output projection (4 w^2) and a 4x MLP (8 w^2); a single block q, k, v (3 w^2), the 4x MLP's input
    # (4 w^2) and the joint output projection from 5 w (5 w^2): 12 w^2 either way (the modulation layers act on
    # one vector per image, not per token)
    per_token = 2 * blocks * 12 * width**2
    attention = blocks * 4 * tokens**2 * width
    hand = tokens * per_token + attention
    assert 1.0 <= step / hand < 1.01, (step, hand)  # the embedders and the output layer add the rest


def test_bench_runs_beside_diffusers(tmp_path: Path) -> None:
    """``sdrt bench --preset flux-dev-tiny``: ort-cpu beside diffusers' FluxPipeline on the same weights and
    latents (packed for diffusers), one denoiser row per image (no classifier-free guidance), the same picture."""
    from sdrt.benchmarks import schema
    from sdrt.cli import main

    out = tmp_path / "run.json"
    assert main(["bench", "--preset", "flux-dev-tiny", "--backends", "ort-cpu", "--resolutions", "64x96",
                 "--steps", "2", "--guidance", "3.5", "--warmup", "0", "--repeats", "1", "--rounds", "1", "--threads", "1",
                 "--matmul-size", "128", "--work-dir", str(tmp_path / "work"), "--no-bf16-baseline",
                 "-o", str(out)]) == 0
    doc = schema.load(out)
    assert schema.problems(doc) == [] and doc["model"]["family"] == "flux"
    assert doc["config"]["samplers"] == ["flow-euler"]
    (m,) = [m for m in doc["measurements"] if m["backend"] == "ort-cpu"]
    assert m["status"] == "ok", m["reason"]
    assert not m["guided"] and m["unet_batch"] == 1 and m["flops"]["unet_step"] > 0
    assert m["image_vs_baseline"]["max_abs"] <= 1


def test_schnell_says_that_guidance_had_no_effect(flux_export) -> None:
    """[schnell] takes no guidance scale (diffusers ignores it too): the images are the same whatever the scale,
    and each API's response says the scale had no effect ([dev], which embeds it, says nothing)."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from sdrt.serve import create_app

    from .helpers.serve_live import LiveServer, pixels

    pipe = shared_pipeline(flux_export("flux-schnell-tiny"))
    assert not pipe.takes_guidance and shared_pipeline(flux_export("flux-dev-tiny")).takes_guidance
    want = np.asarray(pipe(PROMPT, steps=2, seed=5, height=64, width=64, guidance_scale=1.0).images[0])
    np.testing.assert_array_equal(
        np.asarray(pipe(PROMPT, steps=2, seed=5, height=64, width=64, guidance_scale=9.0).images[0]), want)
    app = create_app(pipe, max_batch=4, batch_window_ms=50, max_steps=8, max_pixels=128 * 128, warmup=False)
    with LiveServer(app) as server:
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPT, "size": "64x64", "steps": 2, "seed": 5, "guidance_scale": 6.0})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
        notes = r.json()["notes"]
        assert len(notes) == 1 and notes[0].startswith("guidance_scale 6 had no effect") and "FLUX.1" in notes[0], notes
        r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                       json={"prompt": PROMPT, "size": "64x64", "steps": 2, "seed": 5})
        assert r.status_code == 200 and r.json().get("notes") is None, r.text
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=120,
                       json={"prompt": PROMPT, "steps": 2, "seed": 5, "width": 64, "height": 64, "cfg_scale": 7})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), want)
        notes = json.loads(r.json()["info"])["sdrt_notes"]
        assert len(notes) == 1 and notes[0].startswith("cfg_scale 7 had no effect") and "FLUX.1" in notes[0], notes


def test_sdrt_generate_says_that_guidance_had_no_effect(flux_export, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from sdrt.cli import main

    folder = flux_export("flux-schnell-tiny")
    args = ["generate", str(folder), "--prompt", PROMPT, "--steps", "1", "--height", "64", "--width", "64"]
    assert main([*args, "--guidance", "4", "-o", str(tmp_path / "a.png")]) == 0
    assert "note: --guidance 4 has no effect: FLUX.1" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "b.png")]) == 0  # no --guidance: nothing to say
    assert "no effect" not in capsys.readouterr().err
    assert main(["generate", str(flux_export("flux-dev-tiny")), *args[2:], "--guidance", "4",
                 "-o", str(tmp_path / "c.png")]) == 0
    assert "no effect" not in capsys.readouterr().err


@pytest.mark.parametrize(("preset", "n"), [("flux-schnell-tiny", 6), ("flux-dev-tiny", 64)])
def test_max_sequence_length(flux_export, preset: str, n: int) -> None:
    """``max_sequence_length`` as FluxPipeline's: T5's rows (the transformer's text tokens) padded or cut to
    ``n``; a different image from the default 512's."""
    long = PROMPT + ", on a frozen lake under a pale winter sun"
    with pytest.warns(UserWarning, match="are cut") if n == 6 else contextlib.nullcontext():
        _, got = _compare(flux_export, preset, max_sequence_length=n, prompt=long, steps=2)
    _, default = _compare(flux_export, preset, prompt=long, steps=2)
    assert np.abs(got - default).max() > 1


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_code_path_gives_the_ort_cpu_images(flux_export, monkeypatch: pytest.MonkeyPatch,
                                                     cuda_graph: bool) -> None:
    """ort-cuda's code path (every tensor an OrtValue, IO binding; with cuda_graph the composed transformer +
    step session) in CPU memory on the CPU EP, for [dev] (its guidance input bound per row): the ort-cpu images.
    Says nothing of a GPU."""
    folder = flux_export("flux-dev-tiny")
    kw = {"steps": 3, "seed": 9, "height": 64, "width": 96, "guidance_scale": 4.0}
    want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0])
    with loaded_on(folder, "ort-cuda-path", monkeypatch, cuda_graph=cuda_graph) as pipe:
        got = np.asarray(pipe(PROMPT, **kw).images[0])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("preset", "height", "width", "strength"), [("flux-dev-tiny", 64, 96, 0.6),
                                                                      ("flux-schnell-tiny", 80, 64, 1.0)])
def test_inpaint_by_blending_gives_diffusers_images(flux_export, mean_vae, preset: str, height: int, width: int,
                                                    strength: float) -> None:
    """``image=`` and ``mask_image=`` on a plain FLUX.1 model: diffusers' ``FluxInpaintPipeline``'s images (the
    unmasked region blended back after every step, re-noised to the next sigma), the 120 x 80 image and its
    soft-edged mask resized to the output size. diffusers' noise is the generator's first draw, [1, 16, h, w] (the
    image encodes to its mean: no draw before it)."""
    from .helpers.inputs import image_and_mask

    folder = flux_export(preset)
    image, mask = image_and_mask()
    steps, seed, guidance = 4, 12, 3.5
    noise = torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed)).numpy()
    with torch.no_grad():
        want = flux_preset_pipeline("FluxInpaintPipeline", preset, folder)(
            PROMPT, image=image, mask_image=mask, strength=strength, height=height, width=width,
            num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
            output_type="np").images
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, strength=strength, height=height, width=width,
                                  steps=steps, guidance_scale=guidance, latents=noise)
    assert len(res.timings["unet_steps_ms"]) == steps - int(steps - steps * strength)  # diffusers' get_timesteps
    assert_diffusers_images(res.images, want, f"{preset} {height}x{width} strength {strength}")


@pytest.mark.parametrize(("preset", "height", "width", "strength", "pad"), [("flux-dev-tiny", 64, 96, 0.6, 8),
                                                                             ("flux-schnell-tiny", 96, 64, 1.0, 5)])
def test_inpaint_with_padding_mask_crop_gives_diffusers_images(flux_export, mean_vae, preset: str, height: int,
                                                               width: int, strength: float, pad: int) -> None:
    """``padding_mask_crop`` on a plain FLUX.1 model: the box around an off-centre mask, padded and widened to the
    output's aspect ratio, generated at height x width and pasted back: ``FluxInpaintPipeline``'s images (PIL, the
    original's 120 x 80) within 1/255."""
    from .helpers.inputs import box_mask, image_and_mask

    folder = flux_export(preset)
    image, _ = image_and_mask()
    mask = box_mask()
    steps, seed, guidance = 4, 5, 3.5
    noise = torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed)).numpy()
    with torch.no_grad():
        want = flux_preset_pipeline("FluxInpaintPipeline", preset, folder)(
            PROMPT, image=image, mask_image=mask, strength=strength, height=height, width=width,
            num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
            padding_mask_crop=pad).images[0]
    res = shared_pipeline(folder)(PROMPT, image=image, mask_image=mask, strength=strength, height=height, width=width,
                                  steps=steps, guidance_scale=guidance, latents=noise, padding_mask_crop=pad)
    assert res.images[0].size == want.size == (120, 80)
    assert_diffusers_images(res.images, np.asarray(want)[None] / 255.0, f"{preset} {height}x{width} padding {pad}")
