"""`edgediff serve --ray`: the same FastAPI app as a Ray Serve deployment, one app (with its own render queue and
batching) per replica; Ray's proxy spreads requests over the replicas, its autoscaler adds and removes them.

Each replica builds the app when it starts (`__serve_build_asgi_app__`), so the Pipelines load on the replica's
node, never in the driver. Ray Serve's own cap on concurrent requests per replica (max_ongoing_requests, 5 by
default) is raised to what the app's queue takes: the app, not Ray, answers 429 with Retry-After when full, and
compatible requests queued together still batch.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

from .app import Settings, build_app

APP_NAME = "edgediff"


class EdgediffReplica:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.settings)


def deployment(settings: Settings, *, replicas: int = 1, gpus: float = 0.0, cpus: float = 1.0,
               autoscaling: dict[str, Any] | None = None) -> Any:
    """The bound deployment for `serve.run`: `replicas` fixed, or Ray's `autoscaling` config passed through."""
    from ray import serve

    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    ongoing = settings.max_queue + max(1, settings.workers or len(settings.bundles) or 1) * settings.max_batch
    cls = serve.deployment(
        name=APP_NAME, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}, max_ongoing_requests=ongoing,
        graceful_shutdown_timeout_s=settings.shutdown_timeout, **scale,
    )(serve.ingress()(EdgediffReplica))
    return cls.bind(settings)


def start(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          replicas: int = 1, gpus: float = 0.0, cpus: float = 1.0, autoscaling: dict[str, Any] | None = None) -> str:
    """Deploy and return the base URL once every replica is up (Ray joined or started first if need be)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(settings, replicas=replicas, gpus=gpus, cpus=cpus, autoscaling=autoscaling),
              name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/v1"


def run_ray_serve(settings: Settings, *, host: str, port: int, address: str | None, replicas: int, gpus: float,
                  autoscaling: dict[str, Any] | None, ready: Callable[[str], None]) -> None:
    """Deploy, then hold the driver until SIGTERM or Ctrl-C, and take the deployment down gracefully."""
    from ray import serve

    url = start(settings, host=host, port=port, address=address, replicas=replicas, gpus=gpus,
                autoscaling=autoscaling)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    ready(url)
    stop.wait()
    serve.delete(APP_NAME)
    serve.shutdown()
