"""The int8 U-Net experiments behind RESULTS' "int8 against fp32 after the float-output linears" section.

Graph variants are written beside the bundle's U-Net graph (sharing its weights file) and timed with
`benchmarks/session_options.py BUNDLE unet --level extended --graph VARIANT`; scales are placeholders, so these
variants are for timing only:

    python benchmarks/int8_variants.py float-out benchmarks/bundles/sd-turbo-int8  # needs a bundle exported
        # before float-output linears (commit 24fe3fd): drops each linear's output Q/DQ pair
    python benchmarks/int8_variants.py attn-qk benchmarks/bundles/sd-turbo-int8    # Q u8 x K s8 attention scores
    python benchmarks/int8_variants.py attention                                   # one attention, kernels alone
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _graph(bundle: Path) -> tuple[onnx.ModelProto, dict, dict]:
    model = onnx.load(str(bundle / "unet" / "model.onnx"), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return model, producers, consumers


def float_out(bundle: Path) -> tuple[onnx.ModelProto, int]:
    """Each QDQ MatMul whose output only goes through a Q/DQ pair feeds its consumers directly (float)."""
    model, producers, consumers = _graph(bundle)
    dropped, count = set(), 0
    for n in model.graph.node:
        if n.op_type != "MatMul" or not all(producers.get(i, n).op_type == "DequantizeLinear" for i in n.input):
            continue
        after = consumers.get(n.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        dqs = consumers.get(after[0].output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        for d in dqs:
            for c in consumers.get(d.output[0], []):
                c.input[:] = [n.output[0] if i == d.output[0] else i for i in c.input]
            dropped.add(id(d))
        dropped.add(id(after[0]))
        count += 1
    kept = [n for n in model.graph.node if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model, count


def _qdq(tensor: str, signed: bool, tag: str) -> tuple[list, list, str]:
    scale, zero = f"{tensor}_{tag}_scale", f"{tensor}_{tag}_zero"
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), scale),
             numpy_helper.from_array(np.array(0, np.int8) if signed else np.array(128, np.uint8), zero)]
    nodes = [helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_{tag}_q"]),
             helper.make_node("DequantizeLinear", [f"{tensor}_{tag}_q", scale, zero], [f"{tensor}_{tag}_dq"])]
    return nodes, inits, f"{tensor}_{tag}_dq"


def attn_qk(bundle: Path) -> tuple[onnx.ModelProto, int]:
    """Q/DQ (Q uint8, K int8) on the inputs of every attention-score MatMul (the one feeding Softmax)."""
    model, _, consumers = _graph(bundle)
    nodes, inits, count = [], [], 0
    for n in model.graph.node:
        if n.op_type == "MatMul" and any(c.op_type == "Softmax" for c in consumers.get(n.output[0], [])):
            (qa, ia, a), (qb, ib, b) = _qdq(n.input[0], False, "a"), _qdq(n.input[1], True, "b")
            nodes += qa + qb
            inits += ia + ib
            n.input[:] = [a, b]
            count += 1
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    return model, count


def attention(tokens: int = 4096, heads: int = 5, width: int = 64, runs: int = 5) -> None:
    """One SD-Turbo 64x64-level self-attention: unfused (as exported) vs ONNX Runtime's CPU MultiHeadAttention,
    and the score product Q K^T in float vs u8 x s8."""
    import onnxruntime as ort

    c = heads * width
    f = TensorProto.FLOAT
    shape4 = numpy_helper.from_array(np.array([1, tokens, heads, width], np.int64), "shape4")
    shape3 = numpy_helper.from_array(np.array([1, tokens, c], np.int64), "shape3")
    unfused = [helper.make_node("Reshape", [x, "shape4"], [x + "4"]) for x in "qkv"] + [
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vt"], ["o"]), helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "shape3"], ["y"])]
    fused = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)]
    qk_float = [helper.make_node("MatMul", ["qh", "kh"], ["y"])]
    (qa, ia, a), (qb, ib, b) = _qdq("qh", False, "a"), _qdq("kh", True, "b")
    qk_int8 = qa + qb + [helper.make_node("MatMul", [a, b], ["y"])]
    qkv_in = [helper.make_tensor_value_info(x, f, [1, tokens, c]) for x in "qkv"]
    qk_in = [helper.make_tensor_value_info("qh", f, [1, heads, tokens, width]),
             helper.make_tensor_value_info("kh", f, [1, heads, width, tokens])]
    rng = np.random.default_rng(0)
    cases = {
        "attention, unfused": (unfused, qkv_in, [shape4, shape3]),
        "attention, MultiHeadAttention": (fused, qkv_in, []),
        "Q K^T, float": (qk_float, qk_in, []),
        "Q K^T, u8 x s8": (qk_int8, qk_in, ia + ib),
    }
    for name, (nodes, inputs, inits) in cases.items():
        graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("y", f, None)], inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
                 for i in inputs}
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - began)
        print(f"{name}: best {min(times) * 1e3:.0f} ms, median {np.median(times) * 1e3:.0f} ms")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["float-out", "attn-qk", "attention"])
    p.add_argument("bundle", type=Path, nargs="?", help="an int8 bundle (for the graph variants)")
    args = p.parse_args(argv)
    if args.what == "attention":
        attention()
        return 0
    if args.bundle is None:
        p.error(f"{args.what} needs an int8 bundle")
    model, count = (float_out if args.what == "float-out" else attn_qk)(args.bundle)
    out = args.bundle / "unet" / f"{args.what}.onnx"
    onnx.save(model, str(out))  # beside model.onnx: the variant reads the same weights file
    print(f"{out}: {count} MatMuls changed; time it with benchmarks/session_options.py {args.bundle} unet "
          f"--level extended --graph {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
