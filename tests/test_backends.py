"""The backend registry: a backend is a class and a registry line; the pipeline opens sessions only through it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.cli import main
from edgediff.runtime import backends
from edgediff.runtime.backends import ort as ort_backend
from edgediff.runtime.sessions import BackendError, SessionBase

PROMPT = "a red circle above a blue square"


class NumpySession(SessionBase):
    """A toy backend: the component's ONNX graph run by onnx's NumPy reference evaluator, in-process. It also
    records what it was bound to and called with."""

    log: list = []

    def __init__(self, root, name, component, settings):
        from onnx.reference import ReferenceEvaluator

        super().__init__(name, component.inputs, component.outputs)
        self._graph = ReferenceEvaluator(str(root / component.file))

    def run(self, feeds):
        NumpySession.log.append((self.name, "call", sorted(feeds)))
        names = [t.name for t in self.outputs]
        return dict(zip(names, self._graph.run(names, feeds)))

    def bind(self, **fixed):
        NumpySession.log.append((self.name, "bind", sorted(fixed)))
        return super().bind(**fixed)


@pytest.fixture
def numpy_backend():
    pytest.importorskip("onnx")
    backends.register_backend("numpy", NumpySession, "onnx's reference evaluator (tests)")
    NumpySession.log = []
    yield NumpySession.log
    del backends.BACKENDS["numpy"]


def test_a_registered_backend_renders_without_touching_pipeline(numpy_backend):
    theirs = Pipeline.load(backend="numpy")(PROMPT, seed=3, output_type="np")
    ours = Pipeline.load()(PROMPT, seed=3, output_type="np")
    np.testing.assert_allclose(theirs.images, ours.images, atol=1e-4, rtol=0)
    # the U-Net's conditioning was bound once for the render; each step fed only what changes
    unet = [entry for entry in numpy_backend if entry[0] == "unet"]
    assert unet[0] == ("unet", "bind", ["encoder_hidden_states", "timestep_cond"])
    steps = [entry for entry in unet if entry[1] == "call"]
    assert len(steps) == ours.plan.steps and all(e[2] == sorted(
        ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]) for e in steps)
    assert [e for e in unet if e[1] == "bind"] == unet[:1]


def test_an_unknown_backend_is_one_line():
    with pytest.raises(BackendError, match="unknown backend 'nope'; choose one of cpu"):
        Pipeline.load(backend="nope")


def test_a_provider_onnxruntime_lacks_is_one_line_and_exit_2(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    r = CliRunner().invoke(main, ["render", PROMPT, "--backend", "cuda", "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "needs CUDAExecutionProvider, which this onnxruntime" in lines[0]
    assert "onnxruntime-gpu" in lines[0] and "re-export" not in lines[0]
    assert not (tmp_path / "o.png").exists()


class _FellBack:
    """An InferenceSession as onnxruntime returns it when CUDA could not start: on the CPU provider alone."""

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_a_silent_fallback_to_the_cpu_is_an_error(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort_backend.graph_cache, "open_session", lambda *a, **k: _FellBack())
    with pytest.raises(BackendError, match="fell back to CPUExecutionProvider instead of CUDAExecutionProvider"):
        Pipeline.load(backend="cuda")


def test_missing_gpu_libraries_are_an_environment_error(monkeypatch):
    import onnxruntime

    def fail(*args, **kwargs):
        raise RuntimeError("Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: "
                           "cannot open shared object file: No such file or directory")

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort_backend.graph_cache, "open_session", fail)
    with pytest.raises(BackendError, match="CUDAExecutionProvider cannot start: .*libcublasLt") as e:
        Pipeline.load(backend="cuda")
    assert "re-export" not in str(e.value)


def test_the_cpu_backend_applies_the_manifests_options_and_gpu_backends_do_not():
    assert ort_backend.OrtCpuSession.uses_manifest_options
    assert not ort_backend.OrtCudaSession.uses_manifest_options
    assert not ort_backend.OrtTensorrtSession.uses_manifest_options
    assert ort_backend.OrtCudaSession.provider == "CUDAExecutionProvider"
    assert set(backends.BACKENDS) >= {"cpu", "cuda", "ort-tensorrt"}
