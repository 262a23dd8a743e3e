"""ONNX Runtime's GPU backends without a GPU: the provider options each component gets from its manifest, the I/O
binding path (through a fake session, and through onnxruntime's real I/O binding on the CPU), a silent fallback,
`edgediff info`'s runtime lines and `edgediff bench --backend`."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.bench import harness, worker
from edgediff.bundle import read_manifest
from edgediff.cli import main
from edgediff.models import builtin_bundle
from edgediff.runtime import backends
from edgediff.runtime.backends import ort as ort_backend
from edgediff.runtime.backends import ort_providers
from edgediff.runtime.sessions import BackendError, SessionSettings
from edgediff.runtime.timing import StageTimer

PROMPT = "a red circle above a blue square"
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _components(bundle):
    roots = {"builtin": builtin_bundle(), "sd1": bundle("sd1"), "sdxl": bundle("sdxl")}
    return [(family, root, name, c) for family, root in roots.items()
            for name, c in read_manifest(root).components.items()]


def test_profile_shapes_cover_every_dynamic_input_of_every_family(bundle):
    for family, _, name, component in _components(bundle):
        shapes = ort_providers.profile_shapes(component)
        dynamic = [t for t in component.inputs if any(isinstance(d, str) for d in t.shape)]
        assert set(shapes) == {"min", "opt", "max"}, (family, name)
        for point, text in shapes.items():
            entries = dict(entry.split(":") for entry in text.split(","))
            assert list(entries) == [t.name for t in dynamic], (family, name)
            for t in dynamic:
                dims = [int(d) for d in entries[t.name].split("x")]
                expected = [d if isinstance(d, int) else getattr(component.axes[d], point) for d in t.shape]
                assert dims == expected, (family, name, t.name, point)


def test_the_builtin_unets_profile_literally():
    unet = read_manifest(builtin_bundle()).components["unet"]
    options = ort_providers.tensorrt_options(unet, Path("/b/engines/ort-trt/unet"), Path("/b/engines/ort-trt"))
    rest = "timestep:{0},encoder_hidden_states:{0}x20x128,timestep_cond:{0}x128"
    assert options["trt_profile_min_shapes"] == "sample:1x4x4x4," + rest.format(1)
    assert options["trt_profile_opt_shapes"] == "sample:1x4x8x8," + rest.format(1)
    assert options["trt_profile_max_shapes"] == "sample:8x4x16x16," + rest.format(8)
    assert options["trt_engine_cache_enable"] and options["trt_timing_cache_enable"]
    assert options["trt_engine_cache_path"] == "/b/engines/ort-trt/unet"
    assert options["trt_timing_cache_path"] == "/b/engines/ort-trt"
    assert not options["trt_fp16_enable"] and not options["trt_int8_enable"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_precision_flags_follow_the_components_record(bundle, precision):
    for _, _, _, component in _components(bundle):
        options = ort_providers.tensorrt_options(dataclasses.replace(component, precision=precision),
                                                 Path("e"), Path("t"), device_id=1)
        assert options["trt_fp16_enable"] == (precision == "fp16")
        assert options["trt_int8_enable"] == (precision == "int8")
        assert options["device_id"] == 1


def test_a_dynamic_axis_without_a_range_is_a_bundle_error():
    unet = read_manifest(builtin_bundle()).components["unet"]
    with pytest.raises(ort_providers.BundleError, match="no size range for axes batch"):
        ort_providers.profile_shapes(dataclasses.replace(unet, axes={k: v for k, v in unet.axes.items()
                                                                     if k != "batch"}))


def test_provider_chains():
    cuda = ort_providers.cuda_providers(device_id=2, lean=True)
    assert [p for p, _ in cuda] == GPU_PROVIDERS[1:]
    assert cuda[0][1] == {"device_id": 2, "cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1",
                          "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": True}
    assert ort_providers.cuda_options()["arena_extend_strategy"] == "kNextPowerOfTwo"
    unet = read_manifest(builtin_bundle()).components["unet"]
    chain = ort_providers.tensorrt_providers(unet, Path("e"), Path("t"))
    assert [p for p, _ in chain] == GPU_PROVIDERS


def test_engine_caches_live_in_the_bundle_else_in_the_users_cache(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = bundle_copy("sd1")
    unet = read_manifest(root).components["unet"]
    engines, timing = ort_providers.writable_cache_folders(root, "unet", unet)
    assert (engines, timing) == (root / "engines" / "ort-trt" / "unet", root / "engines" / "ort-trt")
    assert engines.is_dir()
    shutil.rmtree(root / "engines")
    (root / "engines").write_text("")  # the bundle's folder cannot be made (as on a read-only mount)
    engines, timing = ort_providers.writable_cache_folders(root, "unet", unet)
    assert timing == tmp_path / "cache" / "edgediff" / "ort-trt"
    assert engines.parent == timing and engines.name.startswith("unet-") and engines.is_dir()


class FakeOrtValue:
    def __init__(self, array, device, device_id):
        self.array, self.device, self.device_id = array, device, device_id


class FakeBinding:
    def __init__(self, session):
        self.session, self.inputs, self.outputs = session, {}, []

    def bind_ortvalue_input(self, name, value):
        assert isinstance(value, FakeOrtValue) and value.device == "cuda"
        self.session.log.append(("device", name))
        self.inputs[name] = value.array

    def bind_cpu_input(self, name, array):
        self.session.log.append(("host", name))
        self.inputs[name] = array

    def bind_output(self, name, device_type="cpu"):
        assert device_type == "cpu"
        self.outputs.append(name)

    def copy_outputs_to_cpu(self):
        return self.results


class FakeCudaSession:
    """An InferenceSession on CUDA as far as edgediff can tell: it runs on onnxruntime's CPU provider."""

    def __init__(self, path, log):
        self._real = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.log = log

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, names, feeds):
        self.log.append(("run", sorted(feeds)))
        return self._real.run(names, feeds)

    def io_binding(self):
        return FakeBinding(self)

    def run_with_iobinding(self, binding):
        binding.results = self._real.run(binding.outputs, binding.inputs)


