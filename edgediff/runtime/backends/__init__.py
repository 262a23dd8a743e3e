"""The backend registry: the one way a session is opened.

    open_session(root, name, component, backend="cpu", settings=SessionSettings()) -> Session

A backend is a factory `(root, name, component, settings) -> Session` registered under a name with a line that
describes it. The built-in ones are imported only when first opened, so that importing edgediff needs none of
their libraries (onnxruntime-gpu, TensorRT, OpenVINO). A new backend is a new module and a line in `_BUILTIN`,
or a `register_backend` call from outside (tests register a NumPy backend that way).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...bundle import Component
from ..sessions import BackendError, Session, SessionSettings

Factory = Callable[[Path, str, Component, SessionSettings], Session]


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    factory: str | Factory  # "module:attribute" inside this package until first used, then the callable
    # Takes SessionSettings.initializers (run-time LoRA weights) into the graph it runs.
    takes_initializers: bool = False


# name -> (factory as "module:attribute" within this package, what it is, whether it takes run-time weights).
# The TensorRT and OpenVINO backends run engines or compiled models made (and cached) from the bundle's own weights,
# so they take none; nor does "auto", which may choose OpenVINO.
_BUILTIN = {
    "cpu": ("ort:OrtCpuSession", "ONNX Runtime on the CPU, with the export's per-graph options and graph cache",
            True),
    "cuda": ("ort:OrtCudaSession", "ONNX Runtime's CUDA execution provider (needs onnxruntime-gpu)", True),
    "ort-tensorrt": ("ort:OrtTensorrtSession",
                     "ONNX Runtime's TensorRT execution provider (needs onnxruntime-gpu and TensorRT)", False),
    "tensorrt": ("tensorrt:TrtSession",
                 "native TensorRT engines from `edgediff build`, through cuda-python (needs edgediff[tensorrt])",
                 False),
    "auto": ("choice:open_auto", "each component on the CPU backend measured fastest for it on this machine "
             "(edgediff bench --backend cpu,openvino --choose); cpu where nothing was measured", False),
    "openvino": ("openvino:OpenVinoSession",
                 "OpenVINO's CPU plugin on the bundle's ONNX, compiled once per machine (needs edgediff[openvino])",
                 False),
}

BACKENDS: dict[str, Backend] = {name: Backend(name, text, factory, takes)
                                for name, (factory, text, takes) in _BUILTIN.items()}


def register_backend(name: str, factory: Factory, description: str, takes_initializers: bool = False) -> None:
    """Add (or replace) a backend under `name`."""
    BACKENDS[name] = Backend(name, description, factory, takes_initializers)


def check_takes_initializers(name: str) -> None:
    """BackendError (one line) unless backend `name` can run with run-time LoRA weights."""
    backend = BACKENDS.get(name)
    if backend is not None and not backend.takes_initializers:
        able = " or ".join(n for n, b in BACKENDS.items() if b.takes_initializers)
        raise BackendError(f"backend {name!r} runs engines made from the bundle's own weights and cannot take "
                           f"run-time LoRAs; use --backend {able}, or fuse the LoRA at export (edgediff export --lora)")


def backend_factory(name: str) -> Factory:
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(backend.factory, str):
        module, attribute = backend.factory.split(":")
        factory: Factory = getattr(importlib.import_module(f".{module}", __name__), attribute)
        BACKENDS[name] = Backend(name, backend.description, factory, backend.takes_initializers)
        return factory
    return backend.factory


def open_session(root: Path, name: str, component: Component, backend: str = "cpu",
                 settings: SessionSettings | None = None) -> Session:
    """A session for the bundle component `name` on `backend`; BackendError (one line) if it cannot run here."""
    settings = settings or SessionSettings()
    factory = backend_factory(backend)
    if settings.initializers:
        check_takes_initializers(backend)
    return factory(Path(root), name, component, settings)
