"""What test_sd3.py and test_flux.py share: diffusers' reference pipelines on the tiny SD3 / FLUX checkpoints and
the seed-for-seed comparison with edgediff's render."""

from __future__ import annotations

import numpy as np
import torch
from conftest import PIXEL_TOLERANCE, H, W, diffusers_pipeline
from PIL import Image

SEED = 5


def reference(cls: str, checkpoint, **kwargs):
    """diffusers' `cls` on `checkpoint`, with the checkpoint's own FlowMatchEulerDiscreteScheduler."""
    return diffusers_pipeline(cls, checkpoint, scheduler=None, **kwargs)


def init_image() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.random((H, W, 3)) * 0.6 + np.linspace(0, 0.4, W)[None, :, None]
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def assert_same_image(ours, ref, prompt, *, ref_kw=None, **kw) -> np.ndarray:
    """Render `prompt` with both at the same seed; the images must agree within PIXEL_TOLERANCE and be a picture
    (not a flat field, which would match anything). Returns edgediff's images."""
    kw = {"height": H, "width": W, "output_type": "np", **kw}
    expected = ref(prompt, generator=torch.Generator().manual_seed(SEED), **kw, **(ref_kw or {})).images
    got = ours(prompt, seed=SEED, **kw).images
    assert got.shape == expected.shape
    assert expected.std() > 0.05
    err = float(np.abs(got - expected).max())
    assert err <= PIXEL_TOLERANCE, err
    return got
