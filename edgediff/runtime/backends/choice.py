"""The "auto" backend: each component on the backend measured fastest for it on this machine.

Which engine runs a component fastest depends on the CPU (its vector units, its int8 instructions), on the
component (convolutions or attention, fp32 or int8) and on the libraries' versions, none of which the machine that
wrote the bundle knows. So the choice is not in the manifest: `edgediff bench BUNDLE --backend cpu,openvino
--choose` times every stage on each backend side by side and writes a choice file in this machine's cache
(`~/.cache/edgediff/backend-choice/`), keyed by the CPU's features, the bundle's graphs and the libraries'
versions. `--backend auto` reads it; a component it does not name, or a bundle never measured here, runs on "cpu".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ...bundle import Component, Manifest
from ..sessions import Session, SessionSettings

CPU_BACKENDS = ("cpu", "openvino")  # the backends a choice may name
DEFAULT = "cpu"
# the bench's stages -> the components each one times
STAGE_COMPONENTS = {"unet": ("unet",), "vae_decoder": ("vae_decoder", "vae_encoder")}


def _versions() -> str:
    """The installed engines' versions, read from their metadata (importing OpenVINO to ask would cost a second)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for distribution in ("onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            found.append(f"{distribution}{version(distribution)}")
        except PackageNotFoundError:
            continue
    return " ".join(found)


def choice_path(manifest: Manifest) -> Path:
    """This machine's choice file for the bundle whose manifest this is."""
    from ..graph_cache import cpu_features

    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    graphs = " ".join(f.fingerprint for c in manifest.components.values() for f in c.files)
    key = hashlib.sha256(" ".join([*cpu_features(), _versions(), graphs]).encode()).hexdigest()[:16]
    return Path(base) / "edgediff" / "backend-choice" / f"{key}.json"


def read_choice(manifest: Manifest) -> dict[str, str]:
    """component -> backend, as measured here; {} where nothing was measured (or the file is unreadable)."""
    try:
        data = json.loads(choice_path(manifest).read_text())
        return {k: v for k, v in data["components"].items() if v in CPU_BACKENDS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_choice(manifest: Manifest, components: dict[str, str], measured: dict[str, Any]) -> Path:
    from ...atomic import atomic_file

    path = choice_path(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"components": components, "measured": measured}, indent=2) + "\n")
    return path


def choose(stage_seconds: dict[str, dict[str, float]]) -> dict[str, str]:
    """component -> the backend with the lowest median time for its stage; `stage_seconds[backend][stage]`."""
    chosen: dict[str, str] = {}
    for stage, components in STAGE_COMPONENTS.items():
        times = {b: s[stage] for b, s in stage_seconds.items() if stage in s and b in CPU_BACKENDS}
        if times:
            best = min(times, key=lambda b: (times[b], b != DEFAULT))  # a tie keeps the default
            chosen.update({c: best for c in components})
    return chosen


def open_auto(root: Path, name: str, component: Component, settings: SessionSettings) -> Session:
    """The registry's "auto" backend: `name` on the backend this machine's choice file names for it."""
    from ...bundle import read_manifest
    from . import open_session

    backend = read_choice(read_manifest(root)).get(name, DEFAULT)
    return open_session(root, name, component, backend, settings)
