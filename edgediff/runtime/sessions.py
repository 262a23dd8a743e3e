"""One Session protocol (`inputs`, `outputs`, `__call__(**feeds) -> dict`) and one class per backend.

Sessions check the names, dtypes and shapes of what they are fed against the manifest's signature and say what
was expected, so a wrong feed fails with a sentence instead of an ONNX Runtime stack trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..bundle import BundleError, Component, SessionOptions, TensorSpec
from . import graph_cache

BACKENDS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


class FeedError(ValueError):
    """A session was fed something its model does not take."""


class Session(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]: ...


def check_feeds(name: str, specs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray]) -> None:
    expected = {t.name for t in specs}
    if set(feeds) != expected:
        raise FeedError(f"{name}: fed {sorted(feeds)}, expected inputs {sorted(expected)}")
    for t in specs:
        value = feeds[t.name]
        if value.dtype != np.dtype(t.dtype):
            raise FeedError(f"{name}.{t.name}: dtype {value.dtype}, expected {t.dtype}")
        if value.ndim != len(t.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(t.shape, value.shape)
        ):
            raise FeedError(f"{name}.{t.name}: shape {value.shape}, expected {tuple(t.shape)}")


class OrtSession:
    """An ONNX Runtime session for one bundle component, on the execution providers named by `backend`."""

    def __init__(
        self,
        root: Path,
        name: str,
        component: Component,
        *,
        backend: str = "cpu",
        threads: int | None = None,
        lean: bool = False,
    ):
        """`lean` trades a little speed for peak memory: no pre-packed weight copies, no memory arena and no
        pre-planned activation block, so what a call allocates goes back when the call ends (memory="low")."""
        import onnxruntime as ort

        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        available = set(ort.get_available_providers())
        providers = [p for p in BACKENDS[backend] if p in available]
        if BACKENDS[backend][0] not in available:
            raise BundleError(
                f"backend {backend!r} needs {BACKENDS[backend][0]}, which this onnxruntime lacks "
                f"(it has {', '.join(sorted(available))}); install edgediff[gpu] or use --backend cpu"
            )
        options = session_options(ort, component.ort_options, threads, lean)
        self.name = name
        self.inputs = component.inputs
        self.outputs = component.outputs
        path = root / component.file
        try:
            self._session = graph_cache.open_session(
                ort, path, component.files, options, providers, cache=component.ort_options.cache_optimized_graph)
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({first}); re-export the bundle") from None
        self._output_names = [t.name for t in self.outputs]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        return dict(zip(self._output_names, self._session.run(self._output_names, feeds)))


def session_options(ort, chosen: SessionOptions, threads: int | None, lean: bool):
    """ONNX Runtime options from what the export chose for this graph (the manifest's ort_options)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    level = chosen.graph_optimization_level
    if level not in OPTIMIZATION_LEVELS:
        raise BundleError(f"unknown graph optimization level {level!r} in the manifest; re-export the bundle")
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if chosen.disable_prepacking or lean:
        # Pre-packing copies every GEMM weight into the kernel's layout at load: seconds, and a second copy of
        # memory-mapped weights (1.2 GB for the SD U-Net); it pays back in speed only when memory is no object.
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    if lean:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    return options
