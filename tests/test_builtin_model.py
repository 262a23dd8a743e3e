"""The built-in model: its training code's contracts with the runtime, and the shipped bundle's behaviour.

The bundle tests need edgediff/models/builtin/ (trained with `python -m edgediff.models.train` and exported
there); in a source tree without it they skip, saying so. The rest run anywhere the export extra is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgediff.models import BUILTIN_BUNDLE, builtin_bundle

needs_bundle = pytest.mark.skipif(
    builtin_bundle() is None,
    reason=f"no built-in bundle at {BUILTIN_BUNDLE} (train: python -m edgediff.models.train --out DIR "
    f"--bundle-out {BUILTIN_BUNDLE})",
)
MAX_BUNDLE_BYTES = 30 * 1024**2


# --- the training code agrees with the runtime ------------------------------------------------------------


def test_tokenizer_is_read_by_the_runtime_as_built(tmp_path):
    from edgediff.models import architecture as arch
    from edgediff.runtime.tokenizers import ClipTokenizer

    arch.save_tokenizer(tmp_path)
    tokenizer = ClipTokenizer.from_file(tmp_path / "tokenizer.json")
    ids = arch.token_ids()
    assert (tokenizer.max_length, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (
        arch.MAX_LENGTH, ids[arch.PAD], ids[arch.BOS], ids[arch.EOS])
    captions = ["a red circle above a blue square", "An image of a Green Triangle.", ""]
    assert np.array_equal(tokenizer.encode(captions).input_ids, arch.encode_captions(captions))
    assert tokenizer.unknown_words("a red zebra circle") == ["zebra"]
    assert tokenizer.unknown_words("a red circle, with a blue square on its left.") == []


def test_guidance_embedding_and_boundary_match_the_runtime():
    torch = pytest.importorskip("torch")
    from edgediff.models import diffusion
    from edgediff.runtime import denoise

    w = np.array([0.0, 1.5, 7.0, 9.0], np.float32)
    ours = diffusion.guidance_embedding(torch.from_numpy(w), 128).numpy()
    # float32 angles of up to 9000 rad carry ~1e-3 of rounding, whichever library takes the sine
    np.testing.assert_allclose(ours, denoise.guidance_embedding(w, 128), atol=2e-3)
    for t in (0, 19, 499, 999):
        c_skip, c_out = diffusion.consistency_boundary(torch.tensor([t]))
        expected = denoise.consistency_boundary(t, diffusion.LCM_TIMESTEP_SCALING)
        np.testing.assert_allclose([c_skip.item(), c_out.item()], expected, rtol=1e-5)


def test_lcm_timesteps_are_the_distillation_segments():
    """The runtime's `lcm` schedule must only visit timesteps the student was distilled at."""
    torch = pytest.importorskip("torch")
    from edgediff.bundle import SchedulerConfig
    from edgediff.models import architecture as arch
    from edgediff.models.diffusion import DdimSolver, NoiseSchedule
    from edgediff.runtime import schedules

    cfg = SchedulerConfig(original_inference_steps=arch.ORIGINAL_INFERENCE_STEPS)
    trained = set(DdimSolver(NoiseSchedule()).timesteps.tolist())
    for steps in (1, 2, 4, 8):
        assert set(schedules.lcm(cfg, steps).timesteps.astype(int).tolist()) <= trained
    np.testing.assert_allclose(NoiseSchedule().alphas_cumprod.numpy(), schedules.alphas_cumprod(cfg), rtol=1e-6)
    del torch


