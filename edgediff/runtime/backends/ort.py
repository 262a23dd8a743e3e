"""ONNX Runtime backends: one session class over execution providers, one small subclass per backend.

Providers are (name, options) pairs. The manifest's ort_options (optimisation level, pre-packing, graph cache)
were chosen at export for ONNX Runtime's CPU kernels, so only the CPU backend applies them; a GPU provider brings
its own. ONNX Runtime falls back to the CPU quietly when a provider cannot start (its log says so, at a level
edgediff silences), so after creating a session we check that the requested provider is the session's first:
anything else is an error, not a slow render. Some nodes placed on the CPU under a GPU provider is normal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import BundleError, Component, SessionOptions
from .. import graph_cache
from ..sessions import BackendError, FeedError, SessionBase, SessionSettings

Provider = tuple[str, dict[str, Any]]

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
# Messages of a provider whose shared libraries (CUDA, cuDNN, TensorRT, the driver) could not be loaded.
_MISSING_LIBRARY = ("cannot open shared object", "LoadLibrary", "libcu", "libnv", "CUDA driver", "cudaGetDevice")


class OrtSession(SessionBase):
    """An ONNX Runtime session for one bundle component on `providers`, the first of which must take it."""

    backend = ""  # its name in the registry, for messages
    providers: list[Provider] = []
    uses_manifest_options = False  # the manifest's ort_options are CPU choices
    install_hint = ""

    def __init__(self, root: Path, name: str, component: Component, settings: SessionSettings):
        import onnxruntime as ort

        super().__init__(name, component.inputs, component.outputs)
        requested = self.providers[0][0]
        available = ort.get_available_providers()
        if requested not in available:
            raise BackendError(f"backend {self.backend!r} needs {requested}, which this onnxruntime "
                               f"{ort.__version__} lacks (it has {', '.join(available)}){self.install_hint}")
        chosen = component.ort_options if self.uses_manifest_options else SessionOptions()
        options = session_options(ort, chosen, settings.threads, settings.lean)
        path = root / component.file
        try:
            self._session = graph_cache.open_session(
                ort, path, component.files, options, self.providers,
                cache=chosen.cache_optimized_graph and self.uses_manifest_options)
        except Exception as e:  # onnxruntime raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if any(part in first for part in _MISSING_LIBRARY):
                raise BackendError(f"{requested} cannot start: {first}; install the CUDA libraries it needs "
                                   "or use --backend cpu") from None
            raise BundleError(f"{path}: ONNX Runtime cannot load it ({first}); re-export the bundle") from None
        running = self._session.get_providers()
        if not running or running[0] != requested:
            fallback = running[0] if running else "nothing"
            raise BackendError(f"backend {self.backend!r}: ONNX Runtime fell back to {fallback} instead of "
                               f"{requested} (a GPU library or the driver is missing?); use --backend cpu")
        self._output_names = [t.name for t in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(self._output_names, feeds)
        except Exception as e:  # onnxruntime raises its own untyped errors
            if "Failed to allocate memory" not in str(e):
                raise  # anything else is a bug, with its traceback
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
            raise FeedError(f"{self.name}: out of memory running it on {shapes}; render smaller images or fewer "
                            "at once") from None
        return dict(zip(self._output_names, outputs, strict=True))

    def close(self) -> None:
        self._session = None


class OrtCpuSession(OrtSession):
    backend = "cpu"
    providers = [("CPUExecutionProvider", {})]
    uses_manifest_options = True


class OrtCudaSession(OrtSession):
    backend = "cuda"
    providers = [("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    install_hint = "; install onnxruntime-gpu in place of onnxruntime (edgediff[gpu]) or use --backend cpu"


class OrtTensorrtSession(OrtSession):
    backend = "ort-tensorrt"
    providers = [("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {}), ("CPUExecutionProvider", {})]
    install_hint = "; install onnxruntime-gpu and TensorRT, or use --backend cpu"



def session_options(ort: Any, chosen: SessionOptions, threads: int | None, lean: bool) -> Any:
    """ONNX Runtime options from what the export chose for this graph (the manifest's ort_options)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: an error is raised and said in one line, not logged as well
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
