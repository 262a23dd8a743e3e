"""Native TensorRT: the engines `edgediff build` made, run through cuda-python (no torch, no ONNX Runtime).

A session lists the component's engines (runtime/engines.py) when it opens and refuses, in one line naming the
build command, when none was built or none fits this GPU, this TensorRT or this export. The engine itself is
chosen at the first call, from the shapes fed: one whose profile covers them, static first. Device buffers stay
allocated between steps (regrown only when a larger shape comes); feeds fixed by `bind` are uploaded once per
render; on a static engine the step is captured as a CUDA graph after its first run and replayed after that.

tensorrt and cuda-python are imported when a session opens, never when edgediff is imported.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...bundle import Component, read_manifest
from .. import engines
from ..sessions import BackendError, FeedError, SessionBase, SessionSettings, check_feeds
from .cuda_runtime import Cuda, load_tensorrt, this_machine

_bind_tokens = itertools.count(1)


class TrtSession(SessionBase):
    def __init__(self, root: Path, name: str, component: Component, settings: SessionSettings):
        super().__init__(name, component.inputs, component.outputs)
        self._trt = load_tensorrt()
        self._cuda = Cuda()
        machine = this_machine(self._trt, self._cuda)
        self._root = root
        found = engines.engines_for(root, read_manifest(root), name)
        if not found:
            raise BackendError(f"{name}: no TensorRT engine for {root}; build them on this machine with "
                               f"`edgediff build {root}`")
        self._entries = [(p, e) for p, e in found if engines.usable(e, component, machine) and p.is_file()]
        if not self._entries:
            raise BackendError(engines.stale_message(root, name, [e for _, e in found], component, machine))
        self._lean = settings.lean
        self._runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.WARNING))
        self._stream = self._cuda.stream()
        self._engine: _Engine | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._execute(feeds, {}, 0)

    def bind(self, **fixed: np.ndarray) -> Callable[..., dict[str, np.ndarray]]:
        token = next(_bind_tokens)  # this bound call's fixed feeds, once on the device, are not sent again

        def call(**feeds: np.ndarray) -> dict[str, np.ndarray]:
            merged = {**fixed, **feeds}
            check_feeds(self.name, self.inputs, merged)
            return self._execute(feeds, fixed, token)

        return call

    def _execute(self, feeds: dict[str, np.ndarray], fixed: dict[str, np.ndarray],
                 token: int) -> dict[str, np.ndarray]:
        shapes = {k: tuple(v.shape) for k, v in itertools.chain(feeds.items(), fixed.items())}
        engine = self._engine_for(shapes)
        if engine.prepare(shapes) or engine.fixed_token != token or not token:
            engine.upload(fixed)
            engine.fixed_token = token
        engine.upload(feeds)
        return engine.run([(t.name, np.dtype(t.dtype)) for t in self.outputs])

    def _engine_for(self, shapes: dict[str, tuple[int, ...]]) -> _Engine:
        if self._engine is not None and self._engine.entry.covers(shapes):
            return self._engine
        entry = engines.choose([e for _, e in self._entries], shapes)
        if entry is None:
            fed = ", ".join(f"{k} {v}" for k, v in sorted(shapes.items()))
            raise FeedError(f"{self.name}: {fed} is outside every TensorRT engine's profile "
                            f"({engines.describe_profiles([e for _, e in self._entries])}); build one for this "
                            f"size with `edgediff build {self._root} --size WxH`")
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        path = next(p for p, e in self._entries if e is entry)
        self._engine = _Engine(self, path, entry)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._stream:
            self._cuda.destroy_stream(self._stream)
            self._stream = 0


class _Engine:
    """One deserialised engine: its execution context, device buffers and (static shapes) CUDA graph."""

    def __init__(self, session: TrtSession, path: Path, entry: engines.EngineEntry):
        self.trt, self.cuda, self.stream, self.entry = session._trt, session._cuda, session._stream, entry
        stale = (f"{session.name}: this TensorRT {self.trt.__version__} cannot load engine {path.name} (built for "
                 f"{entry.machine.label}); rebuild it here with `edgediff build {session._root}`")
        engine = session._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(stale)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == session._trt.TensorIOMode.INPUT]
        expected = {t.name: np.dtype(t.dtype) for t in session.inputs + session.outputs}
        for n in names:
            if n not in expected or np.dtype(session._trt.nptype(engine.get_tensor_dtype(n))) != expected[n]:
                raise BackendError(stale)
        for n, r in entry.profile.items():
            if tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) != (r.min, r.opt, r.max):
                raise BackendError(stale)
        if entry.weight_streaming and session._lean:
            engine.weight_streaming_budget_v2 = engine.get_weight_streaming_automatic_budget()
        self.engine, self.names = engine, names
        self.context = engine.create_execution_context()
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes allocated)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.graph: tuple[Any, Any] | None = None
        self.fixed_token = -1

    def prepare(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Set the input shapes and point every tensor at a big enough buffer; True if anything changed."""
        if shapes == self.shapes:
            return False
        self._drop_graph()
        for n in self.inputs:
            if not self.context.set_input_shape(n, shapes[n]):
                raise FeedError(f"{self.entry.component}.{n}: TensorRT refused shape {shapes[n]}")
        for n in self.names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(n)))
            need = int(np.prod(shape)) * dtype.itemsize
            pointer, size = self.buffers.get(n, (0, 0))
            if need > size:
                if pointer:
                    self.cuda.free(pointer)
                pointer, size = self.cuda.malloc(need), need
                self.buffers[n] = (pointer, size)
            self.context.set_tensor_address(n, pointer)
        self.shapes = dict(shapes)
        self.fixed_token = -1
        return True

    def upload(self, feeds: dict[str, np.ndarray]) -> None:
        self._pending = [np.ascontiguousarray(v) for v in feeds.values()]  # alive until the stream is synchronised
        for (n, _), value in zip(feeds.items(), self._pending):
            self.cuda.upload(self.buffers[n][0], value, self.stream)

    def run(self, outputs: list[tuple[str, np.dtype[Any]]]) -> dict[str, np.ndarray]:
        if self.graph is not None:
            self.cuda.launch(self.graph[1], self.stream)
        elif not self.context.execute_async_v3(self.stream):
            raise BackendError(f"{self.entry.component}: TensorRT could not run the engine")
        result = {}
        for n, dtype in outputs:
            out = np.empty(tuple(int(d) for d in self.context.get_tensor_shape(n)), dtype)
            self.cuda.download(out, self.buffers[n][0], self.stream)
            result[n] = out
        self.cuda.synchronize(self.stream)
        self._pending = []
        if self.graph is None and self.entry.static:  # captured after a first plain run, as TensorRT advises
            self.graph = self.cuda.capture(self.stream, self._enqueue)
        return result

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"{self.entry.component}: TensorRT could not capture the engine's step")

    def _drop_graph(self) -> None:
        if self.graph is not None:
            self.cuda.destroy_graph(*self.graph)
            self.graph = None

    def close(self) -> None:
        self._drop_graph()
        for pointer, _ in self.buffers.values():
            self.cuda.free(pointer)
        self.buffers = {}
        self.context = self.engine = None

