"""The FastAPI app: OpenAI's images API (generations, edits, streaming), /v1/models, /healthz and /metrics, over
the render queue (queue.py). `create_app` takes bundles already loaded; the CLI and the Ray Serve deployment both
build it the same way (`build_app`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException

from ..runtime.plan import RenderError
from . import BUILTIN_ID
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .queue import Job, JobStopped, QueueFull, Scheduler, Served
from .requests import (
    ApiError,
    Checked,
    Limits,
    check_request,
    encode_image,
    field_of,
    parse_request,
    read_image,
)

log = logging.getLogger("edgediff.serve")
_STOPPED = {"timeout": (504, "the render did not finish within the server's timeout", "timeout"),
            "cancelled": (499, "the request was cancelled", "cancelled"),
            "shutdown": (503, "the server is shutting down; retry on another replica", "shutdown")}


@dataclass
class Settings:
    """What `edgediff serve` was asked for; plain values, so that Ray can ship it to its replicas."""

    bundles: list[str] = field(default_factory=list)  # folders; none: the built-in model
    max_batch: int = 8
    max_queue: int = 64
    workers: int = 0  # 0: one per model
    threads: int | None = None
    backend: str = "cpu"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    shutdown_timeout: float = 30.0
    loras: list[tuple[str, float]] = field(default_factory=list)  # (absolute path, scale), added at load to each model


def load_models(settings: Settings) -> dict[str, Served]:
    from ..runtime.pipeline import Pipeline
    from .preview import previewer

    paths: list[str | None] = list(settings.bundles) or [None]
    models: dict[str, Served] = {}
    for path in paths:
        name = BUILTIN_ID if path is None else Path(path).resolve().name
        if name in models:
            raise ValueError(f"two bundles are named {name!r}; model ids are the folders' names")
        pipe = Pipeline.load(path, backend=settings.backend, threads=settings.threads, loras=settings.loras)
        models[name] = Served(name, pipe, previewer(pipe))
    return models


def build_app(settings: Settings) -> FastAPI:
    return create_app(load_models(settings), settings)


def create_app(models: dict[str, Served], settings: Settings) -> FastAPI:
    # the gauges read the scheduler when scraped, after it exists
    metrics = Metrics(lambda: scheduler.depth, lambda: scheduler.running)
    scheduler = Scheduler(models, workers=settings.workers or len(models), max_batch=settings.max_batch,
                          max_queue=settings.max_queue, observe=metrics.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has already let the open requests finish for up to --shutdown-timeout: what still runs now has
        # lost its client, so it is stopped at once rather than given the timeout a second time
        await asyncio.to_thread(scheduler.close, 1.0)

    app = FastAPI(title="edgediff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.models = scheduler, metrics, models
    _install_errors(app, metrics)
    app.add_middleware(_Gate, metrics=metrics, api_key=settings.api_key)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": list(models), "queue_depth": scheduler.depth}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(s) for s in models.values()]}

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        req = parse_request(data)
        served = _model(models, req.model)
        checked = check_request(served.pipeline, served.name, req, settings.limits)
        return await _answer(request, scheduler, metrics, checked, settings, "image_generation")

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        limit = settings.limits.max_upload_bytes
        if int(request.headers.get("content-length") or 0) > limit + (1 << 20):
            raise ApiError(400, f"image: the upload is larger than this server takes ({limit / 2**20:.1f} MiB)",
                           "image")
        async with request.form() as form:  # closes the spooled upload
            return await _edit(request, form, scheduler, metrics, models, settings)

    return app


async def _edit(request: Request, form: Any, scheduler: Scheduler, metrics: Metrics, models: dict[str, Served],
                settings: Settings) -> Response:
    if "mask" in form:
        raise ApiError(400, "mask: inpainting is not supported yet; send the image without a mask", "mask")
    files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if not files or isinstance(files[0], str):
        raise ApiError(400, "image: upload the init image as a file (multipart form field image)", "image")
    if len(files) > 1:
        raise ApiError(400, "image: edits take one image", "image")
    image = read_image(await files[0].read(), "image", settings.limits)
    fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]") and isinstance(v, str)}
    req = parse_request(fields)
    served = _model(models, req.model)
    checked = check_request(served.pipeline, served.name, req, settings.limits, image=image)
    return await _answer(request, scheduler, metrics, checked, settings, "image_edit")


class _Gate:
    """The API key check and the per-request metrics, as plain ASGI: Starlette's BaseHTTPMiddleware would wrap
    `receive`, and `request.is_disconnected()` then never sees a client go away."""

    def __init__(self, app: Any, metrics: Metrics, api_key: str | None) -> None:
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 500}

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if path.startswith("/v1/") and self.api_key and not _authorised(Request(scope), self.api_key):
            response = _error_response(ApiError(
                401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'", kind="authentication_error",
                code="invalid_api_key"), self.metrics, "unauthorized")
            await response(scope, receive, send_status)
        else:
            await self.app(scope, receive, send_status)
        self.metrics.requests.labels(endpoint, str(status["code"])).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/models", "/healthz", "/metrics")


def _authorised(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _model(models: dict[str, Served], name: str | None) -> Served:
    if name is None:
        return next(iter(models.values()))
    if name not in models:
        raise ApiError(404, f"model {name!r} is not served here; choose one of "
                       f"{', '.join(models)}", "model", code="model_not_found")
    return models[name]


def _model_card(served: Served) -> dict[str, Any]:
    m = served.pipeline.manifest
    d = m.defaults
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "edgediff", "family": m.family,
            "preset": m.preset, "defaults": {"sampler": d.sampler, "schedule": d.schedule, "steps": d.steps,
                                             "guidance_scale": d.guidance_scale, "size": f"{d.width}x{d.height}"}}


def _job(checked: Checked, timeout: float) -> Job:
    req = checked.request
    partial = (req.partial_images or 0) if req.stream else 0
    return Job(checked.model, req.prompt, checked.plan, negative_prompt=req.negative_prompt, image=checked.image,
               partial_images=partial, timeout=timeout)


async def _answer(request: Request, scheduler: Scheduler, metrics: Metrics, checked: Checked, settings: Settings,
                  kind: str) -> Response:
    job = _job(checked, settings.limits.timeout)
    headers = {"X-Edgediff-Seed": str(checked.plan.seed)}
    if checked.request.stream:
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_partial(_job: Job, index: int, images: list[Image.Image]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("partial", (index, images)))

        job.on_partial = on_partial
        future = _submit(scheduler, job)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))
        return StreamingResponse(_stream(job, events, checked, metrics, kind), media_type="text/event-stream",
                                 headers=headers)
    future = _submit(scheduler, job)
    wrapped = asyncio.wrap_future(future)
    deadline = time.monotonic() + settings.limits.timeout
    while not wrapped.done():
        await asyncio.wait([wrapped], timeout=0.1)
        if not wrapped.done() and await request.is_disconnected():
            job.cancel()
            wrapped.cancel()  # nobody will read its result
            metrics.rejected.labels("cancelled").inc()
            return Response(status_code=499)
        if not wrapped.done() and time.monotonic() > deadline:
            job.cancel("timeout")
            wrapped.cancel()
            raise _stopped("timeout")
    images, _info = _result(wrapped)
    metrics.images.labels(checked.model).inc(len(images))
    req = checked.request
    fmt = req.output_format or "png"
    data = [{"b64_json": base64.b64encode(encode_image(im, fmt, req.output_compression)).decode()} for im in images]
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": fmt,
                         "size": f"{checked.plan.width}x{checked.plan.height}"}, headers=headers)


def _submit(scheduler: Scheduler, job: Job) -> Any:
    try:
        return scheduler.submit(job)
    except QueueFull as e:
        raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except JobStopped as e:
        raise _stopped(e.reason) from None


def _stopped(reason: str) -> ApiError:
    status, message, code = _STOPPED[reason]
    return ApiError(status, message, kind="timeout_error" if status == 504 else "server_error", code=code)


def _result(future: Any) -> tuple[list[Image.Image], dict[str, Any]]:
    try:
        result: tuple[list[Image.Image], dict[str, Any]] = future.result()
        return result
    except JobStopped as e:
        raise _stopped(e.reason) from None
    except RenderError as e:  # from the pipeline: what the request asked is impossible
        raise ApiError(400, str(e), field_of(str(e))) from None
    except Exception:  # a bug in a worker: its traceback is in the log (queue.py), never in the answer
        raise ApiError(500, "internal server error (the server's log has the details)", kind="server_error") from None


async def _stream(job: Job, events: asyncio.Queue[tuple[str, Any]], checked: Checked, metrics: Metrics,
                  kind: str) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI's images API sends them: {kind}.partial_image, then {kind}.completed."""
    req = checked.request
    fmt = req.output_format or "png"
    common = {"background": "opaque", "output_format": fmt, "quality": "auto",
              "size": f"{checked.plan.width}x{checked.plan.height}"}
    deadline = time.monotonic() + (job.timeout or 24 * 3600.0)
    try:
        while True:
            try:
                what, value = await asyncio.wait_for(events.get(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancel("timeout")
                continue
            if what == "partial":
                index, previews = value
                for im in previews:
                    yield _sse(f"{kind}.partial_image", {**common, "type": f"{kind}.partial_image",
                               "b64_json": _b64(im, fmt), "created_at": int(time.time()),
                               "partial_image_index": index})
                continue
            try:
                images, _info = _result(job.future)
            except ApiError as e:
                if e.status in (503, 504):
                    metrics.rejected.labels("timeout" if e.status == 504 else "shutdown").inc()
                yield _sse("error", e.body())
                return
            metrics.images.labels(checked.model).inc(len(images))
            usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                     "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
            for im in images:
                yield _sse(f"{kind}.completed", {**common, "type": f"{kind}.completed", "b64_json": _b64(im, fmt),
                                                 "created_at": int(time.time()), "usage": usage})
            return
    finally:
        if not job.future.done():  # the client went away mid-stream
            job.cancel()
            metrics.rejected.labels("cancelled").inc()


def _b64(image: Image.Image, fmt: str) -> str:
    return base64.b64encode(encode_image(image, fmt, None)).decode()


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _error_response(error: ApiError, metrics: Metrics, reason: str | None = None) -> JSONResponse:
    if reason:
        metrics.rejected.labels(reason).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_errors(app: FastAPI, metrics: Metrics) -> None:
    """Every failure answers in OpenAI's error shape; a bug's traceback goes to the log, never to the client."""
    reasons = {400: "bad_request", 404: "bad_request", 429: "queue_full", 504: "timeout", 503: "shutdown"}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e, metrics, reasons.get(e.status))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, "malformed request"), metrics, "bad_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error_response(ApiError(e.status_code, str(e.detail)), metrics)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error_response(ApiError(500, "internal server error (the server's log has the details)",
                                        kind="server_error"), metrics)
