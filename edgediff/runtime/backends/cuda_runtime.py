"""The CUDA runtime through cuda-python (`cuda.bindings.runtime`, `cuda.cudart` before 12.6): device memory,
a stream, copies, CUDA graphs. No torch: the native TensorRT backend and the engine build need nothing else.

cuda-python returns `(error, *values)` from every call; `Cuda.call` turns an error into one line. Also here: the
machine an engine is bound to (compute capability and TensorRT version), with the one-line refusals for a machine
without TensorRT, cuda-python or an NVIDIA GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ..engines import Machine
from ..sessions import BackendError

INSTALL = "pip install 'edgediff[tensorrt]' (TensorRT's wheels come from NVIDIA's index, pypi.nvidia.com)"


def load_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise BackendError(f"TensorRT is not installed; {INSTALL}, on the machine with the NVIDIA GPU") from None


def load_cudart() -> Any:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise BackendError(f"cuda-python is not installed; {INSTALL}")


class CudaError(BackendError):
    """A CUDA call that failed; one line naming the call and CUDA's own words."""


class Cuda:
    """The few CUDA runtime calls edgediff makes, each checked."""

    def __init__(self, cudart: Any | None = None):
        self.rt = cudart if cudart is not None else load_cudart()

    def call(self, name: str, *args: Any) -> Any:
        result = getattr(self.rt, name)(*args)
        err, values = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"CUDA {name} failed: {self.error_text(err)}")
        return values[0] if len(values) == 1 else (values or None)

    def error_text(self, err: Any) -> str:
        try:
            text = self.rt.cudaGetErrorString(err)[1]
            return text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # the error string is a courtesy; the code alone still says what went wrong
            return str(err)

    def compute_capability(self, device: int = 0) -> tuple[str, str]:
        """("9.0", "NVIDIA H100"); BackendError (one line) where there is no usable NVIDIA GPU."""
        err, count = self.rt.cudaGetDeviceCount()
        if err != self.rt.cudaError_t.cudaSuccess or count < 1:
            why = self.error_text(err) if err != self.rt.cudaError_t.cudaSuccess else "no devices"
            raise BackendError(f"no NVIDIA GPU here ({why}); TensorRT engines are built and run on the GPU that "
                               "renders: use --backend cpu here")
        props = self.call("cudaGetDeviceProperties", device)
        name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
        return f"{props.major}.{props.minor}", name

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", max(nbytes, 1)))

    def free(self, pointer: int) -> None:
        self.call("cudaFree", pointer)

    def stream(self) -> int:
        return int(self.call("cudaStreamCreate"))

    def destroy_stream(self, stream: int) -> None:
        self.call("cudaStreamDestroy", stream)

    def upload(self, pointer: int, array: np.ndarray, stream: int) -> None:
        """Host to device on `stream`; `array` must stay alive and unchanged until the stream is synchronised."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync", pointer, array.ctypes.data, array.nbytes, kind, stream)

    def download(self, array: np.ndarray, pointer: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync", array.ctypes.data, pointer, array.nbytes, kind, stream)

    def synchronize(self, stream: int) -> None:
        self.call("cudaStreamSynchronize", stream)

    def capture(self, stream: int, work: Callable[[], None]) -> tuple[Any, Any]:
        """Record what `work` enqueues on `stream` as a CUDA graph; (graph, instantiated graph)."""
        self.call("cudaStreamBeginCapture", stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
        try:
            work()
        finally:
            graph = self.call("cudaStreamEndCapture", stream)
        return graph, self.call("cudaGraphInstantiate", graph, 0)

    def launch(self, graph_exec: Any, stream: int) -> None:
        self.call("cudaGraphLaunch", graph_exec, stream)

    def destroy_graph(self, graph: Any, graph_exec: Any) -> None:
        self.call("cudaGraphExecDestroy", graph_exec)
        self.call("cudaGraphDestroy", graph)


def this_machine(trt: Any, cuda: Cuda) -> Machine:
    """The GPU and TensorRT an engine built or loaded here is bound to."""
    capability, gpu = cuda.compute_capability()
    return Machine(capability, str(trt.__version__), gpu)


def require_gpu_stack() -> tuple[Any, Cuda, Machine]:
    """tensorrt, the CUDA runtime and this machine; one line (BackendError) for whichever is missing."""
    trt = load_tensorrt()
    cuda = Cuda()
    return trt, cuda, this_machine(trt, cuda)
