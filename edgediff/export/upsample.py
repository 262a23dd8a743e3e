"""Nearest 2x upsampling followed by a 3x3 convolution, rewritten as four 2x2 convolutions at the low resolution.

The VAE decoder and the U-Net upsample by repeating each pixel 2x2 and then convolving at the high resolution. Every
output pixel of that convolution sees a 3x3 window of the repeated image, which covers only a 2x2 window of the
original: which 2x2 depends on the output pixel's phase (its row and column mod 2), and the 3x3 kernel's taps that
fall on the same original pixel add up. So each of the four phases is a 2x2 convolution over the original image,
with summed taps and its own padding, and DepthToSpace interleaves the four outputs into the high-resolution
image. Same result up to float rounding, 16 multiply-adds per output pixel instead of 36 (the SD VAE decoder: 2.51 ->
2.13 TFLOP at 512²), plain ONNX that every backend reads. Measured in docs/upsampling.md.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_edit import drop_unread

# A 3x3 tap at offset -1, 0 or +1 on the repeated image lands on the original pixel i - 1 or i (phase 0), or on i
# or i + 1 (phase 1): which kernel rows (or columns) add up into each of the 2x2 taps, per phase.
PHASE_TAPS = {0: ((0,), (1, 2)), 1: ((0, 1), (2,))}


def phase_kernels(weight: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The four (row phase, column phase) 2x2 kernels of a (out, in, 3, 3) kernel after nearest 2x upsampling."""
    kernels = {}
    for a, rows in PHASE_TAPS.items():
        by_rows = np.stack([weight[:, :, list(r), :].sum(axis=2) for r in rows], axis=2)
        for b, cols in PHASE_TAPS.items():
            kernels[a, b] = np.stack([by_rows[:, :, :, list(c)].sum(axis=3) for c in cols], axis=3)
    return kernels


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(_attribute(n, "value"))
    return None


def _nearest_2x(model: onnx.ModelProto, resize: onnx.NodeProto) -> bool:
    """Whether `resize` repeats each pixel 2x2 (torch's F.interpolate(scale_factor=2, mode="nearest") exported)."""
    if (_attribute(resize, "mode") != "nearest" or _attribute(resize, "coordinate_transformation_mode") != "asymmetric"
            or _attribute(resize, "nearest_mode", "round_prefer_floor") != "floor"):
        return False
    scales = _constant(model, resize.input[2]) if len(resize.input) > 2 and resize.input[2] else None
    return scales is not None and scales.tolist() == [1.0, 1.0, 2.0, 2.0]


def _plain_3x3(conv: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    return (conv.input[1] in weights and weights[conv.input[1]].data_type == onnx.TensorProto.FLOAT
            and list(_attribute(conv, "kernel_shape", [])) == [3, 3]
            and list(_attribute(conv, "pads", [0] * 4)) == [1, 1, 1, 1]
            and set(_attribute(conv, "strides", [1, 1])) == {1}
            and set(_attribute(conv, "dilations", [1, 1])) == {1}
            and _attribute(conv, "group", 1) == 1 and _attribute(conv, "auto_pad", "NOTSET") == "NOTSET")


def fold_upsampling_convs(model: onnx.ModelProto, source: Path | None = None, keep: Collection[str] = ()) -> int:
    """Rewrite every nearest-2x Resize whose only reader is a plain 3x3 Conv as four phase convolutions and a
    DepthToSpace, in place; returns how many were rewritten. Weights still in the exporter's external files are read
    from `source`; convolutions whose weight is named in `keep` (LoRA targets, which the runtime patches by name)
    stay as they are."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    weights = {t.name: t for t in graph.initializer}
    done = 0
    for resize in [n for n in graph.node if n.op_type == "Resize"]:
        (conv, *others) = readers.get(resize.output[0], [None])
        if (others or conv is None or conv.op_type != "Conv" or resize.output[0] in outputs
                or not _nearest_2x(model, resize) or not _plain_3x3(conv, weights)
                or len(readers[conv.input[1]]) > 1 or conv.input[1] in keep):
            continue
        weight = weights[conv.input[1]]
        _replace(graph, resize, conv, weight, numpy_helper.to_array(weight, str(source) if source else ""))
        done += 1
    if done:
        drop_unread(graph, "Constant")  # the Resizes' scales: ONNX Runtime would warn about each at every load
    return done


def _replace(graph: onnx.GraphProto, resize: onnx.NodeProto, conv: onnx.NodeProto, weight: onnx.TensorProto,
             kernel3x3: np.ndarray) -> None:
    base = conv.name or conv.output[0]
    bias = conv.input[2:3]
    phases = []
    new_nodes = []
    for (a, b), kernel in phase_kernels(kernel3x3).items():
        name = f"{weight.name}.phase{a}{b}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(kernel, dtype=np.float32), name))
        out = f"{base}/phase{a}{b}"
        new_nodes.append(helper.make_node("Conv", [resize.input[0], name, *bias], [out], name=out,
                                          kernel_shape=[2, 2], pads=[1 - a, 1 - b, a, b]))
        phases.append(out)
    new_nodes.append(helper.make_node("Concat", phases, [f"{base}/phases"], name=f"{base}/phases", axis=1))
    new_nodes.append(helper.make_node("DepthToSpace", [f"{base}/phases"], [conv.output[0]], name=base,
                                      blocksize=2, mode="DCR"))
    at = list(graph.node).index(conv)
    for n in (conv, resize):
        graph.node.remove(n)
    for offset, n in enumerate(new_nodes):
        graph.node.insert(at - 1 + offset, n)
    graph.initializer.remove(weight)
