"""sdrt's sampler plans against diffusers' schedulers, the oracle (diffusers is imported by tests only).

How a comparison is made:
- One fixed, nonlinear model function of (UNet input, timestep) drives both loops, in float64.
- Both loops start from the same noise. Per-step noise (DDIM eta > 0, Euler ancestral, LCM) is drawn
  up front, one array per step. DDIM gets it through ``step(variance_noise=...)``; for the other
  schedulers the test monkeypatches ``randn_tensor`` in the scheduler's own module (what its ``step``
  calls) to return the array of the step being run.
- diffusers builds betas and alphas_cumprod in float32, which puts up to ~1e-5 relative error into its
  smallest sigmas. ``float64_tables`` rebuilds those training tables in float64 (torch, from the same
  config) before ``set_timesteps``, so the matrix measures the sampler; ``test_stock_diffusers`` also
  checks untouched diffusers at the same 1e-5 bound. What remains is diffusers' float32 copies of its
  inference sigmas and of the sample inside ``step`` (seen: < 1e-6 with float64 tables, < 5e-6 stock).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from sdrt.runtime import samplers, schedules
from sdrt.runtime.errors import InputError
from sdrt.runtime.samplers import SAMPLERS, make_plan, run_reference, step_reference

# Stable Diffusion 1.x/2.x scheduler config (the PNDM config the checkpoints ship, spacing made explicit).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}
SHAPE = (2, 4, 8, 8)
REL_TOL = 1e-5  # final latents, relative to their largest magnitude
CASES = [("ddim", 0.0), ("ddim", 0.6), ("dpmpp-2m", 0.0), ("dpmpp-2m-karras", 0.0), ("euler", 0.0),
         ("euler-a", 0.0), ("lcm", 0.0)]
CASE_IDS = [f"{s}-eta{e}" if s == "ddim" else s for s, e in CASES]
PREDICTIONS = ("epsilon", "v_prediction")


def model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in UNet: nonlinear in x, varying with t and channel."""
    channel = np.arange(x.shape[1], dtype=np.float64).reshape(1, -1, 1, 1)
    return np.tanh(0.8 * x + np.sin(t / 137.0 + channel)) + 0.3 * x * np.cos(t / 311.0)


def diffusers_scheduler(sampler: str, config: dict, prediction_type: str | None = None, *,
                        float64: bool = True):
    """The diffusers scheduler each sdrt sampler name stands for (see samplers' module docstring)."""
    kw = {} if prediction_type is None else {"prediction_type": prediction_type}
    if sampler == "ddim":
        sc = DDIMScheduler.from_config(config, **kw)
    elif sampler.startswith("dpmpp-2m"):
        sc = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2,
            use_karras_sigmas=sampler.endswith("-karras") or config.get("use_karras_sigmas", False), **kw)
    elif sampler == "euler":
        sc = EulerDiscreteScheduler.from_config(config, **kw)
    elif sampler == "euler-a":
        sc = EulerAncestralDiscreteScheduler.from_config(config, **kw)
    else:
        sc = LCMScheduler.from_config(config, **kw)
    return float64_tables(sc) if float64 else sc


def float64_tables(sc):
    """Rebuild a scheduler's training tables in float64 (diffusers makes them in float32)."""
    c = sc.config
    if c.trained_betas is not None:
        betas = torch.tensor(c.trained_betas, dtype=torch.float64)
    elif c.beta_schedule == "scaled_linear":
        betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
    if c.get("rescale_betas_zero_snr", False):
        betas = sys.modules[type(sc).__module__].rescale_zero_terminal_snr(betas)
    sc.betas, sc.alphas = betas, 1.0 - betas
    sc.alphas_cumprod = torch.cumprod(sc.alphas, dim=0)
    if c.get("rescale_betas_zero_snr", False) and hasattr(sc, "sigmas"):  # Euler, DPM: as their __init__
        sc.alphas_cumprod[-1] = 2**-24
    if hasattr(sc, "final_alpha_cumprod"):
        sc.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if c.set_alpha_to_one else sc.alphas_cumprod[0]
    if hasattr(sc, "lambda_t"):
        sc.alpha_t, sc.sigma_t = sc.alphas_cumprod.sqrt(), (1 - sc.alphas_cumprod).sqrt()
        sc.lambda_t = sc.alpha_t.log() - sc.sigma_t.log()
    return sc


