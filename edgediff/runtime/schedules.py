"""Sigma / timestep schedules over a checkpoint's training noise schedule.

Everything runs in sigma space (x = x0 + sigma * eps, k-diffusion's convention). A Schedule carries, per step, the
sigma and the timestep the U-Net is told, plus the scale of the initial noise. Images only match diffusers' if each
sampler discretises exactly as its diffusers scheduler does, so a schedule is built under a *convention*, named after
the scheduler family whose set_timesteps it reproduces:

- "euler" (Euler, Euler ancestral, Heun): float timesteps; Karras / exponential sigmas span the *spaced* schedule's
  range and their timesteps stay fractional; the initial noise is sqrt(sigma_max^2 + 1) under leading spacing,
  sigma_max under linspace and trailing.
- "multistep" (DPM-Solver++, UniPC): integer timesteps over steps + 1 points (leading, linspace); Karras sigmas span
  the whole training range and their timesteps are rounded (exponential ones truncated, by the int64 cast).
- "ddim": integer timesteps; each step lands on t - T // steps, which under trailing / linspace spacing is not the
  next timestep: the sample is then re-read at the next timestep as it stands in alpha space (`targets`).
- "lcm", "tcd": the distilled timesteps; TCD lands each step at floor((1 - gamma) * t_next) and re-noises.
- "flow": rectified-flow sigmas t in [0, 1] (x = (1 - t) x0 + t noise), not sigma space.
The alpha-space schedulers (all but euler and flow) start from unit noise in alpha space, which is
sqrt(sigma_max^2 + 1) in sigma space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..bundle import SchedulerConfig

SPACINGS = ("leading", "linspace", "trailing")
DISCRETE = ("discrete", *SPACINGS, "sgm_uniform")

SCHEDULES: dict[str, str] = {
    "discrete": "the checkpoint's own timestep spacing (leading, linspace or trailing, from its scheduler config)",
    "leading": "timesteps evenly spaced up from t=0 plus steps_offset (the SD 1.x / 2.x training recipe's default)",
    "linspace": "timesteps evenly spaced from 0 to the last training step, both ends included",
    "trailing": "timesteps evenly spaced down from the last training step (Lin et al. 2023; Turbo, Lightning)",
    "sgm_uniform": "uniform timesteps down from the last training step: diffusers' mapping of it, trailing spacing",
    "karras": "Karras et al. 2022 sigmas (rho 7) between sigma_max and sigma_min: 'DPM++ 2M Karras'",
    "exponential": "sigmas evenly spaced in log-sigma between sigma_max and sigma_min",
    "lcm": "LCM's distilled timesteps, skipped evenly over the teacher's original_inference_steps grid",
    "flow_shift": "rectified-flow sigmas with a fixed shift (SD3: shift 3)",
    "flow_dynamic": "rectified-flow sigmas shifted by image size, as FLUX does (mu from the latent token count)",
}


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (n + 1,) descending: the sigma of each step, then where the last step lands (often 0)
    timesteps: np.ndarray  # (n,) the U-Net's timestep at each sigma, float (fractional survives)
    init_noise_sigma: float  # initial latents = unit noise * this
    targets: np.ndarray | None = None  # (n,) where each step's update lands when that is not sigmas[i + 1]
    final_scale: float = 1.0  # alpha-space samplers that stop short of sigma 0 hand over x / sqrt(sigma^2 + 1)

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
        targets = self.targets[index:] if self.targets is not None else None
        return replace(self, sigmas=self.sigmas[index:], timesteps=self.timesteps[index:],
                       init_noise_sigma=float(self.sigmas[index]), targets=targets)


# --- the training schedule ------------------------------------------------------------------------------------


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: a float32 step, each point start + i * step rounded once (fused),
    counted from the nearer end. NumPy's own float32 linspace differs by an ulp here and there."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    points: np.ndarray = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return points.astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """The training schedule's cumulative alphas as diffusers computes them: float32 betas, and torch's cumprod,
    which accumulates in float64."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _torch_linspace(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        betas = _torch_linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    else:
        raise ValueError(f"unknown beta schedule {cfg.beta_schedule!r}")
    cumprod = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)
    if cfg.rescale_betas_zero_snr:
        cumprod = _rescale_zero_terminal_snr(cumprod)
    return cumprod


