"""`edgediff serve` (the OpenAI images API over HTTP, optionally as a Ray Serve deployment) and `edgediff batch` (a
prompt file rendered in-process or over a Ray cluster). Thin: parse, call edgediff.serve, show progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_options import USAGE_ERROR, lora_option, one_line_errors
from .runtime.backends import BACKENDS


def _need(extra: str, *modules: str) -> None:
    """One line naming the extra to install when an optional dependency is missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            click.echo(f"error: this needs the {extra} extra ({module} is missing); pip install 'edgediff[{extra}]'",
                       err=True)
            sys.exit(USAGE_ERROR)


def _absolute(loras) -> list[tuple[str, float]]:
    """--lora's (path, scale) pairs as plain values with absolute paths: Ray ships them to its workers."""
    return [(str(Path(path).resolve()), float(scale)) for path, scale in loras]


def _autoscaling(ctx, param, value):
    if value is None:
        return None
    try:
        config = json.loads(value)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise click.BadParameter('give a JSON object of Ray Serve autoscaling settings, e.g. '
                                 '\'{"min_replicas": 1, "max_replicas": 4}\'')
    return config


@click.command()
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=click.IntRange(1), default=8, show_default=True,
              help="Images per Pipeline call: compatible queued requests are rendered together up to this.")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests waiting for a worker; past it, 429 with Retry-After.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=120.0, show_default=True,
              help="Seconds a request may take, queueing included; then 504 and its render stops.")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="On SIGTERM: seconds to finish running and queued renders before stopping them.")
@click.option("--workers", type=click.IntRange(0), default=0, help="Renders running at once [default: one per "
              "model].")
@click.option("--threads", type=click.IntRange(1), help="Intra-op threads per render [default: ONNX Runtime's].")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="cpu", show_default=True,
              help="Where the models run.")
@click.option("--api-key", envvar="EDGEDIFF_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ "
              "[default: $EDGEDIFF_API_KEY, else none].")
@click.option("--max-n", type=click.IntRange(1, 64), default=8, show_default=True, help="Images per request.")
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=16.0, show_default=True,
              help="Largest image upload (/v1/images/edits).")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy as a Ray Serve application instead (needs the ray "
              "extra); the same app in each replica.")
@click.option("--ray-address", help="Ray cluster to join [default: a local one].")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="--ray: replicas.")
@click.option("--gpus-per-replica", type=click.FloatRange(0), default=0.0, show_default=True,
              help="--ray: GPUs each replica reserves (1: one replica per GPU).")
@click.option("--autoscaling", callback=_autoscaling, metavar="JSON",
              help="--ray: Ray Serve autoscaling_config, passed through (replaces --replicas).")
@lora_option("A LoRA added to every served model's weights at load, at SCALE [default: 1]; repeatable.")
def serve(bundles, host, port, max_batch, max_queue, timeout, shutdown_timeout, workers, threads, backend, api_key,
          max_n, max_upload_mb, use_ray, ray_address, replicas, gpus_per_replica, autoscaling, loras):
    """Serve BUNDLES (default: the built-in model, id edgediff-builtin) over OpenAI's images API:
    POST /v1/images/generations and /v1/images/edits, GET /v1/models, /healthz and /metrics."""
    _need("serve", "fastapi", "uvicorn", "prometheus_client", "python_multipart")
    from .serve.app import Settings
    from .serve.requests import Limits

    settings = Settings(bundles=[str(b) for b in bundles], max_batch=max_batch, max_queue=max_queue,
                        workers=workers, threads=threads, backend=backend, api_key=api_key or None,
                        limits=Limits(max_n=max_n, max_upload_bytes=int(max_upload_mb * 2**20), timeout=timeout),
                        shutdown_timeout=shutdown_timeout, loras=_absolute(loras))
    if use_ray:
        _need("ray", "ray")
        from .serve.ray_serve import run_ray_serve

        with one_line_errors():
            run_ray_serve(settings, host=host, port=port, address=ray_address, replicas=replicas,
                          gpus=gpus_per_replica, autoscaling=autoscaling, ready=lambda url: click.echo(url, err=True))
        return
    import uvicorn

    from .serve.app import build_app

    with one_line_errors(ValueError):
        app = build_app(settings)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
                            log_level="warning", access_log=False)
    server = _server_class(uvicorn)(config)
    click.echo(f"serving {', '.join(app.state.models)} on http://{host}:{port}/v1", err=True)
    server.run()


def _server_class(uvicorn):
    import signal
    from contextlib import contextmanager

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            """SIGTERM / SIGINT start uvicorn's graceful shutdown (a second one forces it), as uvicorn's own; but
            uvicorn then re-raises the signal, so a shutdown that finished its work would exit 143. This exits 0."""
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


@click.command()
@click.argument("prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-m", "--model", "bundle", type=click.Path(path_type=Path),
              help="Bundle for lines without a model [default: the built-in model].")
@click.option("--ray", "ray_address", metavar="ADDRESS", help="Render on a Ray cluster (needs the ray extra): its "
              "address, or 'local' to start one on this machine [default: in this process].")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True,
              help="Actors (one Pipeline each) rendering at once.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True,
              help="Prompts per actor call; compatible ones render as one Pipeline batch.")
@click.option("--threads", type=click.IntRange(1), help="Intra-op threads per Pipeline.")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="cpu", show_default=True)
@lora_option("A LoRA added to the weights of every model the prompts use, at SCALE [default: 1]; repeatable.")
def batch(prompts, out_dir, bundle, ray_address, replicas, batch_size, threads, backend, loras):
    """Render every line of PROMPTS (JSON lines: {"prompt": ..., "seed": ..., ...}, see the README) to one PNG
    each in OUT_DIR, with OUT_DIR/results.jsonl. Run again to resume: prompts already rendered are skipped."""
    from tqdm import tqdm

    from .serve.batch import BatchOptions, run_batch

    if ray_address:
        _need("ray", "ray", "pandas")
    options = BatchOptions(bundle=str(bundle) if bundle else None, replicas=replicas, batch_size=batch_size,
                           threads=threads, backend=backend, ray_address=ray_address, loras=_absolute(loras))
    with one_line_errors(), tqdm(desc="batch", unit="prompt", disable=None) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        summary = run_batch(prompts, out_dir, options, progress=progress)
    click.echo(f"{summary.rendered} rendered, {summary.skipped} already there: {out_dir / 'results.jsonl'}", err=True)
