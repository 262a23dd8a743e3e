"""Same checkpoint, same seed -> the same image as diffusers, for every sampler (pixels in 0..1, max abs <= 2e-3).

edgediff draws its noise with TorchNoise (torch's CPU generator, re-implemented in NumPy): the initial latents, the
VAE posterior sample of img2img, and the per-step noise of the stochastic samplers (euler_a, dpmpp_2m_sde, lcm, tcd)
must come out of the stream in the order diffusers draws them for the images to agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# The contract is PIXEL_TOLERANCE (2e-3). Measured errors are below 1e-5, and these tiny random-weight models'
# images move by only ~3e-4 when a quirk goes missing (DPM-Solver's rounding of Karras timesteps), so the tests hold
# them to SEED_TOLERANCE (2e-4).
from conftest import NEGATIVES, PIXEL_TOLERANCE, PROMPTS, H, W, diffusers_pipeline  # noqa: E402
from conftest import SEED_TOLERANCE as TOLERANCE  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.runtime.pipeline import RenderError  # noqa: E402

assert TOLERANCE <= PIXEL_TOLERANCE

# our sampler -> (diffusers scheduler class, config overrides); schedules add their own overrides below. DDIM takes
# the class's own defaults for what the checkpoint's config lacks (clip_sample and set_alpha_to_one true: the tiny
# sd1 config is PNDM's, without clip_sample; sd2's is EulerDiscrete's, without either), as the export records.
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
SCHEDULE_OVERRIDES = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
}


@pytest.fixture(scope="module")
def pipes(bundle, checkpoint):
    """(ours, diffusers text2img, diffusers img2img, the checkpoint's scheduler config) per family, loaded once."""
    loaded = {}

    def get(family):
        if family not in loaded:
            lcm = family == "lcm"
            cls = "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline"
            ref = diffusers_pipeline(cls, checkpoint(family), scheduler=None)
            i2i_cls = (
                diffusers.LatentConsistencyModelImg2ImgPipeline if lcm else diffusers.StableDiffusionImg2ImgPipeline
            )
            i2i = i2i_cls.from_pipe(ref)
            i2i.set_progress_bar_config(disable=True)
            loaded[family] = (Pipeline.load(bundle(family)), ref, i2i, dict(ref.scheduler.config))
        return loaded[family]

    return get


def _scheduler(config, sampler, schedule):
    cls, overrides = SCHEDULERS[sampler]
    return getattr(diffusers, cls).from_config(config, **overrides, **SCHEDULE_OVERRIDES.get(schedule, {}))


def _render_both(pipes, family, sampler, schedule, steps, guidance, seed, image=None, strength=0.6, eta=None):
    ours, ref, i2i, config = pipes(family)
    pipe = ref if image is None else i2i
    pipe.scheduler = _scheduler(config, sampler, schedule)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    extra = {"eta": 0.3} if sampler == "tcd" else {}  # TCD's own default gamma; StableDiffusionPipeline passes 0
    if eta is not None:
        extra["eta"] = eta
    if family != "lcm":
        kw["negative_prompt"] = NEGATIVES
    if image is None:
        kw.update(height=H, width=W)
    else:
        kw.update(image=image, strength=strength)
    theirs = pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kw, **extra).images
    out = ours(PROMPTS, seed=seed, sampler=sampler, schedule=schedule, eta=eta, **kw)
    return out, theirs


CASES = [
    # family, sampler, schedule, steps, guidance
    ("sd1", "euler", "karras", 4, 7.5),
    ("sd2", "euler", "exponential", 3, 5.0),
    ("sd2", "euler_a", "trailing", 3, 5.0),
    ("sd1", "euler_a", "discrete", 2, 7.5),
    ("sd1", "heun", "discrete", 3, 7.5),
    ("sd2", "heun", "karras", 3, 4.0),
    ("sd1", "ddim", "discrete", 4, 7.5),
    ("sd2", "ddim", "trailing", 3, 6.0),  # lands off the next timestep: t - T // steps
    ("sd1", "dpmpp_2m", "karras", 5, 7.5),  # integer timesteps from Karras sigmas
    ("sd2", "dpmpp_2m", "discrete", 4, 5.0),
    ("sd1", "dpmpp_2m_sde", "karras", 4, 7.5),
    ("sd2", "dpmpp_2m_sde", "trailing", 3, 1.0),
    ("sd1", "unipc", "discrete", 5, 7.5),
    ("sd2", "unipc", "karras", 4, 5.0),
    ("lcm", "lcm", "lcm", 4, 8.0),
    ("lcm", "lcm", "lcm", 2, 3.0),
    ("sd1", "tcd", "lcm", 4, 7.5),
    ("sd2", "tcd", "lcm", 3, 1.0),
]