def _rescale_zero_terminal_snr(cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; the last alpha is kept at
    2**-24 (as diffusers does) so that its sigma stays finite."""
    sqrt_ab = np.sqrt(cumprod.astype(np.float64))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    out: np.ndarray = (sqrt_ab**2).astype(np.float32)
    out[-1] = 2.0**-24
    return out


def training_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    ac = alphas_cumprod(cfg)
    sigmas: np.ndarray = ((1 - ac) / ac) ** 0.5
    return sigmas


def sigma_to_t(sigmas: np.ndarray, log_train: np.ndarray) -> np.ndarray:
    """Fractional timesteps of arbitrary sigmas, interpolated in log-sigma over the training schedule (diffusers'
    `_sigma_to_t`, vectorised)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train) - 2)
    w: np.ndarray = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    t: np.ndarray = (1 - w) * low + w * (low + 1)
    return t


def _warped(sigma_max: float, sigma_min: float, steps: int, kind: str) -> np.ndarray:
    if kind == "karras":  # Karras et al. 2022, eq. 5, rho = 7
        ramp = np.linspace(0, 1, steps)
        lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
        sigmas: np.ndarray = (hi + ramp * (lo - hi)) ** 7
        return sigmas
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def _closed(sigmas: np.ndarray, last: float = 0.0) -> np.ndarray:
    """Append where the last step lands; diffusers keeps sigmas in float32, and so must we to land on its values."""
    return np.append(sigmas, last).astype(np.float32).astype(np.float64)


def _alpha_init(sigmas: np.ndarray) -> float:
    return float((sigmas[0] ** 2 + 1) ** 0.5)


# --- timestep spacings ----------------------------------------------------------------------------------------


def discrete_timesteps(cfg: SchedulerConfig, steps: int, spacing: str) -> np.ndarray:
    """Euler-family timesteps (float32; linspace ones are fractional)."""
    n = cfg.num_train_timesteps
    timesteps: np.ndarray
    if spacing == "linspace":
        timesteps = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float32) + cfg.steps_offset
    elif spacing == "trailing":
        timesteps = np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return timesteps


