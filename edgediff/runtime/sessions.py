"""The Session protocol every backend implements, and the feed check every backend runs.

A session runs one bundle component. It says what it takes and gives (`inputs`, `outputs`: the manifest's
signature), runs on keyword feeds (`__call__(**feeds) -> dict`), can hold the feeds that stay the same for a whole
render (`bind`), and releases what it holds (`close`). Sessions are opened only through the backend registry
(`runtime.backends.open_session`), never constructed by the pipeline.

Sessions check the names, dtypes and shapes of what they are fed against the manifest's signature and say what
was expected, so a wrong feed fails with a sentence instead of a backend's stack trace.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ..bundle import BundleError, TensorSpec


class FeedError(ValueError):
    """A session was fed something its model does not take."""


class BackendError(BundleError):
    """A backend that cannot run here (an unknown name, a provider or library missing, a silent fallback); the
    message is one line that says what to install or choose instead."""


@dataclass(frozen=True)
class SessionSettings:
    """What the caller asks of every session, whatever the backend: each backend reads what applies to it."""

    threads: int | None = None  # intra-op threads; None: the backend's own choice
    # memory="low": no pre-packed weight copies or memory arenas, so what a call allocates goes back when it ends
    lean: bool = False
    device_id: int = 0  # the GPU a device backend runs on
    # Run-time LoRA (runtime/lora.py): graph initializers replaced at session creation, name -> array of the graph's
    # dtype and shape; the bundle's files stay as they are. Only backends registered as taking them accept them.
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False)


class Session(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]: ...

    def bind(self, **fixed: np.ndarray) -> Callable[..., dict[str, np.ndarray]]:
        """A call that takes the remaining feeds, with `fixed` held for a whole render (the text embeddings,
        SDXL's time ids, LCM's guidance embedding): a GPU backend keeps them on the device and may capture a
        graph. The values must not change while the bound call is in use."""
        ...

    def close(self) -> None: ...


class SessionBase:
    """What most backends share: the signature, the feed check and a `bind` that just remembers the feeds (enough
    for a backend whose inputs live in host memory anyway). Subclasses implement `run`."""

    def __init__(self, name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        return self.run(feeds)

    def bind(self, **fixed: np.ndarray) -> Callable[..., dict[str, np.ndarray]]:
        return functools.partial(self.__call__, **fixed)

    def close(self) -> None:
        pass


def check_feeds(name: str, specs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray]) -> None:
    expected = {t.name for t in specs}
    if set(feeds) != expected:
        raise FeedError(f"{name}: fed {sorted(feeds)}, expected inputs {sorted(expected)}")
    for t in specs:
        value = feeds[t.name]
        if value.dtype != np.dtype(t.dtype):
            raise FeedError(f"{name}.{t.name}: dtype {value.dtype}, expected {t.dtype}")
        if value.ndim != len(t.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(t.shape, value.shape, strict=True)
        ):
            raise FeedError(f"{name}.{t.name}: shape {value.shape}, expected {tuple(t.shape)}")
