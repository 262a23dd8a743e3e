"""Same weights, same initial noise -> the same image as diffusers (pixels in 0..1, max abs error <= 2e-3)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import NEGATIVES, PROMPTS, H, W, diffusers_pipeline  # noqa: E402
from conftest import PIXEL_TOLERANCE as TOLERANCE  # noqa: E402

from edgediff import Pipeline  # noqa: E402


def _reference(checkpoint, family, scheduler_cls, spacing):
    cls = "LatentConsistencyModelPipeline" if family == "lcm" else "StableDiffusionPipeline"
    pipe = diffusers_pipeline(cls, checkpoint(family), scheduler=None)
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, timestep_spacing=spacing)
    return pipe


def _ours(bundle, family, spacing):
    pipe = Pipeline.load(bundle(family))
    # The manifest records the checkpoint's spacing; these cases try the others too.
    scheduler = dataclasses.replace(pipe.manifest.scheduler, timestep_spacing=spacing)
    pipe.manifest = dataclasses.replace(pipe.manifest, scheduler=scheduler)
    return pipe


CASES = [
    # family, diffusers scheduler, spacing, steps, guidance, our sampler
    ("sd1", "EulerDiscreteScheduler", "leading", 5, 7.5, "euler"),
    ("sd1", "EulerDiscreteScheduler", "trailing", 3, 7.5, "euler"),
    ("sd2", "EulerDiscreteScheduler", "linspace", 4, 5.0, "euler"),
    ("sd2", "EulerDiscreteScheduler", "trailing", 2, 1.0, "euler"),
    ("sd1", "EulerAncestralDiscreteScheduler", "trailing", 1, 3.0, "euler_a"),
    ("sd2", "EulerAncestralDiscreteScheduler", "leading", 1, 6.0, "euler_a"),
    ("lcm", "LCMScheduler", "leading", 1, 8.0, "lcm"),
]


@pytest.mark.parametrize("family,scheduler,spacing,steps,guidance,sampler", CASES)
def test_text_to_image_matches_diffusers_given_latents(
    bundle, checkpoint, family, scheduler, spacing, steps, guidance, sampler
):
    latents = torch.randn(len(PROMPTS), 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    negative = {} if family == "lcm" else {"negative_prompt": NEGATIVES}
    ref = _reference(checkpoint, family, scheduler, spacing)(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=H, width=W, latents=latents,
        output_type="np", **negative,
    ).images
    out = _ours(bundle, family, spacing)(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=H, width=W, latents=latents.numpy(),
        sampler=sampler, output_type="np", **negative,
    )
    assert out.images.shape == ref.shape
    assert ref.std() > 0.05  # a real picture, not a saturated flat field that would match anything
    np.testing.assert_allclose(out.images, ref, atol=TOLERANCE, rtol=0)


def test_negative_prompt_and_guidance_change_the_image(bundle):
    pipe = Pipeline.load(bundle("sd1"))
    kw = dict(num_inference_steps=2, height=H, width=W, seed=1, output_type="np")
    base = pipe("a cat", guidance_scale=7.5, **kw).images
    assert np.abs(base - pipe("a cat", guidance_scale=7.5, negative_prompt="dog", **kw).images).max() > 1e-3
    assert np.abs(base - pipe("a cat", guidance_scale=1.0, **kw).images).max() > 1e-3


def test_multistep_lcm_and_several_images_per_prompt_match_diffusers_by_seed(bundle, checkpoint):
    ref = _reference(checkpoint, "lcm", "LCMScheduler", "leading")(
        PROMPTS, num_inference_steps=4, guidance_scale=8.0, height=H, width=W, num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(11), output_type="np",
    ).images
    out = Pipeline.load(bundle("lcm"))(
        PROMPTS, num_inference_steps=4, guidance_scale=8.0, height=H, width=W, num_images_per_prompt=2, seed=11,
        output_type="np",
    )
    assert out.images.shape == (4, H, W, 3)
    np.testing.assert_allclose(out.images, ref, atol=TOLERANCE, rtol=0)


def test_image_to_image_matches_diffusers_by_seed(bundle, checkpoint):
    rng = np.random.default_rng(0)
    init = (rng.random((H, W, 3)) * 0.6 + np.linspace(0, 0.4, W)[None, :, None]).astype(np.float32)
    ref_pipe = diffusers_pipeline("StableDiffusionImg2ImgPipeline", checkpoint("sd1"))
    from PIL import Image

    image = Image.fromarray((init * 255).round().astype(np.uint8))
    ref = ref_pipe("a red cat", image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(4), output_type="np").images
    out = Pipeline.load(bundle("sd1"))("a red cat", image=image, strength=0.6, num_inference_steps=5,
                                       guidance_scale=7.5, seed=4, output_type="np")
    assert len(out.timings["steps"]) == 3  # int(5 * 0.6) steps from the end of the schedule
    np.testing.assert_allclose(out.images, ref, atol=TOLERANCE, rtol=0)


def test_unet_graphs_run_geglu_as_two_linears_without_a_slice(bundle):
    """The exporter splits each GEGLU projection into value and gate linears (export/specs.py): the graph must
    hold both halves and no Slice of a projection's output, and still match diffusers (the tests above)."""
    onnx = pytest.importorskip("onnx")

    graph = onnx.load(str(bundle("sd1") / "unet" / "model.onnx"), load_external_data=False).graph
    names = [n.name for n in graph.node]
    assert any("/ff/net.0/value/" in n for n in names) and any("/ff/net.0/gate/" in n for n in names)
    assert not any("/ff/net.0/" in n.name for n in graph.node if n.op_type in ("Slice", "Split"))