def test_distillation_targets_are_the_teachers_guided_ddim_solution():
    """The student learns the end of each pool trajectory: it must be what diffusers' DDIM (trailing spacing, the
    distillation's 20 segments) and classifier-free guidance at scale w + 1 make of the same noise."""
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    from edgediff.models import architecture as arch
    from edgediff.models.diffusion import DdimSolver, NoiseSchedule
    from edgediff.models.distill import solve

    torch.manual_seed(0)
    cfg = arch.TINY
    text_encoder = arch.build_text_encoder(cfg.text).eval()
    teacher = arch.build_unet(cfg.unet, cfg.text.hidden_size, student=False).eval()
    ids = arch.encode_captions(["a red circle above a blue square", "a green triangle"])
    size = teacher.config.sample_size
    noise = torch.randn(2, teacher.config.in_channels, size, size)
    w = torch.tensor([1.5, 3.0])
    states, ends = solve(text_encoder, teacher, ids, noise, w, DdimSolver(NoiseSchedule()), NoiseSchedule())

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type=arch.PREDICTION_TYPE, timestep_spacing="trailing", set_alpha_to_one=True)
    scheduler.set_timesteps(arch.ORIGINAL_INFERENCE_STEPS)
    with torch.no_grad():
        cond = text_encoder(input_ids=torch.from_numpy(ids)).last_hidden_state
        uncond = text_encoder(input_ids=torch.from_numpy(arch.encode_captions(["", ""]))).last_hidden_state
        x = noise
        for k, t in enumerate(scheduler.timesteps):
            np.testing.assert_allclose(states[:, -1 - k].numpy(), x.numpy(), atol=1e-4)  # states run 49 ... 999
            v_c, v_u = teacher(torch.cat([x, x]), t, torch.cat([cond, uncond])).sample.chunk(2)
            x = scheduler.step(v_u + (w + 1).view(-1, 1, 1, 1) * (v_c - v_u), t, x).prev_sample
    np.testing.assert_allclose(ends.numpy(), x.numpy(), atol=1e-4)

