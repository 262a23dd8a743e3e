"""Bundle -> TensorRT engines, one per component, on the GPU that will run them.

Written for TensorRT 11's model, which 10.x shares: every network strongly typed (`STRONGLY_TYPED` where the flag
still exists), so an engine's precision is the ONNX's own (fp16 casts, int8 QDQ nodes) and no FP16 / INT8 builder
flag or calibrator is set. One optimisation profile per engine, from build/profiles.py. The timing cache is read
before and written after every engine, so a second build (or a resumed one) skips kernel timing it already did.

Atomic and resumable: each engine file is written beside its place and renamed in, then listed in
engines/index.json (runtime/engines.py); an engine already listed under the same key is not rebuilt, so an
interrupted build resumes at the component it was building.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..bundle import BundleError, Component, load_manifest
from ..runtime.backends.cuda_runtime import require_gpu_stack
from ..runtime.engines import (
    EngineEntry,
    Machine,
    ShapeRange,
    add_entry,
    engine_key,
    graph_digest,
    present,
    write_folder,
)
from ..runtime.sessions import BackendError
from .profiles import BuildRequest, bundle_profiles

OLDEST_TENSORRT = 10
Progress = Callable[[str, int, int, str], None]  # component, done, total, "built" or "skipped"


@dataclass(frozen=True)
class BuildOptions:
    request: BuildRequest = field(default_factory=BuildRequest)
    timing_cache: Path | None = None  # default: one per GPU and TensorRT version beside the engines
    workspace_gb: float | None = None  # TensorRT's workspace pool limit; None: TensorRT's default (the GPU's memory)
    weight_streaming: bool = False  # engines that can stream weights from host memory (big models, small GPUs)


@dataclass(frozen=True)
class Built:
    component: str
    key: str
    path: Path
    skipped: bool  # already built with the same key


def build_engines(root: str | os.PathLike[str], options: BuildOptions = BuildOptions(),
                  progress: Progress | None = None) -> list[Built]:
    """Build (or find already built) an engine for every component of the bundle at `root`."""
    root = Path(root)
    manifest = load_manifest(root)
    profiles = bundle_profiles(manifest, options.request)  # a bad request is refused before the GPU is touched
    trt, _cuda, machine = require_gpu_stack()
    flags = network_flags(trt)
    folder = write_folder(root, manifest)
    cache = options.timing_cache or folder / f"timing.sm{machine.compute_capability.replace('.', '')}" \
                                             f".trt{machine.tensorrt}.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    done: list[Built] = []
    for name, profile in profiles.items():
        component = manifest.components[name]
        key = engine_key(name, component, machine, profile, options.weight_streaming)
        path = folder / f"{key}.plan"
        skipped = present(folder, key)
        if not skipped:
            engine = build_engine(trt, logger, flags, root / component.file, component, profile, options, cache)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp, open(tmp, "wb") as f:
                f.write(engine)
            add_entry(folder, key, _entry(name, component, machine, profile, options, path))
        done.append(Built(name, key, path, skipped))
        if progress:
            progress(name, len(done), len(profiles), "skipped" if skipped else "built")
    return done


def network_flags(trt: Any) -> int:
    """Strongly typed: TensorRT 10 by its flag; TensorRT 11 has no other kind (the flag may be gone)."""
    major = int(str(trt.__version__).split(".")[0])
    if major < OLDEST_TENSORRT:
        raise BackendError(f"TensorRT {trt.__version__} is too old; edgediff builds with TensorRT "
                           f"{OLDEST_TENSORRT} or newer")
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def build_engine(trt: Any, logger: Any, flags: int, graph: Path, component: Component,
                 profile: dict[str, ShapeRange], options: BuildOptions, cache_path: Path) -> Any:
    """One serialised engine (TensorRT's IHostMemory, a buffer) for the ONNX graph at `graph`."""
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)  # holds the weights the network points at: keep it until built
    if not parser.parse_from_file(os.fspath(graph)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"{graph}: TensorRT cannot parse it ({errors[0] if errors else 'no detail'}); "
                          "re-export the bundle or use --backend cpu")
    found = {network.get_input(i).name for i in range(network.num_inputs)}
    expected = {t.name for t in component.inputs}
    if found != expected:
        raise BundleError(f"{graph}: inputs {sorted(found)}, the manifest says {sorted(expected)}; re-export")
    config = builder.create_builder_config()
    if options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    shapes = builder.create_optimization_profile()
    for name, r in profile.items():
        shapes.set_shape(name, r.min, r.opt, r.max)
    config.add_optimization_profile(shapes)
    timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing, False)  # ignore_mismatch False: a cache from another GPU is not used
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BundleError(f"{graph}: TensorRT could not build an engine (its log above says why)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache_path) as tmp, open(tmp, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    return engine


def _entry(name: str, component: Component, machine: Machine, profile: dict[str, ShapeRange],
           options: BuildOptions, path: Path) -> EngineEntry:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return EngineEntry(component=name, file=path.name, precision=component.precision,
                       compute_capability=machine.compute_capability, tensorrt=machine.tensorrt,
                       graph=graph_digest(component), profile=profile,
                       weight_streaming=options.weight_streaming, size=path.stat().st_size,
                       sha256=digest.hexdigest(), built=datetime.now(timezone.utc).isoformat(timespec="seconds"))
