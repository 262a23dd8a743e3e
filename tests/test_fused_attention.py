"""ONNX Runtime's fused CPU attention (runtime/backends/ort_attention.py): every attention the exporter writes is
fused, the fused graph computes what the exported one does, the bundle's files are left alone, and the graph cache
keeps the fused form under its own key."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgediff.bundle import load_manifest
from edgediff.runtime import graph_cache
from edgediff.runtime.backends import open_session
from edgediff.runtime.backends.ort_attention import MHA, fuse_attention
from edgediff.runtime.sessions import SessionSettings


def unet_feeds(component, batch=2, latent=(8, 12), sequence=77, seed=0):
    rng = np.random.default_rng(seed)
    dims = {"batch": batch, "latent_height": latent[0], "latent_width": latent[1], "sequence": sequence}
    feeds = {}
    for spec in component.inputs:
        shape = tuple(dims.get(d, 8) if isinstance(d, str) else d for d in spec.shape)
        value = rng.standard_normal(shape) if spec.dtype == "float32" else np.full(shape, 500)
        feeds[spec.name] = value.astype(spec.dtype)
    return feeds


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_exported_attention_is_fused_and_computes_the_same(bundle, family):
    root = bundle(family)
    unet = load_manifest(root).components["unet"]
    path = root / unet.file
    model = onnx.load(path, load_external_data=False)
    count = {op: sum(n.op_type == op for n in model.graph.node) for op in ("Softmax", "Transpose")}
    softmaxes = count["Softmax"]
    assert softmaxes > 0 and fuse_attention(model) == softmaxes
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    # the heads' split (Q, K, V) and merge went with them
    assert sum(n.op_type == "Transpose" for n in model.graph.node) == count["Transpose"] - 4 * softmaxes
    assert sum(n.op_type == MHA for n in model.graph.node) == softmaxes
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    fused = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = unet_feeds(unet)
    want, got = plain.run(None, feeds)[0], fused.run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_a_masked_attention_is_left_alone(bundle):
    """The CLIP text encoder adds a causal mask before its Softmax: not a form the rewrite knows, so untouched."""
    root = bundle("sd1")
    encoder = load_manifest(root).components["text_encoder"]
    model = onnx.load(root / encoder.file, load_external_data=False)
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


def cached_session(root, unet):
    """A CPU session through the graph cache, as a large convolutional graph's manifest options ask for it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return graph_cache.open_session(ort, root / unet.file, unet.files, options, ["CPUExecutionProvider"], cache=True)


def test_the_cpu_session_runs_the_fused_graph_and_caches_it_under_its_own_key(bundle_copy, monkeypatch):
    root = bundle_copy("sd1")
    unet = load_manifest(root).components["unet"]
    before = {p: p.read_bytes() for p in (root / "unet").iterdir() if p.is_file()}
    feeds = unet_feeds(unet)
    fused = cached_session(root, unet).run(None, feeds)[0]
    cached = [p for p in (root / "unet" / graph_cache.CACHE_FOLDER).iterdir() if p.is_dir()]
    assert ["mha1" in p.name.split("-") for p in cached] == [True]
    graph = onnx.load(cached[0] / "model.onnx", load_external_data=False)
    assert any(n.op_type == MHA for n in graph.graph.node)
    np.testing.assert_allclose(cached_session(root, unet).run(None, feeds)[0], fused, rtol=0, atol=0)  # from cache
    assert {p: p.read_bytes() for p in (root / "unet").iterdir() if p.is_file()} == before  # the bundle untouched
    monkeypatch.setenv(graph_cache.FUSION_SWITCH, "off")
    plain = cached_session(root, unet).run(None, feeds)[0]
    assert sorted("mha1" in p.name.split("-") for p in (root / "unet" / graph_cache.CACHE_FOLDER).iterdir()) == [
        False, True]
    np.testing.assert_allclose(fused, plain, atol=2e-5 * np.abs(plain).max())


def test_the_backend_fuses_without_the_cache_too(bundle):
    """A graph the export did not mark for caching (and EDGEDIFF_GRAPH_CACHE=off) still runs fused."""
    root = bundle("sd1")
    unet = load_manifest(root).components["unet"]
    feeds = unet_feeds(unet)
    got = open_session(root, "unet", unet, "cpu", SessionSettings())(**feeds)["out_sample"]
    graph = graph_cache.fused_graph(root / unet.file)
    assert graph is not None
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(root / "unet"))
    want = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def attention_graph(tokens: int, context: int, heads: int, dim: int, scale: float) -> onnx.ModelProto:
    """An attention as the exporter writes it, with constant shapes and a constant (non-default) scale per side."""
    from onnx import TensorProto, helper

    width = heads * dim
    inits = [helper.make_tensor("q_shape", TensorProto.INT64, [4], [1, tokens, heads, dim]),
             helper.make_tensor("kv_shape", TensorProto.INT64, [4], [1, context, heads, dim]),
             helper.make_tensor("out_shape", TensorProto.INT64, [3], [1, tokens, width]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "q_shape" if name == "q" else "kv_shape"], [name + "_r"]),
                  helper.make_node("Transpose", [name + "_r"], [name + "_t"], perm=perm)]
    nodes += [helper.make_node("Mul", ["q_t", "scale"], ["q_s"]), helper.make_node("Mul", ["k_t", "scale"], ["k_s"]),
              helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v_t"], ["o_t"]),
              helper.make_node("Transpose", ["o_t"], ["o_r"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o_r", "out_shape"], ["out"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, t, width])
              for n, t in (("q", tokens), ("k", context), ("v", context))]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, tokens, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_constant_scale_becomes_the_fused_nodes_scale():
    model = attention_graph(tokens=64, context=7, heads=3, dim=8, scale=0.9)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((1, t, 24)).astype(np.float32) for n, t in (("q", 64), ("k", 7), ("v", 7))}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert fuse_attention(model) == 1
    (node,) = model.graph.node
    assert node.op_type == MHA and {a.name: a for a in node.attribute}["scale"].f == pytest.approx(0.81)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
