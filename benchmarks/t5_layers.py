"""T5-XXL's encoder at full width, a few of its 24 layers: what the whole encoder costs in fp32, int8 and 4 bits.

T5-XXL's fp32 export does not fit this 24 GB machine (19 GB of weights plus the tracer), so google/t5-v1_1-xxl's
encoder (T5_XXL in make_flow_checkpoints.py: d_model 4096, 64 heads x 64, gated-GELU d_ff 10240, vocabulary 32128)
is built with `--layers N` of its 24 layers (random weights, seed 0), exported with edgediff's exporter and fp32
parity gate (export/onnx.py) and converted as a bundle's text_encoder_3 would be: int8 QDQ (export/quantize.py,
calibrated on random token ids at 256) and 4-bit weights (export/weights4.py). Each variant is timed on ONNX
Runtime's CPU backend with 2 threads in its own process (load, median call at batch 1 per sequence length, peak RSS),
its output compared with the fp32 graph's on held-out token ids. `project` scales the layers to 24: the embedding
(32128 x 4096) once, the per-layer bytes and time x 24 / N. The error is measured over N layers only.

    flock /tmp/edgediff-heavy.lock python benchmarks/t5_layers.py export scratch/t5-layers --layers 6
    flock /tmp/edgediff-heavy.lock python benchmarks/t5_layers.py time scratch/t5-layers --runs 3 --sequence 256,512
    python benchmarks/t5_layers.py project scratch/t5-layers     # again from the JSON files, without timing

At --layers 6 the model holds 1.29 B parameters (5.2 GB in fp32); expect the export's peak near twice that.
Checked end to end only at T5_LAYERS_WIDTH=16 (d_model 256, 4 heads, d_ff 640; not T5-XXL's sizes) and --layers 2,
on 2 cores: export 11 s, peak RSS 0.72 GB; `time --runs 3 --sequence 256,512` 9 s, each session's peak 0.36 GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_blocks import variant_copy  # noqa: E402
from make_flow_checkpoints import T5_XXL  # noqa: E402

# T5_LAYERS_WIDTH=16 divides d_model, d_ff and the heads for a quick check of this script (not T5-XXL's sizes)
SHRINK = int(os.environ.get("T5_LAYERS_WIDTH", 1))
XXL: dict[str, Any] = T5_XXL
CONFIG = {**XXL, "d_model": XXL["d_model"] // SHRINK, "d_ff": XXL["d_ff"] // SHRINK,
          "num_heads": XXL["num_heads"] // SHRINK}
FULL_LAYERS: int = XXL["num_layers"]
TRACE, CALIBRATION = 256, 256  # sequence lengths: SD3's and FLUX-schnell's T5 maximum
PRECISIONS = ("fp32", "int8", "int4")
RESULTS = Path(__file__).resolve().parent / "results" / "t5-xxl-layers.json"


def _config(layers: int):
    from transformers import T5Config

    return T5Config(**{**CONFIG, "num_layers": layers})


def _spec(layers: int, model=None):
    """t5_encoder_spec on the model, or on a stand-in holding only its config (the spec reads nothing else)."""
    from edgediff.export.specs_flow import t5_encoder_spec

    return t5_encoder_spec(model if model is not None else SimpleNamespace(config=_config(layers)), "text_encoder_3")


def _ids(spec, sequence: int, seed: int) -> dict[str, np.ndarray]:
    import torch

    feeds = spec.sample({"batch": 1, "sequence": sequence}, torch.Generator().manual_seed(seed))
    return {k: v.numpy() for k, v in feeds.items()}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def export(out: Path, layers: int) -> dict:
    """The fp32 graph gated against PyTorch (traced at 256 tokens, gated at 512), then its int8 and 4-bit copies."""
    import torch
    from transformers import T5EncoderModel

    from edgediff.export.onnx import check_against_torch, export_component, reference_outputs

    torch.manual_seed(0)
    model = T5EncoderModel(_config(layers)).eval()
    params = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    spec = _spec(layers, model)
    path = out / "fp32" / "model.onnx"
    start = time.perf_counter()
    _, options = export_component(model, spec, {"batch": 1, "sequence": TRACE}, path)
    exported = time.perf_counter() - start
    references = reference_outputs(model, spec, [{"batch": 1, "sequence": 512}])
    del model  # before ONNX Runtime loads the graph: both at once are twice the weights
    gc.collect()
    parity = check_against_torch(spec, path, references, ort_options=options)
    record = {"layers": layers, "width_divisor": SHRINK, "config": {**CONFIG, "num_layers": layers},
              "parameters": params,
              "fp32": {"export_s": exported, "gate_max_abs_err": parity.max_abs_err, "bytes": _size(path.parent),
                       "embedding_bytes": _embedding_bytes(path)}}
    print("fp32", record["fp32"], flush=True)
    for precision in PRECISIONS[1:]:
        record[precision] = convert(spec, path, precision)
        print(precision, record[precision], flush=True)
    record["export_peak_rss"] = _peak_rss()
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def convert(spec, fp32: Path, precision: str) -> dict:
    from edgediff.export.quantize import quantize_int8
    from edgediff.export.weights4 import quantize_int4

    path = variant_copy(fp32, precision)
    folder = path.parent
    start = time.perf_counter()
    if precision == "int8":  # calibrated on other token ids than those it is measured on
        quantize_int8(path, [_ids(spec, CALIBRATION, 300 + i) for i in range(3)])
    else:
        quantize_int4(path)
    return {"convert_s": time.perf_counter() - start, "bytes": _size(folder), "embedding_bytes": _embedding_bytes(path)}


def _embedding_bytes(path: Path) -> int:
    """The bytes of the vocabulary's table (and of its scales, if quantized): initializers with a vocabulary-sized
    axis. Read from the graph's tensor headers, not its data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if CONFIG["vocab_size"] in tensor.dims:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            total += int(np.prod(tensor.dims)) * itemsize
    return total


