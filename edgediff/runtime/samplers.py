"""Samplers as pure functions over NumPy arrays, k-diffusion style.

Each has the signature `sample_<name>(denoise, x, sigmas, *, noise, callback) -> x`:
- `denoise(x, sigma) -> x0` is the model (see denoise.py); it returns a new array on every call, which samplers may
  keep. `sigmas` is the schedule, descending, ending where the last step lands (usually 0);
- `noise(shape) -> array` draws unit Gaussian noise for the stochastic samplers, in the order diffusers draws it, so
  that a torch-compatible noise source reproduces diffusers' images for a seed;
- `callback(i, x, x0)` is called after step i; returning False stops the loop, and the sampler then returns the
  last x0 estimate (the cleanest image available at that point). `x` is the sampler's working buffer, valid until
  the next step: copy it to keep it.
DDIM and TCD also take `targets`, where each step lands when that is not the next sigma (see schedules.py).
No sampler keeps state between calls: "DPM++ 2M Karras" is a sampler plus a schedule. The input x is never written.
All updates are in sigma space; diffusers' alpha-space updates (DDIM, DPM-Solver, UniPC, LCM, TCD) are the same
maps divided through by alpha = 1 / sqrt(sigma^2 + 1).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

Denoise = Callable[[np.ndarray, float], np.ndarray]
Noise = Callable[[tuple[int, ...]], np.ndarray]
Callback = Callable[[int, np.ndarray, np.ndarray], "bool | None"]


def _stopped(callback: Callback | None, i: int, x: np.ndarray, x0: np.ndarray) -> bool:
    return callback is not None and callback(i, x, x0) is False


def _working(x: np.ndarray) -> np.ndarray:
    return np.array(x, dtype=np.float32)  # a copy the loop updates in place: fewer temporaries per step


def _toward(x: np.ndarray, x0: np.ndarray, ratio: float, buf: np.ndarray) -> None:
    """x += (x - x0) * ratio in place: the deterministic move from sigma to sigma * (1 + ratio)."""
    np.subtract(x, x0, out=buf)
    buf *= np.float32(ratio)
    x += buf


def _landings(sigmas: np.ndarray, targets: np.ndarray | None) -> Iterator[tuple[int, float, float, float]]:
    """(i, sigma, the next sigma, where the step lands) for each step: `targets[i]` where a schedule lands a step
    off the next sigma (DDIM under trailing spacing, TCD), else the next sigma."""
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        yield i, float(sigmas[i]), sigma_next, float(targets[i]) if targets is not None else sigma_next


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic move to sigma_down and fresh noise of sigma_up (k-diffusion)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def sample_euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                 noise: Noise | None = None, callback: Callback | None = None) -> np.ndarray:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2 without churn)."""
    x = _working(x)
    buf = np.empty_like(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigma)
        _toward(x, x0, (sigma_next - sigma) / sigma, buf)
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_flow_euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                      noise: Noise | None = None, callback: Callback | None = None) -> np.ndarray:
    """Euler over a rectified-flow schedule (Liu et al. 2023, "Flow Straight and Fast"; Esser et al. 2024,
    "Scaling Rectified Flow Transformers"): sigmas are flow times t in [0, 1] and x = (1 - t) x0 + t noise, so
    x + (t_next - t) * v is x + (x - x0) * (t_next - t) / t, Euler's own update over an x0-denoiser."""
    return sample_euler(denoise, x, sigmas, callback=callback)


