"""The manifest's typed records, and the one reader that builds them from JSON, checking every field's type.

Each record is a frozen dataclass whose annotations are the schema: `read_record` walks them (ints, floats, strings,
bools, Literal choices, optional values, tuples, string-keyed dicts, nested records) and says which field is wrong
in one line, so a hand-edited or truncated manifest fails with `defaults.steps: expected an integer, found 'four'`
rather than a traceback deep in the runtime. Field metadata adds the few value checks types cannot state.

Shared by export and runtime: standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line saying what is wrong and what to do."""


class FieldError(ValueError):
    """A manifest field of the wrong type or value; `where` is its dotted path."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


def at_least(n: int) -> dict[str, int]:
    return {"min": n}


NONEMPTY = {"nonempty": True}
NOT_WRITTEN = {"json": False}  # held in memory only (what the manifest was migrated from)
BUNDLE_PATH = {"bundle_path": True}  # a file or folder inside the bundle: relative, no `..`

OptimizationLevel = Literal["disabled", "basic", "extended", "all"]
PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
OPTIMIZATION_LEVELS: tuple[str, ...] = typing.get_args(OptimizationLevel)
PREDICTION_TYPES: tuple[str, ...] = typing.get_args(PredictionType)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle, with what it takes to check it quickly (size, fingerprint) and fully (sha256)."""

    path: str = field(metadata=BUNDLE_PATH)
    size: int = field(metadata=at_least(0))
    sha256: str
    fingerprint: str

    @classmethod
    def of(cls, root: Path, rel: str) -> FileEntry:
        from .bundle_files import (  # the checksums live with the bundle's file checks
            fingerprint_file,
            sha256_file,
        )

        full = root / rel
        return cls(rel, full.stat().st_size, sha256_file(full), fingerprint_file(full))


@dataclass(frozen=True)
class SessionOptions:
    """How ONNX Runtime's CPU backend should run a graph, chosen at export (docs/loading.md says why they differ
    per component). JSON key: "ort_options"."""

    graph_optimization_level: OptimizationLevel = "all"
    disable_prepacking: bool = False
    # Load through runtime/graph_cache.py (the "all"-level graph saved once per machine): large convolutional
    # graphs, whose "all"-level optimisation would otherwise cost seconds at every load.
    cache_optimized_graph: bool = False


@dataclass(frozen=True)
class AxisRange:
    """The sizes a dynamic axis takes (TensorRT optimization profiles are built from these)."""

    min: int = field(metadata=at_least(1))
    opt: int = field(metadata=at_least(1))
    max: int = field(metadata=at_least(1))


@dataclass(frozen=True)
class Parity:
    """The export's proof: the worst error of this graph against its reference (PyTorch, or the fp32 graph for a
    converted one) over the shapes tried, and the limit it was held to."""

    max_abs_err: float
    limit: float
    output: str | None = None
    against: str = "pytorch"
    relative_tolerance: float | None = None
    shapes: tuple[dict[str, int], ...] = ()
    psnr_db: float | None = None
    min_psnr_db: float | None = None
    samples: int | None = None
    fp32_against_pytorch: Parity | None = None  # a converted graph: the fp32 graph's own proof


@dataclass(frozen=True)
class Conversion:
    """What a reduced-precision conversion did: fp16's fp32 islands; int8's scheme, layer counts and the file of
    its per-layer report (quantized vs float, with reasons), which is also listed in the component's files."""

    fp32_islands: tuple[str, ...] = ()
    report: str | None = field(default=None, metadata=BUNDLE_PATH)
    scheme: str | None = None
    quantized_layers: int | None = None
    float_layers: int | None = None


@dataclass(frozen=True)
class TokenizerRecord:
    """A tokenizer folder: `tokenizer.json` (canonical: added tokens, padding and truncation included)."""

    path: str = field(metadata=BUNDLE_PATH)
    files: tuple[FileEntry, ...]
    max_length: int = field(metadata=at_least(1))


@dataclass(frozen=True)
class LoraRecord:
    file: str
    sha256: str
    scale: float
    format: str
    layers: dict[str, int] = field(default_factory=dict)  # layers fused, per component


@dataclass(frozen=True)
class CalibrationRecord:
    prompts: tuple[str, ...]
    held_out: int
    steps: int | None = None
    size: int | None = None
    samples: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> {"calibration", "gate"}


UNKNOWN_LICENCE = "unknown"


