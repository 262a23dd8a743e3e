"""Streaming previews: latents mapped to RGB by a fixed linear map per latent pixel, as the popular UIs preview.

A family's own map (runtime/families: SD 1.x/2.x's and SDXL's well-known factors) serves bundles whose VAE has
that family's latent space, told by the manifest's scaling factor. A bundle with another VAE (the built-in model's
is its own, with a 4x downscale) gets a map fitted once at load by least squares, from a few renders' final
latents against their images (`fit_preview_map`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from ..runtime.families import PreviewMap
from ..runtime.pipeline import Pipeline

# renders whose final latents and images fit a map: varied colours and shapes, in words the built-in model knows
_COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")
_SHAPES = ("circle", "square", "triangle")
_PLACES = ("left of", "right of", "above", "below")
FIT_PROMPTS = tuple(f"a {_COLOURS[i % 6]} {_SHAPES[i % 3]} {_PLACES[i % 4]} a {_COLOURS[(5 * i + 1) % 6]} "
                    f"{_SHAPES[(i // 3) % 3]}" for i in range(32))


def preview_map(pipeline: Pipeline) -> PreviewMap:
    lat = pipeline.manifest.latent
    family_map = pipeline.family.preview_rgb
    if family_map.fits(lat.channels, lat.scaling_factor):
        return family_map
    return fit_preview_map(pipeline)


def fit_preview_map(pipeline: Pipeline) -> PreviewMap:
    """Least squares, latent channels (and 1) -> RGB in -1..1, over the final latents of a few renders at the
    bundle's defaults against their decoded images averaged over each latent pixel's block (random latents fit
    worse: the decoder never sees anything like them). The built-in model's small VAE is far from linear in its
    latents: the fitted map explains about 15 % of the variance of held-out renders' block colours (docs/serve.md),
    so its previews show where the colour is, roughly, and no more."""
    caught: dict[int, np.ndarray] = {}

    def keep(step: int, steps: int, latents: np.ndarray) -> None:
        caught[step] = latents

    out = pipeline(list(FIT_PROMPTS), seed=list(range(len(FIT_PROMPTS))), output_type="np", callback=keep)
    latents, images = caught[max(caught)], np.asarray(out.images)
    lat = pipeline.manifest.latent
    d = lat.downscale
    n, h, w, _ = images.shape
    blocks = (images * 2 - 1).reshape(n, h // d, d, w // d, d, 3).mean(axis=(2, 4))
    x = latents.transpose(0, 2, 3, 1).reshape(-1, lat.channels)
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1), np.float32)]), blocks.reshape(-1, 3),
                               rcond=None)[0]
    factors = tuple((float(r[0]), float(r[1]), float(r[2])) for r in solution[:-1])
    last = solution[-1]
    return PreviewMap(factors=factors, bias=(float(last[0]), float(last[1]), float(last[2])),
                      scaling_factor=lat.scaling_factor)


def preview_images(latents: np.ndarray, rgb_map: PreviewMap, downscale: int) -> list[Image.Image]:
    """(N, C, h, w) latents -> N RGB images at the render's size (nearest-neighbour upscaled)."""
    factors = np.asarray(rgb_map.factors, np.float32)
    rgb = np.einsum("nchw,ck->nhwk", latents.astype(np.float32), factors) + np.asarray(rgb_map.bias, np.float32)
    pixels = np.clip((rgb + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return [Image.fromarray(p).resize((p.shape[1] * downscale, p.shape[0] * downscale), Image.Resampling.NEAREST)
            for p in pixels]


def previewer(pipeline: Pipeline) -> Callable[[np.ndarray], list[Image.Image]]:
    rgb_map = preview_map(pipeline)
    downscale = pipeline.manifest.latent.downscale
    return lambda latents: preview_images(latents, rgb_map, downscale)
