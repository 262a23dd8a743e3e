"""The per-machine backend choice: `bench --choose` measures cpu against openvino and writes it, `--backend auto`
opens each component where it says, and a choice made on another CPU or for other graphs is not used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.bundle import read_manifest
from edgediff.cli import main
from edgediff.runtime.backends import choice
from edgediff.runtime.pipeline import Pipeline

pytest.importorskip("openvino")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_fastest_backend_wins_each_stage_and_a_tie_keeps_the_default():
    chosen = choice.choose({"cpu": {"unet": 2.0, "vae_decoder": 1.0}, "openvino": {"unet": 1.5, "vae_decoder": 1.0}})
    assert chosen == {"unet": "openvino", "vae_decoder": "cpu", "vae_encoder": "cpu"}


def test_auto_opens_each_component_where_the_choice_says(bundle):
    root = bundle("sd1")
    manifest = read_manifest(root)
    assert choice.read_choice(manifest) == {}  # never measured here: everything on cpu
    choice.write_choice(manifest, {"unet": "openvino", "vae_decoder": "cpu"}, {})
    pipe = Pipeline.load(root, backend="auto")
    kinds = {name: type(s).__name__ for name, s in pipe._sessions.items()}
    assert kinds == {"text_encoder": "OrtCpuSession", "unet": "OpenVinoSession", "vae_decoder": "OrtCpuSession"}
    settings = dict(num_inference_steps=2, height=32, width=48, seed=1, output_type="np")
    got = np.asarray(pipe("a red cat", **settings).images)
    want = np.asarray(Pipeline.load(root)("a red cat", **settings).images)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_choice_from_another_cpu_is_not_used(bundle, monkeypatch):
    manifest = read_manifest(bundle("sd1"))
    choice.write_choice(manifest, {"unet": "openvino"}, {})
    assert choice.read_choice(manifest) == {"unet": "openvino"}
    monkeypatch.setattr("edgediff.runtime.graph_cache.cpu_features", lambda: ["AVX2"])
    assert choice.read_choice(manifest) == {}


def test_bench_choose_writes_the_choice_that_auto_reads(bundle, tmp_path):
    root = bundle("sd1")
    r = CliRunner().invoke(main, ["bench", str(root), "--size", "32x32", "--runs", "1", "--backend", "cpu,openvino",
                                  "--choose", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "b.json").read_text())
    assert sorted(e["backend"] for e in record["engines"]) == ["cpu", "openvino"]
    chosen = choice.read_choice(read_manifest(root))
    assert set(chosen) == {"unet", "vae_decoder", "vae_encoder"} and set(chosen.values()) <= {"cpu", "openvino"}
    assert "--backend auto uses it" in r.stdout
    r = CliRunner().invoke(main, ["bench", str(root), "--runs", "1", "--choose"])
    assert r.exit_code == 2 and "--backend cpu,openvino" in r.output
