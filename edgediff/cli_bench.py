"""`edgediff bench`: every stage timed side by side, against peers, on several backends; and the per-machine
choice of the fastest backend per component (--choose)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .bench.openvino_peer import DEFAULT_OPENVINO_PYTHON
from .cli import main
from .cli_options import Named, backend_list, int_list, one_line_errors, parse_size
from .runtime.backends import BACKENDS
from .runtime.pipeline import MEMORY_MODES


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--steps", "steps", default="1", show_default=True, callback=int_list, help="Step counts, e.g. 1,4.")
@click.option("--size", callback=parse_size, default="512x512", show_default=True, help="WIDTHxHEIGHT.")
@click.option("--batch", "batches", default="1", show_default=True, callback=int_list, help="Batch sizes, e.g. 1,4.")
@click.option("--threads", type=int, help="Threads for every engine [default: each engine's own choice].")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Measured runs per configuration.")
@click.option("--warmup", type=click.IntRange(1), default=1, show_default=True,
              help="Unmeasured renders first (the first is reported as the cold render).")
@click.option("--compare", default="", help="Peers to run side by side (comma-separated): diffusers (PyTorch fp32, "
              "CPU), diffusers-cuda (PyTorch fp16, GPU: the GPU backends' peer), optimum (ONNX Runtime, CPU), "
              "openvino (OpenVINO GenAI fp32, CPU, static shapes), openvino-int8w (its int8 weights, float "
              "activations), openvino-int8 (its full static int8: U-Net activations too).")
@click.option("--backend", "backends", default="cpu", show_default=True, callback=backend_list,
              help="edgediff's backends, comma-separated (each bundle is timed on each): "
              + ", ".join(BACKENDS) + ".")
@click.option("--memory", type=Named("memory mode", MEMORY_MODES), default=MEMORY_MODES[0], show_default=True,
              help="edgediff's memory mode (low: one component loaded at a time).")
@click.option("--optimum-python", type=click.Path(path_type=Path), default=Path("benchmarks/.venv-optimum/bin/python"),
              show_default=True, help="Python of the virtual environment Optimum runs in.")
@click.option("--optimum-model", type=click.Path(path_type=Path), help="Optimum's export of the same checkpoint "
              "[default: BUNDLE-optimum beside the first bundle].")
@click.option("--openvino-python", type=click.Path(path_type=Path), default=DEFAULT_OPENVINO_PYTHON,
              show_default=True, help="Python of the virtual environment OpenVINO GenAI runs in.")
@click.option("--openvino-model", type=click.Path(path_type=Path), help="The folder of OpenVINO exports of the same "
              "checkpoint (fp32/, int8w/, int8/; benchmarks/setup_openvino.sh) [default: CHECKPOINT-openvino beside "
              "the first bundle, CHECKPOINT the bundle's source checkpoint's name].")
@click.option("--one-at-a-time", is_flag=True, help="Load, measure and close each engine before the next (models of "
              "which two engines do not fit in memory); runs are then not interleaved.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the full record as JSON.")
@click.option("--chart", type=click.Path(path_type=Path), help="Draw a PNG chart of the stage times.")
@click.option("--choose", is_flag=True, help="With one bundle and several CPU backends (--backend cpu,openvino): "
              "write this machine's choice of the fastest backend per component, which --backend auto then uses.")
def bench(bundles, steps, size, batches, threads, runs, warmup, compare, backends, memory, optimum_python,
          optimum_model, openvino_python, openvino_model, one_at_a_time, json_path, chart, choose):
    """Time every stage of BUNDLES (several: side by side, e.g. fp32 and int8), optionally against diffusers and
    Optimum and OpenVINO GenAI on the same checkpoint, each engine in its own process, interleaved run by run."""
    from .atomic import atomic_file
    from .bench import Settings, run_bench
    from .bench.chart import draw_chart
    from .bench.choice import save_choice
    from .bench.harness import EngineError
    from .bench.report import format_report

    settings = Settings(steps=steps, width=size[0], height=size[1], batches=batches, threads=threads, runs=runs,
                        warmup=warmup, compare=[c.strip() for c in compare.split(",") if c.strip()], memory=memory,
                        backends=backends,
                        optimum_python=optimum_python, optimum_model=optimum_model,
                        openvino_python=openvino_python, openvino_model=openvino_model,
                        one_at_a_time=one_at_a_time)
    with one_line_errors(EngineError):  # an engine failing mid-run: its one line, not a traceback
        if choose and (len(bundles) != 1 or len(backends) < 2):
            raise click.UsageError("--choose compares backends on one bundle: give one BUNDLE and --backend "
                                   "cpu,openvino")
        record = run_bench(list(bundles), settings, progress=lambda msg: click.echo(msg, err=True))
    click.echo(format_report(record))
    if choose:
        path, chosen = save_choice(bundles[0], record)
        click.echo(f"backend per component on this machine: {', '.join(f'{c} {b}' for c, b in chosen.items())} "
                   f"({path}); --backend auto uses it")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(json_path) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    if chart:
        chart.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(chart) as tmp:
            draw_chart(record, tmp)
