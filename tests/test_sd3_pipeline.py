"""SD3 / 3.5 end to end on ort-cpu against diffusers' ``StableDiffusion3Pipeline`` (and its img2img pipeline):
the tiny presets' seeded weights exported by ``export_sd3``, the same initial latents, images within 1/255.

Covers both structures (SD3; 3.5 Medium's dual attention and RMS-normed q/k), guided with a negative prompt
and unguided, with T5 and without it (diffusers' ``text_encoder_3=None``), Large Turbo's settings (guidance 0,
4 steps), both flow samplers, img2img, and the bad input the family refuses before any work.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError

from .helpers.pipelines import loaded_on, module_cache, shared_pipeline
from .helpers.references import assert_diffusers_images, sd3_pipeline

PROMPT = "a red fox in the snow, highly detailed"
NEGATIVE = "blurry, low quality"
_REFS: dict[tuple[str, bool, bool], object] = module_cache({})


def _reference(preset: str, folder: Path, t5: bool, img2img: bool = False):
    """diffusers' pipeline over the same seeded modules, with the export's own tokenizer files."""
    key = (preset, t5, img2img)
    if key not in _REFS:
        from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

        from sdrt.export.sd3_presets import build_modules, get_sd3_preset

        p = get_sd3_preset(preset)
        cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
        _REFS[key] = sd3_pipeline(cls, build_modules(p, seed=0), folder, p.scheduler, t5=t5)
    return _REFS[key]


def _scheduler(sampler: str, config: dict):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    if sampler == "flow-dpmpp-2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                           flow_shift=config["shift"], prediction_type="flow_prediction")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _compare(sd3_export, preset: str, *, t5: bool = True, guidance: float = 5.0, negative: str | None = NEGATIVE,
             height: int = 64, width: int = 96, steps: int = 6, sampler: str = "flow-euler", batch: int = 1,
             seed: int = 0, prompt: str = PROMPT, max_sequence_length: int | None = None):
    folder = sd3_export(preset, t5)
    ref = _reference(preset, folder, t5)
    ref.scheduler = _scheduler(sampler, dict(ref.scheduler.config) if sampler == "flow-euler"
                               else {"shift": float(ref.scheduler.config.shift)})
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, 16, height // 8, width // 8), dtype=np.float32)
    with torch.no_grad():
        want = ref(prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="np",
                   num_images_per_prompt=batch,
                   **({} if max_sequence_length is None else {"max_sequence_length": max_sequence_length})).images
    res = shared_pipeline(folder)(prompt, negative_prompt=negative, height=height, width=width, steps=steps,
                                  guidance_scale=guidance, sampler=sampler, latents=latents, batch_size=batch,
                                  max_sequence_length=max_sequence_length)
    _, want_u8 = assert_diffusers_images(res.images, want, f"{preset} t5={t5} {sampler} guidance {guidance}")
    return res, want_u8


@pytest.mark.parametrize("preset", ["sd3-tiny", "sd35-medium-tiny"])
def test_guided_with_negative_and_t5(sd3_export, preset: str) -> None:
    _compare(sd3_export, preset)


@pytest.mark.parametrize("preset", ["sd3-tiny", "sd35-medium-tiny"])
def test_without_t5(sd3_export, preset: str) -> None:
    """A T5-less export runs as diffusers with ``text_encoder_3=None`` (zeros in T5's place)."""
    _compare(sd3_export, preset, t5=False)


def test_t5_conditions_the_image(sd3_export) -> None:
    """Leaving T5 out changes the image (so the T5-less comparison is not the T5 one again)."""
    _, without = _compare(sd3_export, "sd3-tiny", t5=False)
    _, with_t5 = _compare(sd3_export, "sd3-tiny", t5=True)
    assert np.abs(without - with_t5).max() > 1


def test_unguided_square_batch(sd3_export) -> None:
    res, _ = _compare(sd3_export, "sd3-tiny", guidance=1.0, negative=None, height=64, width=64, batch=2)
    assert len(res.timings["unet_steps_ms"]) == 6


def test_turbo_settings(sd3_export) -> None:
    """SD 3.5 Large Turbo's settings: guidance 0 (no CFG), 4 steps of flow-euler."""
    _compare(sd3_export, "sd3-tiny", guidance=0.0, negative=None, steps=4)


def test_flow_dpmpp_2m(sd3_export) -> None:
    _compare(sd3_export, "sd35-medium-tiny", sampler="flow-dpmpp-2m", steps=8)


def test_default_sampler_is_flow_euler(sd3_export) -> None:
    """A call without a sampler gets the model's (flow-euler, as diffusers' SD3 scheduler), not dpmpp-2m."""
    pipe = shared_pipeline(sd3_export("sd3-tiny", True))
    assert pipe.plan(None, 4).sampler == "flow-euler"
    latents = np.random.default_rng(3).standard_normal((1, 16, 8, 8), dtype=np.float32)
    a = pipe(PROMPT, steps=4, latents=latents, height=64, width=64).images[0]
    b = pipe(PROMPT, steps=4, latents=latents, height=64, width=64, sampler="flow-euler").images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img(sd3_export, monkeypatch: pytest.MonkeyPatch, strength: float) -> None:
    """img2img against StableDiffusion3Img2ImgPipeline (sdrt encodes to the latent mean: diffusers made to)."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as mod

    real = mod.retrieve_latents
    monkeypatch.setattr(mod, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))
    folder = sd3_export("sd3-tiny", True)
    ref = _reference("sd3-tiny", folder, True, img2img=True)
    rng = np.random.default_rng(7)
    image = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    # diffusers draws the noise from the generator (given latents, it would skip the image): its first draw
    noise = torch.randn((1, 16, 8, 12), generator=torch.Generator().manual_seed(11)).numpy()
    from PIL import Image

    pil = Image.fromarray(image)
    with torch.no_grad():
        want = ref(PROMPT, image=pil, strength=strength, num_inference_steps=8, guidance_scale=4.0, height=64, width=96,
                   negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(11), output_type="np").images
    want_u8 = (want * 255).round().astype(np.int32)
    res = shared_pipeline(folder)(PROMPT, negative_prompt=NEGATIVE, image=pil, strength=strength, steps=8,
                                  guidance_scale=4.0, latents=noise)
    got = np.stack([np.asarray(im) for im in res.images]).astype(np.int32)
    diff = int(np.abs(got - want_u8).max())
    assert diff <= 1, f"img2img strength {strength}: max abs difference {diff}/255"
    assert len(res.timings["unet_steps_ms"]) == 8 - int(8 - 8 * strength) and want_u8.std() > 5  # as diffusers


def test_bad_input_is_refused_before_work(sd3_export) -> None:
    folder = sd3_export("sd3-tiny", True)
    pipe = shared_pipeline(folder)
    lim = pipe.manifest.limits
    assert lim.multiple_of == 16 and lim.max_size == 16 * 16  # 2-latent patches, pos_embed_max_size 16 patches
    with pytest.raises(InputError, match="multiple of 16"):
        pipe(PROMPT, height=72, width=64, steps=2)
    with pytest.raises(InputError, match="multiple of 16 between 64 and 256"):
        pipe(PROMPT, height=272, width=64, steps=2)
    with pytest.raises(InputError, match="flow-euler"):
        pipe(PROMPT, sampler="ddim", steps=2, height=64, width=64)
    with pytest.raises(InputError, match=r"\(1, 16, 8, 8\)"):
        pipe(PROMPT, steps=2, height=64, width=64, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(InputError, match="SD 3 / 3.5 models have no deepcache feature caching yet"):
        pipe(PROMPT, steps=2, height=64, width=64, cache="deepcache")


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_code_path_gives_the_ort_cpu_images(sd3_export, monkeypatch: pytest.MonkeyPatch,
                                                     cuda_graph: bool) -> None:
    """ort-cuda's code path (every tensor an OrtValue, IO binding; with cuda_graph the composed transformer +
    step session) in CPU memory on the CPU EP: the ort-cpu images. Says nothing of a GPU."""
    folder = sd3_export("sd3-tiny")
    kw = {"negative_prompt": NEGATIVE, "steps": 4, "seed": 9, "height": 64, "width": 96, "guidance_scale": 5.0}
    want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0])
    with loaded_on(folder, "ort-cuda-path", monkeypatch, cuda_graph=cuda_graph) as pipe:
        got = np.asarray(pipe(PROMPT, **kw).images[0])
    np.testing.assert_array_equal(got, want)


def test_openvino_fp32_gives_the_ort_cpu_images(sd3_export) -> None:
    folder = sd3_export("sd3-tiny")
    kw = {"negative_prompt": NEGATIVE, "steps": 4, "seed": 9, "height": 64, "width": 96, "guidance_scale": 5.0}
    want = np.asarray(shared_pipeline(folder)(PROMPT, **kw).images[0], np.int16)
    want64 = np.asarray(shared_pipeline(folder)(PROMPT, **kw, max_sequence_length=64).images[0], np.int16)
    with loaded_on(folder, "openvino") as pipe:
        got = np.asarray(pipe(PROMPT, **kw).images[0], np.int16)
        got64 = np.asarray(pipe(PROMPT, **kw, max_sequence_length=64).images[0], np.int16)  # another T5 length
    assert want.std() > 5 and np.abs(got - want).max() <= 2
    assert np.abs(got64 - want64).max() <= 2 and np.abs(want64 - want).max() > 2


def test_per_image_seeds(sd3_export) -> None:
    """A batch with one seed per image: image k equals the same seed generated alone (as for every family)."""
    pipe = shared_pipeline(sd3_export("sd3-tiny"))
    kw = {"negative_prompt": NEGATIVE, "steps": 3, "height": 64, "width": 64, "guidance_scale": 4.0}
    both = pipe(PROMPT, seed=[3, 4], batch_size=2, **kw)
    assert both.seed == [3, 4] and len(both.images) == 2
    for k, s in enumerate((3, 4)):
        alone = np.asarray(pipe(PROMPT, seed=s, **kw).images[0], np.int16)
        assert np.abs(np.asarray(both.images[k], np.int16) - alone).max() <= 1
    assert not np.array_equal(np.asarray(both.images[0]), np.asarray(both.images[1]))


@pytest.mark.parametrize(("t5", "n"), [(True, 6), (True, 64), (False, 64)])
def test_max_sequence_length(sd3_export, t5: bool, n: int) -> None:
    """A call's ``max_sequence_length`` as diffusers' argument of that name: T5's rows padded (or the prompt cut)
    to ``n`` tokens, and without T5 the zeros in its place ``n`` long; a different image from the default's."""
    long = PROMPT + ", on a frozen lake under a pale winter sun"
    with pytest.warns(UserWarning, match="are cut") if t5 and n == 6 else contextlib.nullcontext():
        _, got = _compare(sd3_export, "sd3-tiny", t5=t5, max_sequence_length=n, prompt=long, steps=3)
    _, default = _compare(sd3_export, "sd3-tiny", t5=t5, prompt=long, steps=3)
    assert np.abs(got - default).max() > 1


