"""The command line: export -> info -> render, and one clear line with exit code 2 for each kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_export_info_render(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    r = run("export", checkpoint("sd2"), out, "--preset", "turbo")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "turbo" and manifest["prediction_type"] == "v_prediction"
    assert manifest["defaults"]["steps"] == 1 and manifest["defaults"]["guidance_scale"] == 0.0
    assert manifest["scheduler"]["timestep_spacing"] == "trailing"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    r = run("info", out, "--verify")
    assert r.exit_code == 0, r.output
    assert "sd2, preset turbo" in r.output and "unet: fp32" in r.output and "verified" in r.output

    png = tmp_path / "img" / "cat.png"
    r = run("render", "a red cat", "-m", out, "-o", png, "--size", "48x32", "--seed", "7", "--num-images", "2")
    assert r.exit_code == 0, r.output
    first, second = (png.with_name(f"cat-{i}.png") for i in (1, 2))
    with Image.open(first) as im:
        assert im.size == (48, 32)
        params = im.text["parameters"]
    assert params.startswith("a red cat\n") and "Seed: 7" in params and "Sampler: euler_a" in params
    assert second.is_file()


def test_export_refuses_existing_output_without_force(checkpoint, tmp_path):
    (tmp_path / "bundle").mkdir()
    r = run("export", checkpoint("sd1"), tmp_path / "bundle")
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    assert list((tmp_path / "bundle").iterdir()) == []


def test_export_rejects_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "src").mkdir()
    r = run("export", tmp_path / "src", tmp_path / "out")
    assert r.exit_code == 2 and "model_index.json" in r.output
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    from edgediff.export import gate

    monkeypatch.setattr(gate, "FP32_TOLERANCE", gate.Tolerance(relative=0.0))
    r = run("export", checkpoint("sd1"), tmp_path / "out")
    assert r.exit_code == 2 and "differs from PyTorch" in r.output
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import errno

    from edgediff.export import onnx

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_graph", full)
    r = run("export", checkpoint("sd1"), tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == "error: no space left on the device; free some space or write to another disk"
    assert list(tmp_path.iterdir()) == []


def _assert_bad(args, message, tmp_path):
    png = tmp_path / "never.png"
    r = run(*args, "-o", png) if args[0] == "render" else run(*args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.output
    assert "Traceback" not in r.output
    assert not png.exists()


def test_missing_bundle(tmp_path):
    _assert_bad(("render", "x", "-m", tmp_path / "nope"), "no such bundle folder", tmp_path)


def test_folder_without_manifest(tmp_path):
    _assert_bad(("render", "x", "-m", tmp_path), "not an edgediff bundle", tmp_path)


def test_missing_component_file(bundle_copy, tmp_path):
    b = bundle_copy("sd1")
    (b / "unet" / "model.onnx").unlink()
    _assert_bad(("render", "x", "-m", b), "missing bundle file", tmp_path)


def test_truncated_component_file(bundle_copy, tmp_path):
    b = bundle_copy("sd1")
    path = b / "vae_decoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-100])
    _assert_bad(("render", "x", "-m", b), "truncated", tmp_path)


def test_corrupt_component_file(bundle_copy, tmp_path):
    b = bundle_copy("sd1")
    path = b / "text_encoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)
    path.write_bytes(bytes(data))
    _assert_bad(("render", "x", "-m", b), "corrupt", tmp_path)


def test_verify_finds_corruption_that_the_fingerprint_skips(bundle_copy, tmp_path):
    b = bundle_copy("sd1")
    path = b / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    # a byte between the fingerprint's 16 sampled chunks
    middle = len(data) // 15 + 4096 + 10
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run("info", b).exit_code == 0
    _assert_bad(("info", b, "--verify"), "sha256", tmp_path)


def test_unknown_manifest_version(bundle_copy, tmp_path):
    b = bundle_copy("sd1")
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    _assert_bad(("render", "x", "-m", b), "format version 99", tmp_path)


@pytest.mark.parametrize("args,message", [
    (("--size", "40x40"), "not a multiple of 16"),
    (("--size", "big"), None),
    (("--steps", "0"), "steps must be at least 1"),
    (("--sampler", "nope"), "unknown sampler 'nope'"),
    (("--sampler", "euler", "--eta", "0.5"), "sampler 'euler' takes no eta; eta applies to ddim, tcd"),
    (("--eta", "0.5"), "sampler 'euler' takes no eta"),  # the bundle's default sampler, found after loading
])
def test_bad_render_arguments(bundle, tmp_path, args, message):
    if message is None:  # click's own parameter errors also exit 2
        r = run("render", "x", "-m", bundle("sd1"), *args, "-o", tmp_path / "never.png")
        assert r.exit_code == 2 and "WIDTHxHEIGHT" in r.output
        return
    _assert_bad(("render", "x", "-m", bundle("sd1"), *args), message, tmp_path)


def test_unreadable_init_image(bundle, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    _assert_bad(("render", "x", "-m", bundle("sd1"), "--image", bad), "cannot read the init image", tmp_path)


def test_image_to_image_from_the_command_line(bundle, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)).save(init)
    png = tmp_path / "out.png"
    r = run("render", "a cat", "-m", bundle("sd1"), "--image", init, "--strength", "0.5", "--steps", "4", "-o", png)
    assert r.exit_code == 0, r.output
    with Image.open(png) as im:
        assert im.size == (48, 64)  # the init image's size


def test_eta_from_the_command_line(bundle, tmp_path):
    png = tmp_path / "ddim.png"
    args = ("render", "a cat", "-m", bundle("sd1"), "--sampler", "ddim", "--steps", "3", "--size", "48x32")
    r = run(*args, "--eta", "1", "-o", png)
    assert r.exit_code == 0, r.output
    with Image.open(png) as im:
        assert "Eta: 1" in im.text["parameters"]
        noisy = np.asarray(im)
    r = run(*args, "-o", tmp_path / "plain.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "plain.png") as im:
        assert np.abs(np.asarray(im).astype(int) - noisy).max() > 0


def test_export_refuses_dynamic_thresholding(checkpoint, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoint("sd1"), src)
    config = src / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "thresholding": True}))
    _assert_bad(("export", src, tmp_path / "out"), "sets thresholding", tmp_path)
    assert not (tmp_path / "out").exists()


def _choices(command: str, option: str) -> list[str]:
    return list({p.name: p for p in main.commands[command].params}[option].type.choices)


def test_choices_come_from_the_catalogues():
    from edgediff.export import PRECISIONS
    from edgediff.runtime.noise import NOISE_KINDS
    from edgediff.runtime.pipeline import MEMORY_MODES
    from edgediff.runtime.sampler_catalogue import PRESETS, SAMPLERS
    from edgediff.runtime.schedules import SCHEDULES

    assert _choices("render", "sampler") == list(SAMPLERS) and _choices("render", "schedule") == list(SCHEDULES)
    assert _choices("render", "noise") == list(NOISE_KINDS) and _choices("render", "memory") == list(MEMORY_MODES)
    assert _choices("bench", "memory") == list(MEMORY_MODES)
    assert _choices("export", "preset") == list(PRESETS) and _choices("export", "precision") == list(PRECISIONS)
    help_text = run("render", "--help").output
    assert all(name in help_text for name in ("flow_euler", "flow_shift", "flow_dynamic"))


@pytest.mark.parametrize("option,catalogue", [("--sampler", "SAMPLERS"), ("--schedule", "SCHEDULES")])
def test_every_catalogued_name_is_accepted(tmp_path, option, catalogue):
    from edgediff.runtime import sampler_catalogue, schedules

    names = getattr(sampler_catalogue if catalogue == "SAMPLERS" else schedules, catalogue)
    for name in names:  # accepted: the render goes on to look for the (missing) bundle
        _assert_bad(("render", "x", "-m", tmp_path / "nope", option, name), "no such bundle folder", tmp_path)


@pytest.mark.parametrize("args,message", [
    (("render", "x", "--schedule", "cosine"), "unknown schedule 'cosine'; choose one of discrete"),
    (("render", "x", "--noise", "philox"), "unknown noise source 'philox'; choose one of torch, numpy"),
    (("render", "x", "--memory", "tiny"), "unknown memory mode 'tiny'; choose one of normal, low"),
    (("export", "src", "out", "--precision", "int2"), "unknown precision 'int2'; choose one of fp32, fp16, int8, int4"),
    (("export", "src", "out", "--preset", "hyper"), "unknown preset 'hyper'"),
])
def test_an_unknown_name_gets_one_line(tmp_path, args, message):
    _assert_bad(args, message, tmp_path)


def test_a_failed_write_leaves_no_image_of_a_set(bundle, tmp_path, monkeypatch):
    from edgediff.runtime import images

    written = []

    def write_then_fail(image, path, parameters):
        if written:
            raise OSError("No space left on device")
        written.append(path)
        real_write(image, path, parameters)

    real_write = images.write_png
    monkeypatch.setattr(images, "write_png", write_then_fail)
    r = run("render", "x", "-m", bundle("sd1"), "--num-images", "2", "--steps", "1", "-o", tmp_path / "cat.png")
    assert r.exit_code == 2 and "error: " in r.stderr and "No space left on device" in r.stderr
    assert written and list(tmp_path.iterdir()) == []
