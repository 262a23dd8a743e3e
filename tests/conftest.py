"""Shared fixtures: tiny random-weight diffusers checkpoints of each family, and their exported bundles.

Each is built once per test session (a few seconds each) and must not be modified by tests; a test that damages a
bundle copies it first (`bundle_copy`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_pipelines  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_pipelines.build(family, tmp_path_factory.mktemp(f"ck_{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory):
    exported: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in exported:
            from edgediff.export.convert import export_bundle

            out = tmp_path_factory.mktemp(f"bundle_{family}") / "bundle"
            export_bundle(checkpoint(family), out)
            exported[family] = out
        return exported[family]

    return get


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    def get(family: str) -> Path:
        dst = tmp_path / f"{family}_copy"
        shutil.copytree(bundle(family), dst)
        return dst

    return get