def _integer_timesteps(cfg: SchedulerConfig, steps: int, spacing: str, *, multistep: bool) -> np.ndarray:
    """DDIM's integer timesteps, or (multistep) DPM-Solver's and UniPC's, which space steps + 1 points and drop
    the last under leading and linspace."""
    n, k = cfg.num_train_timesteps, steps + multistep
    timesteps: np.ndarray
    if spacing == "linspace":
        t = np.linspace(0, n - 1, k).round()[::-1]
        timesteps = t[:steps].astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, k) * (n // k)).round()[::-1]
        timesteps = t[:steps].astype(np.int64) + cfg.steps_offset
    elif spacing == "trailing":
        timesteps = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return timesteps


def _spacing(cfg: SchedulerConfig, name: str) -> str:
    if name in SPACINGS:
        return name
    # sgm_uniform: diffusers' scheduler overview maps A1111 / k-diffusion's sgm_uniform to timestep_spacing="trailing".
    # ComfyUI's own takes n fractional timesteps of linspace(t_max, 0, n + 1); trailing rounds those to integers
    # (999, 749, 499, 249 for 4 steps, against 999, 749.25, 499.5, 249.75), and has a diffusers image to match.
    return "trailing" if name == "sgm_uniform" else cfg.timestep_spacing


# --- schedules by convention ----------------------------------------------------------------------------------


def discrete(cfg: SchedulerConfig, steps: int, spacing: str | None = None, kind: str = "discrete") -> Schedule:
    """The Euler family's schedule (EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete): spaced timesteps, sigmas
    interpolated over the training sigmas, optionally re-spaced as Karras or exponential sigmas within that range."""
    spacing = spacing or cfg.timestep_spacing
    timesteps = discrete_timesteps(cfg, steps, spacing).astype(np.float64)
    train = training_sigmas(cfg)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if kind != "discrete":
        sigmas = _warped(float(sigmas[0]), float(sigmas[-1]), steps, kind)
        timesteps = sigma_to_t(sigmas, np.log(train))
    sigmas = _closed(sigmas)
    top = float(sigmas.max())
    init = top if spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Schedule(sigmas, timesteps.astype(np.float32).astype(np.float64), init)


def multistep(cfg: SchedulerConfig, steps: int, spacing: str | None = None, kind: str = "discrete",
              *, always_round: bool = False) -> Schedule:
    """DPMSolverMultistep's schedule (UniPC's with `always_round`: it rounds Karras timesteps under every beta
    schedule, DPM-Solver all but squaredcos_cap_v2). Timesteps are integers; Karras sigmas themselves are not."""
    train = training_sigmas(cfg)
    if kind == "discrete":
        timesteps = _integer_timesteps(cfg, steps, spacing or cfg.timestep_spacing, multistep=True)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    else:
        sigmas = _warped(float(train[-1]), float(train[0]), steps, kind)
        t = sigma_to_t(sigmas, np.log(train))
        if kind == "karras" and (always_round or cfg.beta_schedule != "squaredcos_cap_v2"):
            t = t.round()
        timesteps = t.astype(np.int64)  # exponential timesteps are truncated here, as diffusers' int64 cast does
    sigmas = _closed(sigmas)
    return Schedule(sigmas, timesteps.astype(np.float64), _alpha_init(sigmas))


def ddim(cfg: SchedulerConfig, steps: int, spacing: str | None = None) -> Schedule:
    """DDIMScheduler's schedule. Each step moves to the alpha of t - T // steps (the final alpha below 0), which
    is not the next timestep under trailing / linspace spacing; `targets` records where each step lands.
    Like SD's configs (set_alpha_to_one=False), the last step lands on sigma(t=0), not 0."""
    n = cfg.num_train_timesteps
    timesteps = _integer_timesteps(cfg, steps, spacing or cfg.timestep_spacing, multistep=False)
    train = training_sigmas(cfg)
    final = 0.0 if getattr(cfg, "set_alpha_to_one", False) else float(train[0])
    prev = timesteps - n // steps
    targets = np.where(prev >= 0, train[np.maximum(prev, 0)], np.float32(final))
    sigmas = _closed(train[timesteps], final)
    return Schedule(sigmas, timesteps.astype(np.float64), _alpha_init(sigmas),
                    targets=targets.astype(np.float32).astype(np.float64), final_scale=1 / (final**2 + 1) ** 0.5)


def _distilled_timesteps(cfg: SchedulerConfig, steps: int, strength: float) -> np.ndarray:
    original = cfg.original_inference_steps
    k = cfg.num_train_timesteps // original
    origin = np.arange(1, int(original * strength) + 1) * k - 1
    if steps > len(origin):
        raise ValueError(f"lcm takes at most {len(origin)} steps here (the distilled schedule's length), got {steps}")
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[::-1][indices]


def lcm(cfg: SchedulerConfig, steps: int, strength: float = 1.0) -> Schedule:
    """Latent Consistency Models (Luo et al. 2023): `steps` timesteps evenly skipped from the teacher's
    `original_inference_steps` schedule. LCM samples in alpha space with unit initial noise, which in sigma space
    is a scale of sqrt(sigma_max^2 + 1)."""
    timesteps = _distilled_timesteps(cfg, steps, strength)
    sigmas = _closed(training_sigmas(cfg)[timesteps])
    return Schedule(sigmas, timesteps.astype(np.float64), _alpha_init(sigmas))


def tcd(cfg: SchedulerConfig, steps: int, gamma: float = 0.3, strength: float = 1.0) -> Schedule:
    """Trajectory Consistency Distillation (Zheng et al. 2024): LCM's timesteps; each step lands at
    s = floor((1 - gamma) * t_next) and is re-noised to t_next. The last lands at s = 0, sigma(0), not 0."""
    timesteps = _distilled_timesteps(cfg, steps, strength)
    train = training_sigmas(cfg)
    nxt = np.append(timesteps[1:], 0)
    # float32 product, as torch computes floor((1 - eta) * prev_timestep); float64 floors differently at integers
    s = np.floor(np.float32(1 - gamma) * nxt.astype(np.float32)).astype(np.int64)
    sigmas = _closed(train[timesteps], float(train[0]))
    return Schedule(sigmas, timesteps.astype(np.float64), _alpha_init(sigmas),
                    targets=train[s].astype(np.float64), final_scale=1 / (float(sigmas[-1]) ** 2 + 1) ** 0.5)


def flow_shift(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Schedule:
    """FlowMatchEulerDiscreteScheduler with a fixed shift (Esser et al. 2024, SD3): sigma -> shift*s/(1+(shift-1)s).
    Its end points come from the already-shifted training grid and are shifted again, as diffusers does."""
    n = num_train_timesteps
    grid = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    grid = np.float32(shift) * grid / (1 + np.float32(shift - 1) * grid)
    s = np.linspace(float(grid[0]) * n, float(grid[-1]) * n, steps) / n
    return _flow(shift * s / (1 + (shift - 1) * s), n)


def flow_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
            max_seq_len: int = 4096) -> float:
    """FLUX's shift exponent: linear in the image token count (diffusers' calculate_shift, term for term)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_dynamic(steps: int, image_seq_len: int, *, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_seq_len: int = 256, max_seq_len: int = 4096, num_train_timesteps: int = 1000) -> Schedule:
    """FLUX's resolution-dependent shift: sigmas linspace(1, 1/steps) (as FluxPipeline passes them) are mapped by
    e^mu / (e^mu + 1/s - 1), mu from flow_mu."""
    mu = flow_mu(image_seq_len, base_shift, max_shift, base_seq_len, max_seq_len)
    s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    return _flow(math.exp(mu) / (math.exp(mu) + (1 / s - 1)), num_train_timesteps)


def _flow(sigmas: np.ndarray, n: int) -> Schedule:
    sigmas32 = sigmas.astype(np.float32)
    return Schedule(_closed(sigmas32), (sigmas32 * np.float32(n)).astype(np.float64), 1.0)


# --- by name --------------------------------------------------------------------------------------------------


def build(cfg: SchedulerConfig, convention: str, name: str, steps: int, *, strength: float = 1.0,
          gamma: float = 0.3, image_seq_len: int = 4096) -> Schedule:
    """The schedule `name` as the `convention` (see the module docstring) discretises it. `strength` only
    applies to the distilled conventions, which fold img2img's strength into their timesteps; `image_seq_len`
    (latent tokens) only to flow_dynamic. A flow schedule takes its shifts from `cfg` (a config without them,
    e.g. a U-Net's, gets SD3's static shift 3)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    kind = name if name in ("karras", "exponential") else "discrete"
    if convention == "euler":
        return discrete(cfg, steps, _spacing(cfg, name), kind)
    if convention in ("multistep", "unipc"):
        return multistep(cfg, steps, _spacing(cfg, name), kind, always_round=convention == "unipc")
    if convention == "ddim":
        return ddim(cfg, steps, _spacing(cfg, name))
    if convention == "lcm":
        return lcm(cfg, steps, strength)
    if convention == "tcd":
        return tcd(cfg, steps, gamma, strength)
    if convention == "flow":
        if name == "flow_dynamic":
            return flow_dynamic(steps, image_seq_len, base_shift=cfg.base_shift, max_shift=cfg.max_shift,
                                base_seq_len=cfg.base_image_seq_len, max_seq_len=cfg.max_image_seq_len,
                                num_train_timesteps=cfg.num_train_timesteps)
        flow_config = cfg.source_class == "FlowMatchEulerDiscreteScheduler"
        return flow_shift(steps, cfg.shift if flow_config else 3.0, cfg.num_train_timesteps)
    raise ValueError(f"unknown schedule convention {convention!r}")


def img2img_start(steps: int, strength: float, *, flow: bool = False) -> int:
    """The first step an img2img render runs, as diffusers counts it: the last `int(steps * strength)` steps; its
    flow-matching pipelines (SD3, FLUX) truncate after subtracting: step int(steps - steps * strength)."""
    if flow:
        return int(max(steps - min(steps * strength, steps), 0))
    run = min(int(steps * strength), steps)
    return max(steps - run, 0)
