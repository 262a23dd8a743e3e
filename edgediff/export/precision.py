"""Reduced-precision variants of an exported fp32 graph, each held to the fp32 graph by the parity gate.

The fp32 graph has already been proven against PyTorch (onnx.py); a converted graph is proven against that fp32
graph on the same inputs by gate.py, with a looser tolerance stated there per component and precision, and the
export fails past it.
Inputs and outputs keep the fp32 signature the manifest states, so the runtime feeds every precision alike.

fp16 keeps fp32 "islands" where half precision overflows or loses too much: every normalisation (GroupNorm is
exported as InstanceNormalization; its variance of 512-channel activations overflows fp16), and the attention
softmax where the model asks for upcast attention (SD 2.1) or where a causal mask's large negatives meet it (the
text encoder). ONNX Runtime's converter inserts the casts around each island.

T5 and the MMDiT transformers (SD3, FLUX) turn it around: only their linear layers run in fp16, and everything else
stays fp32 (norms, activations, attention products and softmax, the residual stream). Their activations outgrow
fp16: T5 v1.1's feed-forward outputs overflow it (transformers keeps T5's `wo` projections in fp32 and clamps the
residual stream), and diffusers clips FLUX's residual stream in fp16. T5's `wo` projections stay fp32 as well.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TypeGuard

import numpy as np
import onnx

from ..bundle import Conversion, FileEntry, Parity, SessionOptions, TensorSpec
from ..runtime import graph_cache
from . import PRECISIONS, gate
from .calibrate import Phase
from .graph_edit import drop_unread
from .lora_map import Follower
from .onnx import default_ort_options, save_graph

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
NORMALISATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization")


def fp16_islands(component: str, model: onnx.ModelProto, *, upcast_attention: bool) -> list[str]:
    """Op types kept in fp32 for this component."""
    islands = list(NORMALISATIONS)
    if component.startswith("text_encoder") or upcast_attention:
        islands.append("Softmax")
    present = {n.op_type for n in model.graph.node}
    return [op for op in islands if op in present]


LINEARS = ("MatMul", "Gemm", "Conv")
T5_FEED_FORWARD_OUT = "/DenseReluDense/wo/"  # T5's node names: transformers' module path
FP32_OUTSIDE_LINEARS = "everything but the linear layers"


def is_t5(model: onnx.ModelProto) -> bool:
    return any("/DenseReluDense/" in n.name for n in model.graph.node)


def fp32_outside_linears(component: str, model: onnx.ModelProto) -> list[str]:
    """For T5 and the MMDiT transformers: the names of every node kept fp32, all but the linear layers that read a
    weight (T5's feed-forward output projections excepted). Empty for the other graphs."""
    if component != "transformer" and not is_t5(model):
        return []
    weights = {t.name for t in model.graph.initializer}
    fp16 = {n.name for n in model.graph.node
            if n.op_type in LINEARS and any(i in weights for i in n.input[1:2]) and T5_FEED_FORWARD_OUT not in n.name}
    unnamed = [n.op_type for n in model.graph.node if not n.name]
    if unnamed:  # the converter blocks nodes by name: an unnamed one would silently turn fp16
        raise ValueError(f"{component}: {len(unnamed)} unnamed nodes ({unnamed[0]}, ...); cannot keep them fp32")
    return [n.name for n in model.graph.node if n.name not in fp16]


def drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Let fp32 nodes feed fp32 nodes directly. The converter casts every kept node's outputs to fp16 and its inputs
    back to fp32, so that between two kept nodes the tensor is still rounded to fp16, and what fp16 cannot hold
    (T5's or FLUX's residual stream past 65504) becomes infinite. Returns how many round trips were removed."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    fp32_inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}

    def cast_to(node: onnx.NodeProto | None, dtype: int) -> TypeGuard[onnx.NodeProto]:
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == dtype
                                                                   for a in node.attribute)

    def fp32(name: str) -> bool:  # a kept node's output (which the converter renames so), an fp32 input or cast
        return name.endswith("_cast_to_fp16") or name in fp32_inputs or cast_to(producers.get(name), FLOAT)

    renamed: dict[str, str] = {}
    for n in graph.node:
        down = producers.get(n.input[0]) if n.op_type == "Cast" and n.input else None
        if cast_to(n, FLOAT) and cast_to(down, FLOAT16) and fp32(down.input[0]):
            if n.output[0] in outputs:  # the graph's output keeps its name: its cast becomes fp32 -> fp32
                n.input[0] = down.input[0]
            else:
                renamed[n.output[0]] = down.input[0]
    if not renamed:
        return 0
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
    drop_unread(graph, "Cast")  # the round trips' casts back to fp32, then the fp16 casts that only they read
    return len(renamed)


