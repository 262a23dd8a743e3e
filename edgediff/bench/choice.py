"""The per-machine backend choice from a bench record: per stage, the backend with the lowest median time."""

from __future__ import annotations

from pathlib import Path

from ..bundle import read_manifest
from ..runtime.backends.choice import choose, write_choice


def save_choice(bundle: Path, record: dict) -> tuple[Path, dict[str, str]]:
    """Write the choice file for `bundle` from `record` (its edgediff engines, one per backend); returns its path
    and the choice (component -> backend)."""
    stage_seconds: dict[str, dict[str, float]] = {}
    for engine in record["engines"]:
        if engine["engine"] != "edgediff" or not engine["configs"]:
            continue
        medians = engine["configs"][0]["median"]
        stage_seconds[engine["backend"]] = {stage: medians[stage] for stage in ("unet", "vae_decoder")}
    chosen = choose(stage_seconds)
    manifest = read_manifest(bundle)
    measured = {"stage_seconds": stage_seconds, "machine": record["machine"]}
    return write_choice(manifest, chosen, measured), chosen
