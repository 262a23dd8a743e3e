"""The benchmark harness on a tiny bundle: every field in the JSON, a valid PNG chart, missing peers in one line."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main

STAGES = {"text", "unet", "vae_decoder", "other", "total"}


def test_bench_json_and_chart_with_diffusers_and_a_missing_optimum(bundle, tmp_path):
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    r = CliRunner().invoke(main, [
        "bench", str(bundle("sd1")), "--size", "32x32", "--steps", "1,2", "--batch", "1,2", "--runs", "2",
        "--compare", "diffusers,optimum", "--optimum-python", str(tmp_path / "no-python"),
        "--json", str(out), "--chart", str(chart),
    ])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("optimum:")]
    assert len(notes) == 1 and "not installed" in notes[0]

    record = json.loads(out.read_text())
    assert record["peak"]["float32_gflops"] > 1 and record["peak"]["int8_gops"] > 1
    assert {"cpu", "cores"} <= set(record["machine"])
    labels = [e["label"] for e in record["engines"]]
    assert labels == [f"edgediff:{bundle('sd1').name}", "diffusers"]
    for e in record["engines"]:
        assert e["load_s"] > 0 and e["cold_s"] > 0 and e["peak_rss_bytes"] > 10e6
        assert [(c["steps"], c["batch"]) for c in e["configs"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
        for c in e["configs"]:
            assert len(c["runs"]) == 2 and set(c["median"]) == STAGES and set(c["min"]) == STAGES
            assert all(len(run["steps"]) == c["steps"] for run in c["runs"])
            assert c["images_per_s"] > 0
    ours = record["engines"][0]
    for c in ours["configs"]:
        assert set(c["flops"]) == {"text_encoder", "unet_step", "vae_decoder"}
        assert c["flops"]["unet_step"] > 0 and 0 < c["fraction_of_peak"]["vae_decoder"] < 1
    # doubling the batch doubles the U-Net's work per step
    assert ours["configs"][1]["flops"]["unet_step"] == 2 * ours["configs"][0]["flops"]["unet_step"]
    ratios = ours["time_ratio_to"]["diffusers"]
    assert len(ratios) == 4 and set(ratios[0]) == STAGES and len(ours["pair_ratios_to"]["diffusers"][0]) == 2

    with Image.open(chart) as im:
        im.verify()
        assert im.format == "PNG"
    assert "median seconds" in r.stdout


def test_bench_low_memory_mode_renders(bundle, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(bundle("sd1")),
            "--size",
            "32x32",
            "--runs",
            "1",
            "--memory",
            "low",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["settings"]["memory"] == "low" and record["engines"][0]["configs"][0]["median"]["total"] > 0


def test_the_peak_probes_use_constant_weights_as_a_model_does():
    """The probes' weights are graph constants, which the kernels pre-pack as they do a model's: fed as an input,
    the int8 product ran at half the rate and int8 graphs read as over 100 % of the machine's peak."""
    from edgediff.bench import peak_child

    weights = np.arange(16, dtype=np.int8).reshape(4, 4)
    session = peak_child._ort_product("MatMulInteger", "UINT8", weights, "INT32", threads=1)
    assert [i.name for i in session.get_inputs()] == ["a"]
    a = np.eye(4, dtype=np.uint8) * 2
    np.testing.assert_array_equal(session.run(None, {"a": a})[0], 2 * weights.astype(np.int32))
    measured = peak_child.int8_gops(64, runs=1, threads=1)
    assert measured["gops"] > 0


def test_one_at_a_time_never_holds_two_engines(bundle, monkeypatch):
    """--one-at-a-time (models of which two engines do not fit in memory): each engine is loaded, measured and
    closed before the next is started, and the record says its runs are not interleaved."""
    from edgediff.bench import harness

    alive, most = set(), []

    class FakeEngine:
        def __init__(self, label, spec, python):
            self.label, self.spec = label, spec
            self.load_s, self.versions, self.peak_rss_bytes = 0.1, {}, 1
            alive.add(label)
            most.append(len(alive))

        def render(self, request):
            return {"total": 1.0, "text": 0.1, "unet": 0.5, "vae_decoder": 0.3, "steps": [0.5] * request["steps"]}

        def close(self):
            alive.discard(self.label)

    monkeypatch.setattr(harness, "EngineProcess", FakeEngine)
    monkeypatch.setattr(harness, "measure_peak", lambda threads: {"float32_gflops": 1.0, "int8_gops": 1.0})
    root = bundle("sd1")
    settings = harness.Settings(width=32, height=32, runs=2, backends=["cpu", "openvino"], one_at_a_time=True)
    record = harness.run_bench([root], settings)
    assert max(most) == 1 and not alive
    assert [len(e["configs"][0]["runs"]) for e in record["engines"]] == [2, 2]
    assert any("not interleaved" in note for note in record["notes"])
