"""The pipeline's public stages, per-image seeds, output="latents", and the explicit lifecycle.

The references are independent of the code under test: the whole call (whose images match diffusers in
test_pipeline_parity), a numpy float64 replay of the sampler (samplers.step_reference), and single-image
runs for the per-image seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime import samplers
from sdrt.runtime.errors import InputError
from sdrt.runtime.pipeline import Pipeline

SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-a", "lcm")


@pytest.fixture(scope="module")
def sd15(tiny_export) -> Path:
    return tiny_export("sd15-tiny", "fp32")


@pytest.fixture(scope="module")
def pipe(sd15: Path) -> Pipeline:
    with Pipeline.load(sd15, backend="ort-cpu") as p:
        yield p


def _px(result) -> np.ndarray:
    return np.stack([np.asarray(i) for i in result.images])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_per_image_seeds_are_bit_identical_to_single_runs(pipe: Pipeline, sampler: str) -> None:
    seeds = [11, 5, 11]
    batch = pipe(["a red fox", "a blue bird", "a red fox"], steps=4, sampler=sampler, seed=seeds)
    assert batch.seed == seeds
    alone = [pipe(p, steps=4, sampler=sampler, seed=s) for p, s in
             zip(["a red fox", "a blue bird", "a red fox"], seeds)]
    for k, single in enumerate(alone):
        assert np.array_equal(_px(batch)[k], _px(single)[0]), (sampler, k)
    assert np.array_equal(_px(batch)[0], _px(batch)[2]) and not np.array_equal(_px(batch)[0], _px(batch)[1])


def test_seed_list_length_must_match(pipe: Pipeline) -> None:
    with pytest.raises(InputError, match="2 seeds for 3 images"):
        pipe("a", batch_size=3, seed=[1, 2], steps=2)


def test_stages_composed_equal_the_call(pipe: Pipeline) -> None:
    whole = pipe("a lighthouse", negative_prompt="fog", steps=5, sampler="euler-a", seed=3, guidance_scale=6.0)
    emb = pipe.encode_prompt("a lighthouse", "fog", guided=True)
    plan = pipe.plan("euler-a", 5)
    lat = pipe.prepare_latents(plan, 64, 64, seed=3)
    lat = pipe.denoise(emb, lat, plan, guidance_scale=6.0)
    images, nonfinite = pipe.decode(lat)
    assert nonfinite == [False]
    assert np.array_equal(np.asarray(images[0]), _px(whole)[0])


def test_windows_split_the_schedule_exactly(pipe: Pipeline) -> None:
    """Denoising to a fraction of the schedule and continuing from it gives the uninterrupted run's
    latents (the sampler's history travels with the latents)."""
    emb = pipe.encode_prompt("a castle", guided=True)
    plan = pipe.plan("dpmpp-2m", 10)
    full = pipe.denoise(emb, pipe.prepare_latents(plan, 64, 64, seed=7), plan)
    half = pipe.denoise(emb, pipe.prepare_latents(plan, 64, 64, seed=7), plan, end=0.5)
    assert 0 < half.step < plan.steps and half.x0 is not None
    rest = pipe.denoise(emb, half, plan)
    np.testing.assert_array_equal(pipe.backend.to_host(rest.x), pipe.backend.to_host(full.x))
    # diffusers' rule for the cut: the steps with t >= round(1000 * (1 - 0.5))
    assert half.step == int(np.sum(plan.timesteps >= 500))
    with pytest.raises(InputError, match=r"outside \(0, 1\)"):
        pipe.denoise(emb, half, plan, end=1.5)


def test_output_latents_match_a_numpy_replay(pipe: Pipeline) -> None:
    """output="latents": the final latents, checked against a float64 numpy loop over the UNet's outputs."""
    x_init = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    res = pipe("a cat", steps=4, sampler="ddim", latents=x_init, guidance_scale=1.0, output="latents")
    assert res.images == [] and res.latents is not None and res.latents.shape == (1, 4, 8, 8)
    plan = pipe.plan("ddim", 4)
    emb = pipe.encode_prompt("a cat", guided=False)
    hidden = pipe.backend.to_host(emb.hidden)
    unet = pipe.engines["unet"]
    x = x_init.astype(np.float64) * plan.init_noise_sigma
    for i, t in enumerate(plan.timesteps):
        u = samplers.model_input(plan, i, x).astype(np.float32)
        out = unet({"sample": u, "timestep": np.full((1,), t, np.float32), "encoder_hidden_states": hidden})
        x, _ = samplers.step_reference(plan, i, x, out["out_sample"].astype(np.float64))
    np.testing.assert_allclose(res.latents, x, rtol=1e-4, atol=1e-4)


def test_precomputed_embeddings_equal_prompts(pipe: Pipeline) -> None:
    emb = pipe.encode_prompt("a tree", "rain", guided=True)
    hidden = pipe.backend.to_host(emb.hidden)
    neg, pos = hidden[:1], hidden[1:]
    a = pipe("a tree", negative_prompt="rain", steps=3, seed=1)
    b = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, steps=3, seed=1)
    assert np.array_equal(_px(a), _px(b))
    with pytest.raises(InputError, match="negative_prompt_embeds"):
        pipe(prompt_embeds=pos, steps=3)
    with pytest.raises(InputError, match="either prompt or prompt_embeds"):
        pipe("a", prompt_embeds=pos, steps=3)
    with pytest.raises(InputError, match="wide"):
        pipe(prompt_embeds=pos[..., :7], negative_prompt_embeds=neg[..., :7], steps=3)
    # batch_size images per embedding row, as per prompt (diffusers' num_images_per_prompt)
    two = pipe(["a tree", "a tree"], negative_prompt="rain", steps=3, seed=[1, 4])
    rows = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, steps=3, seed=[1, 4], batch_size=2)
    assert len(rows.images) == 2 and not np.array_equal(np.asarray(two.images[0]), np.asarray(two.images[1]))
    for x, y in zip(two.images, rows.images, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_sdxl_precomputed_embeddings_need_pooled(tiny_export) -> None:
    with Pipeline.load(tiny_export("sdxl-tiny"), backend="ort-cpu") as xl:
        emb = xl.encode_prompt("a ship", guided=False)
        hidden, pooled = xl.backend.to_host(emb.hidden), xl.backend.to_host(emb.pooled)
        a = xl("a ship", steps=3, seed=2, guidance_scale=1.0)
        b = xl(prompt_embeds=hidden, pooled_prompt_embeds=pooled, steps=3, seed=2, guidance_scale=1.0)
        assert np.array_equal(_px(a), _px(b))
        with pytest.raises(InputError, match="pooled_prompt_embeds"):
            xl(prompt_embeds=hidden, steps=3, guidance_scale=1.0)
        with pytest.raises(InputError, match="one pooled row per prompt row"):
            xl(prompt_embeds=hidden, pooled_prompt_embeds=np.concatenate([pooled, pooled]), steps=3,
               guidance_scale=1.0)
        c = xl(["a ship", "a ship"], steps=3, seed=[2, 5], guidance_scale=1.0)
        d = xl(prompt_embeds=hidden, pooled_prompt_embeds=pooled, steps=3, seed=[2, 5], guidance_scale=1.0,
               batch_size=2)
        for x, y in zip(c.images, d.images, strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y))