def run_diffusers(sc, timesteps, latents: np.ndarray, noises: list[np.ndarray], monkeypatch, eta=0.0):
    """diffusers' denoising loop (StableDiffusionPipeline's, guidance folded into ``model``)."""
    current: dict[str, np.ndarray] = {}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(current["noise"]).to(dtype or torch.float64)

    module = sys.modules[type(sc).__module__]
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    x = torch.from_numpy(latents)
    for j, t in enumerate(timesteps):
        current["noise"] = noises[j]
        m = torch.from_numpy(model(sc.scale_model_input(x, t).numpy(), float(t)))
        kw = {"eta": eta, "variance_noise": torch.from_numpy(noises[j])} if eta else {}
        x = sc.step(m, t, x, **kw).prev_sample
    return x.numpy()


def draws(steps: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE), [rng.standard_normal(SHAPE) for _ in range(steps)]


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = REL_TOL) -> None:
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= tol, f"relative error {rel:.3g} > {tol:g}"


def txt2img_both(sampler, steps, config, prediction_type, eta, monkeypatch, *, float64=True, seed=0):
    """Run sdrt's plan and diffusers from the same noise; returns (ours, theirs, plan, scheduler)."""
    plan = make_plan(sampler, steps, config, prediction_type=prediction_type, eta=eta)
    sc = diffusers_scheduler(sampler, config, prediction_type, float64=float64)
    sc.set_timesteps(steps)
    noise, noises = draws(steps, seed)
    ours = run_reference(plan, plan.init_noise_sigma * noise, model, noises)
    theirs = run_diffusers(sc, sc.timesteps, noise * float(sc.init_noise_sigma), noises, monkeypatch, eta)
    return ours, theirs, plan, sc


# -- txt2img: every sampler x steps x prediction type --------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25, 50])
@pytest.mark.parametrize(("sampler", "eta"), CASES, ids=CASE_IDS)
def test_matches_diffusers(sampler, eta, steps, prediction_type, monkeypatch):
    ours, theirs, plan, sc = txt2img_both(sampler, steps, SD_CONFIG, prediction_type, eta, monkeypatch)
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=1e-3)
    assert plan.init_noise_sigma == pytest.approx(float(sc.init_noise_sigma), rel=1e-6)
    assert_close(ours, theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize(("sampler", "eta"), CASES, ids=CASE_IDS)
def test_stock_diffusers(sampler, eta, prediction_type, monkeypatch):
    """Untouched diffusers (float32 training tables) agrees within the same bound."""
    ours, theirs, _, _ = txt2img_both(sampler, 25, SD_CONFIG, prediction_type, eta, monkeypatch, float64=False)
    assert_close(ours, theirs)


@pytest.mark.parametrize("steps", [1, 3, 25])
@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_timestep_spacings(sampler, spacing, steps, monkeypatch):
    """leading / trailing / linspace (with steps_offset), and DDIM's default set_alpha_to_one=True."""
    config = {**SD_CONFIG, "timestep_spacing": spacing, "set_alpha_to_one": True}
    ours, theirs, plan, sc = txt2img_both(sampler, steps, config, "epsilon", 0.0, monkeypatch, seed=1)
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=1e-3)
    assert plan.init_noise_sigma == pytest.approx(float(sc.init_noise_sigma), rel=1e-6)
    assert_close(ours, theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [4, 25])
def test_euler_karras_from_config(steps, prediction_type, monkeypatch):
    config = {**SD_CONFIG, "use_karras_sigmas": True}
    ours, theirs, plan, sc = txt2img_both("euler", steps, config, prediction_type, 0.0, monkeypatch)
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=1e-3)
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_linear_betas(sampler, monkeypatch):
    config = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False}
    ours, theirs, _, _ = txt2img_both(sampler, 10, config, "v_prediction", 0.0, monkeypatch, seed=2)
    assert_close(ours, theirs)


# -- img2img: start step and add_noise ------------------------------------------------------------


