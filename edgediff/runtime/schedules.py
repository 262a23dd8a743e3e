"""Sigma / timestep schedules over a checkpoint's training noise schedule.

Everything runs in sigma space (x = x0 + sigma * eps, k-diffusion's convention). A Schedule carries, per step, the
sigma and the timestep the U-Net is told, plus the scale of the initial noise: diffusers' samplers disagree on it
(sqrt(sigma_max^2 + 1) under leading spacing, sigma_max under linspace and trailing) and images only match if the
runtime follows the same convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import SchedulerConfig

SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (n + 1,) descending, ending in 0
    timesteps: np.ndarray  # (n,) the U-Net's timestep at each sigma, float (fractional survives)
    init_noise_sigma: float  # initial latents = unit noise * this

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep_for(self, sigma: float) -> float:
        """The timestep of one of this schedule's sigmas (samplers only evaluate the model at those)."""
        hits = np.flatnonzero(self.sigmas[:-1] == sigma)
        if not len(hits):
            raise ValueError(f"sigma {sigma} is not on this schedule")
        return float(self.timesteps[hits[0]])

    def starting_at(self, index: int) -> Schedule:
        """The tail from step `index` on (img2img). Its noise scale is that step's sigma: noise is added to a clean
        latent, not drawn from scratch."""
        return Schedule(self.sigmas[index:], self.timesteps[index:], float(self.sigmas[index]))


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """The training schedule's cumulative alphas, computed in float32 as diffusers does."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    else:
        raise ValueError(f"unknown beta schedule {cfg.beta_schedule!r}")
    cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
    if cfg.rescale_betas_zero_snr:
        cumprod = _rescale_zero_terminal_snr(cumprod)
    return cumprod


def _rescale_zero_terminal_snr(cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; the last alpha is kept at
    2**-24 (as diffusers does) so that its sigma stays finite."""
    sqrt_ab = np.sqrt(cumprod.astype(np.float64))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    out = (sqrt_ab**2).astype(np.float32)
    out[-1] = 2.0**-24
    return out


def training_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    ac = alphas_cumprod(cfg)
    return ((1 - ac) / ac) ** 0.5


def discrete_timesteps(cfg: SchedulerConfig, steps: int, spacing: str) -> np.ndarray:
    n = cfg.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + cfg.steps_offset
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def discrete(cfg: SchedulerConfig, steps: int, spacing: str | None = None) -> Schedule:
    """The Euler-family schedule: timesteps by spacing, sigmas linearly interpolated over the training sigmas."""
    spacing = spacing or cfg.timestep_spacing
    timesteps = discrete_timesteps(cfg, steps, spacing)
    train = training_sigmas(cfg)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    top = float(sigmas.max())
    init = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Schedule(sigmas, timesteps.astype(np.float64), init)


def lcm(cfg: SchedulerConfig, steps: int, strength: float = 1.0) -> Schedule:
    """Latent Consistency Models (Luo et al. 2023): `steps` timesteps evenly skipped from the teacher's
    `original_inference_steps` schedule. LCM samples in alpha space with unit initial noise, which in sigma space
    is a scale of sqrt(sigma_max^2 + 1)."""
    original = cfg.original_inference_steps
    k = cfg.num_train_timesteps // original
    origin = np.arange(1, int(original * strength) + 1) * k - 1
    if steps > len(origin):
        raise ValueError(f"lcm takes at most {len(origin)} steps here (the distilled schedule's length), got {steps}")
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    timesteps = origin[::-1][indices]
    ac = alphas_cumprod(cfg)
    sigmas = ((1 - ac[timesteps]) / ac[timesteps]) ** 0.5
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)
    return Schedule(sigmas, timesteps.astype(np.float64), float((sigmas[0] ** 2 + 1) ** 0.5))


def img2img_start(steps: int, strength: float) -> int:
    """The first step an img2img render runs, as diffusers counts it: the last `int(steps * strength)` steps."""
    run = min(int(steps * strength), steps)
    return max(steps - run, 0)
