"""Samplers as pure functions over NumPy arrays, k-diffusion style.

Each has the signature `sample_<name>(denoise, x, sigmas, *, noise, callback) -> x`:
- `denoise(x, sigma) -> x0` is the model (see denoise.py); `sigmas` is the schedule, descending, ending in 0;
- `noise(shape) -> array` draws unit Gaussian noise for the stochastic samplers;
- `callback(i, x, x0)` is called after step i; returning False stops the loop, and the sampler then returns the
  last x0 estimate (the cleanest image available at that point).
No sampler keeps state between calls: "Euler a, trailing" is a sampler plus a schedule.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
Noise = Callable[[tuple[int, ...]], np.ndarray]
Callback = Callable[[int, np.ndarray, np.ndarray], "bool | None"]


def _stopped(callback: Callback | None, i: int, x: np.ndarray, x0: np.ndarray) -> bool:
    return callback is not None and callback(i, x, x0) is False


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic move to sigma_down and fresh noise of sigma_up (k-diffusion)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def sample_euler(denoise: Denoise, x, sigmas, *, noise: Noise | None = None, callback: Callback | None = None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigma)
        x = x + (x - x0) * np.float32((sigma_next - sigma) / sigma)
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_euler_a(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None):
    """Ancestral Euler (Song et al. 2021, "Score-Based Generative Modeling through SDEs"; k-diffusion's
    sample_euler_ancestral). Noise is drawn at every step, the last included, as diffusers does, so that a seed
    draws the same stream."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigma_next)
        x = x + (x - x0) * np.float32((down - sigma) / sigma)
        z = noise(x.shape)
        if up:
            x = x + z * np.float32(up)
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_lcm(denoise: Denoise, x, sigmas, *, noise: Noise, callback: Callback | None = None):
    """Latent Consistency Model multi-step sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1):
    jump to the consistency function's x0, then re-noise to the next sigma (no noise after the last step)."""
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        x0 = denoise(x, float(sigmas[i]))
        x = x0 + noise(x.shape) * np.float32(sigma_next) if sigma_next > 0 else x0
        if _stopped(callback, i, x, x0):
            return x0
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