def img2img_diffusers(sampler, steps, strength, sc):
    """Timesteps run and noising timestep as diffusers' img2img pipelines pick them."""
    if sampler == "lcm":  # LatentConsistencyModelImg2ImgPipeline: strength shortens LCM's own schedule
        sc.set_timesteps(steps, strength=strength)
        return sc.timesteps
    sc.set_timesteps(steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
    t_start = max(steps - min(int(steps * strength), steps), 0)
    if hasattr(sc, "set_begin_index"):
        sc.set_begin_index(t_start * sc.order)
    return sc.timesteps[t_start * sc.order:]


@pytest.mark.parametrize("strength", [0.3, 0.55, 0.8, 1.0])
@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize(("sampler", "eta"), CASES, ids=CASE_IDS)
def test_img2img_matches_diffusers(sampler, eta, steps, strength, monkeypatch):
    plan = make_plan(sampler, steps, SD_CONFIG, strength=strength, eta=eta)
    sc = diffusers_scheduler(sampler, SD_CONFIG)
    timesteps = img2img_diffusers(sampler, steps, strength, sc)
    np.testing.assert_allclose(plan.timesteps, timesteps.double().numpy(), rtol=0, atol=1e-3)
    image, noises = draws(len(timesteps) + 1, seed=3)
    noised = sc.add_noise(torch.from_numpy(image), torch.from_numpy(noises[-1]), timesteps[:1]).numpy()
    ours_noised = plan.add_noise(image, noises[-1])
    assert_close(ours_noised, noised, 1e-6)
    ours = run_reference(plan, ours_noised, model, noises)
    assert_close(ours, run_diffusers(sc, timesteps, noised, noises, monkeypatch, eta))


# -- schedule pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SD_CONFIG, {"beta_schedule": "linear"},
                                    {"trained_betas": list(np.linspace(1e-4, 2e-2, 1000))}])
def test_alphas_cumprod(config):
    expected = float64_tables(DDIMScheduler.from_config(config)).alphas_cumprod.numpy()
    np.testing.assert_allclose(schedules.alphas_cumprod(config), expected, rtol=1e-12)


def test_needs_noise():
    def needs(sampler, steps, **kw):
        return make_plan(sampler, steps, SD_CONFIG, **kw).needs_noise

    assert not needs("ddim", 10) and needs("ddim", 10, eta=0.5)
    assert not needs("dpmpp-2m", 10) and not needs("euler", 10)
    assert needs("euler-a", 10) and not needs("euler-a", 1)  # the last step adds sigma_up = 0
    assert needs("lcm", 4) and not needs("lcm", 1)  # the last step returns the denoised sample


def test_plan_is_read_only():
    plan = make_plan("ddim", 4, SD_CONFIG)
    with pytest.raises(ValueError):
        plan.table[0, 0] = 1.0
    assert plan.coeffs(0).dtype == np.float32 and plan.coeffs(0).shape == (len(samplers.COLUMNS),)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_renoise_table_is_diffusers_add_noise_at_the_next_step(sampler, prediction_type):
    """Inpainting by blending puts the image back at step i+1's noise level after step i, in the sampler's
    state: diffusers' ``scheduler.add_noise(image, noise, timesteps[i + 1])``; after the last step, the
    clean image."""
    steps = 10
    plan = make_plan(sampler, steps, SD_CONFIG, prediction_type=prediction_type)
    sc = diffusers_scheduler(sampler, SD_CONFIG, prediction_type)
    sc.set_timesteps(steps)
    image, (noise,) = draws(1, 3)
    table = plan.renoise_table()
    assert table.shape == (steps, 2) and tuple(table[-1]) == (1.0, 0.0)
    for i in range(steps - 1):
        want = sc.add_noise(torch.from_numpy(image), torch.from_numpy(noise), sc.timesteps[i + 1:i + 2]).numpy()
        assert_close(table[i, 0] * image + table[i, 1] * noise, want, 1e-6)


def test_step_reference_requires_history_and_noise():
    plan = make_plan("dpmpp-2m", 4, SD_CONFIG)
    x = np.zeros(SHAPE)
    step_reference(plan, 0, x, x)  # first order: no history needed
    with pytest.raises(InputError, match="x0_prev"):
        step_reference(plan, 1, x, x)
    with pytest.raises(InputError, match="noise"):
        step_reference(make_plan("euler-a", 4, SD_CONFIG), 0, x, x)


