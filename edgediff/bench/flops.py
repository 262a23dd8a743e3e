"""FLOPs per call of an ONNX graph at given input shapes: 2 per multiply-add, for the ops that carry the work.

Convolutions and matrix products (float, QDQ-quantized or integer) are counted from the shapes ONNX shape
inference gives; elementwise ops, norms and softmax are left out (a few percent of a diffusion model's work).
"""

from __future__ import annotations

from math import prod
from pathlib import Path

CONV_OPS = {"Conv", "ConvInteger", "QLinearConv", "NhwcConv", "FusedConv"}
MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulNBits"}


def _shapes(model) -> dict[str, list[int]]:
    shapes = {}
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    for v in values:
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _fix_inputs(model, dims: dict[str, int]) -> None:
    for inp in model.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                if d.dim_param not in dims:
                    raise ValueError(f"no value for the dynamic axis {d.dim_param!r} of {inp.name}")
                d.dim_value = dims[d.dim_param]


def _weights_as_inputs(model) -> None:
    """Turn externally stored weights into graph inputs of the same type and shape: shape inference needs their
    shapes, not their gigabytes (small shape constants are stored inline and stay)."""
    from onnx import helper

    external = [t for t in model.graph.initializer if t.data_location == 1]  # TensorProto.EXTERNAL
    for t in external:
        model.graph.initializer.remove(t)
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _infer_shapes(model):
    """Concrete shapes for every tensor. onnx's own inference loses track at the Reshapes whose target shape the
    exporter computes at run time (every attention block), so ONNX Runtime's symbolic inference goes first."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # sympy missing, or an op it does not know: fall back, counting what onnx can see
        return onnx.shape_inference.infer_shapes(model, data_prop=True)


def count_flops(path: str | Path, dims: dict[str, int]) -> int:
    """FLOPs of one call of the model at `path`, its dynamic axes set from `dims` (e.g. batch, latent_height)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    _weights_as_inputs(model)
    _fix_inputs(model, dims)
    model = _infer_shapes(model)
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type in CONV_OPS:
            total += _conv_flops(node, shapes)
        elif node.op_type in MATMUL_OPS or node.op_type == "Gemm":
            total += _matmul_flops(node, shapes)
    return total


def _conv_flops(node, shapes) -> int:
    weight_index = 3 if node.op_type == "QLinearConv" else 1
    out = shapes.get(node.output[0])
    weight = shapes.get(node.input[weight_index])
    if out is None or weight is None:
        return 0
    # every output element takes (C_in / groups) * kernel multiply-adds: the weight's per-filter size
    return 2 * prod(out) * prod(weight[1:])


def _matmul_flops(node, shapes) -> int:
    b_index = 3 if node.op_type == "QLinearMatMul" else 1
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if a is None or out is None:
        return 0
    k = a[-1]
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    elif len(a) == 1:
        b = shapes.get(node.input[b_index])
        k = b[0] if b else 0
    return 2 * prod(out) * k
