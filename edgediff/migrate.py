"""Older manifests, read as the current format: the one place that knows what earlier versions wrote.

Migration happens in memory at every load and never writes to the bundle, which may be read-only (package data,
a mounted image). Version 1 (edgediff 0.1) differs from version 2 in:
- `tokenizer` / `tokenizer_2` records (with an unread "kind") instead of `tokenizers` by role, and no `max_length`
  where the length was left to the folder's tokenizer_config.json. Their files were copied from the source as
  they were (`vocab.json` + `merges.txt`, or a `tokenizer.json` without padding); the runtime turns them into
  the canonical form in memory (runtime/legacy_tokenizer.py), told so by `Manifest.migrated_from`.
- no `defaults.schedule`: the runtime took it from its preset table, frozen here as it stood;
- no per-axis ranges: derived from the defaults, as the export now does by default;
- empty `parity` / `conversion` objects where there was nothing to say.

Standard library only, as bundle.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .bundle import Component, Manifest, check_references, default_axis_ranges
from .records import FieldError, bundle_path_problem, read_record

# runtime/samplers.py PRESETS as edgediff 0.1 read it: the schedule a v1 bundle's preset rendered with.
V1_PRESET_SCHEDULES = {"standard": "discrete", "turbo": "trailing", "lcm": "lcm", "lightning": "trailing"}
V1_DEFAULT_MAX_LENGTH = 77  # CLIP's, what 0.1's tokenizer fell back to
_NO_LIMIT = 10**20  # transformers writes 1e30 for "no limit"


def migrate_v1(raw: dict[str, Any], root: Path) -> Manifest:
    """A version-1 manifest as a current Manifest; FieldError (with the v1 field's name) where it is malformed."""
    d = {k: v for k, v in raw.items() if k not in ("format", "format_version", "tokenizer", "tokenizer_2")}
    preset = raw.get("preset")
    if preset not in V1_PRESET_SCHEDULES:
        raise FieldError("preset", f"{preset!r} is not one of {', '.join(V1_PRESET_SCHEDULES)}")
    defaults = raw.get("defaults")
    if not isinstance(defaults, dict):
        raise FieldError("defaults", "expected an object")
    d["defaults"] = {"schedule": V1_PRESET_SCHEDULES[preset], **defaults}
    d["tokenizers"] = {}
    for key in ("tokenizer", "tokenizer_2"):
        if raw.get(key) is not None:
            record = _tokenizer_v1(raw[key], root, key)
            d["tokenizers"][record["path"]] = record
    components = raw.get("components")
    if not isinstance(components, dict):
        raise FieldError("components", "expected an object")
    d["components"] = {name: _drop_empty(c, ("parity", "conversion")) for name, c in components.items()}
    manifest = read_record(Manifest, d, "")
    manifest = _with_axis_ranges(manifest)
    check_references(manifest)
    return dataclasses.replace(manifest, migrated_from=1)


def _tokenizer_v1(record: Any, root: Path, key: str) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise FieldError(key, "expected an object with a path")
    problem = bundle_path_problem(record["path"])
    if problem:
        raise FieldError(f"{key}.path", problem)
    out = {k: v for k, v in record.items() if k in ("path", "files", "max_length")}
    if "max_length" not in out:
        out["max_length"] = _folder_max_length(root / record["path"])
    return out


def _folder_max_length(folder: Path) -> int:
    """The length 0.1's tokenizer used: tokenizer_config.json's model_max_length where it is a real limit, else
    CLIP's 77 (a tokenizer.json's own truncation was overridden by it)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return V1_DEFAULT_MAX_LENGTH
    length = config.get("model_max_length") if isinstance(config, dict) else None
    return length if isinstance(length, int) and 0 < length < _NO_LIMIT else V1_DEFAULT_MAX_LENGTH


def _drop_empty(component: Any, keys: tuple[str, ...]) -> Any:
    if not isinstance(component, dict):
        return component  # the reader says what is wrong with it
    return {k: v for k, v in component.items() if not (k in keys and v == {})}


def _with_axis_ranges(m: Manifest) -> Manifest:
    d, latent = m.defaults, m.latent
    sequence = max(t.max_length for t in m.tokenizers.values())
    components: dict[str, Component] = {}
    for name, c in m.components.items():
        try:
            axes = default_axis_ranges(c.dynamic_axes(), height=d.height, width=d.width, downscale=latent.downscale,
                                       size_multiple=m.size_multiple, sequence=sequence)
        except ValueError as e:
            raise FieldError(f"components.{name}", str(e)) from None
        components[name] = dataclasses.replace(c, axes={**axes, **c.axes})
    return dataclasses.replace(m, components=components)
