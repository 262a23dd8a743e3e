"""/metrics in Prometheus' text format, through prometheus_client, on a registry of the app's own (two apps in
one process, as in the tests, do not share counters)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: a built-in render takes ~0.03 s, a full-size CPU render tens of seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self, depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("edgediff_queue_depth", "Requests waiting for a worker", registry=r).set_function(depth)
        Gauge("edgediff_images_rendering", "Images in renders now running", registry=r).set_function(running)
        self.images = Counter("edgediff_images_served", "Images returned to clients", ["model"], registry=r)
        self.requests = Counter("edgediff_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("edgediff_requests_rejected", "Requests refused or given up, by reason "
                                "(queue_full, bad_request, unauthorized, timeout, cancelled, shutdown)",
                                ["reason"], registry=r)
        self.stage = Histogram("edgediff_stage_seconds", "Seconds per render stage (steps: per denoising step; "
                               "queue: waiting for a worker)", ["stage"], buckets=BUCKETS, registry=r)
        self.latency = Histogram("edgediff_request_seconds", "Seconds from request to answer, by endpoint",
                                 ["endpoint"], buckets=BUCKETS, registry=r)
        self.batch = Histogram("edgediff_batch_images", "Images per Pipeline call", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)

    def observe(self, event: str, value: Any) -> None:
        """The render queue's events (called from worker threads; prometheus_client is thread-safe)."""
        if event == "queue_seconds":
            self.stage.labels("queue").observe(value)
        elif event == "batch_images":
            self.batch.observe(value)
        elif event == "timings":
            for stage, seconds in value.items():
                for s in seconds if isinstance(seconds, list) else [seconds]:
                    self.stage.labels(stage).observe(s)

    def text(self) -> bytes:
        return generate_latest(self.registry)