def test_max_sequence_length_is_refused_outside_its_range(sd3_export, tiny_export) -> None:
    pipe = shared_pipeline(sd3_export("sd3-tiny", True))
    for bad in (1, 513, 64.0, True):
        with pytest.raises(InputError, match="max_sequence_length must be an integer from 2 to 512"):
            pipe(PROMPT, steps=1, height=64, width=64, max_sequence_length=bad)
    with pytest.raises(InputError, match="leave it out with prompt_embeds"):
        pipe(prompt_embeds=np.zeros((1, 77 + 8, 32), np.float32), steps=1, max_sequence_length=8)
    sd15 = shared_pipeline(tiny_export("sd15-tiny"))
    with pytest.raises(InputError, match="has no T5 encoder"):
        sd15("a cat", steps=1, height=64, width=64, max_sequence_length=64)


def test_sdrt_generate_takes_max_sequence_length(sd3_export, tiny_export, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from sdrt.cli import main

    folder = sd3_export("sd3-tiny", True)
    out = tmp_path / "fox.png"
    assert main(["generate", str(folder), "--prompt", PROMPT, "--steps", "2", "--height", "64", "--width", "64",
                 "--seed", "4", "--max-sequence-length", "16", "--backend", "ort-cpu", "-o", str(out)]) == 0
    want = shared_pipeline(folder)(PROMPT, steps=2, height=64, width=64, seed=4, guidance_scale=7.5,
                                   max_sequence_length=16).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))
    capsys.readouterr()
    assert main(["generate", str(tiny_export("sd15-tiny")), "--prompt", "x", "--steps", "1", "--height", "64",
                 "--width", "64", "--max-sequence-length", "16", "-o", str(tmp_path / "x.png")]) == 1
    assert "--max-sequence-length is for models with a T5 encoder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