def child(folder: Path, precision: str, sequences: list[int], runs: int) -> None:
    """One session as the CPU backend opens this precision's graph, 2 threads: load, then per sequence length one
    warm-up call and `runs` timed calls on the held-out ids; each length's output saved for the parent to compare."""
    import onnxruntime as ort

    from edgediff.export.onnx import default_ort_options
    from edgediff.export.quantize import ORT_OPTIONS
    from edgediff.runtime.backends.ort import session_options

    path = folder / precision / "model.onnx"
    chosen = ORT_OPTIONS if precision == "int8" else default_ort_options(_size(path.parent))
    baseline = _peak_rss()
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), session_options(ort, chosen, threads=2, lean=False),
                                   providers=["CPUExecutionProvider"])
    reply: dict = {"load_s": time.perf_counter() - start, "baseline_rss": baseline, "load_peak_rss": _peak_rss()}
    for sequence in sequences:
        feeds = {"input_ids": np.load(folder / "heldout" / f"ids-{sequence}.npy")}
        output = session.run(None, feeds)[0]
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        np.save(folder / "heldout" / f"{precision}-{sequence}.npy", output)
        reply[str(sequence)] = {"times_s": times, "median_s": statistics.median(times)}
    reply["peak_rss"] = _peak_rss()
    print(json.dumps(reply))