def sample_euler_a(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                   noise: Noise, callback: Callback | None = None) -> np.ndarray:
    """Ancestral Euler (Song et al. 2021, "Score-Based Generative Modeling through SDEs"; k-diffusion's
    sample_euler_ancestral). Noise is drawn at every step, the last included, as diffusers does, so that a seed
    draws the same stream."""
    x = _working(x)
    buf = np.empty_like(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigma_next)
        _toward(x, x0, (down - sigma) / sigma, buf)
        z = noise(x.shape)
        if up:
            z *= np.float32(up)
            x += z
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_heun(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                noise: Noise | None = None, callback: Callback | None = None) -> np.ndarray:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn): an Euler step, then the slope
    at its end averaged in; the step to sigma 0 stays Euler. Two model calls a step but the last, as diffusers'
    HeunDiscreteScheduler with its doubled timesteps."""
    x = _working(x)
    d, x2 = np.empty_like(x), np.empty_like(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigma)
        dt = np.float32(sigma_next - sigma)
        np.subtract(x, x0, out=d)
        d *= np.float32(1 / sigma)
        if sigma_next == 0:
            d *= dt
            x += d
        else:
            np.multiply(d, dt, out=x2)
            x2 += x
            x0_next = denoise(x2, sigma_next)
            d2 = x2 - x0_next
            d2 *= np.float32(1 / sigma_next)
            d += d2
            d *= np.float32(0.5) * dt
            x += d
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_ddim(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, noise: Noise | None = None,
                callback: Callback | None = None, targets: np.ndarray | None = None, eta: float = 0.0,
                clip_x0: float | None = None) -> np.ndarray:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"). In sigma space its update
    x0 + sigma_to * eps is an Euler step to sigma_to; with eta > 0 its sigma_t(eta) noise is k-diffusion's ancestral
    split of that step (noise drawn every step, as diffusers does). Where diffusers lands a step off the next
    timestep (`targets`), the sample is kept as it stands in alpha space and re-read at the next sigma.
    `clip_x0` clamps x0 as diffusers' clip_sample does, after eps is taken from the unclamped one."""
    x = _working(x)
    buf = np.empty_like(x)
    for i, sigma, sigma_next, to in _landings(sigmas, targets):
        x0 = denoise(x, sigma)
        down, up = ancestral_step(sigma, to, eta)
        _toward(x, x0, (down - sigma) / sigma, buf)
        if clip_x0 is not None:
            clipped = np.clip(x0, -clip_x0, clip_x0)
            np.subtract(clipped, x0, out=buf)
            x += buf
            x0 = clipped
        if eta:
            assert noise is not None, "ddim with eta > 0 draws noise"
            z = noise(x.shape)
            z *= np.float32(up)
            x += z
        if to != sigma_next:
            x *= np.float32(((sigma_next**2 + 1) / (to**2 + 1)) ** 0.5)
        if _stopped(callback, i, x, x0):
            return x0
    return x


def _two_step_x0(x0: np.ndarray, old: np.ndarray | None, h: float, h_last: float, out: np.ndarray) -> np.ndarray:
    """DPM-Solver++(2M)'s blend of this and the last x0: D0 + D1 / 2 with D1 = (x0 - old) * h / h_last."""
    if old is None:
        return x0
    k = 0.5 * h / h_last
    np.multiply(x0, np.float32(1 + k), out=out)
    out -= old * np.float32(k)
    return out


def sample_dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                    noise: Noise | None = None, callback: Callback | None = None) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models"), multistep, midpoint form; first order on the first step and on the step to sigma 0 (diffusers'
    lower_order_final with final_sigmas_type "zero")."""
    return _dpmpp_2m(denoise, x, sigmas, None, callback)


def sample_dpmpp_2m_sde(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                        noise: Noise, callback: Callback | None = None) -> np.ndarray:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", the SDE variant; diffusers' "sde-dpmsolver++",
    midpoint): the 2M update with the noise term of the variance-preserving SDE. Noise is drawn every step, the
    last included, as diffusers does."""
    return _dpmpp_2m(denoise, x, sigmas, noise, callback)


def _dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, noise: Noise | None,
              callback: Callback | None) -> np.ndarray:
    """The 2M loop: deterministic without `noise`, the SDE variant with it."""
    x = _working(x)
    buf = np.empty_like(x)
    old, h_last = None, 0.0
    for i, sigma, sigma_next, _ in _landings(sigmas, None):
        x0 = denoise(x, sigma)
        z = noise(x.shape) if noise is not None else None
        if sigma_next == 0:
            np.copyto(x, x0)
        else:
            h = math.log(sigma / sigma_next)  # lambda = -log sigma
            d = _two_step_x0(x0, old, h, h_last, buf)
            if z is None:
                x *= np.float32(sigma_next / sigma)
                x += d * np.float32(-math.expm1(-h))
            else:
                decay = -math.expm1(-2 * h)  # 1 - e^{-2h}
                x *= np.float32(sigma_next / sigma * math.exp(-h))
                x += d * np.float32(decay)
                z *= np.float32(sigma_next * decay**0.5)
                x += z
            h_last = h
        old = x0
        if _stopped(callback, i, x, x0):
            return x0
    return x


