"""sdrt's flow-matching sampler plans against diffusers' schedulers, the oracle (as tests/test_samplers.py).

The model is the same fixed nonlinear stand-in, read here as a velocity; both loops start from the same
noise and the latents are compared after every step. diffusers keeps its flow sigmas in float32 (and
FlowMatchEulerDiscreteScheduler rounds the sample to float32 in every step), so the bound is the matrix's
1e-5 relative to the largest magnitude. The img2img start and the step cut come from diffusers' own
pipeline code (``StableDiffusion3Img2ImgPipeline.get_timesteps`` run on the reference scheduler).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    StableDiffusion3Img2ImgPipeline,
)

from sdrt.runtime import samplers, schedules
from sdrt.runtime.errors import InputError
from sdrt.runtime.samplers import FLOW_SAMPLERS, SAMPLERS, make_plan, model_input, step_reference

from .test_samplers import SD_CONFIG, SHAPE, assert_close, draws, model

# A flow-matching model's scheduler config with a static shift (shift varies per test).
FLOW_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0",
               "num_train_timesteps": 1000, "shift": 3.0}
# One with the resolution-dependent shift (mu from the image's token count).
DYNAMIC_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}


def reference(sampler: str, config: dict):
    """The diffusers scheduler each flow sampler name stands for (see samplers' module docstring)."""
    if sampler == "flow-euler":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
        flow_shift=config.get("shift", 1.0), prediction_type="flow_prediction")


def run_both(plan, sc, timesteps, start: np.ndarray, noises: list[np.ndarray], monkeypatch) -> None:
    """Step sdrt's plan and diffusers' scheduler side by side (SD3's loop: the transformer sees the latents
    and the timestep as they are); the latents agree after every step."""
    current: dict[str, np.ndarray] = {}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(current["noise"]).to(dtype or torch.float64)

    monkeypatch.setattr(sys.modules[type(sc).__module__], "randn_tensor", fake_randn, raising=False)
    assert plan.steps == len(timesteps)
    ours, theirs, x0 = start, torch.from_numpy(start), None
    for i, t in enumerate(timesteps):
        current["noise"] = noises[i]
        m = model(model_input(plan, i, ours), float(plan.timesteps[i]))
        ours, x0 = step_reference(plan, i, ours, m, x0, noises[i])
        theirs = sc.step(torch.from_numpy(model(theirs.numpy(), float(t))), t, theirs).prev_sample.double()
        assert_close(ours, theirs.numpy())


def txt2img(sampler, steps, config, monkeypatch, mu=None, seed=0, sigmas=None):
    """A whole txt2img run both ways, timesteps and sigmas checked; returns the plan."""
    plan = make_plan(sampler, steps, config, mu=mu, sigmas=sigmas)
    sc = reference(sampler, config)
    extra = {k: v for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None}
    sc.set_timesteps(steps, **extra)
    atol = 0 if sampler == "flow-dpmpp-2m" else 1e-3  # DPM's integer timesteps exactly; Euler's float32 ones
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(-plan.table[:, samplers.Q], sc.sigmas[:-1].double().numpy(), rtol=1e-6, atol=0)
    assert plan.init_noise_sigma == float(getattr(sc, "init_noise_sigma", 1.0)) == 1.0
    noise, noises = draws(steps, seed)
    run_both(plan, sc, sc.timesteps, noise, noises, monkeypatch)
    return plan


