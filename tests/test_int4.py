"""4-bit weight-only bundles (`--precision int4`): the transformer's and T5's MatMul weights as int4 block-wise
DequantizeLinear (plain ONNX, opset 21) that ONNX Runtime's CPU optimizer fuses into MatMulNBits; rendered without
torch, close to the fp32 bundle's image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")

from edgediff.export.checkpoint import SourceError  # noqa: E402
from edgediff.export.convert import export_bundle  # noqa: E402
from edgediff.export.weights4 import BLOCK_SIZE, fused_matmuls  # noqa: E402

# Images of a 3-step render, pixels in 0..1: what the tiny FLUX.1-dev int4 bundle gives against fp32 (measured
# 37.7 dB, max pixel error 0.08); well above the transformer's gate floor since the VAE and CLIP stay fp32.
IMAGE_PSNR_DB = 30.0

RENDER = r"""
import sys
for name in ("torch", "diffusers", "transformers", "optimum"):
    sys.modules[name] = None  # makes `import name` raise ImportError
import numpy as np
from edgediff import Pipeline
for bundle, out in zip(sys.argv[1::2], sys.argv[2::2]):
    image = Pipeline.load(bundle)("a lighthouse at dusk", num_inference_steps=3, height=32, width=48, seed=2,
                                  output_type="np").images
    np.save(out, image)
"""


def _int4_weights(graph) -> list:
    """The DequantizeLinear nodes that read an int4 initializer in blocks along the weight's input rows."""
    int4 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT4}
    found = []
    for n in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "DequantizeLinear" and n.input[0] in int4:
            assert attrs == {"axis": 0, "block_size": BLOCK_SIZE}
            found.append(n)
    return found


def _weight_bytes(path) -> int:
    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


def test_flux_int4_bundle_is_plain_onnx_fused_at_load_and_renders_close_to_fp32(checkpoint, bundle, tmp_path):
    out = tmp_path / "int4"
    m = export_bundle(checkpoint("flux_dev"), out, precision="int4")
    assert {n: c.precision for n, c in m.components.items()} == {
        "text_encoder": "fp32", "text_encoder_2": "int4", "transformer": "int4", "vae_decoder": "fp32",
        "vae_encoder": "fp32"}
    for name in ("transformer", "text_encoder_2"):
        c = m.components[name]
        model = onnx.load(str(out / c.file), load_external_data=False)
        assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {("ai.onnx", 21)}
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no contrib operator in the bundle
        assert len(_int4_weights(model.graph)) == c.conversion.quantized_layers > 0
        # the modulation linears (Gemm in the fp32 graph) are quantized; only the timestep embedders stay float
        assert "Gemm" not in {n.op_type for n in model.graph.node if "time_text_embed" not in n.name}
        assert c.parity.psnr_db >= c.parity.min_psnr_db
        # at the level the CPU backend opens it, every 4-bit weight runs in ONNX Runtime's MatMulNBits kernel
        ops = fused_matmuls(out / c.file, c.ort_options.graph_optimization_level)
        assert ops["MatMulNBits"] == c.conversion.quantized_layers and ops["DequantizeLinear"] == 0
    for name in ("transformer", "text_encoder_2"):  # scales, embedding tables and the float layers included
        assert _weight_bytes(out / name / "model.onnx") < 0.45 * _weight_bytes(bundle("flux_dev") / name / "model.onnx")

    images = [tmp_path / "int4.npy", tmp_path / "fp32.npy"]
    done = subprocess.run([sys.executable, "-c", RENDER, str(out), str(images[0]), str(bundle("flux_dev")),
                           str(images[1])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    int4, fp32 = (np.load(p) for p in images)
    assert 10 * np.log10(1 / np.mean((int4 - fp32) ** 2)) > IMAGE_PSNR_DB
    assert not np.array_equal(int4, fp32)


def test_sd3_int4_quantizes_its_t5_and_transformer(checkpoint, tmp_path):
    m = export_bundle(checkpoint("sd3"), tmp_path / "int4", precision="int4")
    assert {n for n, c in m.components.items() if c.precision == "int4"} == {"transformer", "text_encoder_3"}
    assert all(m.components[n].parity.psnr_db >= m.components[n].parity.min_psnr_db
               for n in ("transformer", "text_encoder_3"))


def test_int4_is_refused_for_unet_families_before_any_work(checkpoint, tmp_path):
    with pytest.raises(SourceError, match="--precision int4: .* use int8"):
        export_bundle(checkpoint("sd1"), tmp_path / "out", precision="int4")
    assert not (tmp_path / "out").exists()


def test_weights_in_a_data_file_are_quantized_without_loading_them_whole(tmp_path):
    """A graph whose weights are in an external-data file (every full-size one) quantizes tensor by tensor from
    that file: the same graph as from weights held inline, the fp32 file gone afterwards, the result close to fp32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.export.onnx import save_graph
    from edgediff.export.weights4 import quantize_int4

    rng = np.random.default_rng(0)
    shift = rng.standard_normal(64).astype(np.float32)
    weights = {"w1": rng.standard_normal((256, 128)).astype(np.float32),
               "w2": rng.standard_normal((64, 128)).astype(np.float32),
               "b2": rng.standard_normal(64).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/proj/MatMul"),
         helper.make_node("Gemm", ["h", "w2", "b2"], ["g"], name="/linear/Gemm", transB=1),
         helper.make_node("Constant", [], ["c"], name="/shift/Constant",  # in the data file too, as torch writes it
                          value=numpy_helper.from_array(shift)),
         helper.make_node("Add", ["g", "c"], ["y"], name="/shift/Add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((4, 256)).astype(np.float32)
    outputs = {}
    for layout in ("inline", "external"):
        path = tmp_path / layout / "model.onnx"
        path.parent.mkdir()
        if layout == "external":  # (onnx's writer turns the model's own tensors into references: a copy)
            onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(path),
                            save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=0, convert_attribute=True)
        else:
            save_graph(onnx.ModelProto.FromString(model.SerializeToString()), path)
        assert (path.with_name("model.onnx.data").exists()) == (layout == "external")
        quantize_int4(path)
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no fp32 copy left
        outputs[layout] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert len(_int4_weights(onnx.load(str(path)).graph)) == 2
    np.testing.assert_array_equal(outputs["external"], outputs["inline"])
    fp32 = (x @ weights["w1"]) @ weights["w2"].T + weights["b2"] + shift
    assert np.abs(outputs["external"] - fp32).max() < 0.25 * np.abs(fp32).max()
