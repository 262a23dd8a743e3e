"""ONNX Runtime backends: one session class over execution providers, one small subclass per backend.

Providers are (name, options) pairs. The manifest's ort_options (optimisation level, pre-packing, graph cache)
were chosen at export for ONNX Runtime's CPU kernels, so only the CPU backend applies them; a GPU provider brings
its own, built from the manifest by ort_providers.py. The GPU sessions keep what `bind` fixes for a render (text
embeddings, time ids) on the device and run every call through an I/O binding.

ONNX Runtime falls back to the CPU quietly when a provider cannot start (its log says so, at a level edgediff
silences), so after creating a session we check that the requested provider is the session's first: anything
else is an error, not a slow render. Some nodes placed on the CPU under a GPU provider is normal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...bundle import BundleError, Component, SessionOptions
from .. import graph_cache
from ..sessions import BackendError, FeedError, SessionBase, SessionSettings, check_feeds
from .ort_providers import CPU, CUDA, TENSORRT, Provider, cuda_providers, tensorrt_providers, writable_cache_folders

OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
# Messages of a provider whose shared libraries (CUDA, cuDNN, TensorRT, the driver) could not be loaded.
_MISSING_LIBRARY = ("cannot open shared object", "LoadLibrary", "libcu", "libnv", "CUDA driver", "cudaGetDevice")


class OrtSession(SessionBase):
    """An ONNX Runtime session for one bundle component on `providers`, the first of which must take it."""

    backend = ""  # its name in the registry, for messages
    provider = CPU  # the execution provider that must take the graph
    uses_manifest_options = False  # the manifest's ort_options are CPU choices
    install_hint = ""

    def __init__(self, root: Path, name: str, component: Component, settings: SessionSettings):
        import onnxruntime as ort

        super().__init__(name, component.inputs, component.outputs)
        requested = self.provider
        available = ort.get_available_providers()
        if requested not in available:
            raise BackendError(f"backend {self.backend!r} needs {requested}, which this onnxruntime "
                               f"{ort.__version__} lacks (it has {', '.join(available)}){self.install_hint}")
        chosen = component.ort_options if self.uses_manifest_options else SessionOptions()
        options = session_options(ort, chosen, settings.threads, settings.lean)
        # Replaced before ONNX Runtime optimises the graph. The graph cache holds a graph optimised from the
        # bundle's own weights (convolutions re-laid out, MatMul weights folded), which no replacement would reach.
        self._initializers = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                              for a in settings.initializers.values()]  # must outlive the session
        if settings.initializers:
            options.add_external_initializers(list(settings.initializers), self._initializers)
        path = root / component.file
        try:
            self._session = graph_cache.open_session(
                ort, path, component.files, options, self.provider_chain(root, name, component, settings),
                cache=chosen.cache_optimized_graph and self.uses_manifest_options and not settings.initializers)
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

    def provider_chain(self, root: Path, name: str, component: Component,
                       settings: SessionSettings) -> list[Provider]:
        """The (provider, options) pairs the session is created with, `provider` first."""
        return [(CPU, {})]

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
        self._initializers = []


class OrtCpuSession(OrtSession):
    backend = "cpu"
    uses_manifest_options = True


class OrtDeviceSession(OrtSession):
    """A session whose provider runs on a device: `bind` uploads the fixed feeds once, and every call goes through
    an I/O binding (the fixed feeds bound where they already are, the rest copied from the host, the outputs
    copied back to the host)."""

    device_type = "cuda"  # what onnxruntime.OrtValue calls the device

    def __init__(self, root: Path, name: str, component: Component, settings: SessionSettings):
        self.device_id = settings.device_id
        super().__init__(root, name, component, settings)

    def bind(self, **fixed: np.ndarray) -> Callable[..., dict[str, np.ndarray]]:
        import onnxruntime as ort

        known = {t.name for t in self.inputs}
        if not set(fixed) <= known:
            raise FeedError(f"{self.name}: bound {sorted(fixed)}, expected some of its inputs {sorted(known)}")
        on_device = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device_type,
                                                            self.device_id) for name, value in fixed.items()}

        def call(**feeds: np.ndarray) -> dict[str, np.ndarray]:
            if set(feeds) & set(fixed):
                raise FeedError(f"{self.name}: {sorted(set(feeds) & set(fixed))} are bound for this render")
            check_feeds(self.name, self.inputs, {**fixed, **feeds})
            return self._run_bound(on_device, feeds)

        return call

    def _run_bound(self, on_device: dict[str, Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._session.io_binding()
        for name, value in on_device.items():
            binding.bind_ortvalue_input(name, value)
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))


class OrtCudaSession(OrtDeviceSession):
    backend = "cuda"
    provider = CUDA
    install_hint = ("; pip uninstall -y onnxruntime && pip install onnxruntime-gpu (see the README's GPU install), "
                    "or use --backend cpu")

    def provider_chain(self, root: Path, name: str, component: Component,
                       settings: SessionSettings) -> list[Provider]:
        return cuda_providers(settings.device_id, settings.lean)


class OrtTensorrtSession(OrtDeviceSession):
    backend = "ort-tensorrt"
    provider = TENSORRT
    install_hint = "; install onnxruntime-gpu in place of onnxruntime, and TensorRT, or use --backend cpu"

    def provider_chain(self, root: Path, name: str, component: Component,
                       settings: SessionSettings) -> list[Provider]:
        engines, timing = writable_cache_folders(root, name, component)
        return tensorrt_providers(component, engines, timing, settings.device_id, settings.lean)


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
    if chosen.disable_prepacking:
        options.add_session_config_entry(graph_cache.DISABLE_PREPACKING, "1")
    if threads:
        options.intra_op_num_threads = threads
    if lean:
        # The pre-planned block holds every activation of a call at once. The arena stays, and so does pre-packing:
        # both lower the peak (docs/loading.md: without the arena each large activation is a fresh mapping, paged
        # in and zeroed, and the int8 convolutions repack at every call), and the arena is the session's own, freed
        # when memory="low" closes the session after its stage. The reuse plan goes too: it hands a freed buffer
        # to a later tensor of the same size, which stretches the buffer's life, and over a deep graph the
        # stretched buffers pile up (T5-XXL int8 at 512 tokens: 1.9 GB above its weights, 0.3 GB without the
        # plan; the arena still recycles what is freed). A few percent slower; docs/loading.md.
        options.enable_mem_pattern = False
        options.enable_mem_reuse = False
    return options
