"""The samplers' catalogue: each sampler's function, the discretisation its schedules follow, the schedules it
runs on, its diffusers counterpart and its eta; the distilled families' presets; and resolving a (sampler,
schedule) pair. The CLI's choices and `edgediff samplers` come from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..bundle import SchedulerConfig
from .samplers import (
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_a,
    sample_flow_euler,
    sample_heun,
    sample_lcm,
    sample_tcd,
    sample_unipc,
)
from .schedules import DISCRETE, SCHEDULES


@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable[..., np.ndarray]  # samplers.py's signature, plus its own keyword options
    convention: str  # whose discretisation its schedules follow (schedules.build)
    schedules: tuple[str, ...]  # the schedules it runs on; the first is its default
    description: str
    scheduler: str  # its diffusers class, whose defaults fill what a source config lacks (export)
    eta: float | None = None  # the default of its stochasticity eta (as diffusers' pipelines pass it); None: none
    clips: str = ""  # where diffusers' clip_sample applies: "x0" (the denoiser's output), "step" (the sampler's)


_WARPED = (*DISCRETE, "karras", "exponential")

SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(sample_euler, "euler", _WARPED, "Euler, deterministic; the plain default (EulerDiscrete)",
                         "EulerDiscreteScheduler"),
    "euler_a": SamplerInfo(sample_euler_a, "euler", _WARPED,
                           "Euler ancestral: fresh noise each step, for exploring (EulerAncestralDiscrete)",
                           "EulerAncestralDiscreteScheduler"),
    "heun": SamplerInfo(sample_heun, "euler", _WARPED, "Heun, second order: two model calls a step (HeunDiscrete)",
                        "HeunDiscreteScheduler", clips="x0"),
    "ddim": SamplerInfo(sample_ddim, "ddim", DISCRETE,
                        "DDIM, deterministic unless --eta, for img2img and latent interpolation (DDIMScheduler)",
                        "DDIMScheduler", eta=0.0, clips="step"),
    "dpmpp_2m": SamplerInfo(sample_dpmpp_2m, "multistep", _WARPED,
                            "DPM++ 2M: with karras, the usual final-render choice (DPMSolverMultistep)",
                            "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": SamplerInfo(sample_dpmpp_2m_sde, "multistep", _WARPED,
                                "DPM++ 2M SDE: stochastic 2M (DPMSolverMultistep, sde-dpmsolver++)",
                                "DPMSolverMultistepScheduler"),
    "unipc": SamplerInfo(sample_unipc, "unipc", _WARPED,
                         "UniPC predictor-corrector, good in 5-10 steps (UniPCMultistep, bh2)",
                         "UniPCMultistepScheduler"),
    "lcm": SamplerInfo(sample_lcm, "lcm", ("lcm",), "LCM multi-step consistency sampling, 1-8 steps (LCMScheduler)",
                       "LCMScheduler", clips="x0"),
    "tcd": SamplerInfo(sample_tcd, "tcd", ("lcm",),
                       "TCD: consistency sampling with partial re-noising, gamma = --eta (TCDScheduler)",
                       "TCDScheduler", eta=0.3),
    "flow_euler": SamplerInfo(sample_flow_euler, "flow", ("flow_shift", "flow_dynamic"),
                              "Euler over rectified flow, for SD3 / FLUX models (FlowMatchEulerDiscrete)",
                              "FlowMatchEulerDiscreteScheduler"),
}


@dataclass(frozen=True)
class SamplerOptions:
    """What a render's eta and the scheduler's clip_sample ask of the sampler, the denoiser and the schedule."""

    sampler: dict[str, float]  # keyword arguments for the sampler function (ddim: eta, clip_x0)
    denoiser_clip: float | None = None  # clamp the denoiser's x0 (make_denoiser's clip_x0)
    gamma: float = 0.3  # TCD's eta: where each step lands below the next timestep, a property of its schedule


def sampler_options(name: str, scheduler: SchedulerConfig, eta: float | None = None) -> SamplerOptions:
    """The options for sampler `name` under `scheduler` (a SchedulerConfig, already `for_sampler(name)`) and the
    caller's eta (None: the sampler's default). An eta for a sampler that takes none is refused, not ignored."""
    info = sampler_info(name)
    if eta is not None and info.eta is None:
        takes = ", ".join(n for n, s in SAMPLERS.items() if s.eta is not None)
        raise ValueError(f"sampler {name!r} takes no eta; eta applies to {takes}")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta:g}")
    eta = info.eta if eta is None else float(eta)
    clip = float(scheduler.clip_sample_range) if scheduler.clip_sample and info.clips else None
    kwargs: dict[str, float] = {}
    if info.clips == "step" and clip is not None:
        kwargs["clip_x0"] = clip
    if info.convention == "tcd":
        return SamplerOptions(kwargs, gamma=eta if eta is not None else 0.3)
    if eta is not None:
        kwargs["eta"] = eta
    return SamplerOptions(kwargs, denoiser_clip=clip if info.clips == "x0" else None)


@dataclass(frozen=True)
class Preset:
    sampler: str
    schedule: str
    description: str


# The distilled families' sampling recipes: the export writes the preset's sampler and schedule (with its steps and
# guidance) into the manifest's defaults, which the runtime reads; this table is for export and `edgediff samplers`.
PRESETS: dict[str, Preset] = {
    "standard": Preset("euler", "discrete", "classifier-free guidance, the checkpoint's own spacing (SD3 / FLUX.1-dev: "
                       "flow_euler, 28 steps, CFG 7 / guidance input 3.5)"),
    "turbo": Preset("euler_a", "trailing", "adversarial distillation (SD-Turbo): 1-4 steps, guidance 0 (SD3.5 Large "
                    "Turbo / FLUX.1-schnell: flow_euler, 4 steps)"),
    "lcm": Preset("lcm", "lcm", "latent consistency (LCM, LCM-LoRA): 2-8 steps, w as a guidance embedding"),
    "lightning": Preset("euler", "trailing", "progressive distillation (Lightning, Hyper-SD): 1-8 steps, guidance 0"),
}


def sampler_info(name: str) -> SamplerInfo:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def resolve(sampler: str, schedule: str | None = None, default_schedule: str | None = None
            ) -> tuple[SamplerInfo, str]:
    """Check a (sampler, schedule) pair and fill in the schedule: `default_schedule` (the manifest's) where the
    sampler runs on it, else the sampler's own default. Errors name the valid choices."""
    info = sampler_info(sampler)
    if schedule is None:
        return info, default_schedule if default_schedule in info.schedules else info.schedules[0]
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule not in info.schedules:
        raise ValueError(f"sampler {sampler!r} does not run on the {schedule!r} schedule; "
                         f"choose one of {', '.join(info.schedules)}")
    return info, schedule