# -- bad input: InputError before any schedule work -------------------------------------------------


BAD = [
    ({"sampler": "dpm++"}, "valid names: ddim, dpmpp-2m, dpmpp-2m-karras, euler, euler-a, lcm"),
    ({"steps": 0}, "steps"),
    ({"steps": -3}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": True}, "steps"),
    ({"steps": 1001}, "training steps"),
    ({"strength": 0.0}, "strength"),
    ({"strength": 1.5}, "strength"),
    ({"strength": float("nan")}, "strength"),
    ({"strength": "0.5"}, "strength"),
    ({"strength": 0.2, "steps": 4}, "strength"),  # int(4 * 0.2) == 0 steps left
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"eta": 0.5, "sampler": "euler"}, "eta"),
    ({"eta": -0.1}, "eta"),
    ({"config": {**SD_CONFIG, "clip_sample": True}}, "clip_sample"),
    ({"config": {**SD_CONFIG, "beta_schedule": "squaredcos_cap_v2"}}, "beta_schedule"),
    ({"config": {**SD_CONFIG, "timestep_spacing": "karras"}}, "timestep_spacing"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"sampler": "dpmpp-2m", "config": {**SD_CONFIG, "final_sigmas_type": "sigma_min"}}, "final_sigmas_type"),
    ({"sampler": "lcm", "steps": 51}, "lcm serves at most 50"),
    ({"sampler": "lcm", "steps": 10, "strength": 0.1}, "lcm serves at most 5"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[str(c) for c, _ in BAD])
def test_bad_input(change, message, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("schedule work started before the arguments were checked")

    for name in ("alphas_cumprod", "spaced_timesteps", "karras_sigmas"):
        monkeypatch.setattr(schedules, name, no_work)
    args = {"sampler": "ddim", "steps": 10, "config": SD_CONFIG, "strength": 1.0, "eta": 0.0,
            "prediction_type": None, **change}
    with pytest.raises(InputError, match=message):
        make_plan(args.pop("sampler"), args.pop("steps"), args.pop("config"), **args)


# -- overrides and options of community checkpoints ---------------------------------------------------


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_timestep_spacing_override(sampler, spacing, monkeypatch):
    """``timestep_spacing=`` wins over the config's, as diffusers' ``from_config(config, timestep_spacing=)``."""
    steps = 4
    plan = make_plan(sampler, steps, SD_CONFIG, timestep_spacing=spacing)
    sc = diffusers_scheduler(sampler, {**SD_CONFIG, "timestep_spacing": spacing})
    sc.set_timesteps(steps)
    noise, noises = draws(steps, 3)
    ours = run_reference(plan, plan.init_noise_sigma * noise, model, noises)
    theirs = run_diffusers(sc, sc.timesteps, noise * float(sc.init_noise_sigma), noises, monkeypatch)
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=1e-3)
    assert_close(ours, theirs)
    if sampler != "lcm":  # lcm's timesteps come from its distillation schedule, not the spacing
        other = make_plan(sampler, steps, {**SD_CONFIG, "timestep_spacing": spacing})
        np.testing.assert_array_equal(plan.timesteps, other.timesteps)


