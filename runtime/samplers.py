"""Samplers as per-step coefficient tables, plus a numpy reference of the step they describe.

Every sampler here is linear per step. With ``m`` the model output after classifier-free guidance,

    unet_in = s_i * x                                      (the UNet sees the VP sample x_t)
    x0      = p_i * x + q_i * m                            (eps / v prediction -> data prediction)
    x_next  = a_i * x + b_i * x0 + c_i * x0_prev + d_i * noise_i

so a plan is a float64 table ``[steps, len(COLUMNS)]`` computed once on the host, and the device runs
the same tiny graph every step (``step_graph.py``). ``x`` is the sampler's own state: the VP sample
x_t for DDIM, DPM-Solver++ and LCM, the VE sample x_t / alpha_t for the Euler samplers (k-diffusion's
convention, hence their ``s_i = alpha_t`` and ``init_noise_sigma > 1``), and the flow sample
x_t = (1 - sigma) x0 + sigma eps for the flow samplers. Adapting the prediction type lives only in (p, q);
the solvers see only x and x0.

Each sampler name reproduces one diffusers scheduler built with ``from_config(scheduler_config)``:
missing keys take that class's defaults, and the name fixes the solver options:

    ddim             DDIMScheduler (eta from ``make_plan``)
    dpmpp-2m         DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    dpmpp-2m-karras  the same with use_karras_sigmas=True
    euler            EulerDiscreteScheduler (honours use_karras_sigmas from the config)
    euler-a          EulerAncestralDiscreteScheduler
    lcm              LCMScheduler; img2img as LatentConsistencyModelImg2ImgPipeline

The flow samplers serve flow-matching models (prediction type ``flow_prediction``: the model sees x_t
itself at timestep sigma * num_train_timesteps and predicts the velocity v = eps - x0, so x0 = x - sigma v).
They read a FlowMatchEulerDiscreteScheduler config (``shift``, ``use_dynamic_shifting`` with ``mu`` from
``make_plan``); img2img starts as diffusers' flow img2img pipelines do (``scale_noise`` at the step that
``schedules.flow_img2img_start`` picks):

    flow-euler       FlowMatchEulerDiscreteScheduler (honours shift_terminal, time_shift_type and
                     stochastic_sampling from the config; custom ``sigmas`` from ``make_plan``)
    flow-dpmpp-2m    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                     use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")

``SAMPLERS`` lists the samplers of epsilon / v_prediction models, ``FLOW_SAMPLERS`` those of flow models;
a sampler of the other kind is refused (``samplers_for`` names the right ones).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import schedules as sch
from .errors import InputError

SAMPLERS = ("ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-a", "lcm")
FLOW_SAMPLERS = ("flow-euler", "flow-dpmpp-2m")
FLOW = "flow_prediction"
PREDICTION_TYPES = ("epsilon", "v_prediction", FLOW)
COLUMNS = ("s", "p", "q", "a", "b", "c", "d", "s_next")
S, P, Q, A, B, C, D, S_NEXT = range(len(COLUMNS))

_DPM = ("dpmpp-2m", "dpmpp-2m-karras")
_ALL_DPM = (*_DPM, "flow-dpmpp-2m")
# Config values diffusers honours that a linear per-step update cannot reproduce: key -> (the only
# supported value, the samplers whose diffusers class reads the key).
_UNSUPPORTED: dict[str, tuple[Any, tuple[str, ...]]] = {
    "clip_sample": (False, ("ddim", "lcm")),
    "thresholding": (False, ("ddim", "lcm", *_ALL_DPM)),
    "final_sigmas_type": ("zero", (*_ALL_DPM, "euler")),
    "use_exponential_sigmas": (False, (*_DPM, "euler", *FLOW_SAMPLERS)),
    "use_beta_sigmas": (False, (*_DPM, "euler", *FLOW_SAMPLERS)),
    "use_karras_sigmas": (False, FLOW_SAMPLERS),
    "invert_sigmas": (False, ("flow-euler",)),
    "use_lu_lambdas": (False, _ALL_DPM),
    "use_flow_sigmas": (False, _DPM),
    "use_dynamic_shifting": (False, _DPM),
    "variance_type": (None, _ALL_DPM),
    "lambda_min_clipped": (-math.inf, _DPM),
    "interpolation_type": ("linear", ("euler",)),
    "timestep_type": ("discrete", ("euler",)),
    "sigma_min": (None, ("euler",)),
    "sigma_max": (None, ("euler",)),
}
# Defaults that differ between the diffusers classes (the rest are shared).
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {"timestep_spacing": "leading"},
    "dpmpp-2m": {"timestep_spacing": "linspace"},
    "dpmpp-2m-karras": {"timestep_spacing": "linspace"},
    "euler": {"timestep_spacing": "linspace"},
    "euler-a": {"timestep_spacing": "linspace"},
    "lcm": {"timestep_spacing": "leading", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear"},
    # FlowMatchEulerDiscreteScheduler's; flow-dpmpp-2m takes its flow shift from ``shift`` (or ``flow_shift``)
    "flow-euler": {"shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential",
                   "shift_terminal": None, "stochastic_sampling": False},
    "flow-dpmpp-2m": {"use_dynamic_shifting": False, "time_shift_type": "exponential"},
}


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Everything the sampling loop needs, precomputed in float64. Arrays are read-only.

    ``timesteps[i]`` is what the UNet receives at step i; ``table[i]`` holds the COLUMNS for step i.
    A txt2img loop starts from ``init_noise_sigma * noise``; img2img from ``add_noise(latents, noise)``.
    """

    sampler: str
    prediction_type: str
    timesteps: np.ndarray
    table: np.ndarray
    init_noise_sigma: float
    noise_coeffs: tuple[float, float]  # img2img start: x = noise_coeffs[0] * latents + noise_coeffs[1] * noise
    needs_noise: bool  # some step adds fresh noise (d_i != 0): ancestral, DDIM eta > 0, LCM

    def __post_init__(self) -> None:
        for a in (self.timesteps, self.table):
            a.flags.writeable = False

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def coeffs(self, i: int) -> np.ndarray:
        """Row i of the table as float32: the step graph's ``coeffs`` input."""
        return self.table[i].astype(np.float32)

    def add_noise(self, latents: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Noise encoded image latents to the first step's level (the scheduler's ``add_noise``)."""
        ka, kn = self.noise_coeffs
        return ka * latents + kn * noise

    def renoise_table(self) -> np.ndarray:
        """[steps, 2]: for step i, (ka, kn) such that ``ka x + kn noise`` is clean latents ``x`` noised to step
        i+1's level in the sampler's state (the scheduler's ``add_noise`` then, as ``noise_coeffs`` for the
        first step); the last row (1, 0): the clean latents. Inpainting by blending puts the unmasked region
        back with it after every step."""
        t, n = self.table, self.steps
        out = np.zeros((n, 2))
        out[-1] = (1.0, 0.0)
        if self.sampler == "lcm":  # LCM re-noises to the next step with (b, d) = (alpha_next, sigma_next)
            out[:-1, 0], out[:-1, 1] = t[:-1, B], t[:-1, D]
            return out
        s, p, q = t[1:, S], t[1:, P], t[1:, Q]
        if self.prediction_type == FLOW:  # x = (1 - sigma) x0 + sigma eps with q = -sigma (scale_noise)
            out[:-1, 0], out[:-1, 1] = 1.0 + q, -q
            return out
        # x = (alpha x0 + sigma eps) / s, and (p, q) give alpha and sigma: eps p = s/alpha, q = -sigma/alpha;
        # v p = alpha s, q = -sigma
        if self.prediction_type == "epsilon":
            out[:-1, 0], out[:-1, 1] = 1.0 / p, -q / p
        else:
            out[:-1, 0], out[:-1, 1] = p / s**2, -q / s
        return out


def make_plan(
    sampler: str,
    steps: int,
    scheduler_config: Mapping[str, Any],
    *,
    prediction_type: str | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    timestep_spacing: str | None = None,
    fresh_from: int = 0,
    mu: float | None = None,
    sigmas: Sequence[float] | np.ndarray | None = None,
) -> SamplerPlan:
    """Precompute a sampler's per-step coefficients for ``steps`` steps (img2img when strength < 1).

    ``prediction_type`` and ``timestep_spacing`` (leading, trailing, linspace) override the config's.
    ``fresh_from`` k > 0: rows k.. are those of a new sampler started at row k with no multistep history,
    as a fresh diffusers scheduler after ``set_begin_index(k)`` (the refiner of diffusers' base + refiner
    ensemble, which starts its own scheduler at ``denoising_start``); only DPM-Solver++(2M) has history to
    lose, the other samplers' rows are unchanged. ``mu``: the flow samplers' resolution-dependent shift,
    required by (and only by) a config with use_dynamic_shifting=True (``flow_mu`` computes diffusers' value
    from the image's token count). ``sigmas``: flow-euler's own descending sigmas in (0, 1], one per step,
    shifted as the config says (diffusers' ``set_timesteps(sigmas=)``, which some flow pipelines pass).
    Raises InputError on any bad argument before any work.
    """
    overrides = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    cfg = _config(sampler, {**scheduler_config, **overrides}, prediction_type)
    if timestep_spacing is not None and sampler in FLOW_SAMPLERS:
        raise InputError(f"timestep_spacing does not apply to {sampler} (its schedule is the flow shift of "
                         "evenly spaced sigmas); leave it unset")
    _check_args(sampler, steps, strength, eta)
    _check_mu(sampler, cfg, mu)
    custom = _check_custom_sigmas(sampler, steps, sigmas)
    _check_run_length(sampler, steps, cfg, strength)
    if not _is_number(fresh_from, integral=True) or fresh_from < 0:
        raise InputError(f"fresh_from must be an integer >= 0 (a row of the plan), got {fresh_from!r}")
    extra: dict[str, Any] = {}  # set_timesteps' arguments beyond the step count
    if sampler in FLOW_SAMPLERS:
        extra = {"mu": mu, "custom": custom} if sampler == "flow-euler" else {"mu": mu}
    plan = _BUILDERS[sampler](sampler, steps, cfg, strength, eta, **extra)
    if fresh_from >= plan.steps:
        raise InputError(f"fresh_from {fresh_from} is past the plan's last row ({plan.steps - 1})")
    if fresh_from and sampler in _ALL_DPM:
        plan = _dpm_fresh_from(plan, fresh_from, steps, cfg, strength, mu)
    return plan


def default_sampler(prediction_type: str) -> str:
    """The sampler a call without one gets: DPM-Solver++ 2M, or for a flow model flow-euler (the
    FlowMatchEulerDiscreteScheduler diffusers' SD3 and FLUX pipelines ship with)."""
    return FLOW_SAMPLERS[0] if prediction_type == FLOW else "dpmpp-2m"


def samplers_for(prediction_type: str) -> tuple[str, ...]:
    """The sampler names that serve a model of this prediction type."""
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type {prediction_type!r} is not supported; "
                         f"use one of {', '.join(PREDICTION_TYPES)}")
    return FLOW_SAMPLERS if prediction_type == FLOW else SAMPLERS


def flow_mu(image_seq_len: int, scheduler_config: Mapping[str, Any]) -> float:
    """``mu`` for a use_dynamic_shifting config and an image of ``image_seq_len`` transformer tokens (latent
    height / patch * latent width / patch): linear in the token count from base_shift at base_image_seq_len to
    max_shift at max_image_seq_len, FlowMatchEulerDiscreteScheduler's defaults for missing keys (diffusers'
    ``calculate_shift`` as its flow pipelines call it with the scheduler's config)."""
    if not _is_number(image_seq_len, integral=True) or image_seq_len < 1:
        raise InputError(f"image_seq_len must be an integer >= 1, got {image_seq_len!r}")
    c = {**_CLASS_DEFAULTS["flow-euler"], **scheduler_config}
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    b = c["base_shift"] - m * c["base_image_seq_len"]
    return float(image_seq_len * m + b)


# -- numpy reference of the device step -----------------------------------------------------------


def guide(unet_out: np.ndarray, guidance: float, rescale: float = 0.0) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022): rows [uncond; cond] -> m = u + g (c - u).

    ``rescale`` phi > 0: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    eq. 15-16, per image: m <- phi * m * std(c) / std(m) + (1 - phi) * m (diffusers' ``guidance_rescale``).
    """
    uncond, cond = np.split(unet_out, 2, axis=0)
    m = uncond + guidance * (cond - uncond)
    if rescale:
        axes = tuple(range(1, m.ndim))
        m = m * (rescale * np.std(cond, axis=axes, keepdims=True) / np.std(m, axis=axes, keepdims=True)
                 + (1.0 - rescale))
    return m


def model_input(plan: SamplerPlan, i: int, x: np.ndarray) -> np.ndarray:
    """The UNet input of step i: s_i * x."""
    return plan.table[i, S] * x


def step_reference(
    plan: SamplerPlan,
    i: int,
    x: np.ndarray,
    model_output: np.ndarray,
    x0_prev: np.ndarray | None = None,
    noise: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One step in numpy: returns (x_next, x0). ``model_output`` is after guidance."""
    _, p, q, a, b, c, d, _ = plan.table[i]
    x0 = p * x + q * model_output
    x_next = a * x + b * x0
    if c != 0.0:
        x_next = x_next + c * _needed(x0_prev, "x0_prev", plan, i)
    if d != 0.0:
        x_next = x_next + d * _needed(noise, "noise", plan, i)
    return x_next, x0


def run_reference(
    plan: SamplerPlan,
    latents: np.ndarray,
    model: Callable[[np.ndarray, float], np.ndarray],
    noises: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """The whole loop in numpy. ``model(unet_in, t)`` returns the guided output; ``noises[i]`` feeds step i."""
    x, x0 = latents, None
    for i in range(plan.steps):
        m = model(model_input(plan, i, x), float(plan.timesteps[i]))
        noise = noises[i] if noises is not None else None
        x, x0 = step_reference(plan, i, x, m, x0, noise)
    return x


def _needed(a: np.ndarray | None, name: str, plan: SamplerPlan, i: int) -> np.ndarray:
    if a is None:
        raise InputError(f"{plan.sampler} step {i} uses {name}; pass it (it is None)")
    return a


# -- argument checks --------------------------------------------------------------------------------


def _config(sampler: str, config: Mapping[str, Any], prediction_type: str | None) -> dict[str, Any]:
    """The config as the sampler's diffusers class would see it, checked; the sampler fits the model's
    prediction type (the argument, else the config's, else flow_prediction for a flow-matching config and
    epsilon otherwise)."""
    if sampler not in SAMPLERS + FLOW_SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; valid names: {', '.join(SAMPLERS + FLOW_SAMPLERS)}")
    cfg = {"num_train_timesteps": 1000, "steps_offset": 0, "prediction_type": "epsilon",
           "set_alpha_to_one": True, "use_karras_sigmas": False, "original_inference_steps": 50,
           "timestep_scaling": 10.0, **_CLASS_DEFAULTS[sampler]}
    cfg.update({k: v for k, v in config.items() if not k.startswith("_")})
    flow_config = _flow_config(config)
    declared = prediction_type if prediction_type is not None else config.get("prediction_type")
    cfg["prediction_type"] = declared if declared is not None else (FLOW if flow_config else "epsilon")
    kind = cfg["prediction_type"]
    if kind not in PREDICTION_TYPES:
        raise InputError(f"prediction_type {kind!r} is not supported; "
                         f"use one of {', '.join(PREDICTION_TYPES)}")
    if flow_config and kind != FLOW:
        raise InputError(f"the scheduler config is a flow-matching one ({flow_config}) but prediction_type "
                         f"is {kind!r}; a flow-matching model's is {FLOW!r}")
    if (sampler in FLOW_SAMPLERS) != (kind == FLOW):
        raise InputError(f"sampler {sampler} does not serve prediction_type {kind!r} models; "
                         f"use one of {', '.join(samplers_for(kind))}")
    for key, (ok, users) in _UNSUPPORTED.items():
        if sampler in users and key in cfg and cfg[key] != ok:
            raise InputError(f"scheduler config {key}={cfg[key]!r} is not supported by {sampler}; "
                             f"set it to {ok!r}")
    if sampler in FLOW_SAMPLERS:
        _check_flow_config(sampler, cfg)
        return cfg
    if cfg["timestep_spacing"] not in sch.SPACINGS:
        raise InputError(f"timestep_spacing {cfg['timestep_spacing']!r} is not supported; "
                         f"use one of {', '.join(sch.SPACINGS)}")
    sch.betas(cfg)  # rejects an unknown beta_schedule now, before any work
    return cfg


def _flow_config(config: Mapping[str, Any]) -> str:
    """Why a scheduler config is a flow-matching model's ('' when it is not)."""
    name = str(config.get("_class_name") or "")
    if name.startswith("FlowMatch"):
        return f"_class_name {name}"
    if config.get("use_flow_sigmas"):
        return "use_flow_sigmas=True"
    return ""


def _flow_shift_of(cfg: Mapping[str, Any]) -> Any:
    """The static flow shift: ``shift`` (FlowMatch configs), else ``flow_shift`` (DPM-Solver's), else 1."""
    return cfg["shift"] if "shift" in cfg else cfg.get("flow_shift", 1.0)


def _check_flow_config(sampler: str, cfg: Mapping[str, Any]) -> None:
    """The flow keys a table reproduces hold values it can use."""
    shift = _flow_shift_of(cfg)
    if not _is_number(shift) or not 0.0 < shift < math.inf:
        raise InputError(f"scheduler config shift={shift!r} must be a number > 0")
    kinds = ("exponential",) if sampler == "flow-dpmpp-2m" else ("exponential", "linear")
    if cfg["use_dynamic_shifting"] and cfg["time_shift_type"] not in kinds:
        raise InputError(f"scheduler config time_shift_type={cfg['time_shift_type']!r} is not supported by "
                         f"{sampler}; use {' or '.join(kinds)}")
    terminal = cfg.get("shift_terminal")
    if sampler == "flow-euler" and terminal and (not _is_number(terminal) or not 0.0 < terminal < 1.0):
        raise InputError(f"scheduler config shift_terminal={terminal!r} must be a number in (0, 1), or null")


def _check_mu(sampler: str, cfg: Mapping[str, Any], mu: float | None) -> None:
    """``mu`` is given exactly when a flow config shifts by image size (use_dynamic_shifting)."""
    if mu is not None and (not _is_number(mu) or not math.isfinite(mu)):
        raise InputError(f"mu must be a finite number, got {mu!r}")
    dynamic = sampler in FLOW_SAMPLERS and bool(cfg["use_dynamic_shifting"])
    if dynamic and mu is None:
        raise InputError(f"the scheduler config has use_dynamic_shifting=True, so {sampler} shifts its "
                         "schedule by the image size: pass mu (samplers.flow_mu(image_seq_len, "
                         "scheduler_config), with image_seq_len the transformer's image token count)")
    if not dynamic and mu is not None:
        raise InputError(f"mu applies only to {', '.join(FLOW_SAMPLERS)} with a use_dynamic_shifting=True "
                         "scheduler config; leave it unset")


def _check_custom_sigmas(sampler: str, steps: int,
                         sigmas: Sequence[float] | np.ndarray | None) -> np.ndarray | None:
    """Custom sigmas are flow-euler's only: ``steps`` finite numbers, descending, in (0, 1]."""
    if sigmas is None:
        return None
    if sampler != "flow-euler":
        raise InputError(f"sigmas= applies only to flow-euler (diffusers' FlowMatchEulerDiscreteScheduler), "
                         f"not {sampler}; leave it unset")
    try:
        out = np.array(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"sigmas must be a sequence of numbers, got {sigmas!r}") from None
    if out.shape != (steps,):
        raise InputError(f"sigmas must hold one number per step ({steps!r}), got shape {out.shape}")
    if not np.all(np.isfinite(out)) or out.min() <= 0.0 or out.max() > 1.0 or np.any(np.diff(out) >= 0):
        raise InputError("sigmas must descend strictly within (0, 1]")
    out.flags.writeable = False
    return out


def _check_args(sampler: str, steps: int, strength: float, eta: float) -> None:
    if not _is_number(steps, integral=True) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    if not _is_number(strength) or not 0.0 < strength <= 1.0:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}")
    if not _is_number(eta) or not 0.0 <= eta <= 1.0:
        raise InputError(f"eta must be a number in [0, 1], got {eta!r}")
    if eta != 0.0 and sampler != "ddim":
        raise InputError(f"eta applies only to ddim, not {sampler}; leave it at 0")


def _is_number(v: object, integral: bool = False) -> bool:
    kinds = (int, np.integer) if integral else (int, float, np.integer, np.floating)
    return isinstance(v, kinds) and not isinstance(v, bool)


def _check_run_length(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float) -> None:
    """The step count and strength leave at least one step, within the model's schedule."""
    if steps > cfg["num_train_timesteps"]:
        raise InputError(f"steps {steps} exceeds the model's {cfg['num_train_timesteps']} training steps")
    if sampler == "lcm":
        original = int(cfg["original_inference_steps"])
        if steps > original or int(original * strength) // steps < 1:
            raise InputError(f"lcm serves at most {int(original * strength)} steps with "
                             f"original_inference_steps={original} and strength={strength}; got {steps}")
    elif _img2img_start(sampler, steps, strength) >= steps:
        raise InputError(f"strength {strength} leaves none of the {steps} steps; raise strength or steps")


def _img2img_start(sampler: str, steps: int, strength: float) -> int:
    """The first step an img2img run keeps: diffusers' flow img2img pipelines' rule for the flow samplers."""
    return (sch.flow_img2img_start if sampler in FLOW_SAMPLERS else sch.img2img_start)(steps, strength)


def _in_range(t: np.ndarray, num_train: int) -> np.ndarray:
    if t.min() < 0 or t.max() > num_train - 1:
        raise InputError(f"timesteps {t.min():g}..{t.max():g} fall outside the {num_train} training "
                         "steps; lower steps_offset or steps")
    return t


def _int_timesteps(t: np.ndarray, num_train: int) -> np.ndarray:
    """Timesteps used as indices into the training schedule: integral and in range."""
    return _in_range(np.round(t), num_train)


# -- shared pieces ----------------------------------------------------------------------------------


def _finite_abar(cfg: Mapping[str, Any]) -> np.ndarray:
    """alphas_cumprod for the VE-sigma samplers: a zero terminal SNR gives an infinite last sigma, which
    diffusers' Euler and DPM schedulers replace by abar = 2^-24 (its value in their float32 tables)."""
    abar = sch.alphas_cumprod(cfg)
    if cfg.get("rescale_betas_zero_snr", False):
        abar = abar.copy()
        abar[-1] = 2.0**-24
    return abar


def _x0_coeffs(
    alpha: np.ndarray, sigma: np.ndarray, s: np.ndarray | float, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) with x0 = p x + q m, for the VP sample x_t = s x = alpha x0 + sigma eps.

    epsilon: x0 = (x_t - sigma eps) / alpha            (DDIM eq. 9)
    v:       x0 = alpha x_t - sigma v, v = alpha eps - sigma x0  (Salimans & Ho 2022, sec. 4)
    """
    if prediction_type == "epsilon":
        return s / alpha, -sigma / alpha
    return alpha * s, -sigma


def _plan(sampler: str, cfg: Mapping[str, Any], timesteps: np.ndarray, cols: Mapping[str, np.ndarray | float],
          alpha0: float, sigma0: float, init_noise_sigma: float) -> SamplerPlan:
    """Assemble the table; ``cols`` holds every COLUMN but s_next, each of length steps."""
    n = len(timesteps)
    table = np.zeros((n, len(COLUMNS)))
    for name, values in cols.items():
        table[:, COLUMNS.index(name)] = np.broadcast_to(np.asarray(values, dtype=np.float64), (n,))
    table[:-1, S_NEXT] = table[1:, S]
    table[-1, S_NEXT] = 1.0
    if not np.all(np.isfinite(table)):
        raise InputError(f"{sampler} has infinite coefficients with this scheduler config (zero terminal SNR "
                         "with epsilon prediction divides by alpha_T = 0); use a v_prediction model, or set "
                         "rescale_betas_zero_snr to false")
    s0 = table[0, S]
    return SamplerPlan(
        sampler=sampler,
        prediction_type=cfg["prediction_type"],
        timesteps=np.asarray(timesteps, dtype=np.float64),
        table=table,
        init_noise_sigma=float(init_noise_sigma),
        noise_coeffs=(float(alpha0 / s0), float(sigma0 / s0)),
        needs_noise=bool(np.any(table[:, D] != 0.0)),
    )


# -- DDIM (Song et al. 2021) -----------------------------------------------------------------------


def _ddim(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float, eta: float) -> SamplerPlan:
    """DDIM eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z.

    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) holds for either prediction type, so
    a = sqrt(1 - abar_prev - std^2) / sqrt(1 - abar_t) and b = sqrt(abar_prev) - a sqrt(abar_t).
    """
    T = cfg["num_train_timesteps"]
    abar = sch.alphas_cumprod(cfg)
    t = sch.spaced_timesteps(cfg["timestep_spacing"], steps, T, cfg["steps_offset"])
    t = _int_timesteps(t, T)[sch.img2img_start(steps, strength):]
    prev = t - T // steps  # diffusers steps back by T // steps whatever the spacing
    final = 1.0 if cfg["set_alpha_to_one"] else abar[0]
    abar_t = abar[t.astype(np.int64)]
    abar_prev = np.where(prev >= 0, abar[np.maximum(prev, 0).astype(np.int64)], final)
    # DDIM eq. 16: sigma_t(eta)^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)
    std = eta * np.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    alpha, sigma = sch.vp_from_abar(abar_t)
    a = np.sqrt(np.maximum(1 - abar_prev - std**2, 0.0)) / sigma
    p, q = _x0_coeffs(alpha, sigma, 1.0, cfg["prediction_type"])
    cols = {"s": 1.0, "p": p, "q": q, "a": a, "b": np.sqrt(abar_prev) - a * alpha, "d": std}
    return _plan(sampler, cfg, t, cols, alpha[0], sigma[0], 1.0)


# -- DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) -------------------------------------


def _dpm_sigmas(steps: int, cfg: Mapping[str, Any], karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, VE sigmas) of the full schedule, as DPMSolverMultistepScheduler.set_timesteps."""
    T, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    train = sch.ve_sigmas(_finite_abar(cfg))
    if karras:  # Karras et al. 2022 eq. 5 over the whole training range; timesteps rounded
        sigmas = sch.karras_sigmas(train[0], train[-1], steps)
        return _int_timesteps(sch.sigma_to_t(sigmas, train), T), sigmas
    if spacing == "trailing":
        t = sch.spaced_timesteps(spacing, steps, T)
    else:  # DPM spaces steps + 1 points and drops the last (t = 0 or steps_offset)
        t = sch.spaced_timesteps(spacing, steps + 1, T, cfg["steps_offset"])[:-1]
    t = _int_timesteps(t, T)
    return t, sch.interp_sigma(t, train)


def _dpm_solver(sigmas: np.ndarray,
                state: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """a, b, c for DPM-Solver++(2M), midpoint form, on VE sigmas[0..n] with sigmas[n] = 0.

    ``state`` (alpha, sigma) at each of those levels: the sampler's sample x = alpha x0 + sigma eps, with
    sigma / alpha the VE sigma; the VP sample (alpha = 1 / sqrt(sigma^2 + 1)) when None.

    First order (DPM-Solver++(1), sec. 4; the same as DDIM): x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) x0,
    with h = lambda_t - lambda_s, so e^-h = sigma'_t / sigma'_s in VE sigmas.
    Second order (Alg. 2): D = (1 + 1/(2 r)) x0_s - 1/(2 r) x0_prev, r = h_prev / h.
    Steps 0 (no history) and n-1 (sigma_n = 0) are first order, as diffusers' lower_order_final.
    """
    n = len(sigmas) - 1
    alpha, sigma = sch.vp_from_sigma(sigmas) if state is None else state
    ratio = sigmas[1:] / sigmas[:-1]  # e^-h
    a = sigma[1:] / sigma[:-1]
    b = alpha[1:] * (1.0 - ratio)
    c = np.zeros(n)
    for i in range(1, n - 1):
        r = math.log(sigmas[i - 1] / sigmas[i]) / math.log(sigmas[i] / sigmas[i + 1])
        c[i] = -b[i] / (2 * r)
        b[i] = b[i] * (1 + 1 / (2 * r))
    return {"a": a, "b": b, "c": c}


def _dpmpp_2m(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float, eta: float) -> SamplerPlan:
    karras = sampler == "dpmpp-2m-karras" or bool(cfg["use_karras_sigmas"])
    t, sigmas = _dpm_sigmas(steps, cfg, karras)
    _check_descending(sigmas, sampler, steps)
    start = sch.img2img_start(steps, strength)  # the run restarts the multistep history (set_begin_index)
    t, sigmas = t[start:], np.append(sigmas[start:], 0.0)
    alpha, sigma = sch.vp_from_sigma(sigmas[:-1])
    p, q = _x0_coeffs(alpha, sigma, 1.0, cfg["prediction_type"])
    cols: dict[str, np.ndarray | float] = {"s": 1.0, "p": p, "q": q, **_dpm_solver(sigmas)}
    return _plan(sampler, cfg, t, cols, alpha[0], sigma[0], 1.0)


def _dpm_fresh_from(plan: SamplerPlan, k: int, steps: int, cfg: Mapping[str, Any], strength: float,
                    mu: float | None) -> SamplerPlan:
    """Rows k.. solved again from row k with no history: first order at row k, as lower_order_nums = 0."""
    if plan.sampler == "flow-dpmpp-2m":
        _, flow = _flow_dpm_sigmas(steps, cfg, mu)
        solver = _flow_dpm_solver(np.append(flow[sch.flow_img2img_start(steps, strength):], 0.0)[k:])
    else:
        karras = plan.sampler == "dpmpp-2m-karras" or bool(cfg["use_karras_sigmas"])
        _, sigmas = _dpm_sigmas(steps, cfg, karras)
        solver = _dpm_solver(np.append(sigmas[sch.img2img_start(steps, strength):], 0.0)[k:])
    table = plan.table.copy()
    for name, values in solver.items():
        table[k:, COLUMNS.index(name)] = values
    return replace(plan, table=table, timesteps=plan.timesteps.copy())


def _check_descending(sigmas: np.ndarray, sampler: str, steps: int) -> None:
    if np.any(np.diff(sigmas) >= 0):
        raise InputError(f"{steps} steps repeat a noise level for {sampler} with this config; use fewer steps")


# -- Euler and Euler ancestral (Karras et al. 2022, Alg. 2; k-diffusion) --------------------------


def _euler_sigmas(steps: int, cfg: Mapping[str, Any], karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, VE sigmas) as EulerDiscreteScheduler.set_timesteps; fractional timesteps allowed."""
    T = cfg["num_train_timesteps"]
    train = sch.ve_sigmas(_finite_abar(cfg))
    t = _in_range(sch.spaced_timesteps(cfg["timestep_spacing"], steps, T, cfg["steps_offset"]), T)
    sigmas = sch.interp_sigma(t, train)
    if karras:  # Karras et al. 2022 eq. 5 between the spaced schedule's own ends
        sigmas = sch.karras_sigmas(sigmas[-1], sigmas[0], steps)
        t = sch.sigma_to_t(sigmas, train)
    return t, sigmas


def _euler_init_sigma(sigmas: np.ndarray, spacing: str) -> float:
    top = float(sigmas.max())
    return top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)


def _euler(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float, eta: float) -> SamplerPlan:
    karras = sampler == "euler" and bool(cfg["use_karras_sigmas"])
    t, sigmas = _euler_sigmas(steps, cfg, karras)
    _check_descending(sigmas, sampler, steps)
    init = _euler_init_sigma(sigmas, cfg["timestep_spacing"])
    start = sch.img2img_start(steps, strength)
    t, sigmas = t[start:], np.append(sigmas[start:], 0.0)
    alpha, sigma = sch.vp_from_sigma(sigmas[:-1])  # UNet input x / sqrt(sigma^2 + 1) = alpha x
    p, q = _x0_coeffs(alpha, sigma, alpha, cfg["prediction_type"])
    solver = _euler_ancestral(sigmas) if sampler == "euler-a" else _euler_step(sigmas)
    cols: dict[str, np.ndarray | float] = {"s": alpha, "p": p, "q": q, **solver}
    return _plan(sampler, cfg, t, cols, alpha[0], sigma[0], init)


def _euler_step(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Euler on dx/dsigma = (x - x0) / sigma: x_next = x + (sigma_next - sigma) (x - x0) / sigma."""
    a = sigmas[1:] / sigmas[:-1]
    return {"a": a, "b": 1.0 - a}


def _euler_ancestral(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Euler to sigma_down, then fresh noise of sigma_up (k-diffusion get_ancestral_step, eta = 1)."""
    cur, nxt = sigmas[:-1], sigmas[1:]
    up = np.sqrt(nxt**2 * (cur**2 - nxt**2) / cur**2)
    down = np.sqrt(nxt**2 - up**2)
    return {"a": down / cur, "b": 1.0 - down / cur, "d": up}


# -- LCM (Luo et al. 2023, "Latent Consistency Models", multistep consistency sampling) -----------


def _lcm_timesteps(steps: int, cfg: Mapping[str, Any], strength: float) -> np.ndarray:
    """LCMScheduler.set_timesteps: ``steps`` picks from the distillation schedule of original steps."""
    T, original = cfg["num_train_timesteps"], int(cfg["original_inference_steps"])
    origin = (np.arange(1, int(original * strength) + 1) * (T // original) - 1)[::-1]
    picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[picks].astype(np.float64)


def _lcm(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float, eta: float) -> SamplerPlan:
    """Consistency function f(x, t) = c_skip(t) x + c_out(t) x0 (Song et al. 2023), then re-noise to the next t."""
    t = _lcm_timesteps(steps, cfg, strength)
    abar = sch.alphas_cumprod(cfg)
    alpha, sigma = sch.vp_from_abar(abar[t.astype(np.int64)])
    p, q = _x0_coeffs(alpha, sigma, 1.0, cfg["prediction_type"])
    scaled = t * cfg["timestep_scaling"]  # boundary condition with sigma_data = 0.5
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / np.sqrt(scaled**2 + 0.25)
    b = np.append(alpha[1:], 1.0)  # last step returns the denoised sample itself
    d = np.append(sigma[1:], 0.0)
    cols = {"s": 1.0, "p": c_skip + c_out * p, "q": c_out * q, "a": 0.0, "b": b, "d": d}
    return _plan(sampler, cfg, t, cols, alpha[0], sigma[0], 1.0)


# -- flow matching (Lipman et al. 2023; Esser et al. 2024, "Scaling Rectified Flow Transformers") --------


def _flow_euler_sigmas(steps: int, cfg: Mapping[str, Any], mu: float | None,
                       custom: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, flow sigmas) as FlowMatchEulerDiscreteScheduler.set_timesteps(steps, mu=mu, sigmas=custom):
    ``custom``, or evenly spaced between the ends of its (shifted) training sigmas, shifted (statically by
    ``shift``, or by ``mu``), optionally stretched to end at shift_terminal."""
    T = cfg["num_train_timesteps"]
    dynamic = bool(cfg["use_dynamic_shifting"])
    if custom is not None:
        sigmas = custom.copy()
    else:
        train = np.arange(T, 0, -1, dtype=np.float64) / T
        if not dynamic:
            train = sch.flow_shift(train, _flow_shift_of(cfg))
        sigmas = np.linspace(train[0] * T, train[-1] * T, steps) / T
    if dynamic:
        assert mu is not None  # _check_mu
        sigmas = sch.flow_time_shift(sigmas, mu, cfg["time_shift_type"])
    else:
        sigmas = sch.flow_shift(sigmas, _flow_shift_of(cfg))
    if cfg["shift_terminal"]:  # stretch_shift_to_terminal: 1 - sigma scaled, the last sigma is shift_terminal
        if steps == 1:  # the one sigma is 1: 0 / 0 (diffusers' schedule is NaN)
            raise InputError("shift_terminal needs at least 2 steps (one step's sigma 1 cannot be stretched)")
        rest = 1.0 - sigmas
        sigmas = 1.0 - rest / (rest[-1] / (1.0 - cfg["shift_terminal"]))
    return sigmas * T, sigmas


def _flow_dpm_sigmas(steps: int, cfg: Mapping[str, Any], mu: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, flow sigmas) as DPMSolverMultistepScheduler(use_flow_sigmas=True).set_timesteps(steps,
    mu=mu): the flow shift (e^mu when dynamic) of steps + 1 even levels in [0, 1 - 1/T] less the 0,
    timesteps truncated to integers, in diffusers' order of operations."""
    T = cfg["num_train_timesteps"]
    shift = _flow_shift_of(cfg)
    if cfg["use_dynamic_shifting"]:  # diffusers sets flow_shift = np.exp(mu)
        assert mu is not None  # _check_mu
        shift = np.exp(mu)
    sigmas = 1.0 - np.linspace(1, 1 / T, steps + 1)
    sigmas = np.flip(sch.flow_shift(sigmas, shift))[:-1].copy()
    return np.trunc(sigmas * T), sigmas


def _check_flow_sigmas(sigmas: np.ndarray, sampler: str, steps: int) -> None:
    if not np.all(np.isfinite(sigmas)) or sigmas.min() <= 0.0 or sigmas.max() > 1.0:
        raise InputError(f"{sampler}: this scheduler config (and mu) gives sigmas outside (0, 1] "
                         f"({sigmas.min():g}..{sigmas.max():g}); check shift, mu and time_shift_type")
    _check_descending(sigmas, sampler, steps)


def _flow_euler(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float, eta: float,
                mu: float | None = None, custom: np.ndarray | None = None) -> SamplerPlan:
    """Euler on the flow ODE dx/dsigma = v = (x - x0) / sigma: the same step as ``_euler_step``; with
    stochastic_sampling, x_next = (1 - sigma_next) x0 + sigma_next z (fresh noise z) instead."""
    t, sigmas = _flow_euler_sigmas(steps, cfg, mu, custom)
    _check_flow_sigmas(sigmas, sampler, steps)
    start = sch.flow_img2img_start(steps, strength)
    t, sigmas = t[start:], np.append(sigmas[start:], 0.0)
    nxt = sigmas[1:]
    solver: dict[str, np.ndarray | float] = (
        {"a": 0.0, "b": 1.0 - nxt, "d": nxt} if cfg["stochastic_sampling"] else dict(_euler_step(sigmas)))
    cols: dict[str, np.ndarray | float] = {"s": 1.0, "p": 1.0, "q": -sigmas[:-1], **solver}
    return _plan(sampler, cfg, t, cols, 1.0 - sigmas[0], sigmas[0], 1.0)


def _flow_dpm_solver(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++(2M) on flow sigmas[0..n], sigmas[n] = 0: alpha_t = 1 - sigma, sigma_t = sigma (diffusers'
    flow sigmas), VE sigma sigma / (1 - sigma)."""
    return _dpm_solver(sigmas / (1.0 - sigmas), (1.0 - sigmas, sigmas))


def _flow_dpmpp_2m(sampler: str, steps: int, cfg: Mapping[str, Any], strength: float, eta: float,
                   mu: float | None = None) -> SamplerPlan:
    t, sigmas = _flow_dpm_sigmas(steps, cfg, mu)
    _check_flow_sigmas(sigmas, sampler, steps)
    start = sch.flow_img2img_start(steps, strength)  # the run restarts the multistep history there
    t, sigmas = t[start:], np.append(sigmas[start:], 0.0)
    cols: dict[str, np.ndarray | float] = {"s": 1.0, "p": 1.0, "q": -sigmas[:-1], **_flow_dpm_solver(sigmas)}
    return _plan(sampler, cfg, t, cols, 1.0 - sigmas[0], sigmas[0], 1.0)


_BUILDERS: dict[str, Callable[..., SamplerPlan]] = {
    "ddim": _ddim,
    "dpmpp-2m": _dpmpp_2m,
    "dpmpp-2m-karras": _dpmpp_2m,
    "euler": _euler,
    "euler-a": _euler,
    "lcm": _lcm,
    "flow-euler": _flow_euler,
    "flow-dpmpp-2m": _flow_dpmpp_2m,
}


def rows_before(timesteps: Sequence[float] | np.ndarray, fraction: float, num_train_timesteps: int) -> int:
    """How many of a plan's steps come before ``fraction`` of the schedule: diffusers' discrete cut-off
    (``denoising_end`` / ``denoising_start``), the steps with t >= round(T - fraction * T)."""
    cutoff = round(num_train_timesteps - fraction * num_train_timesteps)
    return int(np.sum(np.asarray(timesteps) >= cutoff))


def window(plan: SamplerPlan, step: int, start: float | None, end: float | None,
           num_train_timesteps: int) -> tuple[int, int]:
    """The plan rows [lo, hi) a ``denoise`` runs: from ``step`` (or the ``start`` fraction of the schedule) to
    the ``end`` fraction (or the end)."""
    def row(frac: float, label: str) -> int:
        if not 0.0 < frac < 1.0:
            raise InputError(f"{label} {frac} is outside (0, 1): give the fraction of the schedule")
        return rows_before(plan.timesteps, frac, num_train_timesteps)

    lo = step if start is None else row(start, "start")
    hi = plan.steps if end is None else row(end, "end")
    if not 0 <= lo < hi <= plan.steps:
        raise InputError(f"the window [{lo}, {hi}) of the {plan.steps} steps is empty; start before end")
    return lo, hi
