"""One measurement of the machine's peak, in a process of its own: `python peak_child.py KIND N RUNS THREADS`
prints one JSON line. peak.py starts it with the thread count in the environment, so that it applies from the
start (BLAS reads it when NumPy is imported). Run as a plain script: it imports NumPy (and ONNX Runtime for int8),
not edgediff.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable

import numpy as np


def best_seconds(call: Callable[[], object], runs: int) -> float:
    call()  # the first call pays for allocation and kernel selection
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def float32_gflops(n: int, runs: int, threads: int) -> dict:
    """An n x n x n float32 product, the faster of NumPy's BLAS (threads come from the environment) and ONNX
    Runtime's MatMul (MLAS, what the float graphs run: on AVX-512 it outran OpenBLAS by 1.5x, and a peak below
    what the models reach reads as more than 100 % of it)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    flops = 2 * n**3
    numpy_gflops = flops / best_seconds(lambda: a @ b, runs) / 1e9
    session = _ort_product("MatMul", "FLOAT", b, "FLOAT", threads)
    ort_gflops = flops / best_seconds(lambda: session.run(None, {"a": a}), runs) / 1e9
    if ort_gflops > numpy_gflops:
        return {"gflops": ort_gflops, "source": "onnxruntime MatMul"}
    return {"gflops": numpy_gflops, "source": "numpy matmul"}


def int8_gops(n: int, runs: int, threads: int) -> dict:
    """An n x n x n uint8 x int8 product through ONNX Runtime's MatMulInteger, the integer GEMM an int8 bundle's
    quantized MatMuls and convolutions run; its weights in 7 bits, as the export writes them (docs/int8.md)."""
    rng = np.random.default_rng(0)
    session = _ort_product("MatMulInteger", "UINT8", rng.integers(-64, 64, (n, n), dtype=np.int8), "INT32", threads)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8)}
    return {"gops": 2 * n**3 / best_seconds(lambda: session.run(None, feeds), runs) / 1e9}


def _ort_product(op: str, a_type: str, weights: np.ndarray, out_type: str, threads: int):
    """An ONNX Runtime CPU session computing y = op(a, weights) for square `a` of the weights' size. The weights are
    a constant of the graph, as a model's are, so that the kernel pre-packs them as it does a model's (an input
    instead halved the int8 product's rate)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", getattr(TensorProto, a_type), ["n", "n"])],
        [helper.make_tensor_value_info("y", getattr(TensorProto, out_type), ["n", "n"])],
        [numpy_helper.from_array(weights, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


MEASUREMENTS = {"float32": float32_gflops, "int8": int8_gops}


def main(argv: list[str]) -> int:
    kind, n, runs, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    print(json.dumps(MEASUREMENTS[kind](n, runs, threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
