"""Streaming previews: latents mapped to RGB by a fixed linear map per latent pixel, as the popular UIs preview.

A family's own map (runtime/families: SD 1.x/2.x's and SDXL's well-known factors) serves bundles whose VAE has
that family's latent space, told by the manifest's scaling factor. A bundle with another VAE (the built-in model's
is its own, with a 4x downscale) gets a map fitted once at load by least squares: a few latents decoded by the
bundle's own decoder, each decoded image averaged over the latent pixel's block, against the latent values.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from ..runtime.families import PreviewMap
from ..runtime.pipeline import Pipeline

FIT_LATENTS = 16  # latents decoded for a fitted map: enough for 5 unknowns per colour, a few ms on the built-in
FIT_SIZE = 8  # latent pixels per side of each


def preview_map(pipeline: Pipeline) -> PreviewMap:
    lat = pipeline.manifest.latent
    family_map = pipeline.family.preview_rgb
    if family_map.fits(lat.channels, lat.scaling_factor):
        return family_map
    return fit_preview_map(pipeline)


def fit_preview_map(pipeline: Pipeline, seed: int = 0) -> PreviewMap:
    """Least-squares latent -> RGB (in -1..1) through the bundle's own VAE decoder."""
    lat = pipeline.manifest.latent
    latents = np.random.default_rng(seed).standard_normal((FIT_LATENTS, lat.channels, FIT_SIZE, FIT_SIZE),
                                                          dtype=np.float32)
    rgb = pipeline.decode(latents) * 2 - 1  # (N, H, W, 3)
    d = lat.downscale
    n, h, w, _ = rgb.shape
    blocks = rgb.reshape(n, h // d, d, w // d, d, 3).mean(axis=(2, 4))  # (N, h, w, 3)
    x = latents.transpose(0, 2, 3, 1).reshape(-1, lat.channels)
    y = blocks.reshape(-1, 3)
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1), np.float32)]), y, rcond=None)[0]
    factors = tuple(tuple(float(v) for v in row) for row in solution[:-1])
    bias = tuple(float(v) for v in solution[-1])
    return PreviewMap(factors=factors, bias=bias, scaling_factor=lat.scaling_factor)  # type: ignore[arg-type]


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
