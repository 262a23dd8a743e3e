"""OpenVINO GenAI as a bench peer, against tests/fake_openvino/openvino_genai.py (CI has no OpenVINO GenAI venv): a
missing venv or export skips with one note, the spec reaches the worker, and the worker drives Text2ImagePipeline
as OpenVINO's samples do (static shapes, the sampler, threads, torch-compatible seeds) and reports its metrics as the
harness's stages, in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from edgediff.bench.harness import EngineProcess, Settings, _engine_specs, summarize
from edgediff.models import BUILTIN_BUNDLE

FAKE = Path(__file__).parent / "fake_openvino"
PEERS = ["openvino", "openvino-int8w", "openvino-int8"]


@pytest.fixture
def fake_ov(monkeypatch):
    loader = importlib.util.spec_from_file_location("openvino_genai", FAKE / "openvino_genai.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "openvino_genai", module)
    return module


def export(root: Path, variant: str) -> Path:
    """An OpenVINO export folder as the fake reads it: model_index.json and the scheduler's config."""
    (root / variant / "scheduler").mkdir(parents=True)
    (root / variant / "model_index.json").write_text("{}")
    (root / variant / "scheduler" / "scheduler_config.json").write_text("{}")
    return root / variant


def specs(tmp_path: Path, **settings):
    notes: list[str] = []
    found = _engine_specs([BUILTIN_BUNDLE], Settings(compare=PEERS, **settings), notes)
    return {label: (spec, python) for label, spec, python in found}, notes


def test_missing_venv_or_export_skips_each_peer_with_one_note(tmp_path):
    found, notes = specs(tmp_path, openvino_python=tmp_path / "no-python")
    assert set(found) == {"edgediff:builtin"}
    assert len(notes) == 3 and all("not installed" in n and "setup_openvino.sh" in n for n in notes)
    assert [n.split(":")[0] for n in notes] == PEERS

    # the venv is there, the exports are not: the default folder is named after the bundle's source checkpoint
    found, notes = specs(tmp_path, openvino_python=Path(sys.executable))
    default = BUILTIN_BUNDLE.parent / "pipeline-openvino"
    assert set(found) == {"edgediff:builtin"}
    assert notes == [f"{p}: no OpenVINO export at {default / v} (make it with benchmarks/setup_openvino.sh); "
                     "skipped" for p, v in zip(PEERS, ("fp32", "int8w", "int8"))]


def test_each_variant_runs_its_own_export_in_the_openvino_venv(tmp_path):
    export(tmp_path / "ov", "fp32")
    export(tmp_path / "ov", "int8")
    python = tmp_path / "python"
    python.write_text("")
    found, notes = specs(tmp_path, openvino_python=python, openvino_model=tmp_path / "ov", threads=3, width=64,
                         height=48, batches=[2, 1])
    assert notes == [f"openvino-int8w: no OpenVINO export at {tmp_path / 'ov' / 'int8w'} (make it with "
                     "benchmarks/setup_openvino.sh); skipped"]
    spec, used = found["openvino-int8"]
    assert used == str(python) and found["openvino"][0]["model"] == str(tmp_path / "ov" / "fp32")
    assert spec == {"engine": "openvino", "model": str(tmp_path / "ov" / "int8"), "threads": 3, "static": True,
                    "width": 64, "height": 48, "batch": 2, "guidance": 4.0}


def test_worker_drives_text2image_pipeline_with_static_shapes(fake_ov, tmp_path):
    from edgediff.bench import worker

    model = export(tmp_path, "fp32")
    spec = {"engine": "openvino", "model": str(model), "threads": 2, "static": True, "width": 64, "height": 48,
            "batch": 1, "guidance": 0.0, "sampler": "euler_a"}
    render, versions = worker.load_openvino(spec)
    assert versions["variant"] == "fp32" and versions["openvino_genai"] == fake_ov.__version__
    request = {"prompt": "a cat", "steps": 3, "guidance": 0.0, "height": 48, "width": 64, "batch": 1, "seed": 7}
    timings = render(request)
    calls = [name for name, _ in fake_ov.CALLS]
    assert calls == ["init", "set_scheduler", "reshape", "compile", "generate"]
    args = dict(fake_ov.CALLS)
    assert args["set_scheduler"] == {"config": str(model / "scheduler" / "scheduler_config.json"),
                                     "type": "EULER_ANCESTRAL_DISCRETE"}
    assert args["reshape"] == {"shape": [1, 48, 64, 0.0]}
    assert args["compile"] == {"device": "CPU", "properties": {"INFERENCE_PRECISION_HINT": "f32",
                                                                   "INFERENCE_NUM_THREADS": 2}}
    assert args["generate"] == {"prompt": "a cat", "seed": 7, "width": 64, "height": 48, "num_inference_steps": 3,
                                "guidance_scale": 0.0, "num_images_per_prompt": 1}
    # milliseconds (text, VAE) and microseconds (steps) become seconds
    assert timings["text_encoder"] == pytest.approx(0.005) and timings["vae_decoder"] == pytest.approx(0.007)
    assert timings["steps"] == pytest.approx([0.002, 0.004, 0.006])
    stages = summarize([timings], 1)["median"]
    assert stages["unet"] == pytest.approx(0.012) and stages["other"] == pytest.approx(timings["total"] - 0.024)

    render({**request, "batch": 2})  # another static shape: a pipeline compiled for it, once
    render({**request, "batch": 2, "seed": 8})
    calls = [name for name, _ in fake_ov.CALLS]
    assert calls[5:] == ["init", "set_scheduler", "reshape", "compile", "generate", "generate"]
    assert fake_ov.CALLS[7][1] == {"shape": [2, 48, 64, 0.0]}


