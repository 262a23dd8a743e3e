"""FLUX.1 (dev and schnell): an MMDiT transformer on 2x2-packed latent tokens with rotary position ids, conditioned
on CLIP-L's pooled output and T5's hidden states; dev is told the guidance scale as an input (guidance
distillation), schnell takes none.

As diffusers' FluxPipeline: latents are drawn (and decoded) as (B, C, H/8, W/8) and packed into (B, H/16 * W/16,
4C) tokens for the transformer, whose image position ids are (0, row, column) per token and text ids all zero; the
transformer is told sigma (the timestep / 1000). A negative prompt is used only with true CFG (true_cfg_scale > 1):
then negatives and prompts run as one [uncond, cond] batch, which is diffusers' two calls combined the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...bundle import Manifest
from ..plan import RenderPlan, uses_cfg
from ..prompts import PromptEncoder
from ..sessions import Session
from ..timing import StageTimer
from . import Conditioning, Model, PreviewMap, SessionFor
from .sd import _cfg_batch, negative_texts
from .sd3 import transformer_conditions

UNUSED_NEGATIVE = ("negative prompt unused: FLUX takes one only with true CFG (true_cfg_scale > 1, two model calls "
                   "a step)")


def pack(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch a token, channels outermost (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """pack's inverse, for latents of `height` x `width`."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(patches).reshape(b, d // 4, height, width)


def image_ids(height: int, width: int) -> np.ndarray:
    """Position ids of the packed tokens of (height, width) latents: (0, row, column), row-major."""
    rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


# FLUX.1's 16-channel VAE: the latent-to-RGB factors ComfyUI's live previews use (comfy/latent_formats.py)
FLUX_PREVIEW = PreviewMap(
    factors=((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
             (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
             (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011),
             (0.0428, -0.0012, -0.0036), (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103),
             (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778)),
    bias=(-0.0329, -0.0718, -0.0851), scaling_factor=0.3611)


class Flux:
    denoiser = "transformer"
    preview_rgb = FLUX_PREVIEW

    def __init__(self, root: Path, manifest: Manifest):
        self.manifest = manifest
        self.conditions = transformer_conditions(manifest)
        self.prompt_encoder = PromptEncoder(root, manifest)

    def uses_cfg(self, plan: RenderPlan) -> bool:
        return uses_cfg(self.manifest, plan.guidance_scale, plan.true_cfg_scale)

    def condition(self, prompts: list[str], negative_prompt: str | list[str] | None, plan: RenderPlan,
                  session: SessionFor, warnings: list[str], timer: StageTimer) -> Conditioning:
        true_cfg = self.uses_cfg(plan) and negative_prompt is not None
        if negative_prompt is not None and not true_cfg:
            warnings.append(UNUSED_NEGATIVE)
        negatives = negative_texts(negative_prompt, len(prompts)) if true_cfg else None
        outputs = self.prompt_encoder.run(prompts + (negatives or []), session, warnings, timer)
        pooled = next(p for _, p in outputs if p is not None)
        hidden = next(h for e, (h, _) in zip(self.prompt_encoder.encoders, outputs) if not e.pooled_output)
        n, per_image = len(prompts), plan.images_per_prompt

        def halves(x: np.ndarray) -> np.ndarray:
            cond = np.repeat(x[:n], per_image, axis=0)
            return _cfg_batch(np.repeat(x[n:], per_image, axis=0) if true_cfg else None, cond)

        feeds = {"encoder_hidden_states": halves(hidden), "pooled_projections": halves(pooled),
                 "txt_ids": np.zeros((hidden.shape[1], 3), np.float32)}
        calls = n * per_image * (2 if true_cfg else 1)
        if self.conditions.guidance_embeds:
            feeds["guidance"] = np.full(calls, plan.guidance_scale, np.float32)
        down = self.manifest.latent.downscale
        feeds["img_ids"] = image_ids(plan.height // down, plan.width // down)
        return Conditioning(feeds, n * per_image, plan.true_cfg_scale if true_cfg else None)

    def model(self, session: Session, conditioning: Conditioning) -> Model:
        """The sampler works on unpacked latents (packing is a permutation, so its steps are the same); the
        transformer is fed packed tokens and sigma."""
        bound = session.bind(**conditioning.feeds)
        per_mille = np.float32(1000.0)

        def transformer(sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            h, w = sample.shape[-2:]
            out = bound(hidden_states=pack(sample), timestep=timestep.astype(np.float32) / per_mille)
            return unpack(out["out_hidden_states"], h, w)

        return transformer