@dataclass(frozen=True)
class Provenance:
    """Where a bundle came from and what made it."""

    source: str = ""
    description: str | None = None
    source_pipeline: str | None = None
    licence: str = UNKNOWN_LICENCE  # the source model's licence: users must check it before commercial use
    licence_from: str | None = None  # "the model card", "--license"
    opset: int | None = None
    loras: tuple[LoraRecord, ...] = ()
    vae_decoder: str | None = None
    precision: str | None = None
    kept_fp32: dict[str, str] = field(default_factory=dict)  # component -> why it stayed fp32
    calibration: CalibrationRecord | None = None
    date: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this edgediff does not know, kept as read


def read_record(cls: type, value: Any, where: str) -> Any:
    """Build record `cls` from JSON `value`, checking every field; FieldError names the first bad one."""
    if not isinstance(value, dict):
        raise FieldError(where or "manifest", f"expected an object, found {_show(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("json", True)}
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldError(path, "missing")
            continue
        kwargs[name] = _check_value(f, read_value(hints[name], value[name], path), path)
    unknown = {k: v for k, v in value.items() if k not in fields}
    if unknown and "extra" in fields:
        kwargs["extra"] = {**kwargs.get("extra", {}), **unknown}
    return cls(**kwargs)


def read_value(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return read_value(option, value, where)
            except FieldError:
                pass
        return read_value(options[-1], value, where)
    if origin is Literal:
        if value not in args:
            raise FieldError(where, f"{_show(value)} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldError(where, f"expected a list, found {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(read_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise FieldError(where, f"expected {len(args)} values, found {len(value)}")
        return tuple(read_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(where, f"expected an object, found {_show(value)}")
        return {k: read_value(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return read_record(typing.cast(type, tp), value, where)
    return _read_scalar(tp, value, where)


def _read_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(where, f"expected true or false, found {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(where, f"expected an integer, found {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(where, f"expected a number, found {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise FieldError(where, f"expected a string, found {_show(value)}")
        return value
    raise TypeError(f"{where}: no reader for {tp!r}")  # a schema bug, not a bad manifest


def _check_value(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    minimum = f.metadata.get("min")
    if minimum is not None and value is not None and value < minimum:
        raise FieldError(where, f"{value!r} is below {minimum}")
    if f.metadata.get("nonempty") and not value:
        raise FieldError(where, "empty")
    if f.metadata.get("bundle_path") and value is not None:
        problem = bundle_path_problem(value)
        if problem:
            raise FieldError(where, problem)
    return value


def bundle_path_problem(path: str) -> str | None:
    """Why `path` cannot name something inside a bundle, or None. A bundle's paths are relative to its folder and
    never climb out of it: a manifest must not make the runtime open (or hash) a file elsewhere."""
    if not path or "\x00" in path:
        return f"{_show(path)} is not a path inside the bundle"
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).anchor:
        return f"{_show(path)} is absolute; a bundle's paths are relative to its folder"
    if ".." in PurePosixPath(path).parts or ".." in PureWindowsPath(path).parts:
        return f"{_show(path)} climbs out of the bundle (..); a bundle's paths stay inside its folder"
    return None


def read_versioned(path: Path, fmt: str, version: int, cls: type, key: str) -> Any:
    """Record `cls` from the JSON file at `path`: "format" must be `fmt`, "format_version" `version`, and `key`
    holds the record's one field. Raises one of VERSIONED_ERRORS, for the caller to say what to do."""
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or raw.get("format") != fmt:
        raise FieldError("format", f"not {fmt!r}")
    if raw.get("format_version") != version:
        raise FieldError("format_version", f"{raw.get('format_version')!r}, this edgediff reads {version}")
    return read_record(cls, {key: raw.get(key, {})}, "")


VERSIONED_ERRORS = (OSError, UnicodeDecodeError, json.JSONDecodeError, FieldError)


def to_json(record: Any) -> Any:
    """A record as JSON values: fields in order, tuples as lists, in-memory-only fields left out."""
    if dataclasses.is_dataclass(record):
        out = {f.name: to_json(getattr(record, f.name))
               for f in dataclasses.fields(record) if f.metadata.get("json", True)}
        return {k: v for k, v in out.items() if not (k == "extra" and not v)}
    if isinstance(record, dict):
        return {k: to_json(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [to_json(v) for v in record]
    return record


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
