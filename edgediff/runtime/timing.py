"""Seconds per stage of one render: the one clock behind Pipeline's `timings` and the bench workers' peers.

The record has one shape wherever it comes from, so that the bench compares like with like: a float per stage
(summed over calls: tokenize, text_encoder, vae_encoder, vae_decoder), a list for "steps" (one entry per U-Net
call), and "total" from the timer's start. Standard library only: bench workers import it under other
environments (Optimum's) before they load their engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class StageTimer:
    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a new record (a worker's timer lives across renders)."""
        self.timings: dict[str, float | list[float]] = {"steps": []}
        self._start = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        if name == "steps":
            self.timings["steps"].append(seconds)  # type: ignore[union-attr]
        else:
            self.timings[name] = self.timings.get(name, 0.0) + seconds  # type: ignore[operator]

    def stage(self, name: str, since: float) -> float:
        """Charge the time from `since` to now to `name`; returns now, the next stage's `since`."""
        now = time.perf_counter()
        self.add(name, now - since)
        return now

    def total(self) -> dict[str, float | list[float]]:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings

    def wrap(self, obj: Any, method: str, stage: str) -> None:
        """Charge every call of `obj.method` to `stage` (for pipelines whose stages cannot be timed from inside:
        diffusers', Optimum's). The wrapper lives on the instance and always charges this timer's current record."""
        inner: Callable[..., Any] = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.stage(stage, start)

        setattr(obj, method, timed)

    def time(self, call: Callable[[], Any]) -> dict[str, float | list[float]]:
        """A fresh record of one `call()`, its wrapped methods charged to their stages."""
        self.restart()
        call()
        return self.total()
