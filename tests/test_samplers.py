"""Each (sampler, schedule) pair against its diffusers scheduler, step by step, over a toy denoiser.

The toy model is a fixed smooth function of the model input and timestep; diffusers' loop (scale_model_input, step)
and ours (schedules.build, make_denoiser, sample_<name>) both run it from the same torch-seeded noise, and every
step's latents must agree within 1e-5 of the trajectory's largest magnitude. Our sigma-space x is compared in
diffusers' own space: x / sqrt(sigma^2 + 1) for the alpha-space schedulers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgediff.bundle import SchedulerConfig
from edgediff.runtime import schedules
from edgediff.runtime.denoise import make_denoiser
from edgediff.runtime.noise import TorchNoise
from edgediff.runtime.sampler_catalogue import PRESETS, SAMPLERS, resolve, sampler_options

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 4, 8, 8)
SEED = 5
RELATIVE_TOLERANCE = 1e-5
IMAGE_SEQ_LEN = 1024  # flow_dynamic: a 512x512 FLUX image's latent tokens


def toy(x, t):
    """eps (or v, or x0) = 0.3 x cos(t / 300) + 0.1 sin(x), in NumPy or torch alike."""
    c = np.float32(0.3 * math.cos(float(t) / 300))
    if isinstance(x, np.ndarray):
        return (x * c + np.float32(0.1) * np.sin(x)).astype(np.float32)
    return x * float(c) + 0.1 * torch.sin(x)


def fake_unet(sample, timestep):
    return toy(sample, timestep[0])


SCHEDULER = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


def reference_scheduler(sampler: str, schedule: str, prediction: str, spacing: str, **config):
    """The diffusers scheduler configured as our (sampler, schedule) pair, on SD's training schedule."""
    cls = getattr(diffusers, SCHEDULER[sampler])
    if sampler == "flow_euler":
        if schedule == "flow_dynamic":
            return cls(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        return cls(shift=3.0)
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
              prediction_type=prediction, timestep_spacing=spacing)
    if schedule == "karras":
        kw["use_karras_sigmas"] = True
    elif schedule == "exponential":
        kw["use_exponential_sigmas"] = True
    elif schedule in ("trailing", "sgm_uniform"):
        kw["timestep_spacing"] = "trailing"
    elif schedule in ("leading", "linspace"):
        kw["timestep_spacing"] = schedule
    if sampler == "ddim":
        kw.update(clip_sample=False, set_alpha_to_one=False)  # SD 1.x / 2.x configs' values
    if sampler == "dpmpp_2m_sde":
        kw["algorithm_type"] = "sde-dpmsolver++"
    return cls(**{**kw, **config})


def diffusers_trajectory(sampler, schedule, prediction, spacing, steps, config=None, **step_kw):
    sched = reference_scheduler(sampler, schedule, prediction, spacing, **(config or {}))
    if schedule == "flow_dynamic":
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (IMAGE_SEQ_LEN - 256)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(SHAPE, generator=gen) * getattr(sched, "init_noise_sigma", 1.0)
    out = []
    timesteps = sched.timesteps
    for k, t in enumerate(timesteps):
        model_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        kw = dict(step_kw)
        if "generator" in sched.step.__code__.co_varnames:
            kw["generator"] = gen
        x = sched.step(toy(model_in, t), t, x, **kw).prev_sample
        # Heun: a step is done when the scheduler is back in its first-order state (or at the very end)
        if sampler != "heun" or sched.state_in_first_order or k == len(timesteps) - 1:
            out.append(x.numpy().copy())
    return out


