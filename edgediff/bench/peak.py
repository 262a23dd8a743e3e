"""The machine's own limit on the benchmark's threads: a large float32 matrix product (the faster of NumPy's BLAS
and ONNX Runtime's MatMul), and a large int8 product through ONNX Runtime's integer kernels (what an int8 bundle's
MatMulInteger / QLinearConv use), both with constant, pre-packed weights as a model has.

Each is measured in a child process (peak_child.py) so that the thread count applies from the start (BLAS reads
it at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from . import peak_child


def _child(kind: str, n: int, runs: int, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    out = subprocess.run([sys.executable, peak_child.__file__, kind, str(n), str(runs), str(threads or 0)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_peak(threads: int | None = None, *, n: int = 3072, runs: int = 5) -> dict:
    """Best-of-`runs` throughput of an n x n x n product: float32 GFLOP/s and int8 GOP/s."""
    float32 = _child("float32", n, runs, threads)
    try:
        int8 = _child("int8", n, runs, threads)["gops"]
    except (subprocess.CalledProcessError, KeyError):  # onnx missing: the int8 figure is then unknown
        int8 = None
    return {"float32_gflops": float32["gflops"], "float32_source": float32["source"], "int8_gops": int8,
            "int8_source": "onnxruntime MatMulInteger", "n": n, "threads": threads}