def test_worker_without_threads_or_static_shapes_leaves_openvino_its_defaults(fake_ov, tmp_path):
    from edgediff.bench import worker

    spec = {"engine": "openvino", "model": str(export(tmp_path, "int8w")), "threads": None, "static": False,
            "width": 64, "height": 64, "batch": 1, "guidance": 0.0, "sampler": "dpmpp_2m"}  # no OpenVINO scheduler
    worker.load_openvino(spec)
    assert [name for name, _ in fake_ov.CALLS] == ["init", "compile"]
    assert fake_ov.CALLS[1][1] == {"device": "CPU", "properties": {"INFERENCE_PRECISION_HINT": "f32"}}


def test_harness_runs_the_worker_in_its_process(tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(FAKE))
    monkeypatch.setenv("FAKE_OPENVINO_LOG", str(log))
    spec = {"engine": "openvino", "model": str(export(tmp_path, "fp32")), "threads": 1, "static": True,
            "width": 64, "height": 64, "batch": 1, "guidance": 0.0, "sampler": "euler"}
    engine = EngineProcess("openvino", spec, sys.executable)
    try:
        timings = engine.render({"prompt": "p", "steps": 2, "guidance": 0.0, "height": 64, "width": 64, "batch": 1,
                                 "seed": 3})
    finally:
        engine.close()
    assert engine.load_s > 0 and engine.peak_rss_bytes > 1e6 and engine.versions["variant"] == "fp32"
    assert timings["steps"] == pytest.approx([0.002, 0.004]) and timings["total"] > 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[-1][0] == "generate" and calls[-1][1]["seed"] == 3


def test_a_failing_openvino_pipeline_is_one_line(tmp_path, monkeypatch):
    from edgediff.bench.harness import EngineError

    monkeypatch.setenv("PYTHONPATH", str(FAKE))
    spec = {"engine": "openvino", "model": str(tmp_path / "missing"), "threads": None, "static": True,
            "width": 64, "height": 64, "batch": 1, "guidance": 0.0, "sampler": "euler"}
    with pytest.raises(EngineError, match=r"^openvino: RuntimeError: no model_index.json in .*missing$"):
        EngineProcess("openvino", spec, sys.executable)


def test_cli_passes_the_openvino_options_to_the_harness(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import edgediff.bench
    from edgediff.cli import main

    seen = []

    def fake_run_bench(bundles, settings, progress):
        seen.append(settings)
        return {"machine": {}, "peak": {"float32_gflops": 1.0, "threads": None}, "notes": [], "engines": []}

    monkeypatch.setattr(edgediff.bench, "run_bench", fake_run_bench)
    r = CliRunner().invoke(main, ["bench", str(BUILTIN_BUNDLE), "--compare", "openvino, openvino-int8",
                                  "--openvino-python", str(tmp_path / "py"), "--openvino-model", str(tmp_path / "ov")])
    assert r.exit_code == 0, r.output
    assert seen[0].compare == ["openvino", "openvino-int8"]
    assert (seen[0].openvino_python, seen[0].openvino_model) == (tmp_path / "py", tmp_path / "ov")


def test_an_engine_failing_mid_run_ends_the_bench_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgediff.cli import main

    monkeypatch.setenv("PYTHONPATH", str(FAKE))
    monkeypatch.setenv("FAKE_OPENVINO_FAIL", "Exception from src/plugin.cpp:1:\nout of memory")
    export(tmp_path / "ov", "fp32")
    r = CliRunner().invoke(main, ["bench", str(BUILTIN_BUNDLE), "--compare", "openvino", "--runs", "1",
                                  "--openvino-python", sys.executable, "--openvino-model", str(tmp_path / "ov")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.splitlines()[-1] == "error: openvino: RuntimeError: Exception from src/plugin.cpp:1:"
