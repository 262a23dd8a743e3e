"""The model as an x0-denoiser over sigmas: eps / v / sample / flow parametrisations, CFG, LCM's boundary condition.

Samplers see one function, `denoise(x, sigma) -> x0`, in sigma space (x = x0 + sigma * eps). This module turns a
model into that function: it scales the input (c_in = 1 / sqrt(sigma^2 + 1), which is diffusers' alpha-space
sample), tells the U-Net the schedule's timestep, batches the conditional and unconditional halves of
classifier-free guidance into one call, and converts the prediction to x0 (Karras et al. 2022's c_skip / c_out, as
in generative-models' denoiser_scaling.py). Flow-matching models (SD3, FLUX) run over flow times t instead of
sigmas (x = (1 - t) x0 + t noise): their input is not scaled and their velocity v gives x0 = x - t v. What the
model is conditioned on is its family's business (runtime/families/): here it is `model(sample, timestep)`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..bundle import PREDICTION_TYPES

# (sample, timestep) -> the model's prediction; the family binds the conditioning (runtime/families/)
Model = Callable[[np.ndarray, np.ndarray], np.ndarray]


def to_x0(prediction: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """Sigma-space x0 from the model's prediction at noise level sigma (flow: at flow time sigma)."""
    if prediction_type in ("epsilon", "flow"):  # x - sigma * eps; x - t * v
        x0: np.ndarray = prediction * np.float32(-sigma)
        x0 += x
        return x0
    if prediction_type == "v_prediction":
        x0 = prediction * np.float32(-sigma / (sigma**2 + 1) ** 0.5)
        x0 += x * np.float32(1 / (sigma**2 + 1))
        return x0
    if prediction_type == "sample":
        return prediction
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """LCM's guidance-scale embedding (Luo et al. 2023; w scaled by 1000, sinusoidal like a timestep)."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -np.float32(np.log(10000.0) / (half - 1)))
    angles = (np.asarray(w, dtype=np.float32) * 1000.0)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def consistency_boundary(t: float, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """LCM's (c_skip, c_out) at timestep t: the consistency function is the identity at t = 0."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def make_denoiser(
    model: Model,
    prediction_type: str,
    timestep_for: Callable[[float], float],
    *,
    guidance_scale: float | None = None,
    lcm_timestep_scaling: float | None = None,
    clip_x0: float | None = None,
) -> Callable[[np.ndarray, float], np.ndarray]:
    """`denoise(x, sigma) -> x0` for one render; each call returns a new array (multistep samplers keep old ones).
    With `guidance_scale`, the model is fed the batch twice ([uncond, cond], one call) and the halves are combined
    by classifier-free guidance. With `lcm_timestep_scaling`, LCM's boundary condition is applied (the x0 an LCM
    sampler steps to). `clip_x0` clamps x0 to +-clip_x0, before the boundary condition, where diffusers'
    clip_sample does (Heun, LCM)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    cfg = guidance_scale is not None
    flow = prediction_type == "flow"
    # the model's input buffer per shape, reused every step (the session copies it)
    inputs: dict[tuple[int, ...], np.ndarray] = {}

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        t = timestep_for(sigma)
        n = x.shape[0]
        x_in = inputs.get(x.shape)
        if x_in is None:
            x_in = inputs[x.shape] = np.empty((2 * n if cfg else n, *x.shape[1:]), dtype=np.float32)
        np.multiply(x, np.float32(1.0 if flow else 1.0 / (sigma**2 + 1) ** 0.5), out=x_in[:n])
        if cfg:
            x_in[n:] = x_in[:n]
        out = model(x_in, np.full(x_in.shape[0], t, dtype=np.float32))
        if cfg:
            uncond, cond = out[:n], out[n:]
            guided = cond - uncond
            guided *= np.float32(guidance_scale)
            guided += uncond
            out = guided
        x0 = to_x0(out, x, sigma, prediction_type)
        if clip_x0 is not None:
            x0 = np.clip(x0, -clip_x0, clip_x0)
        if lcm_timestep_scaling is not None:
            c_skip, c_out = consistency_boundary(t, lcm_timestep_scaling)
            # LCM mixes in the alpha-space sample x / sqrt(sigma^2 + 1), which is what the model was fed
            x0 = x0 * np.float32(c_out)
            x0 += x * np.float32(c_skip / (sigma**2 + 1) ** 0.5)
        return x0.astype(np.float32, copy=False)

    return denoise
