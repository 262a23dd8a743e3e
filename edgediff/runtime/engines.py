"""TensorRT engines of a bundle: their keys, their index, where they live, and which one a render takes.

An engine is valid only on the GPU architecture (compute capability) and the TensorRT version that built it, for
the graph it was built from, and only for the input shapes of its optimisation profile. The key says all of it:

    <component>.<precision>.sm<major><minor>.trt<version>.<digest>

where the digest covers the source graph's fingerprints, the profile and the build options that change the engine
(weight streaming). Engines sit in `engines/` inside the bundle, listed in `engines/index.json`; where the bundle is
read-only (an installed package), in the user's cache (`~/.cache/edgediff/engines/<bundle id>/`), as
graph_cache.py does for optimised graphs. The manifest and its checksums are never rewritten: an index entry
records the graph it came from, so a re-exported bundle never meets a stale engine.

Standard library only (tensorrt and cuda-python are imported by the build and the backend, lazily).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..bundle import BundleError, Component, Manifest
from ..records import VERSIONED_ERRORS, read_versioned, to_json

ENGINES_FOLDER = "engines"
INDEX_NAME = "index.json"
INDEX_FORMAT = "edgediff-engines"
INDEX_VERSION = 1

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimisation profile: the smallest, the tuned-for and the largest shape an engine takes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def covers(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= n <= hi for lo, n, hi in zip(self.min, shape, self.max))

    @property
    def static(self) -> bool:
        return self.min == self.max


@dataclass(frozen=True)
class Machine:
    """What an engine is bound to: the GPU's compute capability ("9.0") and TensorRT's version ("10.8.0.43")."""

    compute_capability: str
    tensorrt: str
    gpu: str = ""

    @property
    def label(self) -> str:
        return f"sm{self.compute_capability.replace('.', '')} / TensorRT {self.tensorrt}"


@dataclass(frozen=True)
class EngineEntry:
    """One engine as engines/index.json lists it; `file` is relative to the index's folder."""

    component: str
    file: str
    precision: str
    compute_capability: str
    tensorrt: str
    graph: str  # digest of the source graph's file fingerprints
    profile: dict[str, ShapeRange]
    weight_streaming: bool = False
    size: int = 0
    sha256: str = ""
    built: str = ""  # ISO date

    @property
    def machine(self) -> Machine:
        return Machine(self.compute_capability, self.tensorrt)

    def covers(self, shapes: Shapes) -> bool:
        return all(name in shapes and r.covers(shapes[name]) for name, r in self.profile.items())

    @property
    def static(self) -> bool:
        return all(r.static for r in self.profile.values())


@dataclass(frozen=True)
class EngineIndex:
    engines: dict[str, EngineEntry] = field(default_factory=dict)


def graph_digest(component: Component) -> str:
    return hashlib.sha256(" ".join(f.fingerprint for f in component.files).encode()).hexdigest()[:16]


def engine_key(name: str, component: Component, machine: Machine, profile: Mapping[str, ShapeRange],
               weight_streaming: bool = False) -> str:
    """The engine's name: readable where it matters to a person, a digest for the rest."""
    what = json.dumps({"graph": graph_digest(component), "profile": to_json(dict(sorted(profile.items()))),
                       "weight_streaming": weight_streaming}, sort_keys=True)
    digest = hashlib.sha256(what.encode()).hexdigest()[:10]
    sm = machine.compute_capability.replace(".", "")
    return f"{name}.{component.precision}.sm{sm}.trt{machine.tensorrt}.{digest}"


def bundle_id(manifest: Manifest) -> str:
    return hashlib.sha256(" ".join(f.fingerprint for f in manifest.all_files()).encode()).hexdigest()[:16]


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgediff" / "engines"


def engine_folders(root: Path, manifest: Manifest) -> list[Path]:
    """Where a bundle's engines may live, in order: inside the bundle, then the user's cache."""
    return [Path(root) / ENGINES_FOLDER, user_cache_root() / bundle_id(manifest)]


def write_folder(root: Path, manifest: Manifest) -> Path:
    """Where a build writes: the bundle's own engines/ if the bundle can be written, else the user's cache."""
    inside, cache = engine_folders(root, manifest)
    return inside if writable(inside if inside.is_dir() else Path(root)) else cache


def writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def read_index(folder: Path) -> EngineIndex:
    path = folder / INDEX_NAME
    if not path.is_file():
        return EngineIndex()
    try:
        index: EngineIndex = read_versioned(path, INDEX_FORMAT, INDEX_VERSION, EngineIndex, "engines")
    except VERSIONED_ERRORS as e:
        raise BundleError(f"{path}: unreadable engine index ({e}); delete {folder} and run `edgediff build` "
                          "again") from None
    return index


def write_index(folder: Path, index: EngineIndex) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION,
                            "engines": to_json(dict(sorted(index.engines.items())))}
    with atomic_file(folder / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def add_entry(folder: Path, key: str, entry: EngineEntry) -> None:
    """Record a built engine (re-reading the index first: another build may have added its own meanwhile)."""
    engines = dict(read_index(folder).engines)
    engines[key] = entry
    write_index(folder, EngineIndex(engines))


def present(folder: Path, key: str) -> bool:
    """An engine listed under `key` whose file is there at the size the index records (a finished build)."""
    entry = read_index(folder).engines.get(key)
    path = folder / entry.file if entry else None
    return entry is not None and path is not None and path.is_file() and path.stat().st_size == entry.size


def engines_for(root: Path, manifest: Manifest, name: str) -> list[tuple[Path, EngineEntry]]:
    """Every engine listed for component `name`, with its path, wherever it lives."""
    found = []
    for folder in engine_folders(root, manifest):
        for entry in read_index(folder).engines.values():
            if entry.component == name:
                found.append((folder / entry.file, entry))
    return found


def usable(entry: EngineEntry, component: Component, machine: Machine) -> bool:
    return (entry.machine == Machine(machine.compute_capability, machine.tensorrt)
            and entry.graph == graph_digest(component) and entry.precision == component.precision)


def stale_message(root: Path, name: str, found: list[EngineEntry], component: Component, machine: Machine) -> str:
    """One line for engines that exist but cannot run here: which machine they were made for, what to run."""
    rebuild = f"rebuild them here with `edgediff build {root}`"
    if any(e.graph != graph_digest(component) or e.precision != component.precision for e in found):
        return f"{name}: the TensorRT engines in {root} were built from an earlier export of the bundle; {rebuild}"
    built_for = sorted({e.machine.label for e in found})
    return (f"{name}: the TensorRT engines in {root} were built for {', '.join(built_for)}, this machine is "
            f"{machine.label}; {rebuild}")


def choose(entries: list[EngineEntry], shapes: Shapes) -> EngineEntry | None:
    """The engine for a call of these shapes: one whose profile covers them, static ones first (a CUDA graph
    can be captured), then the tightest profile (the least memory, kernels tuned nearest)."""
    fitting = [e for e in entries if e.covers(shapes)]
    if not fitting:
        return None

    def looseness(e: EngineEntry) -> tuple[bool, int]:
        volume = 0
        for r in e.profile.values():
            n = 1
            for d in r.max:
                n *= d
            volume += n
        return not e.static, volume

    return min(fitting, key=looseness)


def describe_profiles(entries: list[EngineEntry]) -> str:
    def one(e: EngineEntry) -> str:
        return ", ".join(f"{n} {r.min}..{r.max}" if not r.static else f"{n} {r.min}" for n, r in e.profile.items())

    return "; ".join(f"[{one(e)}]" for e in entries)