def our_trajectory(sampler, schedule, prediction, spacing, steps, gamma=None, config=None, eta=None):
    """Ours, with `config` (SchedulerConfig fields) and `eta` as a render passes them (sampler_options)."""
    info, schedule = resolve(sampler, schedule)
    cfg = SchedulerConfig(timestep_spacing=spacing, **(config or {}))
    options = sampler_options(sampler, cfg, gamma if gamma is not None else eta)
    sched = schedules.build(cfg, info.convention, schedule, steps, gamma=options.gamma, image_seq_len=IMAGE_SEQ_LEN)
    rng = TorchNoise(SEED)
    x = rng.randn(SHAPE) * np.float32(sched.init_noise_sigma)
    alpha_space = info.convention not in ("euler", "flow")
    denoise = make_denoiser(fake_unet, "flow" if sampler == "flow_euler" else prediction, sched.timestep_for,
                            lcm_timestep_scaling=cfg.timestep_scaling if sampler == "lcm" else None,
                            clip_x0=options.denoiser_clip)
    out = []

    def record(i, x, x0):
        sigma = float(sched.sigmas[i + 1])
        out.append(x / np.float32((sigma**2 + 1) ** 0.5) if alpha_space else x.copy())

    extra = {"targets": sched.targets} if sched.targets is not None else {}
    info.fn(denoise, x, sched.sigmas, noise=rng.randn, callback=record, **extra, **options.sampler)
    return out, sched


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    scale = max(float(np.abs(t).max()) for t in theirs)
    errors = [float(np.abs(o - t).max()) for o, t in zip(ours, theirs)]
    assert max(errors) <= RELATIVE_TOLERANCE * scale, f"per-step errors {errors}, trajectory scale {scale:.3g}"
    return max(errors) / scale


# (sampler, schedule, prediction types, step counts); spacing "leading" unless the schedule names one.
_SPACED = ("leading", "linspace", "trailing")
CASES = [
    *[("euler", s, p, n) for s in (*_SPACED, "karras", "exponential") for p in ("epsilon", "v_prediction", "sample")
      for n in (1, 4, 9)],
    *[("euler_a", s, p, n) for s in _SPACED for p in ("epsilon", "v_prediction") for n in (1, 5)],
    *[("heun", s, p, n) for s in (*_SPACED, "karras", "exponential") for p in ("epsilon", "v_prediction", "sample")
      for n in (1, 5)],
    *[("ddim", s, p, n) for s in _SPACED for p in ("epsilon", "v_prediction", "sample") for n in (1, 3, 5, 7)],
    *[(smp, s, p, n) for smp in ("dpmpp_2m", "dpmpp_2m_sde", "unipc")
      for s in (*_SPACED, "karras", "exponential") for p in ("epsilon", "v_prediction", "sample") for n in (1, 2, 6)],
    *[(smp, "karras", "epsilon", 20) for smp in ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "euler", "heun")],
    *[("lcm", "lcm", p, n) for p in ("epsilon", "v_prediction") for n in (1, 2, 4, 8)],
    *[("tcd", "lcm", p, n) for p in ("epsilon", "v_prediction") for n in (1, 2, 4, 8)],
    *[("flow_euler", s, "flow", n) for s in ("flow_shift", "flow_dynamic") for n in (1, 4, 28)],
    ("euler", "sgm_uniform", "epsilon", 4),
    ("ddim", "sgm_uniform", "v_prediction", 3),
]


@pytest.mark.parametrize("sampler,schedule,prediction,steps", CASES)
def test_matches_diffusers_step_by_step(sampler, schedule, prediction, steps):
    spacing = schedule if schedule in _SPACED else "leading"
    step_kw = {"eta": 0.3} if sampler == "tcd" else {}
    theirs = diffusers_trajectory(sampler, schedule, prediction, spacing, steps, **step_kw)
    ours, _ = our_trajectory(sampler, schedule, prediction, spacing, steps)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_discrete_schedule_follows_the_checkpoint_spacing(spacing):
    theirs = diffusers_trajectory("dpmpp_2m", spacing, "epsilon", spacing, 5)
    ours, _ = our_trajectory("dpmpp_2m", "discrete", "epsilon", spacing, 5)
    assert_same_trajectory(ours, theirs)


def test_tcd_without_gamma_is_deterministic_and_matches():
    theirs = diffusers_trajectory("tcd", "lcm", "epsilon", "leading", 4, eta=0.0)
    ours, _ = our_trajectory("tcd", "lcm", "epsilon", "leading", 4, gamma=0.0)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("spacing,prediction,steps", [("leading", "epsilon", 4), ("trailing", "v_prediction", 3),
                                                      ("linspace", "epsilon", 5)])