def _unipc_update(x: np.ndarray, m0: np.ndarray, sigma_s: float, sigma_t: float, *, m_prev: np.ndarray | None = None,
                  sigma_prev: float | None = None, m_t: np.ndarray | None = None, corrector_order: int = 1
                  ) -> np.ndarray:
    """One UniPC (bh2, data prediction) update from sigma_s to sigma_t in sigma space. Without `m_t` it is the
    predictor UniP (second order with m_prev), with `m_t` the corrector UniC of the given order."""
    h = math.log(sigma_s / sigma_t)
    hh = -h
    phi1 = math.expm1(hh)  # also B(h) under bh2
    out: np.ndarray = x * np.float32(sigma_t / sigma_s)
    out -= m0 * np.float32(phi1)
    if m_t is None:
        if m_prev is not None:  # rho_p = 1/2
            assert sigma_prev is not None
            out -= (m_prev - m0) * np.float32(phi1 * 0.5 / (math.log(sigma_s / sigma_prev) / h))
        return out
    if corrector_order == 1:
        rho_t = 0.5
    else:
        assert m_prev is not None and sigma_prev is not None, "the second-order corrector needs the previous step"
        rk = math.log(sigma_s / sigma_prev) / h
        phi_k = phi1 / hh - 1
        b1 = phi_k / phi1
        b2 = (phi_k / hh - 0.5) * 2 / phi1
        rho_prev = (b1 - b2) / (1 - rk)  # solves [[1, 1], [rk, 1]] rho = b
        rho_t = b1 - rho_prev
        if rho_prev:
            out -= (m_prev - m0) * np.float32(phi1 * rho_prev / rk)
    out -= (m_t - m0) * np.float32(phi1 * rho_t)
    return out


def sample_unipc(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
                 noise: Noise | None = None, callback: Callback | None = None) -> np.ndarray:
    """UniPC, order 2, bh2 (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models"): each model call first corrects the previous step (UniC), then predicts the next (UniP);
    first order on the first and last steps, as diffusers' UniPCMultistepScheduler with lower_order_final."""
    x = _working(x)
    n = len(sigmas) - 1
    history: list[np.ndarray] = []  # the last two x0 predictions
    last_x, last_order = None, 0
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, sigma)
        if last_x is not None:
            two = last_order == 2
            x = _unipc_update(last_x, history[-1], float(sigmas[i - 1]), sigma, m_t=x0, corrector_order=last_order,
                              m_prev=history[-2] if two else None, sigma_prev=float(sigmas[i - 2]) if two else None)
        history = [*history[-1:], x0]
        order = min(2, n - i, i + 1)
        last_x, last_order = x, order
        if sigma_next == 0:
            x = x0.copy()
        else:
            two = order == 2
            x = _unipc_update(x, x0, sigma, sigma_next, m_prev=history[0] if two else None,
                              sigma_prev=float(sigmas[i - 1]) if two else None)
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_lcm(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
               noise: Noise, callback: Callback | None = None) -> np.ndarray:
    """Latent Consistency Model multi-step sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1):
    jump to the consistency function's x0, then re-noise to the next sigma (no noise after the last step)."""
    for i in range(len(sigmas) - 1):
        sigma_next = float(sigmas[i + 1])
        x0 = denoise(x, float(sigmas[i]))
        if sigma_next > 0:
            z = noise(x.shape)
            z *= np.float32(sigma_next)
            z += x0
            x = z
        else:
            x = x0
        if _stopped(callback, i, x, x0):
            return x0
    return x


def sample_tcd(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *,
               noise: Noise, callback: Callback | None = None, targets: np.ndarray | None = None) -> np.ndarray:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, "Trajectory
    Consistency Distillation"): a DDIM step down to s = targets[i] (below the next sigma when gamma > 0), then
    fresh noise back up to the next sigma; the last step lands on its target without noise."""
    x = _working(x)
    buf = np.empty_like(x)
    for i, sigma, sigma_next, s in _landings(sigmas, targets):
        x0 = denoise(x, sigma)
        _toward(x, x0, (s - sigma) / sigma, buf)
        if s < sigma_next:
            z = noise(x.shape)
            z *= np.float32((sigma_next**2 - s**2) ** 0.5)
            x += z
        if _stopped(callback, i, x, x0):
            return x0
    return x