def test_embeddings_guidance_mismatch_is_named(pipe: Pipeline) -> None:
    emb = pipe.encode_prompt("a", guided=False)
    plan = pipe.plan("ddim", 2)
    with pytest.raises(InputError, match="guided=True"):
        pipe.denoise(emb, pipe.prepare_latents(plan, 64, 64, seed=0), plan, guidance_scale=7.5)


def test_close_releases_and_refuses_further_use(sd15: Path) -> None:
    p = Pipeline.load(sd15, backend="ort-cpu")
    assert len(p("a", steps=2, seed=0).images) == 1
    p.close()
    p.close()  # idempotent
    assert p.closed and p.engines == {}
    for call in (lambda: p("a", steps=2), lambda: p.encode_prompt("a"), lambda: p.plan(), lambda: p.decode(None),
                 lambda: p.dtype, lambda: p.is_inpainting):
        with pytest.raises(InputError, match="was closed; load it again"):
            call()
    with Pipeline.load(sd15, backend="ort-cpu") as q:
        assert len(q("a", steps=2, seed=0).images) == 1
    assert q.closed


def test_negatives_are_one_string_or_one_per_prompt(pipe: Pipeline) -> None:
    """A list of negatives pairs with the prompts (each repeated batch_size times, as the prompts are); one
    negative in a list for two prompts is refused (it used to be reused silently), as diffusers refuses it."""
    with pytest.raises(InputError, match="1 negative prompts for 2 prompts .2 images.: give one string"):
        pipe(["a", "b"], negative_prompt=["n"], steps=2, seed=1)
    kw = {"steps": 2, "seed": [3, 4, 5, 6], "batch_size": 2}
    paired = pipe(["a", "b"], negative_prompt=["n1", "n2"], **kw)
    per_image = pipe(["a", "b"], negative_prompt=["n1", "n1", "n2", "n2"], **kw)
    alone = [pipe(p, negative_prompt=n, steps=2, seed=s) for p, n, s in (("a", "n1", 3), ("b", "n2", 6))]
    np.testing.assert_array_equal(_px(paired), _px(per_image))
    np.testing.assert_array_equal(_px(paired)[[0, 3]], np.concatenate([_px(r) for r in alone]))
    one = pipe(["a", "b"], negative_prompt="n1", steps=2, seed=[3, 6])
    np.testing.assert_array_equal(_px(one)[0], _px(alone[0])[0])


def test_staged_seeds_list_makes_one_image_per_seed(pipe: Pipeline) -> None:
    """The README's staged example: prepare_latents(plan, h, w, seed=[1, 2]) makes two images' latents (the
    batch follows the list), each that seed's alone."""
    plan = pipe.plan("euler", 2)
    two = pipe.prepare_latents(plan, 64, 64, seed=[1, 2])
    one = pipe.prepare_latents(plan, 64, 64, seed=2)
    x2, x1 = pipe.backend.to_host(two.x), pipe.backend.to_host(one.x)
    assert x2.shape[0] == 2
    np.testing.assert_array_equal(x2[1:], x1)


def test_denoise_refuses_embeddings_for_another_batch(pipe: Pipeline) -> None:
    """Embeddings for one image and latents for two: a clear error before any engine runs (it failed inside
    ONNX Runtime)."""
    emb = pipe.encode_prompt("a", guided=True)
    plan = pipe.plan("euler", 2)
    lat = pipe.prepare_latents(plan, 64, 64, seed=[1, 2])
    runs: list[str] = []
    real = pipe.engines["unet"].__class__.__call__
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipe.engines["unet"].__class__, "__call__", lambda self, *a, **k: runs.append("run") or real(self, *a, **k))
        with pytest.raises(InputError, match="the embeddings are for 1 image but the latents hold 2"):
            pipe.denoise(emb, lat, plan, guidance_scale=7.5)
    assert runs == []