def convert_fp16(
    component: str, path: Path, *, upcast_attention: bool = False, lora_map: Follower | None = None
) -> tuple[list[Path], SessionOptions, Conversion]:
    """Rewrite the fp32 graph at `path` as fp16 in place (fp32 inputs and outputs, fp32 islands).

    Returns the files written, the ONNX Runtime options, and what the manifest records about the conversion."""
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    graph = onnx.load(str(path), load_external_data=False)
    islands = fp16_islands(component, graph, upcast_attention=upcast_attention)
    kept_nodes = fp32_outside_linears(component, graph)
    if kept_nodes:
        islands = [FP32_OUTSIDE_LINEARS] + ([f"T5's feed-forward output projections ({T5_FEED_FORWARD_OUT})"]
                                            if is_t5(graph) else [])
    del graph
    # Given the path, the converter infers shapes on disk (in-memory inference stops at protobuf's 2 GiB).
    # keep_io_types: the runtime's feeds and outputs stay float32, as the manifest says; the casts are in-graph.
    model = convert_float_to_float16(str(path), keep_io_types=True, node_block_list=kept_nodes or None,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + ([] if kept_nodes else islands))
    drop_fp16_round_trips(model)
    written, weights = save_graph(model, path, external=lora_map.resolve(model) if lora_map else ())
    if lora_map is not None:
        written.append(lora_map.write(model))
    del model
    return written, default_ort_options(weights), Conversion(fp32_islands=tuple(islands))


def convert_component(
    component: str,
    precision: str,
    path: Path,
    outputs: tuple[TensorSpec, ...],
    fp32_ort_options: SessionOptions,
    fp32_files: tuple[FileEntry, ...],
    gate_feeds: list[dict[str, np.ndarray]],
    calibration_feeds: list[dict[str, np.ndarray]] | None = None,
    *,
    upcast_attention: bool = False,
    lora_map: bool = False,
    phase: Phase | None = None,
) -> tuple[list[Path], SessionOptions, Parity, Conversion]:
    """Convert the proven fp32 graph at `path` to `precision` in place and gate it against the fp32 graph; with
    `lora_map`, carry the component's LoRA map over to the converted graph (export/lora_map.py).

    Returns the files written, the ONNX Runtime options, the parity record, and what the manifest records about
    the conversion (fp32 islands; the quantization report's summary)."""
    from .quantize import WEIGHT_RANGE, quantize_int8
    from .weights4 import quantize_int4

    names = [t.name for t in outputs]
    # Through the graph cache: the fp32 gate left this graph optimised there, and that is what the fp32 bundle runs.
    reference = gate.run_graph(path, gate_feeds, fp32_ort_options, fp32_files, names)
    graph_cache.clear(path.parent)  # made from the fp32 graph, which is about to be replaced
    if precision == "fp16":
        follower = Follower(path) if lora_map else None
        written, options, details = convert_fp16(component, path, upcast_attention=upcast_attention,
                                                 lora_map=follower)
    elif precision == "int8":
        follower = Follower(path, WEIGHT_RANGE) if lora_map else None
        written, options, details = quantize_int8(path, calibration_feeds or [], phase, lora_map=follower)
    elif precision == "int4":  # LoRA is refused for the transformer families, the only ones int4 is for
        written, options, details = quantize_int4(path)
    else:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    check = gate.Check(component, f"the {precision} graph", "fp32", gate.REDUCED_TOLERANCES[precision][component])
    root = path.parent.parent  # the bundle being written: the graph cache keys by the files as the manifest lists them
    files = tuple(FileEntry.of(root, str(p.relative_to(root))) for p in written)
    parity = gate.check_graph(check, path, gate_feeds, reference, names, options, files=files)  # warms the cache
    return written, options, replace(parity, against="fp32 graph", samples=len(gate_feeds)), details
