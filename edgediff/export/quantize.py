"""int8 QDQ quantization of one exported graph, with onnxruntime's static quantizer, and its layer report.

The format (docs/int8.md says why, with the measurements): activations uint8 and symmetric (zero point 128, so a
TensorRT build can take the Q/DQ pairs as int8 losslessly), per tensor, MinMax over calibration trajectories;
weights int8, symmetric, per output channel, in 7 bits ([-64, 64]) so that ONNX Runtime's u8 x s8 kernels on CPUs
without VNNI never saturate their int16 pair sums. Left in float: the convolutions at the latent end of each graph,
the timestep-embedding layers, and the attention products of two activations.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..bundle import Conversion, SessionOptions
from .calibrate import Phase
from .lora_map import Follower
from .onnx import save_graph

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Node-name parts of the layers that turn the timestep (and SDXL's added conditions) into embeddings: tiny
# matmuls whose error shifts every block's bias at once.
EMBEDDING_LAYERS = ("time_embedding", "time_emb_proj", "add_embedding", "class_embedding", "time_proj",
                    "time_text_embed")  # SD3 / FLUX: timestep, pooled text and FLUX's guidance, embedded together
# The convolutions at the latent end of each graph, by their diffusers names (the VAE decoder's first structural
# conv is post_quant_conv, a 1x1; its conv_in, which widens the 4 latent channels, is as sensitive and as cheap).
LATENT_CONVS = ("/conv_in/", "/conv_out/", "/post_quant_conv/", "/quant_conv/")
REPORT_NAME = "quantization.json"
# int8 weights in 7 bits: what onnxruntime's reduce_range gives symmetric int8, and what run-time LoRA re-quantizes to
WEIGHT_RANGE = (-64, 64)
# ONNX Runtime's CPU kernels run these fused QDQ graphs fastest at the "extended" level with weights pre-packed
# (docs/int8.md).
# "extended": the QDQ fusions; cached per machine, so that a load reads the fused graph (docs/loading.md)
SCHEME = ("QDQ; activations uint8 symmetric (zero point 128), per tensor, MinMax over calibration trajectories; "
          "weights int8 symmetric in 7 bits ([-64, 64]), per output channel")
ORT_OPTIONS = SessionOptions(graph_optimization_level="extended", disable_prepacking=False, cache_optimized_graph=True)


def float_layers(model: onnx.ModelProto) -> dict[str, str]:
    """The quantizable nodes kept in float, each with the reason."""
    keep: dict[str, str] = {}
    initializers = {t.name for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if convs:
        keep[convs[0].name] = "first convolution"
        keep[convs[-1].name] = "last convolution"
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OPS and any(part in n.name for part in EMBEDDING_LAYERS):
            keep.setdefault(n.name, "timestep embedding")
        elif n.op_type == "Conv" and any(part in n.name for part in LATENT_CONVS):
            keep.setdefault(n.name, "convolution at the latent end")
        elif n.op_type == "MatMul" and not any(i in initializers for i in n.input):
            # Named, not left to MatMulConstBOnly: onnxruntime looks for "a constant B" up the producer path and
            # finds the to_k projection's weight behind the key's Reshape and Transpose.
            keep[n.name] = "product of two activations (attention)"
    return keep


REDUCTIONS = ("ReduceMin", "ReduceMax")


def _reductions(tensor: str) -> list[onnx.NodeProto]:
    return [onnx.helper.make_node(op, [tensor], [f"{tensor}__{op}"], keepdims=0, name=f"{tensor}__{op}")
            for op in REDUCTIONS]


def activation_ranges(path: Path, feeds: list[dict[str, np.ndarray]], scratch: Path,
                      phase: Phase | None = None):
    """Min and max of every float activation a quantizable node reads or writes, over `feeds` (MinMax calibration).

    What onnxruntime's MinMax calibrator computes, at a fraction of its memory (docs/int8.md): only the graph is
    loaded, and the augmented graph is written beside the original so that its weights stay the original's
    memory-mapped external data file. Returns the ranges as a file in onnxruntime's calibration-cache format, in
    `scratch`."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorsData,
        save_tensors_data,
    )

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    floats = {v.name for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    initializers = {t.name for t in model.graph.initializer}
    tensors = sorted({name for n in model.graph.node if n.op_type in QUANTIZED_OPS for name in (*n.input, *n.output)
                      if name in floats and name not in initializers})
    # Each tensor is reduced right where it is made (see the execution order below).
    wanted = set(tensors)
    produced = {o for n in model.graph.node for o in n.output}
    nodes = [r for name in tensors if name not in produced for r in _reductions(name)]  # graph inputs: first
    for node in model.graph.node:
        nodes.append(onnx.NodeProto.FromString(node.SerializeToString()))
        nodes.extend(r for name in node.output if name in wanted for r in _reductions(name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for name in tensors:
        for op in REDUCTIONS:
            model.graph.output.append(onnx.helper.make_tensor_value_info(f"{name}__{op}", onnx.TensorProto.FLOAT, []))
    augmented = path.with_name(f".calibrate-{path.name}")
    try:
        onnx.save(model, str(augmented))  # the initializers still point at path's data file, by relative name
        del model
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's calibrator
        options.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
        # Each reduction must run as soon as its tensor exists, so that the tensor is freed as in the plain graph;
        # ONNX Runtime's default order ran them late and kept every activation alive (docs/int8.md).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        names = [f"{t}__{op}" for t in tensors for op in REDUCTIONS]
        low = np.full(len(tensors), np.inf, np.float32)
        high = np.full(len(tensors), -np.inf, np.float32)
        for i, feed in enumerate(feeds):
            values = np.array(session.run(names, feed), dtype=np.float32).reshape(len(tensors), 2)
            low, high = np.minimum(low, values[:, 0]), np.maximum(high, values[:, 1])
            if phase:
                phase(f"{path.parent.name} activation ranges", i + 1, len(feeds))
        del session
    finally:
        augmented.unlink(missing_ok=True)
    ranges = TensorsData(CalibrationMethod.MinMax, {
        t: (np.array(lo, np.float32), np.array(hi, np.float32)) for t, lo, hi in zip(tensors, low, high)})
    cache = scratch / "ranges.json"
    save_tensors_data(ranges, cache)
    return cache


def quantize_int8(path: Path, feeds: list[dict[str, np.ndarray]], phase: Phase | None = None,
                  lora_map: Follower | None = None) -> tuple[list[Path], SessionOptions, Conversion]:
    """Quantize the fp32 graph at `path` in place, calibrated on `feeds`; `lora_map` follows the weights.

    Returns the files written (the graph, its data, the layer report), the ONNX Runtime options, and the
    manifest's summary of the report."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    keep = float_layers(onnx.load(str(path), load_external_data=False))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".quantize-") as scratch, _quiet():
        ranges = activation_ranges(path, feeds, Path(scratch), phase)
        if phase:
            phase(f"{path.parent.name} quantization", 0, 1)
        out = Path(scratch) / "model.onnx"
        quantize_static(
            str(path),
            str(out),
            None,  # the ranges come from the cache just written
            calibration_cache_path=str(ranges),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=True,  # weights in 7 bits: no int16 saturation on AVX2 (see the module's docstring)
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(keep),
            # the quantizer holds the model as it rewrites it; external data keeps a 3.4 GB U-Net under 2 GiB
            use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # MatMul weights are (in, out): per output
                # A linear's output feeds float ops (norms, GELU, attention, residual adds) in these graphs:
                # left float, ONNX Runtime runs MatMulIntegerToFloat instead of QLinearMatMul plus a
                # DequantizeLinear pass over the output (full-size SD-Turbo U-Net step ~5 % faster).
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )
        model = onnx.load(str(out))
    written, _ = save_graph(model, path, external=lora_map.resolve(model) if lora_map else ())
    if lora_map is not None:
        written.append(lora_map.write(model))
    if phase:
        phase(f"{path.parent.name} quantization", 1, 1)
    report = layer_report(model, keep, SCHEME)
    del model
    report_path = path.with_name(REPORT_NAME)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    summary = Conversion(
        report=report_path.name,
        scheme=report["scheme"],
        quantized_layers=len(report["quantized"]),
        float_layers=len(report["float"]),
    )
    return [*written, report_path], ORT_OPTIONS, summary


def layer_report(model: onnx.ModelProto, keep: dict[str, str], scheme: str) -> dict:
    """Which Conv / MatMul / Gemm nodes run on quantized weights (int8, or 4-bit: weights4.py), and which stayed
    float and why."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized, kept = [], []
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        if any(i in dequantized for i in n.input[1:2]):
            quantized.append({"node": n.name, "op": n.op_type})
            continue
        kept.append({"node": n.name, "op": n.op_type, "reason": keep.get(n.name, "not quantized by onnxruntime")})
    return {
        "scheme": scheme,
        "quantized": quantized,
        "float": kept,
    }


class _quiet:
    """onnxruntime's quantizer logs advice (pre-processing) at WARNING on the root logger for every graph."""

    def __enter__(self):
        self._level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.root.setLevel(self._level)
