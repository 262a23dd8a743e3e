"""What differs per model family, one module each; the render loop and the samplers know none of them.

A family turns prompts into the model's conditioning (which encoders, pooled outputs, size ids, guidance as CFG or
as an embedding), says the latent layout, and makes the model's call: `model(sample, timestep) -> prediction`
with the conditioning bound as the session's fixed feeds. Families are looked up by the manifest's `family`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ...bundle import BundleError, Manifest
from ..plan import RenderPlan
from ..sessions import Session
from ..timing import StageTimer

# (sample, timestep) -> the model's prediction, for a batch that is doubled under CFG
Model = Callable[[np.ndarray, np.ndarray], np.ndarray]
SessionFor = Callable[[str], Session]


@dataclass
class Conditioning:
    """What the model is conditioned on for one render: its fixed feeds, batched as [uncond, cond] under CFG (as
    diffusers orders the halves), and the CFG scale (None when CFG is off and the batch runs once)."""

    feeds: dict[str, np.ndarray]
    batch: int  # images rendered (the latents' batch before CFG doubling)
    guidance_scale: float | None = None


@dataclass(frozen=True)
class PreviewMap:
    """A cheap preview: RGB in -1..1 = latent channels @ `factors` + `bias`, per latent pixel, as the popular UIs
    draw their live previews. The factors hold for one VAE's latent space, the one whose scaling factor is
    `scaling_factor`; another VAE (the built-in model's) needs its own (serve/preview.py fits one)."""

    factors: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float]
    scaling_factor: float

    def fits(self, channels: int, scaling_factor: float) -> bool:
        return channels == len(self.factors) and abs(scaling_factor - self.scaling_factor) < 1e-4


class Family(Protocol):
    denoiser: str  # the component the sampler loop calls: "unet", or "transformer" (SD3, FLUX)
    preview_rgb: PreviewMap  # the latent-to-RGB map of the family's own VAE


    def condition(self, prompts: list[str], negative_prompt: str | list[str] | None, plan: RenderPlan,
                  session: SessionFor, warnings: list[str], timer: StageTimer) -> Conditioning: ...

    def uses_cfg(self, plan: RenderPlan) -> bool: ...

    def model(self, session: Session, conditioning: Conditioning) -> Model: ...


# manifest family -> "module:class" in this package
FAMILIES = {
    "sd1": "sd:StableDiffusion",
    "sd2": "sd:StableDiffusion",
    "sdxl": "sdxl:StableDiffusionXL",
    "sd3": "sd3:StableDiffusion3",
    "flux": "flux:Flux",
}


def latent_shape(manifest: Manifest, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The sampler's latents: (batch, channels, height, width) at the VAE's scale, for every family (FLUX packs
    its 2x2 patches around the transformer's call, not in the sampler's latents)."""
    lat = manifest.latent
    return batch, lat.channels, height // lat.downscale, width // lat.downscale


def family_for(root: Path, manifest: Manifest) -> Family:
    where = FAMILIES.get(manifest.family)
    if where is None:
        raise BundleError(f"model family {manifest.family!r} is not one this edgediff renders "
                          f"({', '.join(sorted(FAMILIES))}); update edgediff")
    module, name = where.split(":")
    family: Family = getattr(importlib.import_module(f".{module}", __name__), name)(root, manifest)
    return family
