"""OpenVINO on the CPU: the bundle's own ONNX graphs, compiled by OpenVINO's CPU plugin.

OpenVINO reads the ONNX files as they are, fp32 and int8 QDQ alike (its low-precision transformations turn the
QDQ pairs into int8 kernels). Compiling a full-size U-Net takes tens of seconds, so compiled blobs go to OpenVINO's
model cache, in the user's cache folder (`~/.cache/edgediff/openvino`, or $XDG_CACHE_HOME): OpenVINO keys them
by the model, its shapes, the device and the settings, so a later compile of the same graph at the same shapes
reads the blob instead. The
bundle's files are never written. Install with `pip install 'edgediff[openvino]'`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import BundleError, Component
from ..sessions import BackendError, FeedError, SessionBase, SessionSettings


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgediff" / "openvino"


def _core() -> Any:
    try:
        import openvino
    except ImportError:
        raise BackendError("backend 'openvino' needs OpenVINO: pip install 'edgediff[openvino]', or use --backend "
                           "cpu") from None
    core = openvino.Core()
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": os.fspath(folder)})
    except OSError:
        pass  # no cache where the home folder is read-only: every load compiles
    return core


class OpenVinoSession(SessionBase):
    """One bundle component compiled for OpenVINO's CPU plugin, tuned for latency (one render at a time).

    Compiled for the shapes of each call, not for the graph's dynamic axes: OpenVINO plans static shapes better
    (the full-size SD-Turbo U-Net step 1.85 s against 2.00 s; benchmarks/RESULTS.md). A new shape compiles once
    (from the model cache after the first time on this machine) and replaces the previous one, so that memory
    holds one compiled graph; renders at one size compile once."""

    def __init__(self, root: Path, name: str, component: Component, settings: SessionSettings):
        super().__init__(name, component.inputs, component.outputs)
        self._core = _core()
        # f32: on CPUs with bf16 units OpenVINO would otherwise run fp32 graphs in bf16 (errors of 1e-2 in pixels)
        self._config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if settings.threads:
            self._config["INFERENCE_NUM_THREADS"] = settings.threads
        self._path = root / component.file
        self._model = self._openvino_call("read", lambda: self._core.read_model(os.fspath(self._path)))
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._request: Any = None
        self._ports: dict[str, Any] = {}

    def _openvino_call(self, what: str, call: Any) -> Any:
        try:
            return call()
        except Exception as e:  # OpenVINO raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{self._path}: OpenVINO cannot {what} it ({first}); use --backend cpu") from None

    def _compile_for(self, feeds: dict[str, np.ndarray]) -> None:
        shapes = tuple(tuple(v.shape) for v in feeds.values())
        if shapes == self._shapes:
            return
        self._request = None  # the previous shape's compiled graph goes before the next is built
        self._openvino_call("reshape", lambda: self._model.reshape({n: list(v.shape) for n, v in feeds.items()}))
        compiled = self._openvino_call("compile", lambda: self._core.compile_model(self._model, "CPU",
                                                                                    self._config))
        self._request = compiled.create_infer_request()
        # a port may carry several tensor names (an output that is also an intermediate): look each up by ours
        self._ports = {t.name: compiled.output(t.name) for t in self.outputs}
        self._shapes = shapes

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            self._compile_for(feeds)
            results = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except RuntimeError as e:
            if "allocate" not in str(e).lower():
                raise
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
            raise FeedError(f"{self.name}: out of memory running it on {shapes}; render smaller images or fewer "
                            "at once") from None
        return {name: np.array(results[port], copy=True) for name, port in self._ports.items()}

    def close(self) -> None:
        self._request = None
        self._model = None
