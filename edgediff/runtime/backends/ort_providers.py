"""ONNX Runtime's GPU execution providers, configured from the manifest alone: pure functions, so that tests check
what a GPU would be given on a machine without one.

- CUDA: the device, cuDNN's convolution search (exhaustive: a render keeps one size, so the search runs once per
  shape and pays back over the steps), and the memory arena (grown only by what is asked under `--memory low`).
- TensorRT: precision from the component's record (fp16 → `trt_fp16_enable`, int8 QDQ → `trt_int8_enable`, no
  calibration table: the QDQ nodes carry the scales), an engine cache and a timing cache (TensorRT's build takes
  minutes for a U-Net; the cache makes it once per GPU), and one optimization profile from the manifest's per-axis
  min/opt/max (without one, ONNX Runtime rebuilds the engine whenever a shape leaves what it has seen).

Where the caches live: `<bundle>/engines/ort-trt/<component>` (the timing cache in `<bundle>/engines/ort-trt`,
shared by the components), or, for a bundle this user cannot write, the per-machine cache under
`~/.cache/edgediff/ort-trt/`. ONNX Runtime names its engine files after the graph's hash and the GPU's compute
capability, so one folder serves several GPUs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ...bundle import BundleError, Component
from ..sessions import BackendError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

Provider = tuple[str, dict[str, Any]]
PROFILE_POINTS = ("min", "opt", "max")
ENGINE_FOLDER = Path("engines") / "ort-trt"


def cuda_options(device_id: int = 0, lean: bool = False) -> dict[str, Any]:
    """The CUDA execution provider's options."""
    return {
        "device_id": device_id,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        # kNextPowerOfTwo keeps freed blocks for the next step; kSameAsRequested holds no more than was asked for
        "arena_extend_strategy": "kSameAsRequested" if lean else "kNextPowerOfTwo",
        "do_copy_in_default_stream": True,
    }


def profile_shapes(component: Component) -> dict[str, str]:
    """TensorRT's optimization profile from the manifest: {"min"|"opt"|"max": "name:1x4x64x64,name2:…"} over the
    inputs with a dynamic axis (an empty dict when every input is fixed)."""
    dynamic = [t for t in component.inputs if any(isinstance(d, str) for d in t.shape)]
    if not dynamic:
        return {}
    missing = sorted({d for t in dynamic for d in t.shape if isinstance(d, str) and d not in component.axes})
    if missing:
        raise BundleError(f"{component.file}: the manifest gives no size range for axes {', '.join(missing)}; "
                          "re-export the bundle")
    shapes = {}
    for point in PROFILE_POINTS:
        shapes[point] = ",".join(
            t.name + ":" + "x".join(str(d if isinstance(d, int) else getattr(component.axes[d], point))
                                    for d in t.shape)
            for t in dynamic)
    return shapes


def tensorrt_options(component: Component, engine_cache: Path, timing_cache: Path,
                     device_id: int = 0) -> dict[str, Any]:
    """The TensorRT execution provider's options for `component`, with its caches at the given folders."""
    options: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": component.precision == "fp16",
        "trt_int8_enable": component.precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": os.fspath(engine_cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": os.fspath(timing_cache),
    }
    for point, shapes in profile_shapes(component).items():
        options[f"trt_profile_{point}_shapes"] = shapes
    return options


def cuda_providers(device_id: int = 0, lean: bool = False) -> list[Provider]:
    return [(CUDA, cuda_options(device_id, lean)), (CPU, {})]


def tensorrt_providers(component: Component, engine_cache: Path, timing_cache: Path, device_id: int = 0,
                       lean: bool = False) -> list[Provider]:
    """TensorRT first; what it cannot take runs on CUDA, then the CPU (ONNX Runtime's own partitioning)."""
    return [(TENSORRT, tensorrt_options(component, engine_cache, timing_cache, device_id)),
            *cuda_providers(device_id, lean)]


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgediff" / "ort-trt"


def cache_folders(root: Path, name: str, component: Component) -> list[tuple[Path, Path]]:
    """(engine cache, timing cache) candidates in order of preference: inside the bundle, then the user's cache
    (keyed by the component's files, so two bundles never share engines)."""
    graph = hashlib.sha256(" ".join(f.sha256 for f in component.files).encode()).hexdigest()[:12]
    inside, mine = root / ENGINE_FOLDER, user_cache_root()
    return [(inside / name, inside), (mine / f"{name}-{graph}", mine)]


def writable_cache_folders(root: Path, name: str, component: Component) -> tuple[Path, Path]:
    """The first cache folders that exist or can be made, and can be written (a read-only bundle: the user's)."""
    candidates = cache_folders(root, name, component)
    for engines, timing in candidates:
        try:
            engines.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(engines, os.W_OK) and os.access(timing, os.W_OK):
            return engines, timing
    raise BackendError(f"no writable place for TensorRT engines: tried {', '.join(str(e) for e, _ in candidates)}")