@pytest.fixture
def fake_cuda(monkeypatch):
    log, uploads, chains = [], [], []
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: GPU_PROVIDERS)

    def upload(array, device, device_id):
        uploads.append((array.shape, device, device_id))
        return FakeOrtValue(array, device, device_id)

    monkeypatch.setattr(onnxruntime.OrtValue, "ortvalue_from_numpy", upload)
    real = ort_backend.graph_cache.open_session

    def open_session(ort, path, files, options, providers, cache):
        if providers[0][0] == "CPUExecutionProvider":  # the reference render
            return real(ort, path, files, options, providers, cache)
        chains.append(providers)
        return FakeCudaSession(path, log)

    monkeypatch.setattr(ort_backend.graph_cache, "open_session", open_session)
    return log, uploads, chains


def test_bound_feeds_are_uploaded_once_and_bound_on_the_device(fake_cuda):
    log, uploads, chains = fake_cuda
    ours = Pipeline.load(backend="cuda")(PROMPT, seed=3, output_type="np")
    reference = Pipeline.load()(PROMPT, seed=3, output_type="np")
    np.testing.assert_allclose(ours.images, reference.images, atol=1e-5, rtol=0)
    assert all(chain == ort_providers.cuda_providers() for chain in chains) and len(chains) >= 3
    # the U-Net's conditioning went up once for the render; every step bound it where it was, the rest from the host
    assert sorted(device for _, device, _ in uploads) == ["cuda", "cuda"] and {i for *_, i in uploads} == {0}
    steps = ours.plan.steps
    assert log.count(("device", "encoder_hidden_states")) == steps == log.count(("host", "sample"))
    assert log.count(("device", "timestep_cond")) == steps and ("device", "sample") not in log


def test_a_bound_feed_given_again_or_unknown_is_a_feed_error(fake_cuda):
    manifest = read_manifest(builtin_bundle())
    session = backends.open_session(builtin_bundle(), "unet", manifest.components["unet"], "cuda")
    with pytest.raises(ort_backend.FeedError, match="expected some of its inputs"):
        session.bind(nope=np.zeros(1, np.float32))
    call = session.bind(timestep_cond=np.zeros((1, 128), np.float32))
    with pytest.raises(ort_backend.FeedError, match="bound for this render"):
        call(timestep_cond=np.zeros((1, 128), np.float32))


class CpuBoundSession(ort_backend.OrtDeviceSession):
    """The GPU sessions' I/O binding path on onnxruntime's real I/O binding, with the CPU as the device."""

    backend = "cpu-bound"
    device_type = "cpu"


