"""The OpenAI images API's request bodies, edgediff's own fields beside them, and OpenAI-style errors.

A request is checked whole before it queues: pydantic for types and ranges, then the bundle's own plan
(`Pipeline.plan`: size multiple, sampler names, step limits) and the memory estimate, so a bad request costs no
worker time and its 400 names the field, as OpenAI's errors do (`error.param`).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.pipeline import Pipeline, RenderError, RenderPlan

MAX_PARTIAL_IMAGES = 3  # as OpenAI's API
# the fields a RenderError message can be about, in the words the plan uses -> the request's field
_FIELD_WORDS = (("negative prompt", "negative_prompt"), ("images per prompt", "n"), ("guidance", "guidance_scale"),
                ("steps", "steps"), ("seed", "seed"), ("sampler", "sampler"), ("schedule", "schedule"),
                ("strength", "strength"), ("eta", "eta"), ("width", "size"), ("height", "size"), ("size", "size"),
                ("memory", "size"), ("prompt", "prompt"))


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, *, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ImageRequest(BaseModel):
    """POST /v1/images/generations (JSON) and /v1/images/edits (multipart, less the files)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None  # WIDTHxHEIGHT or "auto" (the bundle's default)
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES)
    # OpenAI's fields that change nothing here, accepted so that clients which always send them work
    quality: str | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: str | None = None
    style: str | None = None
    user: str | None = None
    input_fidelity: str | None = None
    # edgediff's own (the openai client sends them through extra_body)
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0)
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    strength: float | None = None
    eta: float | None = None


@dataclass
class Limits:
    max_n: int = 8
    max_upload_bytes: int = 16 << 20
    timeout: float = 120.0


@dataclass
class Checked:
    """A request ready to queue."""

    model: str
    request: ImageRequest
    plan: RenderPlan
    image: Image.Image | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_request(data: Any) -> ImageRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field; see /v1/models and the API's fields (edgediff's own: negative_prompt, seed, " \
                  "steps, guidance_scale, sampler, schedule, strength, eta)"
    elif first.get("type") == "missing":
        message = "this field is required"
    return ApiError(400, f"{param}: {message}" if param else message, param)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size.strip().lower())
    if not match:
        raise ApiError(400, f"size must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto, got {size!r}", "size")
    return int(match[1]), int(match[2])


def check_request(pipe: Pipeline, model: str, req: ImageRequest, limits: Limits,
                  image: Image.Image | None = None) -> Checked:
    """Everything a render would refuse, refused now with the field named."""
    if req.response_format == "url":
        raise ApiError(400, "response_format url is not served (images are not kept on the server); use b64_json",
                       "response_format")
    if req.n > limits.max_n:
        raise ApiError(400, f"n must be at most {limits.max_n} on this server, got {req.n}", "n")
    width, height = parse_size(req.size)
    try:
        plan = pipe.plan(image=image, steps=req.steps, guidance_scale=req.guidance_scale, width=width, height=height,
                         seed=req.seed, sampler=req.sampler, schedule=req.schedule, images_per_prompt=req.n,
                         strength=(0.8 if req.strength is None else req.strength) if image is not None else None,
                         eta=req.eta)
        if image is None and req.strength is not None:
            raise RenderError("strength is for /v1/images/edits (image-to-image)")
        pipe.check_memory(plan, 1, img2img=image is not None)  # memory.py's estimate, VAE tiling counted
    except RenderError as e:
        raise ApiError(400, str(e), field_of(str(e))) from None
    return Checked(model, req, plan, image)


def field_of(message: str) -> str | None:
    """The request field a plan's message is about: the first field word in it."""
    text = message.lower()
    found = [(text.find(word), name) for word, name in _FIELD_WORDS if word in text]
    return min(found)[1] if found else None


def read_image(data: bytes, param: str, limits: Limits) -> Image.Image:
    if len(data) > limits.max_upload_bytes:
        raise ApiError(400, f"{param}: the upload is {len(data) / 2**20:.1f} MiB; this server takes at most "
                       f"{limits.max_upload_bytes / 2**20:.1f} MiB", param)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 64 << 20:
                raise ApiError(400, f"{param}: {im.width}x{im.height} pixels is too large to decode", param)
            return im.convert("RGB")
    except ApiError:
        raise
    except Exception:
        raise ApiError(400, f"{param}: not an image PIL can read (PNG, JPEG or WebP)", param) from None


def encode_image(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=100 if compression is None
                   else 100 - compression)
    return buf.getvalue()
