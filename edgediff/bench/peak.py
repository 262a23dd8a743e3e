"""The machine's own limit on the benchmark's threads: a large float32 matrix product through NumPy, and a large
int8 product through ONNX Runtime's integer kernels (what an int8 bundle's MatMulInteger / QLinearConv use).

Each is measured in a child process so that the thread count applies from the start (BLAS reads it at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_FLOAT32 = r"""
import json, sys, time
import numpy as np
n, runs = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(runs))
print(json.dumps({"gflops": 2 * n**3 / best / 1e9}))
"""

_INT8 = r"""
import json, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
n, runs, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "peak",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]), helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
options = ort.SessionOptions()
if threads:
    options.intra_op_num_threads = threads
s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
s.run(None, feeds)
best = min((lambda t: (s.run(None, feeds), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(runs))
print(json.dumps({"gops": 2 * n**3 / best / 1e9}))
"""


def _child(script: str, args: list[str], threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_peak(threads: int | None = None, *, n: int = 3072, runs: int = 5) -> dict:
    """Best-of-`runs` throughput of an n x n x n product: float32 GFLOP/s and int8 GOP/s."""
    float32 = _child(_FLOAT32, [str(n), str(runs)], threads)["gflops"]
    try:
        int8 = _child(_INT8, [str(n), str(runs), str(threads or 0)], threads)["gops"]
    except (subprocess.CalledProcessError, KeyError):  # onnx missing: the int8 figure is then unknown
        int8 = None
    return {"float32_gflops": float32, "float32_source": "numpy matmul", "int8_gops": int8,
            "int8_source": "onnxruntime MatMulInteger", "n": n, "threads": threads}
