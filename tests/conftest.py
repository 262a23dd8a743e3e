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

# Shared by the parity tests (`from conftest import ...`): what edgediff's images are held to against diffusers'.
PIXEL_TOLERANCE = 2e-3  # same weights and initial latents: max abs pixel error, pixels in 0..1
SEED_TOLERANCE = 2e-4  # same seed: the noise is drawn by edgediff's re-implementation of torch's CPU generator
PROMPTS = ["a red cat on a sofa", "a blue dog in the snow"]
NEGATIVES = ["blurry", "low quality, ugly"]
H, W = 32, 48  # render size: small, non-square, so that a swapped height and width shows


def diffusers_pipeline(cls, source, *, scheduler: str | None = "EulerDiscreteScheduler", **kwargs):
    """diffusers' reference pipeline `cls` (a class or its name) on `source`: no safety checker where the class
    has one, no progress bar, and the scheduler replaced by `scheduler` built from the checkpoint's own config (as
    edgediff reads it; None keeps the checkpoint's)."""
    import diffusers

    cls = getattr(diffusers, cls) if isinstance(cls, str) else cls
    if "safety_checker" in cls._optional_components:
        kwargs = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
    pipe = cls.from_pretrained(source, **kwargs)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@pytest.fixture
def builtin_copy(tmp_path):
    """The built-in bundle, copied so that a test may write into it (caches, engines) or damage it."""
    from edgediff.models import BUILTIN_BUNDLE

    return Path(shutil.copytree(BUILTIN_BUNDLE, tmp_path / "builtin", ignore=shutil.ignore_patterns(".ort-optimized")))


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A fake NVIDIA GPU with TensorRT and cuda-python (tests/fake_tensorrt.py); engines cached under tmp_path."""
    import fake_tensorrt

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return fake_tensorrt.install(monkeypatch)


@pytest.fixture(scope="module")
def serve_models():
    """`edgediff serve`'s models (the built-in one), loaded once per test module of the server."""
    from edgediff.serve.app import Settings, load_models

    return load_models(Settings())


@pytest.fixture(scope="session", autouse=True)
def builtin_bundle_untouched():
    """No test may write into the package's own built-in bundle (caches, engines): tests copy it first."""
    from edgediff.models import builtin_bundle

    root = builtin_bundle()
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root else []
    yield
    after = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root else []
    assert after == before, f"tests wrote into {root}: {sorted(set(after) - set(before))}"
