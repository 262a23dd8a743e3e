"""Stable Diffusion 3 / 3.5: an MMDiT transformer on 16-channel latents, conditioned on CLIP-L and CLIP-G (hidden
states and pooled outputs) and T5, guided by batched CFG.

As diffusers' StableDiffusion3Pipeline: the CLIP hidden states are concatenated on features, zero-padded to T5's
width, and followed on the sequence axis by T5's tokens (all zeros for a pipeline without T5); the pooled outputs
are concatenated; an absent negative prompt is encoded as "" (no zeroing); CFG batches [uncond, cond].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...bundle import BundleError, Manifest, TransformerConditions
from ..plan import RenderPlan
from ..prompts import PromptEncoder
from ..sessions import Session
from ..timing import StageTimer
from . import Conditioning, Model, PreviewMap, SessionFor
from .sd import _cfg_batch, negative_texts


def transformer_conditions(manifest: Manifest) -> TransformerConditions:
    if manifest.transformer is None:
        raise BundleError(f"this {manifest.family} bundle's manifest has no transformer record; re-export it")
    return manifest.transformer


# SD3's 16-channel VAE: the latent-to-RGB factors ComfyUI's live previews use (comfy/latent_formats.py)
SD3_PREVIEW = PreviewMap(
    factors=((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
             (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
             (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951),
             (-0.0278, 0.0524, -0.0542), (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810),
             (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189)),
    bias=(0.2394, 0.2135, 0.1925), scaling_factor=1.5305)


class StableDiffusion3:
    denoiser = "transformer"
    preview_rgb = SD3_PREVIEW

    def __init__(self, root: Path, manifest: Manifest):
        self.manifest = manifest
        self.conditions = transformer_conditions(manifest)
        self.prompt_encoder = PromptEncoder(root, manifest)

    def uses_cfg(self, plan: RenderPlan) -> bool:
        return plan.guidance_scale > 1.0

    def condition(self, prompts: list[str], negative_prompt: str | list[str] | None, plan: RenderPlan,
                  session: SessionFor, warnings: list[str], timer: StageTimer) -> Conditioning:
        negatives = negative_texts(negative_prompt, len(prompts)) if self.uses_cfg(plan) else None
        hidden, pooled = self.encode(prompts + (negatives or []), session, warnings, timer)
        n = len(prompts)
        per_image = plan.images_per_prompt

        def halves(x: np.ndarray) -> np.ndarray:
            cond = np.repeat(x[:n], per_image, axis=0)
            return _cfg_batch(np.repeat(x[n:], per_image, axis=0) if negatives is not None else None, cond)

        feeds = {"encoder_hidden_states": halves(hidden), "pooled_projections": halves(pooled)}
        return Conditioning(feeds, n * per_image, plan.guidance_scale if negatives is not None else None)

    def encode(self, texts: list[str], session: SessionFor, warnings: list[str], timer: StageTimer
               ) -> tuple[np.ndarray, np.ndarray]:
        """The transformer's text tokens [CLIP-L | CLIP-G, zero-padded to T5's width ; T5] and pooled [L | G]."""
        outputs = self.prompt_encoder.run(texts, session, warnings, timer)
        encoders = self.prompt_encoder.encoders
        clip = [h for e, (h, _) in zip(encoders, outputs) if e.pooled_output]
        t5 = [h for e, (h, _) in zip(encoders, outputs) if not e.pooled_output]
        width = self.conditions.joint_attention_dim
        clip_hidden = np.concatenate(clip, axis=-1)
        if clip_hidden.shape[-1] > width:
            raise BundleError(f"CLIP's hidden states are {clip_hidden.shape[-1]} wide, the transformer's text "
                              f"tokens {width}; re-export the bundle")
        clip_hidden = np.pad(clip_hidden, ((0, 0), (0, 0), (0, width - clip_hidden.shape[-1])))
        t5_hidden = t5[0] if t5 else np.zeros((len(texts), self.conditions.max_sequence_length, width), np.float32)
        pooled = np.concatenate([p for _, p in outputs if p is not None], axis=-1)
        return np.concatenate([clip_hidden, t5_hidden], axis=1).astype(np.float32), pooled

    def model(self, session: Session, conditioning: Conditioning) -> Model:
        bound = session.bind(**conditioning.feeds)

        def transformer(sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
            return bound(hidden_states=sample, timestep=timestep)["out_hidden_states"]

        return transformer