def test_ddim_with_eta_draws_diffusers_noise(spacing, prediction, steps):
    """eta = 1 (DDPM-like): the sigma_t(eta) noise is the ancestral split of the step, drawn as diffusers draws it."""
    theirs = diffusers_trajectory("ddim", spacing, prediction, spacing, steps, eta=1.0)
    ours, _ = our_trajectory("ddim", spacing, prediction, spacing, steps, eta=1.0)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_tcd_eta_is_its_gamma(gamma):
    theirs = diffusers_trajectory("tcd", "lcm", "epsilon", "leading", 4, eta=gamma)
    ours, _ = our_trajectory("tcd", "lcm", "epsilon", "leading", 4, eta=gamma)
    assert_same_trajectory(ours, theirs)


# The toy model's x0 leaves [-1, 1] at high noise, so these clamp on real steps.
@pytest.mark.parametrize("sampler,schedule,prediction,steps,config", [
    ("ddim", "leading", "epsilon", 5, dict(clip_sample=True)),
    ("ddim", "trailing", "v_prediction", 3, dict(clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=True)),
    ("heun", "karras", "epsilon", 4, dict(clip_sample=True, clip_sample_range=0.8)),
    ("lcm", "lcm", "epsilon", 4, dict(clip_sample=True)),
    ("lcm", "lcm", "v_prediction", 8, dict(clip_sample=True, clip_sample_range=0.5)),
])
def test_clip_sample_and_set_alpha_to_one_match_diffusers(sampler, schedule, prediction, steps, config):
    spacing = schedule if schedule in _SPACED else "leading"
    step_kw = {"eta": 1.0} if sampler == "ddim" and config.get("set_alpha_to_one") else {}
    theirs = diffusers_trajectory(sampler, schedule, prediction, spacing, steps, config=config, **step_kw)
    ours, _ = our_trajectory(sampler, schedule, prediction, spacing, steps, config=config, **step_kw)
    assert_same_trajectory(ours, theirs)
    unclipped, _ = our_trajectory(sampler, schedule, prediction, spacing, steps, **step_kw)
    assert np.abs(ours[-1] - unclipped[-1]).max() > 1e-3  # the settings did act


@pytest.mark.parametrize("sampler,eta,fragment", [
    ("euler", 0.5, "sampler 'euler' takes no eta; eta applies to ddim, tcd"),
    ("dpmpp_2m_sde", 0.0, "sampler 'dpmpp_2m_sde' takes no eta"),
    ("ddim", 1.5, "eta must be in [0, 1], got 1.5"),
])
def test_eta_where_a_sampler_takes_none_is_refused(sampler, eta, fragment):
    with pytest.raises(ValueError) as e:
        sampler_options(sampler, SchedulerConfig(), eta)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("sampler,schedule", [("euler", "karras"), ("dpmpp_2m", "karras"), ("dpmpp_2m", "exponential"),
                                              ("unipc", "karras"), ("ddim", "trailing"), ("euler", "linspace")])
def test_schedule_timesteps_and_initial_noise_match_diffusers(sampler, schedule):
    """The quirks themselves: integer vs fractional timesteps, and each scheduler's init_noise_sigma."""
    info, _ = resolve(sampler, schedule)
    spacing = schedule if schedule in _SPACED else "leading"
    ref = reference_scheduler(sampler, schedule, "epsilon", spacing)
    ref.set_timesteps(7)
    ours = schedules.build(SchedulerConfig(timestep_spacing=spacing), info.convention, schedule, 7)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float64), rtol=0, atol=1e-4)
    alpha_space = info.convention != "euler"
    init = float(ref.init_noise_sigma)
    # alpha-space schedulers start from unit noise at the first sigma, which is sqrt(sigma_0^2 + 1) in sigma space
    if hasattr(ref, "sigmas"):
        expected = (float(ref.sigmas[0]) ** 2 + 1) ** 0.5 if alpha_space else init
    else:  # DDIM: 1 / sqrt(alpha_cumprod) at the first timestep
        expected = float(ref.alphas_cumprod[int(ref.timesteps[0])]) ** -0.5
    assert ours.init_noise_sigma == pytest.approx(expected, rel=1e-6)
    if sampler == "dpmpp_2m" and schedule == "karras":
        assert np.all(ours.timesteps == np.round(ours.timesteps))  # DPM-Solver rounds Karras timesteps
    if sampler == "euler" and schedule == "karras":
        assert np.any(ours.timesteps != np.round(ours.timesteps))  # Euler passes them on fractional