# -- txt2img -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_matches_diffusers(sampler, steps, shift, monkeypatch):
    plan = txt2img(sampler, steps, {**FLOW_CONFIG, "shift": shift}, monkeypatch)
    assert plan.prediction_type == "flow_prediction" and not plan.needs_noise
    assert np.all(plan.table[:, samplers.S] == 1.0) and np.all(plan.table[:, samplers.P] == 1.0)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_dynamic_shifting(sampler, image_seq_len, time_shift_type, monkeypatch):
    """use_dynamic_shifting: ``mu`` from flow_mu is diffusers' calculate_shift with the config's values, and
    the plan matches set_timesteps(steps, mu=mu). DPM-Solver asserts time_shift_type exponential."""
    config = {**DYNAMIC_CONFIG, "time_shift_type": time_shift_type}
    mu = samplers.flow_mu(image_seq_len, config)
    assert mu == pytest.approx(calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15), rel=1e-12)
    if sampler == "flow-dpmpp-2m" and time_shift_type == "linear":
        with pytest.raises(InputError, match="time_shift_type='linear' is not supported by flow-dpmpp-2m"):
            make_plan(sampler, 10, config, mu=mu)
        return
    txt2img(sampler, 10, config, monkeypatch, mu=mu, seed=1)


@pytest.mark.parametrize("config", [DYNAMIC_CONFIG, FLOW_CONFIG], ids=["dynamic", "static"])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_custom_sigmas(steps, config, monkeypatch):
    """flow-euler with set_timesteps(sigmas=): the linspace(1, 1/n, n) that FluxPipeline passes, shifted by mu
    (or by the static shift)."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = samplers.flow_mu(4096, config) if config.get("use_dynamic_shifting") else None
    plan = txt2img("flow-euler", steps, config, monkeypatch, mu=mu, seed=7, sigmas=sigmas)
    default = make_plan("flow-euler", steps, config, mu=mu)
    assert steps == 1 or not np.allclose(plan.timesteps, default.timesteps)  # the custom sigmas did change it


def test_flow_mu_defaults():
    """Missing keys take FlowMatchEulerDiscreteScheduler's defaults (what the pipelines read off its config)."""
    config = FlowMatchEulerDiscreteScheduler().config
    want = calculate_shift(1024, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                           config.max_shift)
    assert samplers.flow_mu(1024, {}) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_shift_terminal(steps, monkeypatch):
    """Sigmas stretched to end at shift_terminal; one step is refused (diffusers' schedule is NaN there)."""
    config = {**FLOW_CONFIG, "shift_terminal": 0.1}
    if steps == 1:
        sc = FlowMatchEulerDiscreteScheduler.from_config(config)
        sc.set_timesteps(1)
        assert torch.isnan(sc.sigmas[0])
        with pytest.raises(InputError, match="shift_terminal needs at least 2 steps"):
            make_plan("flow-euler", 1, config)
        return
    plan = txt2img("flow-euler", steps, config, monkeypatch, seed=2)
    assert -plan.table[-1, samplers.Q] == pytest.approx(0.1, rel=1e-9)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_stochastic_sampling(steps, monkeypatch):
    """stochastic_sampling: x_next = (1 - sigma_next) x0 + sigma_next z, z fresh each step (linear in the
    table's noise column), against diffusers with its randn_tensor fed the same draws."""
    plan = txt2img("flow-euler", steps, {**FLOW_CONFIG, "stochastic_sampling": True}, monkeypatch, seed=3)
    assert plan.needs_noise == (steps > 1)  # the last step goes to sigma 0: no noise


# -- img2img and inpainting ----------------------------------------------------------------------------


def img2img_cut(sc, steps: int, strength: float):
    """Timesteps run, as StableDiffusion3Img2ImgPipeline.get_timesteps picks them (it also sets begin_index)."""
    sc.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=sc)
    timesteps, n = StableDiffusion3Img2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    assert n == len(timesteps)
    return timesteps


