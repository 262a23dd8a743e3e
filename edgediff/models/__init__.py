"""The built-in default model: its dataset, architecture, training and evaluation code, and the shipped bundle.

Looking up the bundle's path imports nothing beyond the standard library (the runtime does it without torch);
the training and evaluation modules import torch only when run.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_BUNDLE = Path(__file__).resolve().parent / "builtin"


def builtin_bundle() -> Path | None:
    """The shipped bundle's folder, or None when this install has none (a source tree before training)."""
    return BUILTIN_BUNDLE if (BUILTIN_BUNDLE / "manifest.json").is_file() else None