def test_img2img_tails_match_diffusers_begin_index():
    """Starting part-way (strength) is the schedule's tail, run from scratch: diffusers' set_begin_index."""
    for sampler in ("dpmpp_2m", "unipc", "heun", "ddim"):
        info, schedule = resolve(sampler, "karras" if sampler != "ddim" else "trailing")
        spacing = "trailing" if sampler == "ddim" else "leading"
        ref = reference_scheduler(sampler, schedule, "epsilon", spacing)
        ref.set_timesteps(6)
        start = schedules.img2img_start(6, 0.5)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(start * ref.order)
        rng_t = torch.Generator().manual_seed(SEED)
        clean = torch.randn(SHAPE, generator=rng_t)
        noise = torch.randn(SHAPE, generator=rng_t)
        timesteps = ref.timesteps[start * ref.order:]
        x = ref.add_noise(clean, noise, timesteps[:1])
        for t in timesteps:
            x = ref.step(toy(ref.scale_model_input(x, t), t), t, x).prev_sample
        sched = schedules.build(SchedulerConfig(timestep_spacing=spacing), info.convention, schedule, 6)
        sched = sched.starting_at(start)
        rng = TorchNoise(SEED)
        x0, z = rng.randn(SHAPE), rng.randn(SHAPE)
        ours = x0 + z * np.float32(sched.init_noise_sigma)
        denoise = make_denoiser(fake_unet, "epsilon", sched.timestep_for)
        extra = {"targets": sched.targets} if sched.targets is not None else {}
        ours = info.fn(denoise, ours, sched.sigmas, noise=rng.randn, **extra) * np.float32(sched.final_scale)
        theirs = x.numpy()
        assert np.abs(ours - theirs).max() <= RELATIVE_TOLERANCE * max(1.0, float(np.abs(theirs).max())), sampler


# --- names and pairs -------------------------------------------------------------------------------------------


def test_every_sampler_names_its_paper_and_default_schedule():
    for name, info in SAMPLERS.items():
        assert info.fn.__doc__ and any(str(y) in info.fn.__doc__ for y in range(2019, 2026)), name
        assert info.schedules[0] in schedules.SCHEDULES and info.description


@pytest.mark.parametrize("sampler,schedule,fragment", [
    ("nope", None, "unknown sampler 'nope'; choose one of euler, euler_a"),
    ("euler", "nope", "unknown schedule 'nope'; choose one of discrete"),
    ("lcm", "karras", "sampler 'lcm' does not run on the 'karras' schedule; choose one of lcm"),
    ("ddim", "karras", "choose one of discrete, leading, linspace, trailing, sgm_uniform"),
    ("flow_euler", "trailing", "choose one of flow_shift, flow_dynamic"),
    ("euler", "lcm", "does not run on the 'lcm' schedule"),
])
def test_bad_names_and_pairs_get_one_line_naming_the_choices(sampler, schedule, fragment):
    with pytest.raises(ValueError) as e:
        resolve(sampler, schedule)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_presets_pick_the_distilled_recipes():
    for preset in PRESETS.values():
        assert resolve(preset.sampler, None, preset.schedule)[1] == preset.schedule
    assert resolve("dpmpp_2m", None, "lcm")[1] == "discrete"  # the default schedule does not fit: the sampler's
    assert {p.sampler for p in PRESETS.values()} <= set(SAMPLERS)


def test_cli_lists_samplers_and_refuses_bad_pairs_before_loading_anything(tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    listing = CliRunner().invoke(main, ["samplers"])
    assert listing.exit_code == 0
    for name in [*SAMPLERS, *schedules.SCHEDULES, *PRESETS]:
        assert any(line.split()[:1] == [name] for line in listing.output.splitlines()), name
    missing = tmp_path / "no-bundle-here"
    for args, fragment in [(["--sampler", "lcm", "--schedule", "karras"], "choose one of lcm"),
                           (["--schedule", "nope"], "unknown schedule 'nope'; choose one of discrete"),
                           (["--sampler", "nope"], "unknown sampler 'nope'; choose one of euler")]:
        result = CliRunner().invoke(main, ["render", "a cat", "-m", str(missing), *args])
        assert result.exit_code == 2, result.output
        assert fragment in result.output and result.output.count("\n") == 1
