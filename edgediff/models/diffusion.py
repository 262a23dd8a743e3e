"""The training side of the noise schedule, v-prediction and LCM, in torch; the runtime's NumPy twins live in
edgediff/runtime (schedules.py, denoise.py), and the two must agree for the shipped model to sample correctly.
"""

from __future__ import annotations

import math

import torch

from . import architecture as arch

LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's default, which the exporter copies into the manifest
LCM_SIGMA_DATA = 0.5


class NoiseSchedule:
    """Stable Diffusion's scaled-linear betas, as diffusers and the runtime compute them (float32)."""

    def __init__(self, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
        self.steps = steps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ac.sqrt(), (1.0 - ac).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t)
        return a * x0 + s * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t)
        return a * noise - s * x0

    def from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a v prediction."""
        a, s = self._coefficients(t)
        return a * x_t - s * v, s * x_t + a * v


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's sinusoidal embedding of w, exactly as runtime/denoise.py's `guidance_embedding` computes it."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def consistency_boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at timestep t, shaped for broadcasting over latents."""
    scaled = t.float() * LCM_TIMESTEP_SCALING
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


class DdimSolver:
    """The teacher's ODE solver over the skipping schedule the student is distilled on (LCM paper, Sec. 4.2).

    Segment n runs from timestep (n + 1) * k - 1 down to n * k - 1 (clamped to 0), k = 1000 / N; these are
    the timesteps the runtime's `lcm` schedule picks from."""

    def __init__(self, schedule: NoiseSchedule, segments: int = arch.ORIGINAL_INFERENCE_STEPS):
        k = schedule.steps // segments
        self.skip = k
        self.segments = segments
        self.timesteps = torch.arange(1, segments + 1) * k - 1  # the segments' start timesteps
        ac = schedule.alphas_cumprod
        self.alphas_prev = torch.cat([ac[:1], ac[self.timesteps[:-1]]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) from segment `index`'s start to its end, given the teacher's x0 and eps there."""
        ac_prev = self.alphas_prev[index].view(-1, 1, 1, 1)
        return ac_prev.sqrt() * x0 + (1.0 - ac_prev).sqrt() * eps


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, 1.0 - decay)
    for buffer, value in zip(target.buffers(), source.buffers()):
        buffer.copy_(value)