@pytest.mark.parametrize("strength", [0.3, 0.55, 0.8, 1.0])
@pytest.mark.parametrize("steps", [4, 10, 28])
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_img2img_matches_diffusers(sampler, steps, strength, monkeypatch):
    """The start: scale_noise (FlowMatch) / add_noise (DPM, flow sigmas) of the image at the first kept step,
    sigma z + (1 - sigma) x0; then the rest of the run, multistep history restarted there."""
    plan = make_plan(sampler, steps, FLOW_CONFIG, strength=strength)
    sc = reference(sampler, FLOW_CONFIG)
    timesteps = img2img_cut(sc, steps, strength)
    np.testing.assert_allclose(plan.timesteps, timesteps.double().numpy(), rtol=0, atol=1e-3)
    image, noises = draws(len(timesteps) + 1, seed=4)
    img, z = torch.from_numpy(image), torch.from_numpy(noises[-1])
    if sampler == "flow-euler":
        theirs = sc.scale_noise(img, timesteps[:1], z).numpy()
    else:
        theirs = sc.add_noise(img, z, timesteps[:1]).numpy()
    ours = plan.add_noise(image, noises[-1])
    assert_close(ours, theirs, 1e-6)
    run_both(plan, sc, timesteps, ours, noises, monkeypatch)


@pytest.mark.parametrize(("steps", "strength", "start"), [(10, 0.55, 4), (28, 0.6, 11), (4, 0.2, 3)])
def test_flow_img2img_start_is_not_sd_rule(steps, strength, start):
    """The flow pipelines' cut differs from StableDiffusionImg2ImgPipeline's (no int() around steps * strength);
    ``start`` read off StableDiffusion3Img2ImgPipeline.get_timesteps."""
    sc = FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG)
    assert steps - len(img2img_cut(sc, steps, strength)) == start
    assert schedules.flow_img2img_start(steps, strength) == start != schedules.img2img_start(steps, strength)


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_renoise_table_is_scale_noise_at_the_next_step(sampler):
    """Inpainting by blending (StableDiffusion3InpaintPipeline): after step i the image goes back at
    timesteps[i + 1]'s level with scale_noise; after the last step, the clean image."""
    steps = 10
    plan = make_plan(sampler, steps, FLOW_CONFIG)
    sc = FlowMatchEulerDiscreteScheduler.from_config(FLOW_CONFIG)
    sc.set_timesteps(steps)
    if sampler == "flow-dpmpp-2m":  # the same formula on the DPM schedule's own sigmas
        dpm = reference(sampler, FLOW_CONFIG)
        dpm.set_timesteps(steps)
        sc.sigmas, sc.timesteps = dpm.sigmas, dpm.timesteps.float()
    image, (noise,) = draws(1, 5)
    table = plan.renoise_table()
    assert table.shape == (steps, 2) and tuple(table[-1]) == (1.0, 0.0)
    for i in range(steps - 1):
        img, z = torch.from_numpy(image), torch.from_numpy(noise)
        want = sc.scale_noise(img, sc.timesteps[i + 1:i + 2], z).numpy()
        assert_close(table[i, 0] * image + table[i, 1] * noise, want, 1e-6)


@pytest.mark.parametrize("end", [0.3, 0.5])  # shift 3 keeps most timesteps above 200
def test_fresh_sampler_at_denoising_start(end, monkeypatch):
    """``fresh_from=k``: rows k.. of flow-dpmpp-2m as a fresh scheduler after set_begin_index(k), no history."""
    steps = 10
    plan = make_plan("flow-dpmpp-2m", steps, FLOW_CONFIG)
    k = samplers.rows_before(plan.timesteps, end, 1000)
    fresh = make_plan("flow-dpmpp-2m", steps, FLOW_CONFIG, fresh_from=k)
    np.testing.assert_array_equal(fresh.table[:k], plan.table[:k])
    noise, _ = draws(steps, 6)
    x, x0 = noise, None
    for i in range(steps):
        p = plan if i < k else fresh
        x0 = None if i == k else x0
        x, x0 = step_reference(p, i, x, model(model_input(p, i, x), float(p.timesteps[i])), x0)
    base, refiner = reference("flow-dpmpp-2m", FLOW_CONFIG), reference("flow-dpmpp-2m", FLOW_CONFIG)
    base.set_timesteps(steps)
    refiner.set_timesteps(steps)
    refiner.set_begin_index(k)
    lat = torch.from_numpy(noise)
    for sc, ts in ((base, base.timesteps[:k]), (refiner, refiner.timesteps[k:])):
        for t in ts:
            lat = sc.step(torch.from_numpy(model(lat.numpy(), float(t))), t, lat).prev_sample.double()
    assert_close(x, lat.numpy())
    assert not np.allclose(x, samplers.run_reference(plan, noise, model), rtol=1e-4)  # the restart matters


