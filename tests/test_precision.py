"""fp16 and int8 bundles: they render, hold their stated tolerances against the fp32 bundle, and say what they are."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edgediff import Pipeline  # noqa: E402
from edgediff.export.calibrate import Calibration  # noqa: E402
from edgediff.export.gate import psnr_db  # noqa: E402

# Whole renders (several U-Net steps and the decode) against the fp32 bundle, pixels in 0..1.
FP16_MAX_PIXEL_ERROR = 2e-2
# The int8 render measured 28.75 dB on AVX-512 VNNI and on AVX2 (qemu's Haswell model) alike: with 7-bit weights
# every x86 kernel computes the same integer sums (none saturates, test_int8_weights_leave_int16_headroom), so
# the floor holds on both kinds with the same margin. Full-range weights read 28.0 dB on VNNI and 23.9 on AVX2.
INT8_MIN_PSNR_DB = 25.0
CALIBRATION = Calibration(prompts=("a red cat", "a castle on a hill at dawn", "a bowl of fruit"), steps=2)
RENDER = dict(num_inference_steps=3, height=32, width=48, seed=5, output_type="np")


PHASES: list[tuple[str, int, int]] = []  # what the int8 export reported within its components


@pytest.fixture(scope="module")
def int8_bundle(checkpoint, tmp_path_factory):
    from edgediff.export.convert import export_bundle

    out = tmp_path_factory.mktemp("int8") / "bundle"
    export_bundle(checkpoint("sd1"), out, precision="int8", calibration=CALIBRATION,
                  phase=lambda *report: PHASES.append(report))
    return out


def test_the_int8_export_reports_each_phase(int8_bundle):
    """An int8 export of a full-size model spends many minutes inside a component: each phase says how far it is."""
    renders = len(CALIBRATION.prompts)
    assert [p for p in PHASES if p[0] == "calibration renders"] == [
        ("calibration renders", i + 1, renders) for i in range(renders)]
    for component in ("unet", "vae_decoder"):
        ranges = [p for p in PHASES if p[0] == f"{component} activation ranges"]
        assert ranges and ranges[-1][1] == ranges[-1][2] == len(ranges)
        assert [p[1:] for p in PHASES if p[0] == f"{component} quantization"] == [(0, 1), (1, 1)]


def _render(path, prompt="a red cat on a sofa"):
    return Pipeline.load(path)(prompt, **RENDER).images


def test_int8_bundle_renders_close_to_fp32(int8_bundle, bundle):
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    precisions = {name: c["precision"] for name, c in manifest["components"].items()}
    assert precisions == {"text_encoder": "fp32", "unet": "int8", "vae_decoder": "int8", "vae_encoder": "fp32"}
    assert manifest["provenance"]["calibration"]["samples"]["unet"] == {
        "calibration": 4,
        "gate": 2,
    }  # 2 steps per prompt
    fp32, int8 = _render(bundle("sd1")), _render(int8_bundle)
    assert psnr_db(fp32, int8) >= INT8_MIN_PSNR_DB
    assert np.abs(fp32 - int8).max() > 1e-4  # it really is a different (quantized) graph


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_int8_graph_is_qdq_with_a_layer_report(int8_bundle, component):
    c = json.loads((int8_bundle / "manifest.json").read_text())["components"][component]
    ops = [n.op_type for n in onnx.load(str(int8_bundle / c["file"])).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    report_file = f"{component}/{c['conversion']['report']}"
    assert report_file in [f["path"] for f in c["files"]]  # listed, so it is checked like the graph
    report = json.loads((int8_bundle / report_file).read_text())
    assert len(report["quantized"]) == c["conversion"]["quantized_layers"] > 10
    reasons = {f["node"]: f["reason"] for f in report["float"]}
    assert reasons.get("/unet/conv_in/Conv" if component == "unet" else "/post_quant_conv/Conv") == "first convolution"
    assert any(r == "last convolution" for r in reasons.values())
    if component == "unet":
        assert "product of two activations (attention)" in reasons.values()
        assert "timestep embedding" in reasons.values()
    assert c["parity"]["psnr_db"] >= c["parity"]["min_psnr_db"] and c["parity"]["against"] == "fp32 graph"


def test_int8_linears_write_float_so_onnxruntime_fuses_them(int8_bundle, tmp_path):
    """A quantized linear's output is not re-quantized: ONNX Runtime then runs MatMulIntegerToFloat (int8 inputs,
    float output) rather than QLinearMatMul followed by a DequantizeLinear pass over its output."""
    import onnxruntime as ort

    model = onnx.load(str(int8_bundle / "unet" / "model.onnx"), load_external_data=False)
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    linears = [n for n in model.graph.node if n.op_type == "MatMul" and "DequantizeLinear" in
               {p.op_type for p in model.graph.node if p.output[0] in n.input}]
    assert linears and all(consumers.get(n.output[0]) != "QuantizeLinear" for n in linears)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8_bundle / "unet" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node}
    assert "MatMulIntegerToFloat" in ops and "QLinearMatMul" not in ops


def test_int8_weights_leave_int16_headroom(int8_bundle):
    """CPUs without VNNI multiply u8 activations by s8 weights with VPMADDUBSW, which sums two products into a
    saturating int16: the weights must keep 2 * 255 * max|w| <= 32767, so that AVX2 renders what VNNI renders."""
    from onnx import numpy_helper

    for component in ("unet", "vae_decoder"):
        model = onnx.load(str(int8_bundle / component / "model.onnx"))
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert len(weights) > 10
        assert 2 * 255 * max(int(np.abs(w).max()) for w in weights) <= np.iinfo(np.int16).max, component


def test_int8_activations_are_symmetric_uint8(int8_bundle):
    """Zero point 128 everywhere: exactly int8 with zero point 0, shifted, so TensorRT can take the Q/DQ pairs."""
    from onnx import numpy_helper

    model = onnx.load(str(int8_bundle / "unet" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.uint8 and np.all(z == 128) for z in zero_points)


def test_fp16_bundle_from_the_command_line(checkpoint, bundle, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    out = tmp_path / "fp16"
    r = CliRunner().invoke(main, ["export", str(checkpoint("sd1")), str(out), "--precision", "fp16"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    for name, c in manifest["components"].items():
        assert c["precision"] == "fp16" and c["inputs"][0]["dtype"] in ("float32", "int64"), name
        assert "fp32_islands" in c["conversion"] and c["parity"]["max_abs_err"] <= c["parity"]["limit"]
    assert "InstanceNormalization" in manifest["components"]["unet"]["conversion"]["fp32_islands"]
    weights = [t for t in onnx.load(str(out / "unet" / "model.onnx")).graph.initializer if t.dims and len(t.dims) == 4]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)  # every conv weight is half
    fp32, fp16 = _render(bundle("sd1")), _render(out)
    assert np.abs(fp32 - fp16).max() <= FP16_MAX_PIXEL_ERROR


def test_a_conversion_past_its_tolerance_fails_loudly_and_writes_nothing(checkpoint, tmp_path, monkeypatch):
    from edgediff.export import gate
    from edgediff.export.convert import export_bundle
    from edgediff.export.gate import ParityError

    strict = {**gate.REDUCED_TOLERANCES["fp16"], "unet": gate.Tolerance(relative=1e-9, min_psnr_db=200.0)}
    monkeypatch.setitem(gate.REDUCED_TOLERANCES, "fp16", strict)
    with pytest.raises(ParityError, match="the fp16 graph differs from fp32"):
        export_bundle(checkpoint("sd1"), tmp_path / "out", precision="fp16")
    assert list(tmp_path.iterdir()) == []


def test_activation_ranges_match_onnxruntimes_minmax_calibrator(bundle, tmp_path):
    """edgediff computes MinMax ranges itself (a third of the memory); they must be the ones onnxruntime's own
    calibrator would hand the quantizer: the same tensors, the same min and max."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, load_tensors_data

    from edgediff.bundle import read_manifest
    from edgediff.export.quantize import QUANTIZED_OPS, activation_ranges

    root = bundle("sd1")
    path = root / read_manifest(root).components["vae_decoder"].file
    rng = np.random.default_rng(0)
    feeds = [{"latent_sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * s} for s in (0.5, 1, 2)]
    ours = load_tensors_data(activation_ranges(path, feeds, tmp_path))

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    calibrator = create_calibrator(path, list(QUANTIZED_OPS), augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(Reader())
    theirs = calibrator.compute_data()
    assert set(ours.data) == set(theirs.data) and len(ours.data) > 10
    for name in theirs.data:
        np.testing.assert_allclose(ours[name].range_value, np.array(theirs[name].range_value).reshape(2), rtol=1e-6)
    assert not list(path.parent.glob(".calibrate-*"))  # the augmented graph is not left in the bundle


def test_int8_graphs_load_from_the_graph_cache(int8_bundle):
    """The QDQ graphs' "extended" optimisation (their int8 fusions) is saved once per machine, as the fp32 graphs'
    "all" level is: the export's gate warmed it, so the bundle arrives with it."""
    from edgediff.runtime import graph_cache

    for component in ("unet", "vae_decoder"):
        keys = list(graph_cache.cached_graphs(int8_bundle / component))
        assert keys and all("ext" in key.split("-") for key in keys), keys