def test_zero_terminal_snr_betas():
    """Lin et al. Alg. 1 against diffusers' rescale_zero_terminal_snr: last abar 0, first unchanged."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = schedules.betas(SD_CONFIG)
    ours = schedules.zero_terminal_snr(betas)
    theirs = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)
    abar = schedules.alphas_cumprod({**SD_CONFIG, "rescale_betas_zero_snr": True})
    assert abar[-1] == pytest.approx(0.0, abs=1e-15)
    assert abar[0] == pytest.approx(1.0 - betas[0], rel=1e-12)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize(("sampler", "eta"), [c for c in CASES if c[0] != "dpmpp-2m-karras"],
                         ids=[i for i in CASE_IDS if i != "dpmpp-2m-karras"])  # diffusers itself fails there
def test_zero_terminal_snr_matches_diffusers(sampler, eta, steps, spacing, monkeypatch):
    """rescale_betas_zero_snr=True (v_prediction, the models trained with it), trailing as the paper asks."""
    config = {**SD_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": spacing}
    ours, theirs, plan, sc = txt2img_both(sampler, steps, config, "v_prediction", eta, monkeypatch, seed=4)
    np.testing.assert_allclose(plan.timesteps, sc.timesteps.double().numpy(), rtol=0, atol=1e-3)
    assert plan.init_noise_sigma == pytest.approx(float(sc.init_noise_sigma), rel=1e-6)
    # the Euler samplers start at sigma = 4096 (abar = 2^-24), which diffusers holds in float32
    assert_close(ours, theirs, 5e-5)


def test_zero_terminal_snr_epsilon_refused():
    """Epsilon prediction at zero SNR divides by alpha_T = 0: a clear error, not NaN images."""
    config = {**SD_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(InputError, match="v_prediction"):
        make_plan("ddim", 4, config, prediction_type="epsilon")


@pytest.mark.parametrize("rescale", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale):
    """samplers.guide(..., rescale) against diffusers' rescale_noise_cfg after its CFG."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(5)
    out = np.concatenate([rng.standard_normal(SHAPE), 2.0 * rng.standard_normal(SHAPE) + 0.3])
    uncond, cond = (torch.from_numpy(a) for a in np.split(out, 2))
    cfg = uncond + 7.5 * (cond - uncond)
    theirs = rescale_noise_cfg(cfg, cond, guidance_rescale=rescale).numpy()
    np.testing.assert_allclose(samplers.guide(out, 7.5, rescale), theirs, rtol=1e-12, atol=1e-12)
    if rescale:
        assert not np.allclose(theirs, cfg.numpy())  # the case does rescale


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("end", [0.5, 0.8])
@pytest.mark.parametrize(("sampler", "eta"), CASES, ids=CASE_IDS)
def test_fresh_sampler_at_denoising_start(sampler, eta, end, prediction_type, monkeypatch):
    """diffusers' base + refiner ensemble: the base runs its scheduler to ``denoising_end``; the refiner
    (StableDiffusionXLImg2ImgPipeline(denoising_start=)) builds a fresh scheduler, set_timesteps(n) and
    set_begin_index(k), so a multistep sampler restarts with no history there. ``fresh_from=k`` does the same."""
    steps = 10
    plan = make_plan(sampler, steps, SD_CONFIG, prediction_type=prediction_type, eta=eta)
    cutoff = round(1000 - end * 1000)  # diffusers' denoising_end / denoising_start rule
    k = int(np.sum(plan.timesteps >= cutoff))
    fresh = make_plan(sampler, steps, SD_CONFIG, prediction_type=prediction_type, eta=eta, fresh_from=k)
    np.testing.assert_array_equal(fresh.table[:k], plan.table[:k])
    noise, noises = draws(steps, 6)
    x, x0 = plan.init_noise_sigma * noise, None
    for i in range(steps):
        p = plan if i < k else fresh
        if i == k:
            x0 = None  # the refiner gets latents, not the base's history
        m = model(samplers.model_input(p, i, x), float(p.timesteps[i]))
        x, x0 = step_reference(p, i, x, m, x0, noises[i])

    base = diffusers_scheduler(sampler, SD_CONFIG, prediction_type)
    base.set_timesteps(steps)
    lat = run_diffusers(base, base.timesteps[:k], noise * float(base.init_noise_sigma), noises[:k], monkeypatch, eta)
    refiner = diffusers_scheduler(sampler, SD_CONFIG, prediction_type)
    refiner.set_timesteps(steps)
    if hasattr(refiner, "set_begin_index"):
        refiner.set_begin_index(k)
    theirs = run_diffusers(refiner, refiner.timesteps[k:], lat, noises[k:], monkeypatch, eta)
    assert_close(x, theirs)
    if sampler.startswith("dpmpp"):  # the restart matters: the uninterrupted plan differs
        assert not np.allclose(run_reference(plan, plan.init_noise_sigma * noise, model, noises), theirs, rtol=1e-4)