def test_the_trajectory_pool_is_reused_only_for_the_same_teacher(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from edgediff.models import architecture as arch
    from edgediff.models import data, distill

    torch.manual_seed(0)
    ds = data.load_or_make(tmp_path / "data", 20, 0)
    text_encoder = arch.build_text_encoder(arch.TINY.text)
    teacher = arch.build_unet(arch.TINY.unet, arch.TINY.text.hidden_size, student=False)
    path = tmp_path / "trajectories.npz"
    first = distill.make_pool(path, text_encoder, teacher, ds, 0, 3, (1.5, 3.5))
    assert first["states"].shape[:2] == (3, arch.ORIGINAL_INFERENCE_STEPS) and path.is_file()
    solved = []
    monkeypatch.setattr(distill, "solve", _counting(distill.solve, solved))
    again = distill.make_pool(path, text_encoder, teacher, ds, 0, 3, (1.5, 3.5))
    assert not solved and np.array_equal(again["ends"], first["ends"])
    with torch.no_grad():
        next(teacher.parameters()).add_(0.1)
    changed = distill.make_pool(path, text_encoder, teacher, ds, 0, 3, (1.5, 3.5))
    assert solved and not np.array_equal(changed["ends"], first["ends"])


def _counting(fn, calls: list):
    def wrapper(*args):
        calls.append(1)
        return fn(*args)

    return wrapper


def test_caption_augmentations_keep_captions_well_formed():
    from edgediff.models import architecture as arch
    from edgediff.models import data

    ids = arch.token_ids()
    tokens = arch.encode_captions(["a red circle above a blue square"] * 2000)
    out = data.augment(tokens, np.random.default_rng(0))
    for row in out:
        eos = np.flatnonzero(row == ids[arch.EOS])
        assert row[0] == ids[arch.BOS] and len(eos) == 1 and (row[eos[0] + 1:] == ids[arch.PAD]).all()
    assert 0.05 < (out[:, 1] == ids[arch.EOS]).mean() < 0.15  # null prompts: bos, eos, padding
    assert (out == ids[arch.UNK]).any() and (out == ids["."]).any()


def test_scene_labels_are_canonical():
    """The auxiliary loss's targets: a scene and its mirror statement ("b right of a") get the same label."""
    from edgediff.models.data import LABEL_CLASSES, scene_labels
    from edgediff.models.shapes import Scene, ShapeObject

    red, blue = ShapeObject("circle", "red"), ShapeObject("square", "blue")
    labels = scene_labels([Scene((red, blue), "left_of"), Scene((blue, red), "right_of"), Scene((red,), None),
                           Scene((blue, red), "below")])
    assert (labels[0] == labels[1]).all() and labels[0][0] == 1
    assert labels[2].tolist() == [0, 0, 0, LABEL_CLASSES[3] - 1, LABEL_CLASSES[4] - 1]
    assert labels[3].tolist()[:3] == [2, 0, 0]  # canonically "red circle above blue square"
    assert (labels < np.array(LABEL_CLASSES)).all()


def test_bundle_path_is_found_without_torch():
    script = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'): sys.modules[name] = None\n"
        "import edgediff.models as m\n"
        "print(m.BUILTIN_BUNDLE, m.builtin_bundle())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_tiny_training_run_exports_a_bundle_that_renders(tmp_path):
    """Every stage of the training command on a toy-sized model, then the exported bundle renders."""
    pytest.importorskip("diffusers")
    from edgediff.models import train
    from edgediff.runtime.pipeline import Pipeline

    args = ["--out", str(tmp_path / "run"), "--preset", "tiny", "--n-images", "200", "--threads", "1"]
    for stage in ("vae", "teacher", "distill"):
        args += [f"--{stage}-steps", "3", f"--{stage}-batch", "4"]
    assert train.main(args + ["--distill-trajectories", "6"]) == 0
    assert (tmp_path / "run" / "student" / "unet").is_dir()
    assert not (tmp_path / "run" / "trajectories.npz").exists()  # the pool only lives while its stage runs
    out = Pipeline.load(tmp_path / "run" / "bundle")("a red circle", output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


# --- the shipped bundle -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline():
    from edgediff.runtime.pipeline import Pipeline

    return Pipeline.load(BUILTIN_BUNDLE)


@needs_bundle
def test_shipped_bundle_is_small_and_lcm_by_default(pipeline):
    m = pipeline.manifest
    assert (m.preset, m.defaults.sampler, m.defaults.steps) == ("lcm", "lcm", 4)
    assert (m.defaults.width, m.defaults.height) == (32, 32) and m.guidance_embedding_dim
    assert sum(f.size for f in m.all_files()) <= MAX_BUNDLE_BYTES


@needs_bundle
@pytest.mark.parametrize(
    "prompt, seed",
    [("a red circle above a blue square", 0), ("a green triangle", 0), ("a yellow square left of a purple circle", 1)],
)
def test_shipped_bundle_draws_the_prompt(pipeline, prompt, seed):
    from edgediff.models.detector import check
    from edgediff.models.shapes import parse_caption

    image = pipeline(prompt, seed=seed, output_type="np").images[0]
    assert check(image, parse_caption(prompt)).all_ok, prompt


@needs_bundle
def test_unknown_words_render_anyway_and_are_named(pipeline):
    out = pipeline("a shiny red circle on a wooden table", seed=0, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
    named = [w.rsplit(": ", 1)[-1].split(", ") for w in out.warnings if "does not know" in w]
    assert named == [["shiny", "wooden", "table"]], out.warnings


@needs_bundle
def test_shipped_bundle_renders_without_torch():
    script = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'): sys.modules[name] = None\n"
        "from edgediff.models import builtin_bundle\n"
        "from edgediff.runtime.pipeline import Pipeline\n"
        "out = Pipeline.load(builtin_bundle())('a blue triangle', output_type='np')\n"
        "print(list(out.images.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [1, 32, 32, 3]


def test_a_run_folder_takes_settings_newer_than_itself_but_refuses_contradictions(tmp_path):
    """A run started before a setting existed can still be given it; it is then stored."""
    import json
    from dataclasses import asdict

    from edgediff.models.train import RunConfig, _config, _parse

    stored = {k: v for k, v in asdict(RunConfig()).items() if k != "distill_trajectories"}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert _config(_parse(["--out", str(tmp_path), "--distill-trajectories", "700"])).distill_trajectories == 700
    assert _config(_parse(["--out", str(tmp_path)])).distill_trajectories == 700
    with pytest.raises(SystemExit, match="other settings"):
        _config(_parse(["--out", str(tmp_path), "--teacher-steps", "1"]))


def test_a_run_folder_from_an_older_recipe_is_refused(tmp_path):
    import json
    from dataclasses import asdict

    from edgediff.models.train import RunConfig, _config, _parse

    (tmp_path / "config.json").write_text(json.dumps({**asdict(RunConfig()), "refine_steps": 700}))
    with pytest.raises(SystemExit, match="older recipe.*refine_steps"):
        _config(_parse(["--out", str(tmp_path)]))
