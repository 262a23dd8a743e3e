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
    """An n x n x n float32 product through NumPy's BLAS (threads come from the environment)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return {"gflops": 2 * n**3 / best_seconds(lambda: a @ b, runs) / 1e9}


def int8_gops(n: int, runs: int, threads: int) -> dict:
    """An n x n x n uint8 x int8 product through ONNX Runtime's MatMulInteger, the kernel an int8 bundle's
    MatMulInteger / QLinearConv nodes use."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return {"gops": 2 * n**3 / best_seconds(lambda: session.run(None, feeds), runs) / 1e9}


MEASUREMENTS = {"float32": float32_gflops, "int8": int8_gops}


def main(argv: list[str]) -> int:
    kind, n, runs, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    print(json.dumps(MEASUREMENTS[kind](n, runs, threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