def time_all(out: Path, runs: int, sequences: list[int]) -> dict:
    from edgediff.export.gate import psnr_db

    record = json.loads((out / "export.json").read_text())
    spec = _spec(record["layers"])
    (out / "heldout").mkdir(exist_ok=True)
    for sequence in sequences:
        np.save(out / "heldout" / f"ids-{sequence}.npy", _ids(spec, sequence, 700)["input_ids"])
    results: dict = {}
    for precision in PRECISIONS:  # fp32 first: the others are compared with its outputs
        done = subprocess.run([sys.executable, __file__, "_child", str(out), precision,
                               ",".join(map(str, sequences)), str(runs)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: the {precision} session failed: {done.stderr.strip().splitlines()[-1:]}")
        results[precision] = reply = json.loads(done.stdout.strip().splitlines()[-1])
        for sequence in (s for s in sequences if precision != "fp32"):
            reference = np.load(out / "heldout" / f"fp32-{sequence}.npy")
            got = np.load(out / "heldout" / f"{precision}-{sequence}.npy")
            reply[str(sequence)].update(psnr_db=psnr_db(reference, got),
                                        max_abs_err=float(np.abs(reference - got).max()),
                                        reference_max=float(np.abs(reference).max()))
        print(precision, json.dumps(reply), flush=True)
    (out / "timings.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def projection(record: dict, timings: dict) -> dict:
    """Per precision: the 24-layer encoder's bytes (embedding once, the rest x 24 / N) and time per call (x 24 / N:
    the part outside the layers, a table lookup and a final norm, is too small to time apart)."""
    scale = FULL_LAYERS / record["layers"]
    whole: dict = {}
    for precision in PRECISIONS:
        sizes, timed = record[precision], timings.get(precision, {})
        layer_bytes = sizes["bytes"] - sizes["embedding_bytes"]
        whole[precision] = {
            "bytes": sizes["embedding_bytes"] + layer_bytes * scale,
            "seconds": {s: t["median_s"] * scale for s, t in timed.items() if isinstance(t, dict)},
            # the session's peak through loading less the interpreter's: about what it holds once loaded
            "load_peak_rss": (timed["load_peak_rss"] - timed["baseline_rss"] - sizes["embedding_bytes"]) * scale
            + sizes["embedding_bytes"] if timed else None,
        }
    return whole


def _table(record: dict, timings: dict, whole: dict) -> None:
    n = record["layers"]
    sequences = sorted({s for t in timings.values() for s, v in t.items() if isinstance(v, dict)}, key=int)
    print(f"\nT5-XXL encoder, {n} of {FULL_LAYERS} layers measured (width / {SHRINK}); ONNX Runtime CPU, 2 threads\n")
    print("| precision | on disk | load | process peak RSS | " + " | ".join(f"{s} tokens: time, PSNR, max err" for s in
                                                               sequences) + " |")
    print("|---" * (4 + len(sequences)) + "|")
    for precision in PRECISIONS:
        t = timings.get(precision, {})
        cells = [f"{t[s]['median_s']:.3f} s" + (f", {t[s]['psnr_db']:.1f} dB, {t[s]['max_abs_err']:.3g}"
                                                 if "psnr_db" in t[s] else " (the reference)")
                 for s in sequences if s in t]
        print(f"| {precision} | {_gb(record[precision]['bytes'])} | {t.get('load_s', float('nan')):.1f} s | "
              f"{_gb(t.get('peak_rss', 0))} | " + " | ".join(cells) + " |")
    print(f"\nprojected to {FULL_LAYERS} layers (embedding once, the rest x {FULL_LAYERS}/{n}):\n")
    print("| precision | weights on disk | RSS at load, less the interpreter's | "
          + " | ".join(f"{s} tokens" for s in sequences) + " |")
    print("|---" * (3 + len(sequences)) + "|")
    for precision, p in whole.items():
        held = _gb(p["load_peak_rss"]) if p["load_peak_rss"] is not None else "-"
        print(f"| {precision} | {_gb(p['bytes'])} | {held} | "
              + " | ".join(f"{p['seconds'][s]:.2f} s" for s in sequences if s in p["seconds"]) + " |")
    print(f"\nThe errors above were measured over {n} layers, not {FULL_LAYERS}: error compounds with depth, so the "
          f"whole encoder's int8 and 4-bit errors will be larger than these.")


def project(out: Path, json_out: Path) -> None:
    record = json.loads((out / "export.json").read_text())
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    whole = projection(record, timings)
    _table(record, timings, whole)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    note = f"errors measured over {record['layers']} layers, not {FULL_LAYERS}; they compound with depth"
    json_out.write_text(json.dumps({"measured": record, "timings": timings, f"projected_{FULL_LAYERS}_layers": whole,
                                    "note": note}, indent=2) + "\n")
    print(f"\nwritten: {json_out}")


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        child(Path(sys.argv[2]), sys.argv[3], [int(s) for s in sys.argv[4].split(",")], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("export", "time", "project"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=6, help=f"of T5-XXL's {FULL_LAYERS} (export)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sequence", default="256,512", help="token counts to time, comma-separated")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where `time` and `project` write every figure")
    args = parser.parse_args()
    try:
        sequences = [int(s) for s in args.sequence.split(",")]
    except ValueError:
        parser.error(f"--sequence: comma-separated integers expected, got {args.sequence!r}")
    if not 1 <= args.layers <= FULL_LAYERS:
        parser.error(f"--layers: 1 to {FULL_LAYERS}")
    if args.command != "export" and not (args.out / "export.json").is_file():
        parser.error(f"{args.out / 'export.json'} not found: run `export {args.out}` first")
    if args.command == "export":
        export(args.out, args.layers)
    elif args.command == "time":
        time_all(args.out, args.runs, sequences)
    if args.command != "export":
        project(args.out, args.json)


if __name__ == "__main__":
    main()