# -- refusals: InputError before any schedule work ----------------------------------------------------


BAD = [
    # a sampler of the other kind, named with the right ones
    ({"sampler": "euler"}, ("sampler euler does not serve prediction_type 'flow_prediction' models; "
                            "use one of flow-euler, flow-dpmpp-2m")),
    ({"sampler": "dpmpp-2m", "config": {**FLOW_CONFIG, "_class_name": None},
      "prediction_type": "flow_prediction"}, "use one of flow-euler, flow-dpmpp-2m"),
    ({"config": SD_CONFIG}, ("sampler flow-euler does not serve prediction_type 'epsilon' models; "
                             "use one of ddim, dpmpp-2m, dpmpp-2m-karras, euler, euler-a, lcm")),
    ({"sampler": "flow-dpmpp-2m", "config": SD_CONFIG, "prediction_type": "v_prediction"}, "use one of ddim"),
    ({"prediction_type": "epsilon"}, "flow-matching one .*FlowMatchEulerDiscreteScheduler.* 'flow_prediction'"),
    ({"sampler": "flow-eulr"}, "valid names: ddim, .*, lcm, flow-euler, flow-dpmpp-2m"),
    # use_dynamic_shifting needs mu, and only it takes mu
    ({"config": DYNAMIC_CONFIG}, r"use_dynamic_shifting=True.*pass mu \(samplers.flow_mu"),
    ({"sampler": "flow-dpmpp-2m", "config": DYNAMIC_CONFIG}, "pass mu"),
    ({"mu": 0.8}, "mu applies only to flow-euler, flow-dpmpp-2m with a use_dynamic_shifting=True"),
    ({"sampler": "ddim", "config": SD_CONFIG, "mu": 0.8}, "mu applies only"),
    ({"config": DYNAMIC_CONFIG, "mu": float("nan")}, "mu must be a finite number"),
    # config values a linear table cannot reproduce
    ({"config": {**FLOW_CONFIG, "use_karras_sigmas": True}},
     "use_karras_sigmas=True is not supported by flow-euler"),
    ({"sampler": "flow-dpmpp-2m", "config": {**FLOW_CONFIG, "use_karras_sigmas": True}}, "use_karras_sigmas"),
    ({"config": {**FLOW_CONFIG, "use_exponential_sigmas": True}}, "use_exponential_sigmas"),
    ({"config": {**FLOW_CONFIG, "use_beta_sigmas": True}}, "use_beta_sigmas"),
    ({"config": {**FLOW_CONFIG, "invert_sigmas": True}}, "invert_sigmas=True is not supported"),
    ({"sampler": "flow-dpmpp-2m", "config": {**FLOW_CONFIG, "final_sigmas_type": "sigma_min"}},
     "final_sigmas_type"),
    ({"sampler": "flow-dpmpp-2m", "config": {**FLOW_CONFIG, "thresholding": True}}, "thresholding"),
    ({"config": {**FLOW_CONFIG, "shift": 0.0}}, "shift=0.0 must be a number > 0"),
    ({"config": {**FLOW_CONFIG, "shift_terminal": 1.5}}, "shift_terminal=1.5"),
    ({"config": {**DYNAMIC_CONFIG, "time_shift_type": "cosine"}, "mu": 0.8}, "time_shift_type='cosine'"),
    # custom sigmas: flow-euler's, one per step, descending in (0, 1]
    ({"sampler": "flow-dpmpp-2m", "sigmas": [1.0, 0.5]}, "sigmas= applies only to flow-euler"),
    ({"sigmas": [1.0, 0.5]}, r"one number per step \(10\), got shape \(2,\)"),
    ({"steps": 2, "sigmas": [0.5, 1.0]}, "descend strictly within"),
    ({"steps": 2, "sigmas": [1.5, 0.5]}, "descend strictly within"),
    ({"steps": 2, "sigmas": [1.0, 0.0]}, "descend strictly within"),
    ({"steps": 2, "sigmas": ["a", "b"]}, "sequence of numbers"),
    # arguments that do not apply, and runs with no steps
    ({"timestep_spacing": "trailing"}, "timestep_spacing does not apply to flow-euler"),
    ({"eta": 0.5}, "eta applies only to ddim"),
    ({"strength": 1e-17}, "strength 1e-17 leaves none of the 10 steps"),  # 10 - 1e-16 rounds to 10
    ({"steps": 1001}, "training steps"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[str(c) for c, _ in BAD])
def test_bad_input(change, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("schedule work started before the arguments were checked")

    for name in ("alphas_cumprod", "spaced_timesteps", "karras_sigmas", "flow_shift", "flow_time_shift"):
        monkeypatch.setattr(schedules, name, no_work)
    args = {"sampler": "flow-euler", "steps": 10, "config": FLOW_CONFIG, **change}
    with pytest.raises(InputError, match=message):
        make_plan(args.pop("sampler"), args.pop("steps"), args.pop("config"), **args)


def test_samplers_for():
    assert samplers.samplers_for("flow_prediction") == FLOW_SAMPLERS == ("flow-euler", "flow-dpmpp-2m")
    assert samplers.samplers_for("epsilon") == samplers.samplers_for("v_prediction") == SAMPLERS
    assert not set(FLOW_SAMPLERS) & set(SAMPLERS)
    with pytest.raises(InputError, match="sample"):
        samplers.samplers_for("sample")


def test_declared_flow_prediction_without_a_flow_config():
    """prediction_type=flow_prediction (the manifest's) with a config that does not say so: FlowMatch's
    defaults."""
    plan = make_plan("flow-euler", 4, {"num_train_timesteps": 1000}, prediction_type="flow_prediction")
    sc = FlowMatchEulerDiscreteScheduler()
    sc.set_timesteps(4)
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=1e-3)
    assert plan.add_noise(np.ones(SHAPE), np.zeros(SHAPE))[0, 0, 0, 0] == 0.0  # starts at sigma 1: pure noise


# -- the device step graph runs flow rows unchanged ----------------------------------------------------


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "unguided"])
@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_step_graph_runs_flow_rows(sampler, guided):
    """Every row of a flow plan through the onnxruntime step graph (float32) against the float64 reference,
    within tests/test_step_graph.py's rounding bound: the flow samplers need no new graph."""
    from .test_step_graph import GUIDANCE, LATENT, B, assert_within, magnitudes, run, session

    plan = make_plan(sampler, 10, {**FLOW_CONFIG, "stochastic_sampling": sampler == "flow-euler"})
    sess = session(guided, np.float32)
    rng = np.random.default_rng(8)
    for i in range(plan.steps):
        x, x0_prev, noise = (rng.standard_normal((B, *LATENT)).astype(np.float32) for _ in range(3))
        unet_out = rng.standard_normal((2 * B if guided else B, *LATENT)).astype(np.float32)
        got = run(sess, x, unet_out, plan.coeffs(i), x0_prev, noise, guided)
        wide = [v.astype(np.float64) for v in (x, unet_out, x0_prev, noise)]
        m = samplers.guide(wide[1], GUIDANCE) if guided else wide[1]
        x_next, x0 = step_reference(plan, i, wide[0], m, wide[2], wide[3])
        mags = magnitudes(plan.table[i], *wide, guided)
        assert_within(got[0], x_next, mags[1], np.float32)
        assert_within(got[1], x0, mags[0], np.float32)
