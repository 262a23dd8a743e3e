"""A small fake of TensorRT's Python API and of cuda-python's runtime, for tests on machines without a GPU.

`install(monkeypatch)` puts `tensorrt`, `cuda`, `cuda.bindings` and `cuda.bindings.runtime` into sys.modules. Their
calls follow the documented signatures (TensorRT 10/11: Builder, create_network with STRONGLY_TYPED, OnnxParser
.parse_from_file, IBuilderConfig.set_memory_pool_limit / set_flag / add_optimization_profile / create_timing_cache
/ set_timing_cache / get_timing_cache().serialize(), build_serialized_network, Runtime.deserialize_cuda_engine,
ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_profile_shape,
IExecutionContext.set_input_shape / get_tensor_shape / set_tensor_address / execute_async_v3; cuda-python: every
call returns (cudaError_t, *values)). What they do is faked:

- "device memory" is host memory (ctypes buffers), so cudaMemcpyAsync is a memmove and can be checked;
- an "engine" is JSON naming its ONNX graph, profile, TensorRT version and compute capability; running it runs
  the graph on ONNX Runtime's CPU provider, so a TensorRT render can be compared with a CPU render;
- a captured stream records its work instead of doing it; a graph launch does it;
- deserialising an engine made by another TensorRT version or for another GPU returns None, as TensorRT does.

`FakeGpu` holds the state tests look at (and change: `version`, `capability`, `fail_build`).
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUCCESS = 0


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


NPTYPES = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
           DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.INT64: np.int64}
ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
              7: DataType.INT64}


@dataclass
class FakeGpu:
    version: str = "10.8.0.43"
    capability: tuple[int, int] = (9, 0)
    devices: int = 1
    strongly_typed_flag: bool = True  # TensorRT 11 may drop the flag: every network is strongly typed
    fail_build: set[str] = field(default_factory=set)  # ONNX folder names whose build raises (an interrupted build)
    memory: dict[int, Any] = field(default_factory=dict)  # pointer -> ctypes buffer
    uploads: list[tuple[int, int]] = field(default_factory=list)  # (pointer, bytes)
    builds: list[dict[str, Any]] = field(default_factory=list)  # what each build_serialized_network was given
    executions: int = 0  # engine steps actually run (plain or from a graph)
    captures: int = 0
    launches: int = 0
    capturing: dict[int, list[Any]] = field(default_factory=dict)  # stream -> work recorded

    def enqueue(self, stream: int, work: Any) -> None:
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()


class _Stream:
    """cudaStream_t: an opaque handle that int() turns into its address."""

    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


def make_cudart(gpu: FakeGpu) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaError_t, rt.cudaMemcpyKind, rt.cudaStreamCaptureMode = cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode
    streams = iter(range(0x1000, 0x2000))

    def malloc(n: int) -> tuple[Any, int]:
        buf = ctypes.create_string_buffer(n)
        gpu.memory[ctypes.addressof(buf)] = buf
        return cudaError_t.cudaSuccess, ctypes.addressof(buf)

    def free(ptr: int) -> tuple[Any]:
        known = gpu.memory.pop(ptr, None) is not None
        return (cudaError_t.cudaSuccess if known else cudaError_t.cudaErrorInvalidValue,)

    def memcpy(dst: int, src: int, n: int, kind: Any, stream: Any) -> tuple[Any]:
        device = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if not any(p <= device and device + n <= p + len(b) for p, b in gpu.memory.items()):
            return (cudaError_t.cudaErrorInvalidValue,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            gpu.uploads.append((dst, n))
        gpu.enqueue(int(stream), lambda: ctypes.memmove(dst, src, n))
        return (cudaError_t.cudaSuccess,)

    def end_capture(stream: Any) -> tuple[Any, list[Any]]:
        gpu.captures += 1
        return cudaError_t.cudaSuccess, gpu.capturing.pop(int(stream))

    def launch(graph_exec: list[Any], stream: Any) -> tuple[Any]:
        gpu.launches += 1
        for work in graph_exec:
            work()
        return (cudaError_t.cudaSuccess,)

    ok = (cudaError_t.cudaSuccess,)
    rt.cudaGetErrorString = lambda err: (cudaError_t.cudaSuccess, f"{cudaError_t(err).name}".encode())
    rt.cudaGetDeviceCount = lambda: ((cudaError_t.cudaSuccess, gpu.devices) if gpu.devices
                                     else (cudaError_t.cudaErrorNoDevice, 0))
    rt.cudaGetDeviceProperties = lambda device: (cudaError_t.cudaSuccess, types.SimpleNamespace(
        major=gpu.capability[0], minor=gpu.capability[1], name=b"Fake GPU"))
    rt.cudaMalloc, rt.cudaFree, rt.cudaMemcpyAsync = malloc, free, memcpy
    rt.cudaStreamCreate = lambda: (cudaError_t.cudaSuccess, _Stream(next(streams)))
    rt.cudaStreamDestroy = rt.cudaStreamSynchronize = lambda stream: ok
    rt.cudaStreamBeginCapture = lambda stream, mode: (gpu.capturing.setdefault(int(stream), []), ok)[1]
    rt.cudaStreamEndCapture = end_capture
    rt.cudaGraphInstantiate = lambda graph, flags: (cudaError_t.cudaSuccess, list(graph))
    rt.cudaGraphLaunch = launch
    rt.cudaGraphExecDestroy = rt.cudaGraphDestroy = lambda graph: ok
    return rt


def _enum(name: str, **members: int) -> type[enum.IntEnum]:
    return enum.IntEnum(name, members)  # type: ignore[return-value]


def make_tensorrt(gpu: FakeGpu) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = gpu.version
    trt.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "INFO": 3,
                                     "__init__": lambda self, min_severity=2: None})
    trt.DataType = DataType
    trt.nptype = lambda dt: NPTYPES[DataType(dt)]
    trt.TensorIOMode = _enum("TensorIOMode", NONE=0, INPUT=1, OUTPUT=2)
    trt.MemoryPoolType = _enum("MemoryPoolType", WORKSPACE=0)
    if gpu.version.startswith("10."):
        trt.BuilderFlag = _enum("BuilderFlag", FP16=0, INT8=1, WEIGHT_STREAMING=21)
    else:  # TensorRT 11: no precision flags
        trt.BuilderFlag = _enum("BuilderFlag", WEIGHT_STREAMING=21)
    if gpu.strongly_typed_flag:
        trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0,
                                                  STRONGLY_TYPED=1)
    trt.Builder = lambda logger: _Builder(gpu, trt)
    trt.OnnxParser = _Parser
    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: _deserialize(gpu, trt, bytes(data)))
    return trt


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: DataType


@dataclass
class _Network:
    flags: int
    path: str = ""
    inputs: list[_Tensor] = field(default_factory=list)
    outputs: list[_Tensor] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]


class _Parser:
    def __init__(self, network: _Network, logger: Any):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            graph = onnx.load(path, load_external_data=False).graph
        except Exception as e:
            self.errors.append(f"cannot read {path}: {e}")
            return False

        def tensor(v: Any) -> _Tensor:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
            return _Tensor(v.name, dims, ONNX_TYPES[v.type.tensor_type.elem_type])

        initialisers = {i.name for i in graph.initializer}
        self.network.path = path
        self.network.inputs = [tensor(v) for v in graph.input if v.name not in initialisers]
        self.network.outputs = [tensor(v) for v in graph.output]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 (TensorRT's names)
        if not all(a <= b <= c for a, b, c in zip(min, opt, max)):
            raise ValueError(f"{name}: min <= opt <= max violated")
        self.shapes[name] = [list(min), list(opt), list(max)]


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data


class _Config:
    def __init__(self) -> None:
        self.flags: set[Any] = set()
        self.pools: dict[Any, int] = {}
        self.profiles: list[_Profile] = []
        self.timing: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return self.timing


class _Builder:
    def __init__(self, gpu: FakeGpu, trt: types.ModuleType):
        self.gpu, self.trt = gpu, trt

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        folder = network.path.replace("\\", "/").split("/")[-2]
        self.gpu.builds.append({"component": folder, "flags": network.flags, "config": config})
        if folder in self.gpu.fail_build:
            raise KeyboardInterrupt(f"build of {folder} interrupted")
        profile = config.profiles[0].shapes if config.profiles else {}
        if any(-1 in t.shape and t.name not in profile for t in network.inputs):
            return None  # a dynamic input without a profile: TensorRT logs an error and returns None
        if config.timing is not None:
            config.timing.data += f"{folder};".encode()
        streaming = self.trt.BuilderFlag.WEIGHT_STREAMING in config.flags
        return b"FAKE-TRT\n" + json.dumps({
            "version": self.gpu.version, "capability": list(self.gpu.capability), "onnx": network.path,
            "inputs": {t.name: int(t.dtype) for t in network.inputs},
            "outputs": {t.name: int(t.dtype) for t in network.outputs},
            "profile": profile, "weight_streaming": streaming}).encode()


def _deserialize(gpu: FakeGpu, trt: types.ModuleType, data: bytes) -> _Engine | None:
    if not data.startswith(b"FAKE-TRT\n"):
        return None
    spec = json.loads(data.split(b"\n", 1)[1])
    if spec["version"] != gpu.version or tuple(spec["capability"]) != gpu.capability:
        return None  # TensorRT refuses an engine from another version or GPU architecture
    return _Engine(gpu, trt, spec)


class _Engine:
    def __init__(self, gpu: FakeGpu, trt: types.ModuleType, spec: dict[str, Any]):
        self.gpu, self.trt, self.spec = gpu, trt, spec
        self.io = [(n, trt.TensorIOMode.INPUT) for n in spec["inputs"]] + \
                  [(n, trt.TensorIOMode.OUTPUT) for n in spec["outputs"]]
        self.weight_streaming_budget_v2 = -1
        self._session: Any = None

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str) -> Any:
        return dict(self.io)[name]

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType({**self.spec["inputs"], **self.spec["outputs"]}[name])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.spec["profile"][name]]

    def get_weight_streaming_automatic_budget(self) -> int:
        return 1 << 20

    def create_execution_context(self) -> _Context:
        return _Context(self)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            import onnxruntime

            self._session = onnxruntime.InferenceSession(self.spec["onnx"], providers=["CPUExecutionProvider"])
        names = list(self.spec["outputs"])
        return dict(zip(names, self._session.run(names, feeds)))


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._output_shapes: dict[tuple[Any, ...], dict[str, tuple[int, ...]]] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        lo, _, hi = self.engine.spec["profile"].get(name, [shape, shape, shape])
        if len(shape) != len(lo) or not all(a <= n <= b for a, n, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.spec["inputs"]:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self._output_shapes:  # what TensorRT's shape inference would say: run once on zeros
            zeros = {n: np.zeros(self.shapes[n], NPTYPES[DataType(t)]) for n, t in self.engine.spec["inputs"].items()}
            self._output_shapes[key] = {n: v.shape for n, v in self.engine.run(zeros).items()}
        return self._output_shapes[key][name]

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if set(self.addresses) != set(self.engine.spec["inputs"]) | set(self.engine.spec["outputs"]):
            return False
        self.engine.gpu.enqueue(int(stream_handle), self._step)
        return True

    def _step(self) -> None:
        feeds = {n: _view(self.addresses[n], self.shapes[n], NPTYPES[DataType(t)]).copy()
                 for n, t in self.engine.spec["inputs"].items()}
        for n, value in self.engine.run(feeds).items():
            _view(self.addresses[n], value.shape, value.dtype)[...] = value
        self.engine.gpu.executions += 1


def _view(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * n).from_address(address), dtype=dtype).reshape(shape)


def install(monkeypatch: Any, **settings: Any) -> FakeGpu:
    """Put the fakes where `import tensorrt` and `import cuda.bindings.runtime` find them; the GPU's state."""
    gpu = FakeGpu(**settings)
    cudart = make_cudart(gpu)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in {"tensorrt": make_tensorrt(gpu), "cuda": cuda, "cuda.bindings": bindings,
                         "cuda.bindings.runtime": cudart}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return gpu


def reinstall(monkeypatch: Any, gpu: FakeGpu) -> None:
    """After changing `gpu.version`: a fresh tensorrt module reporting it (what reinstalling TensorRT does)."""
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt(gpu))