def test_the_io_binding_path_renders_what_the_cpu_renders_on_real_onnxruntime():
    backends.register_backend("cpu-bound", CpuBoundSession, "tests: I/O binding on the CPU")
    try:
        ours = Pipeline.load(backend="cpu-bound")(PROMPT, seed=5, output_type="np")
    finally:
        del backends.BACKENDS["cpu-bound"]
    reference = Pipeline.load()(PROMPT, seed=5, output_type="np")
    np.testing.assert_allclose(ours.images, reference.images, atol=1e-5, rtol=0)


class _FellBack:
    def get_providers(self):
        return ["CPUExecutionProvider"]


@pytest.mark.parametrize("backend, provider", [("cuda", "CUDAExecutionProvider"),
                                               ("ort-tensorrt", "TensorrtExecutionProvider")])
def test_a_silent_fallback_is_an_error_on_every_gpu_backend(monkeypatch, tmp_path, backend, provider):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: GPU_PROVIDERS)
    monkeypatch.setattr(ort_backend.graph_cache, "open_session", lambda *a, **k: _FellBack())
    root = Path(shutil.copytree(builtin_bundle(), tmp_path / "builtin"))  # the TensorRT backend makes its caches
    manifest = read_manifest(root)
    with pytest.raises(BackendError, match=f"fell back to CPUExecutionProvider instead of {provider}"):
        backends.open_session(root, "unet", manifest.components["unet"], backend, SessionSettings(device_id=0))


def test_info_shows_the_onnxruntime_distribution_and_providers():
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    tail = r.output.splitlines()[r.output.splitlines().index("runtime:"):]
    assert f"onnxruntime {onnxruntime.__version__}, from the distribution onnxruntime" in tail[1]
    assert tail[2] == f"  providers: {', '.join(onnxruntime.get_available_providers())}"
    assert "  backend cpu: ready" in tail
    assert any(line.startswith("  backend cuda: ") for line in tail)
    alone = CliRunner().invoke(main, ["info", "--runtime"])
    assert alone.exit_code == 0 and alone.output.splitlines() == tail


def test_info_warns_when_both_distributions_are_installed(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", lambda name: "1.0")
    r = CliRunner().invoke(main, ["info", "--runtime"])
    assert "onnxruntime 1.0, onnxruntime-gpu 1.0" in r.output and "share one module" in r.output


def test_bench_backend_option_is_parsed_and_checked(bundle, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("edgediff.bench.run_bench", lambda bundles, s, progress: seen.setdefault("s", s) and {})
    monkeypatch.setattr("edgediff.bench.report.format_report", lambda record: "")
    r = CliRunner().invoke(main, ["bench", str(bundle("sd1")), "--backend", "cuda, ort-tensorrt,cuda",
                                  "--compare", "diffusers-cuda"])
    assert r.exit_code == 0, r.output
    assert seen["s"].backends == ["cuda", "ort-tensorrt"] and seen["s"].compare == ["diffusers-cuda"]
    bad = CliRunner().invoke(main, ["bench", str(bundle("sd1")), "--backend", "cpu,gpu"])
    lines = bad.output.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1
    assert lines[0].endswith("--backend': unknown backend gpu; choose from " + ", ".join(backends.BACKENDS))


def test_bench_specs_for_gpu_backends_and_the_cuda_peer(bundle):
    notes: list[str] = []
    s = harness.Settings(backends=["cpu", "cuda"], compare=["diffusers-cuda"])
    specs = harness._engine_specs([bundle("sd1")], s, notes)
    assert notes == []
    name = bundle("sd1").name
    assert [label for label, _, _ in specs] == [f"edgediff-cpu:{name}", f"edgediff-cuda:{name}", "diffusers-cuda"]
    assert [spec.get("backend") for _, spec, _ in specs[:2]] == ["cpu", "cuda"]
    assert specs[2][1]["engine"] == "diffusers" and specs[2][1]["device"] == "cuda"
    single = harness._engine_specs([bundle("sd1")], harness.Settings(), notes)
    assert [label for label, _, _ in single] == [f"edgediff:{name}"]


def test_the_cuda_peer_synchronises_outside_and_at_the_end_of_each_stage():
    events = []

    class Model:
        def forward(self):
            events.append("forward")

    model, clock = Model(), StageTimer()
    worker._wrap_synchronised(model, "forward", lambda: events.append("sync"), after=True)
    clock.wrap(model, "forward", "steps")
    worker._wrap_synchronised(model, "forward", lambda: events.append("sync-before"), after=False)
    record = clock.time(model.forward)
    assert events == ["sync-before", "forward", "sync"] and len(record["steps"]) == 1


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(Path(__file__).parents[1] / "benchmarks" / "gpu" / "check.sh")], check=True)