@pytest.mark.parametrize("family,sampler,schedule,steps,guidance", CASES)
def test_text_to_image_matches_diffusers_by_seed(pipes, family, sampler, schedule, steps, guidance):
    out, theirs = _render_both(pipes, family, sampler, schedule, steps, guidance, seed=7)
    assert out.images.shape == theirs.shape == (len(PROMPTS), H, W, 3)
    assert theirs.std() > 0.05  # a real picture, not a flat field that would match anything
    np.testing.assert_allclose(out.images, theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("family,sampler,schedule,steps,eta", [
    ("sd1", "ddim", "discrete", 4, 1.0),
    ("sd2", "ddim", "trailing", 3, 0.5),  # set_alpha_to_one: the last step lands on 0, its noise drawn and unused
    ("sd1", "tcd", "lcm", 4, 0.7),
    ("sd2", "tcd", "lcm", 3, 0.0),
])
def test_eta_matches_diffusers_by_seed(pipes, family, sampler, schedule, steps, eta):
    out, theirs = _render_both(pipes, family, sampler, schedule, steps, 7.5, seed=11, eta=eta)
    np.testing.assert_allclose(out.images, theirs, atol=TOLERANCE, rtol=0)
    plain, _ = _render_both(pipes, family, sampler, schedule, steps, 7.5, seed=11)
    assert np.abs(out.images - plain.images).max() > 1e-3  # eta did act


def test_ddim_takes_diffusers_defaults_for_keys_the_config_lacks(pipes):
    """sd2's EulerDiscrete config has no set_alpha_to_one or clip_sample: DDIMScheduler.from_config sets both, and
    so does the bundle's manifest for ddim (and for nothing else)."""
    ours, _, _, config = pipes("sd2")
    assert "set_alpha_to_one" not in config and "clip_sample" not in config
    assert ours.manifest.scheduler.per_sampler["ddim"] == {"set_alpha_to_one": True, "clip_sample": True}
    assert not ours.manifest.scheduler.for_sampler("euler").clip_sample


def _init_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.random((H, W, 3)) * 0.6 + np.linspace(0, 0.4, W)[None, :, None]
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")  # diffusers repeats the one init image
@pytest.mark.parametrize("family,sampler,schedule,steps,strength", [
    ("sd1", "euler_a", "discrete", 5, 0.6),
    ("sd1", "heun", "karras", 4, 0.5),
    ("sd1", "ddim", "trailing", 5, 0.6),
    ("sd2", "dpmpp_2m", "karras", 6, 0.5),
    ("sd1", "dpmpp_2m_sde", "discrete", 5, 0.8),
    ("sd2", "unipc", "discrete", 6, 0.7),
    ("sd1", "tcd", "lcm", 4, 0.75),
    ("lcm", "lcm", "lcm", 4, 0.6),  # LCM folds strength into its distilled timesteps and runs all 4
])
def test_image_to_image_matches_diffusers_by_seed(pipes, family, sampler, schedule, steps, strength):
    out, theirs = _render_both(pipes, family, sampler, schedule, steps, 7.5 if family != "lcm" else 8.0, seed=4,
                               image=_init_image(), strength=strength)
    expected_steps = steps if sampler == "lcm" else int(steps * strength)
    assert len(out.timings["steps"]) == expected_steps
    np.testing.assert_allclose(out.images, theirs, atol=TOLERANCE, rtol=0)


def test_turbo_preset_runs_euler_a_trailing_unguided(pipes):
    """A Turbo bundle (preset turbo) renders with euler_a over trailing timesteps when none is named: the defaults
    a turbo export writes, which the runtime reads (not its preset table)."""
    ours, ref, _, config = pipes("sd2")
    turbo = Pipeline(ours.root, dataclasses.replace(ours.manifest, preset="turbo", defaults=dataclasses.replace(
        ours.manifest.defaults, sampler="euler_a", schedule="trailing", steps=2, guidance_scale=0.0)))
    ref.scheduler = _scheduler(config, "euler_a", "trailing")
    theirs = ref(PROMPTS, num_inference_steps=2, guidance_scale=0.0, height=H, width=W, output_type="np",
                 generator=torch.Generator().manual_seed(3)).images
    out = turbo(PROMPTS, height=H, width=W, seed=3, output_type="np")
    np.testing.assert_allclose(out.images, theirs, atol=TOLERANCE, rtol=0)
    assert (out.plan.sampler, out.plan.schedule, out.plan.steps) == ("euler_a", "trailing", 2)


def test_numpy_noise_is_its_own_reproducible_stream(pipes):
    ours = pipes("sd1")[0]
    kw = dict(num_inference_steps=2, height=H, width=W, output_type="np", sampler="euler_a")
    a = ours("a cat", seed=5, noise="numpy", **kw).images
    np.testing.assert_array_equal(a, ours("a cat", seed=5, noise="numpy", **kw).images)
    assert np.abs(a - ours("a cat", seed=5, noise="torch", **kw).images).max() > 1e-3


@pytest.mark.parametrize("kw,fragment", [
    (dict(sampler="nope"), "unknown sampler 'nope'; choose one of euler, euler_a, heun"),
    (dict(sampler="dpmpp_2m", schedule="nope"), "unknown schedule 'nope'; choose one of discrete"),
    (dict(sampler="lcm", schedule="karras"), "sampler 'lcm' does not run on the 'karras' schedule; choose one of lcm"),
    (dict(sampler="flow_euler"), "does not fit this bundle's epsilon model; choose one of euler, euler_a"),
    (dict(noise="cuda"), "unknown noise kind 'cuda'"),
    (dict(sampler="euler_a", eta=0.5), "sampler 'euler_a' takes no eta; eta applies to ddim, tcd"),
])
def test_bad_sampler_schedule_or_noise_is_one_render_error(pipes, kw, fragment):
    with pytest.raises(RenderError) as e:
        pipes("sd1")[0]("a cat", num_inference_steps=2, height=H, width=W, **kw)
    assert fragment in str(e.value) and "\n" not in str(e.value)
