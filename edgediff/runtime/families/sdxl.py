"""SDXL (and SDXL-Turbo, Lightning, LCM-SDXL): two CLIP text encoders whose hidden states are concatenated, the
second's pooled embedding as the U-Net's `text_embeds`, and the size conditioning `time_ids`.

As diffusers' StableDiffusionXLPipeline: with `force_zeros_for_empty_prompt`, no negative prompt at all (not an
empty one) gives all-zero negative embeddings, pooled included; the original and target sizes in `time_ids` are
the render's.
"""

from __future__ import annotations

from ...bundle import BundleError
from ..plan import RenderPlan
from ..prompts import time_ids
from ..timing import StageTimer
from . import Conditioning, PreviewMap, SessionFor
from .sd import StableDiffusion, _cfg_batch, negative_texts


class StableDiffusionXL(StableDiffusion):
    # SDXL's VAE: ComfyUI's latent-to-RGB factors and bias for SDXL previews
    preview_rgb = PreviewMap(factors=((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                                      (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
                             bias=(0.1084, -0.0175, -0.0011), scaling_factor=0.13025)

    def condition(self, prompts: list[str], negative_prompt: str | list[str] | None, plan: RenderPlan,
                  session: SessionFor, warnings: list[str], timer: StageTimer) -> Conditioning:
        added = self.manifest.added_conditions
        cfg = self.uses_cfg(plan)
        zero_negatives = cfg and negative_prompt is None and added is not None and added.force_zeros_for_empty_prompt
        negatives = negative_texts(negative_prompt, len(prompts)) if cfg and not zero_negatives else None
        cond, uncond = self.encode(prompts, negatives, session, warnings, timer)
        if zero_negatives:
            uncond = cond.zeros_like()
        conditioning = self.conditioning(cond, uncond, plan)
        cfg_on = uncond is not None
        ids = time_ids(plan.height, plan.width, added.crops_coords_top_left if added else (0, 0), conditioning.batch)
        pooled = cond.repeat(plan.images_per_prompt).pooled
        if pooled is None:
            raise BundleError("this SDXL bundle's text encoders give no pooled embedding (text_embeds); re-export it")
        pooled_uncond = uncond.repeat(plan.images_per_prompt).pooled if uncond is not None else None
        conditioning.feeds["text_embeds"] = _cfg_batch(pooled_uncond, pooled)
        conditioning.feeds["time_ids"] = _cfg_batch(ids if cfg_on else None, ids)
        return conditioning
