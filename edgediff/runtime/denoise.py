"""The model as an x0-denoiser over sigmas: eps / v / sample / flow parametrisations, CFG, LCM's boundary condition.

Samplers see one function, `denoise(x, sigma) -> x0`, in sigma space (x = x0 + sigma * eps). This module turns a
U-Net session into that function: it scales the input (c_in = 1 / sqrt(sigma^2 + 1), which is diffusers' alpha-space
sample), tells the U-Net the schedule's timestep, batches the conditional and unconditional halves of
classifier-free guidance into one call, and converts the prediction to x0 (Karras et al. 2022's c_skip / c_out, as
in generative-models' denoiser_scaling.py). Flow-matching models (SD3, FLUX) run over flow times t instead of
sigmas (x = (1 - t) x0 + t noise): their input is not scaled and their velocity v gives x0 = x - t v.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..bundle import PREDICTION_TYPES

# a Session: (sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, timestep_cond]) -> {"out_sample"}
UNet = Callable[..., dict]


def to_x0(prediction: np.ndarray, x: np.ndarray, sigma: float, prediction_type: str) -> np.ndarray:
    """Sigma-space x0 from the model's prediction at noise level sigma (flow: at flow time sigma)."""
    if prediction_type in ("epsilon", "flow"):  # x - sigma * eps; x - t * v
        x0 = prediction * np.float32(-sigma)
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


@dataclass
class Conditioning:
    """What the U-Net is conditioned on for one render: text embeddings, and either CFG or a guidance embedding."""

    cond: np.ndarray  # (B, S, D)
    uncond: np.ndarray | None = None  # (B, S, D) when classifier-free guidance runs
    guidance_scale: float = 1.0
    timestep_cond: np.ndarray | None = None  # (B, P): LCM's guidance embedding
    # SDXL's added conditions by U-Net input name (text_embeds, time_ids), per image; the uncond half's under CFG
    added: dict[str, np.ndarray] = field(default_factory=dict)
    added_uncond: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        # Built once per render, not per step: the CFG batch is [uncond, cond], as diffusers orders it.
        cfg = self.uncond is not None
        self.batched = np.concatenate([self.uncond, self.cond]) if cfg else self.cond
        self.added_batched = {
            k: np.concatenate([self.added_uncond[k], v]) if cfg else v for k, v in self.added.items()
        }


def make_denoiser(
    unet: UNet,
    conditioning: Conditioning,
    prediction_type: str,
    timestep_for: Callable[[float], float],
    *,
    lcm_timestep_scaling: float | None = None,
) -> Callable[[np.ndarray, float], np.ndarray]:
    """`denoise(x, sigma) -> x0` for one render; each call returns a new array (multistep samplers keep old ones).
    With `lcm_timestep_scaling`, LCM's boundary condition is applied (the x0 an LCM sampler steps to)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    c = conditioning
    cfg = c.uncond is not None
    flow = prediction_type == "flow"
    feeds = {"encoder_hidden_states": c.batched, **c.added_batched}
    if c.timestep_cond is not None:
        feeds["timestep_cond"] = c.timestep_cond
    inputs: dict[tuple, np.ndarray] = {}  # the U-Net's input buffer, reused every step (the session copies it)

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        t = timestep_for(sigma)
        n = x.shape[0]
        x_in = inputs.get(x.shape)
        if x_in is None:
            x_in = inputs[x.shape] = np.empty((2 * n if cfg else n, *x.shape[1:]), dtype=np.float32)
        np.multiply(x, np.float32(1.0 if flow else 1.0 / (sigma**2 + 1) ** 0.5), out=x_in[:n])
        if cfg:
            x_in[n:] = x_in[:n]
        feeds["sample"] = x_in
        feeds["timestep"] = np.full(x_in.shape[0], t, dtype=np.float32)
        out = unet(**feeds)["out_sample"]
        if cfg:
            uncond, cond = out[:n], out[n:]
            guided = cond - uncond
            guided *= np.float32(c.guidance_scale)
            guided += uncond
            out = guided
        x0 = to_x0(out, x, sigma, prediction_type)
        if lcm_timestep_scaling is not None:
            c_skip, c_out = consistency_boundary(t, lcm_timestep_scaling)
            # LCM mixes in the alpha-space sample x / sqrt(sigma^2 + 1), which is what the U-Net was fed
            x0 = x0 * np.float32(c_out)
            x0 += x * np.float32(c_skip / (sigma**2 + 1) ** 0.5)
        return x0.astype(np.float32, copy=False)

    return denoise
