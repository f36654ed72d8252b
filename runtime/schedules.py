"""Noise schedules from a diffusers scheduler configuration, in float64 on the host.

Everything here is a pure function of the configuration and the step count; ``samplers.py`` turns
the results into a per-step coefficient table. Notation (DDPM, Ho et al. 2020; Karras et al. 2022):

    beta_t            per-step noise variance of the training process, t = 0 .. T-1
    abar_t            alphas_cumprod: prod_{s<=t} (1 - beta_s)      (DDIM's alpha_t)
    alpha_t, sigma_t  sqrt(abar_t), sqrt(1 - abar_t): x_t = alpha_t x_0 + sigma_t eps   (VP form)
    sigma (no index)  sigma_t / alpha_t = sqrt((1 - abar) / abar): x_t / alpha_t = x_0 + sigma eps  (VE form)
    lambda            log(alpha_t / sigma_t) = -log(sigma): the half log-SNR of DPM-Solver

Flow matching (rectified flow; Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3) has no betas:
x_t = (1 - s) x_0 + s eps with s in [0, 1] the flow sigma, timestep s * T, and the model predicts the
velocity v = eps - x_0. Its VE sigma is s / (1 - s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear")
SPACINGS = ("leading", "trailing", "linspace")


def betas(config: Mapping[str, Any]) -> np.ndarray:
    """beta_t for t = 0 .. T-1 (diffusers' ``trained_betas`` / ``beta_schedule``), float64."""
    trained = config.get("trained_betas")
    if trained is not None:
        return np.asarray(trained, dtype=np.float64)
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    raise InputError(f"beta_schedule {kind!r} is not supported; use one of {BETA_SCHEDULES}")


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4), float64; zero terminal SNR when the config's
    ``rescale_betas_zero_snr`` asks for it."""
    b = betas(config)
    if config.get("rescale_betas_zero_snr", False):
        b = zero_terminal_snr(b)
    return np.cumprod(1.0 - b)


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1: shift and
    scale sqrt(abar) so that its last value is 0 (zero SNR at t = T-1) and its first is unchanged."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def vp_from_abar(abar: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) = (sqrt(abar), sqrt(1 - abar))."""
    abar = np.asarray(abar, dtype=np.float64)
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def vp_from_sigma(sigma: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) of a VE sigma: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t."""
    sigma = np.asarray(sigma, dtype=np.float64)
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def ve_sigmas(abar: np.ndarray) -> np.ndarray:
    """sigma = sqrt((1 - abar) / abar) for every training timestep."""
    return np.sqrt((1.0 - abar) / abar)


def spaced_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int = 0) -> np.ndarray:
    """Descending inference timesteps (float64), as diffusers' DDIM/Euler ``set_timesteps``.

    See Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2.
    ``linspace`` is not rounded here; integer-timestep samplers round it themselves.
    """
    if spacing == "linspace":
        return np.linspace(0.0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps, dtype=np.float64) * (num_train // steps))[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / steps)) - 1.0
    raise InputError(f"timestep_spacing {spacing!r} is not supported; use one of {SPACINGS}")


def interp_sigma(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linear in t between training timesteps."""
    return np.interp(timesteps, np.arange(len(sigmas), dtype=np.float64), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is ``sigma``: linear interpolation in log sigma.

    ``sigmas`` ascends with t. Same as k-diffusion's ``DiscreteSchedule.sigma_to_t``.
    """
    log_sigmas = np.log(sigmas)
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step run for img2img (diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``)."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def flow_img2img_start(steps: int, strength: float) -> int:
    """Index of the first step run for img2img by diffusers' flow-matching img2img pipelines
    (``StableDiffusion3Img2ImgPipeline.get_timesteps``): int(steps - steps * strength), with no int() around
    steps * strength as in ``img2img_start``, so the two can differ by one (10 steps, strength 0.55: 4, not
    5)."""
    return int(max(steps - min(steps * strength, steps), 0))


def flow_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The timestep shift of Esser et al. 2024 (eq. 23): s' = shift s / (1 + (shift - 1) s), in diffusers'
    order of operations (its DPM-Solver truncates s' T to integer timesteps, so the last bit can matter)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_time_shift(sigmas: np.ndarray, mu: float, kind: str) -> np.ndarray:
    """Resolution-dependent shift of FlowMatchEulerDiscreteScheduler.time_shift (exponent 1): exponential
    e^mu / (e^mu + 1/s - 1) (the shift above with shift = e^mu), or linear mu / (mu + 1/s - 1)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))
