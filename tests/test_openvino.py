"""The OpenVINO backend: the bundle's own ONNX on OpenVINO's CPU plugin, equal to ONNX Runtime's renders, its
compiled blobs cached outside the bundle."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from conftest import PIXEL_TOLERANCE

from edgediff.runtime.pipeline import Pipeline
from edgediff.runtime.sessions import BackendError

pytest.importorskip("openvino")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "edgediff" / "openvino"


def render(pipe, **kwargs):
    settings = dict(num_inference_steps=3, height=32, width=48, seed=7, output_type="np")
    return np.asarray(pipe("a red cat on a sofa", **{**settings, **kwargs}).images)


def test_the_builtin_model_renders_as_on_onnxruntime(own_cache):
    want = np.asarray(Pipeline.load(None)("a red circle above a blue square", output_type="np").images)
    got = np.asarray(Pipeline.load(None, backend="openvino")("a red circle above a blue square",
                                                             output_type="np").images)
    np.testing.assert_allclose(got, want, atol=1e-5)  # fp32 kept in fp32 (no bf16 on CPUs that have it)
    assert any(own_cache.iterdir())  # compiled once, kept for the next load, outside the (read-only) package
    again = np.asarray(Pipeline.load(None, backend="openvino")("a red circle above a blue square",
                                                               output_type="np").images)
    np.testing.assert_array_equal(again, got)


def test_a_bundle_renders_text_to_image_and_image_to_image_as_on_onnxruntime(bundle):
    from PIL import Image

    root = bundle("sd1")
    cpu, ov = Pipeline.load(root), Pipeline.load(root, backend="openvino")
    np.testing.assert_allclose(render(ov), render(cpu), atol=PIXEL_TOLERANCE)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    np.testing.assert_allclose(render(ov, image=image, strength=0.6), render(cpu, image=image, strength=0.6),
                               atol=PIXEL_TOLERANCE)


def test_without_openvino_the_backend_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(BackendError, match=r"pip install 'edgediff\[openvino\]'"):
        Pipeline.load(None, backend="openvino")


def test_each_call_runs_a_graph_compiled_for_its_shapes(bundle):
    """Static shapes per call (OpenVINO plans them better than dynamic axes): a new size or batch compiles again,
    renders still equal ONNX Runtime's, and the session holds one compiled graph at a time."""
    root = bundle("sd1")
    cpu, ov = Pipeline.load(root), Pipeline.load(root, backend="openvino")
    for size in (dict(height=32, width=48), dict(height=48, width=32, num_images_per_prompt=2),
                 dict(height=32, width=48)):
        np.testing.assert_allclose(render(ov, **size), render(cpu, **size), atol=PIXEL_TOLERANCE)
    unet = ov.session("unet")
    assert unet._shapes is not None and (2, 4, 4, 6) in unet._shapes  # the last call's (CFG: batch 2), alone
