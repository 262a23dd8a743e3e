"""4-bit weight-only quantization of the MatMul weights of a transformer or T5 graph, in plain ONNX.

onnxruntime's block-wise quantizer (MatMulNBitsQuantizer) in its QDQ form writes each weight as int4 with one fp32
scale per block of BLOCK_SIZE input rows, read by a standard `DequantizeLinear` (opset 21, `block_size`) that
feeds the unchanged `MatMul`. No contrib operator is in the bundle, so any ONNX backend reads it; ONNX Runtime's
CPU optimizer fuses each DequantizeLinear + MatMul pair into its `MatMulNBits` kernel at session creation, from
the "extended" level up (both levels the CPU backend uses), which the export checks (`fused_matmuls`).
docs/transformers.md has the measurements (quality, size, speed against fp32).

Activations stay fp32, so there is no calibration; the layers int8 keeps in float (timestep embeddings, the
attention products of two activations) stay float here too.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..bundle import Conversion, SessionOptions
from .onnx import DATA_SUFFIX, default_ort_options, graph_tensors, save_graph
from .quantize import REPORT_NAME, _quiet, float_layers, layer_report

# Rows of the weight (the MatMul's K axis) sharing one scale: onnxruntime's default. On FLUX.1's full-width blocks
# 32 rows (llama.cpp's Q4_0) leave a sixth less error (block update 16-17 % RMS against 20 %) but run a third
# slower in MatMulNBits, barely faster than fp32, for 0.75 bit more per weight (docs/flux_streaming.md).
BLOCK_SIZE = 128
OPSET = 21  # DequantizeLinear's int4 inputs and block_size attribute
SCHEME = (f"weight-only: MatMul weights int4 symmetric, one fp32 scale per {BLOCK_SIZE} input rows (DequantizeLinear "
          f"opset {OPSET}, fused into MatMulNBits by ONNX Runtime's CPU optimizer); activations fp32")


def quantize_int4(path: Path, block_size: int | None = None) -> tuple[list[Path], SessionOptions, Conversion]:
    """Quantize the MatMul weights of the fp32 graph at `path` to 4 bits, in place; `block_size` rows per scale
    other than BLOCK_SIZE only for measurements (SCHEME states BLOCK_SIZE).

    Returns the files written (the graph, its data, the layer report), the ONNX Runtime options, and the
    manifest's summary of the report."""
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # Converted before the weights are read: the converter keeps external-data references and stops at 2 GiB.
    model = onnx.load(str(path), load_external_data=False)
    keep = float_layers(model)
    model = version_converter.convert_version(model, OPSET)
    # The fp32 weights are never loaded whole (SD3.5 Medium's 9 GB beside the export's other work did not fit
    # 24 GB): each is read from its file as the quantizer reaches it, and what stays float is copied in chunks.
    fp32_data = _set_aside(model, path)
    gemms_as_matmuls(model, keep)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size or BLOCK_SIZE, is_symmetric=True,
                                          quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(keep), algo_config=config)
        quantizer.process()
    model = quantizer.model.model
    del quantizer
    if fp32_data is not None:  # what stayed float is copied from the set-aside file (onnx reads relative paths only)
        _point_at(model, fp32_data.name)
    written, weights = save_graph(model, path, source=path.parent)
    if fp32_data is not None:
        fp32_data.unlink()
    report = layer_report(model, keep, SCHEME)
    del model
    report_path = path.with_name(REPORT_NAME)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    # "all" re-lays out convolutions only (none here); "extended" fuses, and the cache keeps the fused graph
    options = default_ort_options(weights)
    summary = Conversion(report=report_path.name, scheme=SCHEME, quantized_layers=len(report["quantized"]),
                         float_layers=len(report["float"]))
    return [*written, report_path], options, summary


def _set_aside(model: onnx.ModelProto, path: Path) -> Path | None:
    """Move the graph's data file aside (save_graph writes the new one under its name) and point the external
    tensors at it by its absolute path, which the quantizer (onnx_ir) memory-maps tensor by tensor."""
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph_tensors(model)):
        return None
    data = path.with_name(path.name + DATA_SUFFIX)
    aside = data.with_name(".fp32-" + data.name)
    data.rename(aside)
    _point_at(model, str(aside.resolve()))
    return aside


def _point_at(model: onnx.ModelProto, location: str) -> None:
    for t in graph_tensors(model):  # the initializers, and Constant nodes' tensors the exporter put in the file too
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's values, read from its external file (by absolute path: _set_aside) where it has one."""
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    return np.fromfile(info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0))).reshape(
        tuple(tensor.dims))


def gemms_as_matmuls(model: onnx.ModelProto, keep: dict[str, str]) -> None:
    """Rewrite each Gemm on a constant weight (a linear on a 2-D input: FLUX's and SD3's modulation linears, a
    third of a FLUX double block's weights) as MatMul + Add, which the 4-bit quantizer takes; `keep`'s stay."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in keep or node.input[1] not in initializers
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = _array(initializers[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight
        name = node.input[1] + "_in_out"
        model.graph.initializer.append(numpy_helper.from_array(weight.copy(), name))
        replaced.add(node.input[1])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = node.output[0] + "_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name + "_MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=node.name + "_Add"))
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in replaced or t.name in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def fused_matmuls(path: Path, level: str) -> collections.Counter:
    """Op counts of the graph at `path` as ONNX Runtime's CPU optimizer leaves it at `level`: how many 4-bit
    DequantizeLinear + MatMul pairs became MatMulNBits."""
    import onnxruntime as ort

    from ..runtime.backends.ort import session_options

    options = session_options(ort, SessionOptions(graph_optimization_level=level,  # type: ignore[arg-type]
                                                  disable_prepacking=True), threads=1, lean=True)
    with tempfile.TemporaryDirectory() as scratch:
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        # the optimized graph's weights go beside it, not into the protobuf (2 GiB)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)
