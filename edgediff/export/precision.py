"""Reduced-precision variants of an exported fp32 graph, each held to the fp32 graph by the parity gate.

The fp32 graph has already been proven against PyTorch (onnx.py); a converted graph is proven against that fp32
graph on the same inputs by gate.py, with a looser tolerance stated there per component and precision, and the
export fails past it.
Inputs and outputs keep the fp32 signature the manifest states, so the runtime feeds every precision alike.

fp16 keeps fp32 "islands" where half precision overflows or loses too much: every normalisation (GroupNorm is
exported as InstanceNormalization; its variance of 512-channel activations overflows fp16), and the attention
softmax where the model asks for upcast attention (SD 2.1) or where a causal mask's large negatives meet it (the
text encoder). ONNX Runtime's converter inserts the casts around each island.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from ..bundle import Conversion, FileEntry, Parity, SessionOptions, TensorSpec
from ..runtime import graph_cache
from . import PRECISIONS, gate
from .calibrate import Phase
from .lora_map import Follower
from .onnx import default_ort_options, save_graph

NORMALISATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization")


def fp16_islands(component: str, model: onnx.ModelProto, *, upcast_attention: bool) -> list[str]:
    """Op types kept in fp32 for this component."""
    islands = list(NORMALISATIONS)
    if component.startswith("text_encoder") or upcast_attention:
        islands.append("Softmax")
    present = {n.op_type for n in model.graph.node}
    return [op for op in islands if op in present]


def convert_fp16(
    component: str, path: Path, *, upcast_attention: bool = False, lora_map: Follower | None = None
) -> tuple[list[Path], SessionOptions, Conversion]:
    """Rewrite the fp32 graph at `path` as fp16 in place (fp32 inputs and outputs, fp32 islands).

    Returns the files written, the ONNX Runtime options, and what the manifest records about the conversion."""
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    islands = fp16_islands(component, onnx.load(str(path), load_external_data=False), upcast_attention=upcast_attention)
    # Given the path, the converter infers shapes on disk (in-memory inference stops at protobuf's 2 GiB).
    # keep_io_types: the runtime's feeds and outputs stay float32, as the manifest says; the casts are in-graph.
    model = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + islands)
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
