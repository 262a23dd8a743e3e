"""save_graph: the exporter's per-tensor weight files are streamed into one data file (or inlined when small)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgediff.export import onnx as export_onnx  # noqa: E402


def _exported_like_a_big_model(folder):
    """A two-matmul graph saved as torch's exporter saves one past 2 GiB: each weight in a file of its own."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    stripped = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for t in stripped.graph.initializer:  # torch's exporter writes a location and no offset or length
        kept = [(e.key, e.value) for e in t.external_data if e.key == "location"]
        del t.external_data[:]
        for key, value in kept:
            t.external_data.add(key=key, value=value)
    onnx.save_model(stripped, str(folder / "model.onnx"))
    x = rng.standard_normal((2, 16)).astype(np.float32)
    return x, np.maximum(x @ w1, 0) @ w2


@pytest.mark.parametrize("threshold, files", [(0, 2), (1 << 30, 1)])
def test_per_tensor_files_become_one_data_file_or_inline(tmp_path, monkeypatch, threshold, files):
    x, expected = _exported_like_a_big_model(tmp_path / "traced")
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_THRESHOLD", threshold)
    model = onnx.load(str(tmp_path / "traced" / "model.onnx"), load_external_data=False)
    out = tmp_path / "bundle" / "model.onnx"
    out.parent.mkdir()
    written, weights = export_onnx.save_graph(model, out, source=tmp_path / "traced")
    assert weights == (16 * 32 + 32 * 8) * 4 and len(written) == files
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in written)
    if files == 2:
        assert written[1].stat().st_size >= weights  # every weight moved (tensors start on 64-byte boundaries)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_consumed_per_tensor_files_are_deleted_as_they_are_copied(tmp_path, monkeypatch):
    """The export's disk peak: each per-tensor file goes once its bytes are in the data file."""
    x, expected = _exported_like_a_big_model(tmp_path / "traced")
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    model = onnx.load(str(tmp_path / "traced" / "model.onnx"), load_external_data=False)
    out = tmp_path / "bundle" / "model.onnx"
    out.parent.mkdir()
    export_onnx.save_graph(model, out, source=tmp_path / "traced", consume=True)
    assert sorted(p.name for p in (tmp_path / "traced").iterdir()) == ["model.onnx"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
