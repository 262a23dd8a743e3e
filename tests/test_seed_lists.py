"""A render given one seed per prompt draws each prompt's images from its own stream (BatchNoise), so a batch of
prompts equals each prompt rendered alone, through samplers that draw fresh noise every step (the server batches
requests this way); and the latent previews per family."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.runtime.noise import BatchNoise, NumpyNoise, TorchNoise
from edgediff.runtime.plan import RenderError

PROMPTS = ["a red circle left of a blue square", "a green triangle", "a yellow square above a purple circle"]


def test_batch_noise_slices_follow_their_own_streams():
    noise = BatchNoise([TorchNoise(3), TorchNoise(8)], [2, 1])
    alone = [TorchNoise(3), TorchNoise(8)]
    for _ in range(3):  # every call continues each stream, as a sampler's per-step draws do
        drawn = noise.randn((3, 4, 5, 5))
        assert np.array_equal(drawn[:2], alone[0].randn((2, 4, 5, 5)))
        assert np.array_equal(drawn[2:], alone[1].randn((1, 4, 5, 5)))
    with pytest.raises(ValueError, match="does not split"):
        noise.randn((2, 4))
    with pytest.raises(ValueError):
        BatchNoise([NumpyNoise(1)], [1, 2])


@pytest.fixture(scope="module")
def builtin():
    return Pipeline.load(None)


def test_seed_list_equals_single_renders_lcm(builtin):
    """The built-in model samples with LCM: fresh noise every step."""
    batched = builtin(PROMPTS, seed=[5, 6, 7], num_images_per_prompt=2, output_type="np")
    assert batched.plan.seeds == (5, 6, 7) and batched.plan.seed == 5
    for i, (prompt, seed) in enumerate(zip(PROMPTS, [5, 6, 7])):
        alone = builtin(prompt, seed=seed, num_images_per_prompt=2, output_type="np").images
        assert np.abs(batched.images[2 * i:2 * i + 2] - alone).max() <= 1 / 255


def test_seed_list_equals_single_renders_euler_a_with_cfg(bundle):
    pipe = Pipeline.load(bundle("sd1"))
    kw = dict(sampler="euler_a", num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np")
    batched = pipe(PROMPTS[:2], negative_prompt=["blurry", "dark"], seed=[1, 2], **kw).images
    for i, (prompt, negative, seed) in enumerate(zip(PROMPTS[:2], ["blurry", "dark"], [1, 2])):
        alone = pipe(prompt, negative_prompt=negative, seed=seed, **kw).images
        assert np.abs(batched[i] - alone[0]).max() <= 1 / 255
    assert np.abs(batched[0] - batched[1]).max() > 0.05


def test_seed_list_errors(builtin):
    with pytest.raises(RenderError, match="2 seeds for 3 prompts"):
        builtin(PROMPTS, seed=[1, 2])
    with pytest.raises(RenderError, match="seed must be"):
        builtin(PROMPTS[:1], seed=[])
    with pytest.raises(RenderError, match="seed must be at least 0"):
        builtin(PROMPTS[:2], seed=[1, -2])
    with pytest.raises(RenderError, match="text-to-image"):
        builtin(PROMPTS[:1], seed=[1], image=np.zeros((32, 32, 3), np.float32))


def test_previews(builtin, bundle):
    pytest.importorskip("fastapi")
    from edgediff.runtime.families.sd import SD_PREVIEW
    from edgediff.serve.preview import preview_images, preview_map

    assert preview_map(Pipeline.load(bundle("sd1"))) is SD_PREVIEW  # SD's VAE: the well-known factors
    rgb_map = preview_map(builtin)  # its own VAE: fitted on renders
    assert rgb_map is not SD_PREVIEW
    caught = {}
    prompts = [f"a {c} {s} above a {d} circle" for c, d in (("red", "blue"), ("green", "purple"), ("cyan", "red"),
                                                              ("yellow", "green")) for s in ("square", "triangle")]
    out = builtin(prompts, seed=list(range(100, 108)), output_type="np",
                  callback=lambda i, n, x: caught.__setitem__(i, x))
    previews = preview_images(caught[max(caught)], rgb_map, 4)
    assert [p.size for p in previews] == [(32, 32)] * 8
    preview = np.stack([np.asarray(p, np.float32) / 255 for p in previews])
    got, want = (a.reshape(8, 8, 4, 8, 4, 3).mean(axis=(2, 4)) for a in (preview, out.images))
    explained = 1 - ((got - want) ** 2).sum() / ((want - want.mean(axis=(0, 1, 2))) ** 2).sum()
    assert explained > 0.05  # rough (a small VAE far from linear) but better than a flat colour on renders it
    # was not fitted on
