"""The render plan: every choice a render makes, resolved once from the call and the bundle's defaults.

`make_plan` fills what the caller left out from the manifest's defaults, checks each value (one RenderError line
naming what is wrong), and returns a `RenderPlan` that the render then follows and `PipelineOutput.plan` hands
back: the CLI writes it into the PNG's parameters instead of resolving names again.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, ParamSpec, TypeVar

from ..bundle import Manifest
from . import schedules
from .noise import NOISE_KINDS
from .sampler_catalogue import SAMPLERS, SamplerInfo, SamplerOptions, resolve, sampler_options

OUTPUT_TYPES = ("pil", "np")
MAX_STEPS = 1000  # a train schedule's length: more steps only cost time (and a typo's 10**9 would never end)
MAX_IMAGES = 64  # per prompt in one render: they all go through the models as one batch
SEED_LIMIT = 2**64  # torch's manual_seed takes seeds below this, and the noise follows torch

_P = ParamSpec("_P")
_T = TypeVar("_T")


class RenderError(ValueError):
    """Render arguments the model cannot take; the message says what is wrong and what would do."""


@dataclass(frozen=True)
class RenderPlan:
    sampler: str
    schedule: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    images_per_prompt: int = 1
    strength: float | None = None  # image-to-image only: how much of the init image is repainted
    eta: float | None = None  # the sampler's stochasticity where it has one (DDIM's eta, TCD's gamma)
    noise: str = "torch"
    true_cfg_scale: float | None = None  # FLUX only: CFG with a negative prompt beside the guidance embedding
    seeds: tuple[int, ...] = ()  # one per prompt when the render was given a list of seeds (`seed` is the first)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def uses_cfg(manifest: Manifest, guidance_scale: float, true_cfg_scale: float | None = None) -> bool:
    """CFG runs as one batched call (negatives beside prompts) above guidance 1; an LCM U-Net with a guidance
    embedding takes w as an input instead, and FLUX takes guidance as an input (dev) or not at all (schnell),
    batching negatives only for true CFG. The TensorRT build doubles those batches by the same rule."""
    if manifest.family == "flux":
        return true_cfg_scale is not None and true_cfg_scale > 1.0
    return guidance_scale > 1.0 and not manifest.guidance_embedding_dim


def resolve_sampler(manifest: Manifest, sampler: str | None, schedule: str | None) -> tuple[str, SamplerInfo, str]:
    """The sampler (name and entry) and schedule a render runs: the caller's, else the manifest's defaults (the
    export wrote its preset's: Turbo euler_a, trailing; LCM lcm; Lightning euler, trailing), else the sampler's own
    default schedule. A pair that makes no sense (lcm with karras, flow_euler on an epsilon
    model) is refused."""
    name = sampler or manifest.defaults.sampler
    info, schedule = _lookup(resolve, name, schedule, manifest.defaults.schedule)
    prediction = manifest.prediction_type
    if (info.convention == "flow") != (prediction == "flow"):
        fits = [n for n, s in SAMPLERS.items() if (s.convention == "flow") == (prediction == "flow")]
        raise RenderError(f"sampler {name!r} does not fit this bundle's {prediction} model; "
                          f"choose one of {', '.join(fits)}")
    return name, info, schedule


def make_plan(manifest: Manifest, *, steps: int | None = None, guidance_scale: float | None = None,
              width: int | None = None, height: int | None = None, seed: int | Sequence[int] | None = 0,
              sampler: str | None = None, schedule: str | None = None, images_per_prompt: int = 1,
              strength: float | None = None, eta: float | None = None, noise: str = "torch",
              true_cfg_scale: float | None = None) -> RenderPlan:
    """Resolve and check a render's choices; `strength` is given for image-to-image only; `seed` may be a list, one
    per prompt (each prompt's images then come from its own noise stream)."""
    if true_cfg_scale is not None:
        true_cfg_scale = _finite("true_cfg_scale", true_cfg_scale)
        if manifest.family != "flux":
            raise RenderError("true_cfg_scale is FLUX's; other models take the negative prompt's weight from "
                              "guidance")
    d = manifest.defaults
    seeds = tuple(_whole("seed", s, 0, SEED_LIMIT - 1) for s in _seed_list(seed)) if _is_list(seed) else ()
    sampler, info, schedule = resolve_sampler(manifest, sampler, schedule)
    if eta is not None:
        _finite("eta", eta)
        _lookup(sampler_options, sampler, manifest.scheduler.for_sampler(sampler), eta)  # refused where none
        eta = float(eta)
    plan = RenderPlan(
        sampler=sampler, schedule=schedule,
        steps=_whole("steps", d.steps if steps is None else steps, 1, MAX_STEPS),
        guidance_scale=_finite("guidance", d.guidance_scale if guidance_scale is None else guidance_scale),
        width=d.width if width is None else _whole("width", width, 1),
        height=d.height if height is None else _whole("height", height, 1),
        seed=seeds[0] if seeds else (
            int.from_bytes(os.urandom(4), "little") if seed is None else _whole("seed", seed, 0, SEED_LIMIT - 1)),
        images_per_prompt=_whole("images per prompt", images_per_prompt, 1, MAX_IMAGES),
        strength=None if strength is None else checked_strength(strength),
        eta=info.eta if eta is None else eta, noise=noise, true_cfg_scale=true_cfg_scale, seeds=seeds,
    )
    m = manifest.size_multiple
    if plan.height % m or plan.width % m:
        raise RenderError(f"size {plan.width}x{plan.height} is not a multiple of {m} pixels, which this model needs")
    most = manifest.transformer.max_side if manifest.transformer is not None else None
    if most is not None and max(plan.height, plan.width) > most:
        raise RenderError(f"size {plan.width}x{plan.height}: this model's position embedding reaches {most} pixels "
                          "a side; render smaller")
    if noise not in NOISE_KINDS:
        raise RenderError(f"unknown noise kind {noise!r}; choose one of {', '.join(NOISE_KINDS)}")
    return plan


def _is_list(seed: object) -> bool:
    return isinstance(seed, (list, tuple))


def _seed_list(seed: Any) -> list[Any]:
    if not seed:
        raise RenderError("seed must be a whole number or a non-empty list of them")
    return list(seed)


def sampler_settings(manifest: Manifest, plan: RenderPlan) -> SamplerOptions:
    """What the plan's eta and the scheduler's clip_sample ask of the sampler, the denoiser and the schedule."""
    return _lookup(sampler_options, plan.sampler, manifest.scheduler.for_sampler(plan.sampler), plan.eta)


def build_schedule(manifest: Manifest, plan: RenderPlan) -> schedules.Schedule:
    """The plan's schedule, discretised as the sampler's diffusers counterpart does. For img2img it starts part-way
    as diffusers' img2img pipelines do: LCM folds strength into its distilled timesteps and runs them all
    (LatentConsistencyModelImg2ImgPipeline), the others run the last int(steps * strength)."""
    info = SAMPLERS[plan.sampler]
    lcm = info.convention == "lcm"
    strength = plan.strength
    # latent tokens as SD3's 2x2 patches and FLUX's 2x2 packing count them (flow_dynamic's mu)
    tokens = (plan.height // (2 * manifest.latent.downscale)) * (plan.width // (2 * manifest.latent.downscale))
    sched = _lookup(schedules.build, manifest.scheduler.for_sampler(plan.sampler), info.convention, plan.schedule,
                    plan.steps, strength=strength if strength is not None and lcm else 1.0,
                    gamma=sampler_settings(manifest, plan).gamma, image_seq_len=tokens)
    if strength is None:
        return sched
    flow = info.convention == "flow"
    return sched.starting_at(0 if lcm else schedules.img2img_start(len(sched), strength, flow=flow))


def _finite_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _whole(what: str, value: Any, least: int, most: int | None = None) -> int:  # value: what the caller passed
    if not _finite_real(value) or value != int(value) or value < least:
        raise RenderError(f"{what} must be at least {least} (a whole number), got {value!r}")
    if most is not None and value > most:
        raise RenderError(f"{what} must be at most {most}, got {value!r}")
    return int(value)


def _finite(what: str, value: Any) -> float:
    if not _finite_real(value):
        raise RenderError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def checked_strength(strength: Any) -> float:
    """Image-to-image strength; checked even where no init image makes it matter, so a typo is not silent."""
    value = _finite("strength", strength)
    if not 0.0 < value <= 1.0:
        raise RenderError(f"strength must be in (0, 1], got {value}")
    return value


def checked_threads(threads: Any) -> int | None:
    """Intra-op threads: None for the backend's own choice, else a whole number of at least 1 (ONNX Runtime reads
    0 as its default and a negative count as an error deep in session creation)."""
    return None if threads is None else _whole("threads", threads, 1)


def _lookup(getter: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """The library's ValueError about a bad name or pair, as a RenderError (one line, exit code 2 at the CLI)."""
    try:
        return getter(*args, **kwargs)
    except ValueError as e:
        raise RenderError(str(e)) from None
