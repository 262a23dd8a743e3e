"""Stable Diffusion 1.x and 2.x (and LCM students of them, and the built-in model, which is SD 1.x-shaped):
one CLIP text encoder, a U-Net on 4-channel latents at 1/8 (the built-in model: 1/4) scale, guidance as batched
CFG or, for LCM U-Nets with a guidance embedding, as `timestep_cond`.

As diffusers' StableDiffusionPipeline: CFG batches [uncond, cond], an absent negative prompt is encoded as "",
each prompt's embeddings are repeated per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...bundle import Manifest
from ..denoise import guidance_embedding
from ..plan import RenderError, RenderPlan, uses_cfg
from ..prompts import Embeddings, PromptEncoder
from ..sessions import Session
from ..timing import StageTimer
from . import Conditioning, Model, PreviewMap, SessionFor

# SD 1.x/2.x's VAE: the latent-to-RGB factors ComfyUI's and A1111's live previews use (a least-squares fit)
SD_PREVIEW = PreviewMap(factors=((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                                 (-0.2120, -0.2616, -0.7177)), bias=(0.0, 0.0, 0.0), scaling_factor=0.18215)


class StableDiffusion:
    denoiser = "unet"
    preview_rgb = SD_PREVIEW

    def __init__(self, root: Path, manifest: Manifest):
        self.manifest = manifest
        self.prompt_encoder = PromptEncoder(root, manifest)

    def uses_cfg(self, plan: RenderPlan) -> bool:
        return uses_cfg(self.manifest, plan.guidance_scale)

    def condition(self, prompts: list[str], negative_prompt: str | list[str] | None, plan: RenderPlan,
                  session: SessionFor, warnings: list[str], timer: StageTimer) -> Conditioning:
        negatives = negative_texts(negative_prompt, len(prompts)) if self.uses_cfg(plan) else None
        cond, uncond = self.encode(prompts, negatives, session, warnings, timer)
        return self.conditioning(cond, uncond, plan)

    def encode(self, prompts: list[str], negatives: list[str] | None, session: SessionFor, warnings: list[str],
               timer: StageTimer) -> tuple[Embeddings, Embeddings | None]:
        """Text embeddings for the prompts (and the negatives, in the same encoder calls)."""
        embeddings = self.prompt_encoder(prompts + (negatives or []), session, warnings, timer)
        n = len(prompts)
        return embeddings[:n], (embeddings[n:] if negatives is not None else None)

    def conditioning(self, cond: Embeddings, uncond: Embeddings | None, plan: RenderPlan) -> Conditioning:
        cond = cond.repeat(plan.images_per_prompt)
        uncond = uncond.repeat(plan.images_per_prompt) if uncond is not None else None
        batch = cond.hidden.shape[0]
        feeds = {"encoder_hidden_states": _cfg_batch(uncond.hidden if uncond is not None else None, cond.hidden)}
        dim = self.manifest.guidance_embedding_dim
        if dim:
            feeds["timestep_cond"] = guidance_embedding(np.full(batch, plan.guidance_scale - 1.0, np.float32), dim)
        return Conditioning(feeds, batch, plan.guidance_scale if uncond is not None else None)

    def model(self, session: Session, conditioning: Conditioning) -> Model:
        bound = session.bind(**conditioning.feeds)

        def unet(sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            return bound(sample=sample, timestep=timestep)["out_sample"]

        return unet


def negative_texts(negative_prompt: str | list[str] | None, n: int) -> list[str]:
    """One negative prompt per prompt: none is "" for each, one is repeated."""
    if negative_prompt is None:
        return [""] * n
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) == 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise RenderError(f"{len(negatives)} negative prompts for {n} prompts; give one, or one per prompt")
    return negatives


def _cfg_batch(uncond: np.ndarray | None, cond: np.ndarray) -> np.ndarray:
    return cond if uncond is None else np.concatenate([uncond, cond])
