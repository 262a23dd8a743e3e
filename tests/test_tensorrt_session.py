"""The native TensorRT backend against tests/fake_tensorrt.py: renders equal to the CPU backend's, bound feeds
uploaded once, CUDA graphs on static engines, and the one-line refusals (no engine, a stale one, a shape outside
every profile)."""

from __future__ import annotations

import fake_tensorrt
import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.build.profiles import BuildRequest
from edgediff.build.tensorrt import BuildOptions, build_engines
from edgediff.bundle import read_manifest
from edgediff.cli import main
from edgediff.runtime.backends import open_session
from edgediff.runtime.sessions import BackendError, FeedError

PROMPT = "a red circle above a blue square"


def render(bundle, backend, **kwargs):
    return Pipeline.load(bundle, backend=backend)(PROMPT, seed=5, output_type="np", **kwargs)


def test_a_static_engine_renders_as_the_cpu_does_with_one_upload_of_bound_feeds_and_a_cuda_graph(gpu, builtin_copy):
    build_engines(builtin_copy, BuildOptions(BuildRequest.make(size=(32, 32), batch=1)))
    ours = render(builtin_copy, "tensorrt")
    cpu = render(builtin_copy, "cpu")
    np.testing.assert_allclose(ours.images, cpu.images, atol=1e-4, rtol=0)
    steps = cpu.plan.steps
    # text encoder, vae decoder once each (a plain run, then a capture for a next call); the U-Net once plain,
    # then every further step replayed from its graph
    assert gpu.launches == steps - 1 and gpu.captures == 3
    hidden = 1 * 20 * 128 * 4  # encoder_hidden_states: bound for the render, sent once
    assert sum(1 for _, n in gpu.uploads if n == hidden) == 1
    assert gpu.executions == 1 + steps + 1


def test_a_dynamic_engine_renders_other_sizes_without_graphs(gpu, builtin_copy):
    build_engines(builtin_copy)
    ours = render(builtin_copy, "tensorrt", height=48, width=32, num_images_per_prompt=2)
    cpu = render(builtin_copy, "cpu", height=48, width=32, num_images_per_prompt=2)
    np.testing.assert_allclose(ours.images, cpu.images, atol=1e-4, rtol=0)
    assert gpu.captures == 0 and gpu.launches == 0


def test_buffers_stay_between_steps_and_are_freed_at_close(gpu, builtin_copy):
    build_engines(builtin_copy)
    m = read_manifest(builtin_copy)
    session = open_session(builtin_copy, "vae_decoder", m.components["vae_decoder"], backend="tensorrt")
    latents = np.zeros((1, 4, 8, 8), np.float32)
    session(latent_sample=latents)
    held = dict(gpu.memory)
    session(latent_sample=latents + 1)
    assert gpu.memory == held  # nothing reallocated for the same shape
    session.close()
    assert gpu.memory == {}


def test_a_shape_outside_every_profile_is_one_line_naming_the_build(gpu, builtin_copy):
    build_engines(builtin_copy, BuildOptions(BuildRequest.make(size=(32, 32))))
    m = read_manifest(builtin_copy)
    session = open_session(builtin_copy, "vae_decoder", m.components["vae_decoder"], backend="tensorrt")
    with pytest.raises(FeedError, match="outside every TensorRT engine's profile.*edgediff build") as e:
        session(latent_sample=np.zeros((1, 4, 16, 16), np.float32))
    assert "\n" not in str(e.value)


def test_no_engine_is_one_line_naming_the_build(gpu, builtin_copy):
    m = read_manifest(builtin_copy)
    with pytest.raises(BackendError, match=r"no TensorRT engine .*`edgediff build "):
        open_session(builtin_copy, "unet", m.components["unet"], backend="tensorrt")


@pytest.mark.parametrize("change, words", [
    ({"version": "10.9.0.1"}, "built for sm90 / TensorRT 10.8.0.43, this machine is sm90 / TensorRT 10.9.0.1"),
    ({"capability": (8, 6)}, "built for sm90 / TensorRT 10.8.0.43, this machine is sm86"),
])
def test_an_engine_from_another_gpu_or_tensorrt_is_refused_in_one_line(gpu, builtin_copy, monkeypatch, change,
                                                                        words):
    build_engines(builtin_copy)
    for k, v in change.items():
        setattr(gpu, k, v)
    fake_tensorrt.reinstall(monkeypatch, gpu)
    result = CliRunner().invoke(main, ["render", PROMPT, "-m", str(builtin_copy), "-o",
                                       str(builtin_copy / "x.png"), "--backend", "tensorrt"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and words in line and f"`edgediff build {builtin_copy}`" in line
    assert not (builtin_copy / "x.png").exists()


def test_an_engine_tensorrt_will_not_load_is_refused_in_one_line(gpu, builtin_copy, monkeypatch):
    build_engines(builtin_copy)
    for plan in (builtin_copy / "engines").glob("vae_decoder.*.plan"):
        plan.write_bytes(b"\0" * plan.stat().st_size)  # same size, so still listed: TensorRT's deserialise fails
    m = read_manifest(builtin_copy)
    session = open_session(builtin_copy, "vae_decoder", m.components["vae_decoder"], backend="tensorrt")
    with pytest.raises(BackendError, match="cannot load engine .*edgediff build"):
        session(latent_sample=np.zeros((1, 4, 8, 8), np.float32))


def test_a_re_exported_bundle_does_not_meet_its_old_engines(gpu, builtin_copy, monkeypatch):
    build_engines(builtin_copy)
    m = read_manifest(builtin_copy)
    component = m.components["unet"]
    other = type(component)(**{**component.__dict__, "files": tuple(
        type(f)(f.path, f.size, f.sha256, "0" * 64) for f in component.files)})
    with pytest.raises(BackendError, match="earlier export.*edgediff build"):
        open_session(builtin_copy, "unet", other, backend="tensorrt")
