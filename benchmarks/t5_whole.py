"""T5-XXL's whole encoder, all 24 layers at full width, exported in pieces: its int8 and 4-bit error, size and time.

Its fp32 export does not fit this 24 GB machine at once (19 GB of weights plus the tracer), so the encoder is built
as `--pieces` pieces of 24 / pieces layers each (random weights, piece k seeded k: piece 0 is t5_layers.py's
6-layer model without its final norm), each exported in its own process with edgediff's exporter, gated against
PyTorch on the activations that reach it in the chain, and converted as a bundle's text_encoder_3 is: int8 QDQ
(export/quantize.py) calibrated on the fp32 chain's own activations at the piece's input, which is what calibrating
the whole graph would see, and 4-bit weights (export/weights4.py). Piece 0 holds the embedding and computes the
relative position bias that every layer reads; the last applies the final norm.

`time` runs each precision as the whole encoder would run: piece after piece in one process, each fed what the
previous piece of the same precision computed, so that int8's and 4-bit's error compounds over all 24 layers, and
compares the outputs with the fp32 chain's on held-out token ids. `stitch` joins a precision's pieces into one
graph (model.onnx + one data file, streamed, never loaded whole), as a bundle would hold it; `time` then also opens
that one graph (see `_open`: directly, with memory="low"'s options, and as edgediff's CPU backend opens a bundle
component under memory="low", whose peak is then the T5 stage's), and checks that it computes what the chain did.
Figures and what they showed: benchmarks/RESULTS.md (session 8: export 10 min 50 s, peak 7.5 GB; time ~10 min).

    flock /tmp/edgediff-heavy.lock python benchmarks/t5_whole.py export scratch/t5-whole --pieces 4
    python benchmarks/t5_whole.py stitch scratch/t5-whole
    flock /tmp/edgediff-heavy.lock python benchmarks/t5_whole.py time scratch/t5-whole --runs 3 --sequence 256,512

tests/test_t5_pieces.py runs all three at T5_LAYERS_WIDTH=16 (t5_layers.py; not T5-XXL's sizes), 2 pieces.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_blocks import variant_copy  # noqa: E402
from t5_layers import CONFIG, FULL_LAYERS, _config, _peak_rss, _size  # noqa: E402

CALIBRATION = [(f"calibration-{i}", 256, 300 + i) for i in range(3)]  # (name, tokens, seed of the ids)
PRECISIONS = ("fp32", "int8", "int4")
RESULTS = Path(__file__).resolve().parent / "results" / "t5-xxl-whole.json"


def _piece(model, first: bool, last: bool):
    """The encoder's layers in `model` as one piece of the chain: token ids (piece 0) or the previous piece's hidden
    states and the shared position bias in; hidden states out, through the final norm in the last piece; piece 0
    also gives out the position bias. T5Stack's own loop, without an attention mask (the export feeds ids alone)."""
    import torch

    class Piece(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = model.encoder

        def forward(self, *inputs):
            hidden, bias = (self.stack.embed_tokens(inputs[0]), None) if first else inputs
            for block in self.stack.block:
                hidden, bias, _ = block(hidden, None, bias, None, None, None)
            if last:
                return (self.stack.final_layer_norm(hidden),)
            return (hidden, bias) if first else (hidden,)

    return Piece().eval()


def _spec(first: bool, last: bool, trace: dict):
    """The piece's inputs and outputs; `trace` (the chain's own activations, as tensors) is what it is traced on."""
    from edgediff.bundle import TensorSpec
    from edgediff.export.specs import ComponentSpec

    hidden = TensorSpec("hidden_states", "float32", ("batch", "sequence", CONFIG["d_model"]))
    bias = TensorSpec("position_bias", "float32", (1, CONFIG["num_heads"], "sequence", "sequence"))
    inputs = (TensorSpec("input_ids", "int64", ("batch", "sequence")),) if first else (hidden, bias)
    last_hidden = TensorSpec("last_hidden_state" if last else "hidden_out", "float32", hidden.shape)
    outputs: tuple[TensorSpec, ...] = (last_hidden,)
    if first and not last:
        outputs += (TensorSpec("position_bias_out", "float32", bias.shape),)
    return ComponentSpec(name="text_encoder_3", inputs=inputs, outputs=outputs, wrap=lambda m: m,
                         sample=lambda dims, g: trace)


def _ids(tokens: int, seed: int) -> np.ndarray:
    """Token ids as t5_encoder_spec samples them: text, then EOS, then padding."""
    ids = np.random.default_rng(seed).integers(2, CONFIG["vocab_size"], (1, tokens), dtype=np.int64)
    ids[:, -3:] = 0
    ids[:, -4] = CONFIG.get("eos_token_id", 1)
    return ids


def _sets(sequences: list[int]) -> list[tuple[str, int, int]]:
    return CALIBRATION + [(f"heldout-{s}", s, 700) for s in sequences]


def _feeds(out: Path, piece: int, name: str, tag: str) -> dict[str, np.ndarray]:
    """What reaches `piece` on input set `name`, as the chain of `tag` (a precision, or torch) computed it."""
    if piece == 0:
        return {"input_ids": np.load(out / "flow" / f"{name}-ids.npy")}
    return {"hidden_states": np.load(out / "flow" / f"{name}-{tag}-{piece}.npy"),
            "position_bias": np.load(out / "flow" / f"{name}-{tag}-bias.npy")}


def _keep(out: Path, piece: int, name: str, tag: str, outputs: list[np.ndarray]) -> None:
    np.save(out / "flow" / f"{name}-{tag}-{piece + 1}.npy", outputs[0])
    if len(outputs) > 1:
        np.save(out / "flow" / f"{name}-{tag}-bias.npy", outputs[1])


def export_piece(out: Path, piece: int, pieces: int, layers: int, sequences: list[int]) -> dict:
    """Piece `piece`: built, run in PyTorch on every input set (its outputs feed the next piece), exported, gated
    against PyTorch on the held-out sets, and converted to int8 (calibrated on the calibration sets) and 4 bits."""
    import torch
    from transformers import T5EncoderModel

    from edgediff.export.onnx import check_against_torch, export_component
    from edgediff.export.quantize import quantize_int8
    from edgediff.export.weights4 import quantize_int4

    first, last = piece == 0, piece == pieces - 1
    torch.manual_seed(piece)
    model = T5EncoderModel(_config(layers // pieces)).eval()
    module = _piece(model, first, last)
    trace = {n: torch.from_numpy(v) for n, v in _feeds(out, piece, CALIBRATION[0][0], "torch").items()}
    spec = _spec(first, last, trace)
    references = []
    for name, tokens, _ in _sets(sequences):
        feeds = _feeds(out, piece, name, "torch")
        with torch.no_grad():
            outputs = [t.numpy() for t in module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))]
        _keep(out, piece, name, "torch", outputs)
        if name.startswith("heldout"):
            references.append(({"batch": 1, "sequence": tokens}, feeds, outputs))
    path = out / f"piece{piece}" / "fp32" / "model.onnx"
    start = time.perf_counter()
    _, options = export_component(module, spec, {}, path)
    record: dict = {"piece": piece, "layers": layers // pieces, "export_s": time.perf_counter() - start}
    del module, model
    gc.collect()  # the piece's class, defined per call, holds the weights in a reference cycle: free them now
    parity = check_against_torch(spec, path, references, ort_options=options)
    record["fp32"] = {"gate_max_abs_err": parity.max_abs_err, "bytes": _size(path.parent)}
    calibration = [_feeds(out, piece, name, "torch") for name, _, _ in CALIBRATION]
    for precision in PRECISIONS[1:]:
        copy = variant_copy(path, precision)
        start = time.perf_counter()
        if precision == "int8":
            quantize_int8(copy, calibration)
        else:
            quantize_int4(copy)
        record[precision] = {"convert_s": time.perf_counter() - start, "bytes": _size(copy.parent)}
    record["peak_rss"] = _peak_rss()
    print(json.dumps(record), flush=True)
    return record


def export(out: Path, pieces: int, layers: int, sequences: list[int]) -> None:
    (out / "flow").mkdir(parents=True, exist_ok=True)
    for name, tokens, seed in _sets(sequences):
        np.save(out / "flow" / f"{name}-ids.npy", _ids(tokens, seed))
    records = []
    for piece in range(pieces):  # each in its own process: the peak is one piece's, not the sum of what was freed
        done = subprocess.run([sys.executable, __file__, "_piece", str(out), str(piece), str(pieces), str(layers),
                               ",".join(map(str, sequences))], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: piece {piece} failed: {done.stderr.strip().splitlines()[-3:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"piece {piece}: {records[-1]}", flush=True)
    (out / "export.json").write_text(json.dumps({"pieces": pieces, "layers": layers, "config": CONFIG,
                                                 "sequences": sequences, "records": records}, indent=2) + "\n")


def stitch(out: Path, precision: str, pieces: int) -> Path:
    """One graph from the pieces: each piece's names prefixed, piece k's inputs renamed to what piece k - 1 and
    piece 0 give out, the weights streamed into one data file by save_graph."""
    import onnx
    from onnx.compose import add_prefix

    from edgediff.export.onnx import graph_tensors, save_graph

    graphs = []
    for piece in range(pieces):
        model = onnx.load(str(out / f"piece{piece}" / precision / "model.onnx"), load_external_data=False)
        for tensor in graph_tensors(model):  # the data file's place relative to `out`, the source below
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = f"piece{piece}/{precision}/{entry.value}"
        graphs.append(add_prefix(model, f"p{piece}/"))
    rename = {"p0/input_ids": "input_ids", f"p{pieces - 1}/last_hidden_state": "last_hidden_state"}
    for piece in range(1, pieces):
        rename[f"p{piece}/hidden_states"] = f"p{piece - 1}/hidden_out"
        rename[f"p{piece}/position_bias"] = "p0/position_bias_out"
    whole = graphs[0]
    del whole.graph.output[:]
    for model in graphs[1:]:
        whole.graph.node.extend(model.graph.node)
        whole.graph.initializer.extend(model.graph.initializer)
        whole.graph.value_info.extend(model.graph.value_info)
    whole.graph.output.extend(graphs[-1].graph.output)
    for node in whole.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for value in list(whole.graph.input) + list(whole.graph.output):
        value.name = rename.get(value.name, value.name)
    path = out / "whole" / precision / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_graph(whole, path, source=out)
    return path


def _options(precision: str, folder: Path):
    from edgediff.export.onnx import default_ort_options
    from edgediff.export.quantize import ORT_OPTIONS

    return ORT_OPTIONS if precision == "int8" else default_ort_options(_size(folder))


def _timed(session, feeds: dict, runs: int) -> tuple[list[np.ndarray], list[float]]:
    outputs = session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return outputs, times


def _open(ort, folder: Path, precision: str, whole: str):
    """A session on the graph in `folder`: directly (the chain, "normal", "low"), or as edgediff's CPU backend opens
    a bundle's component under memory="low" ("runtime"): attention fused and the optimised graph cached beside it
    (runtime/graph_cache.py; the first such open makes the cache, the next ones load it)."""
    from edgediff.records import FileEntry
    from edgediff.runtime import graph_cache
    from edgediff.runtime.backends.ort import session_options

    chosen = _options(precision, folder)
    options = session_options(ort, chosen, 2, lean=whole in ("low", "runtime"))
    path = folder / "model.onnx"
    if whole != "runtime":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    files = tuple(FileEntry.of(folder, f.name) for f in sorted(folder.glob("model.onnx*")))
    return graph_cache.open_session(ort, path, files, options, ["CPUExecutionProvider"],
                                    cache=chosen.cache_optimized_graph)


def child(out: Path, precision: str, pieces: int, sequences: list[int], runs: int, whole: str) -> None:
    """One process: the chain of pieces (`whole` empty), or the stitched graph opened as `whole` says (_open); per
    held-out set, the time per call (summed over the pieces) and the output saved."""
    import onnxruntime as ort

    reply: dict = {"baseline_rss": _peak_rss(), "load_s": 0.0}
    folders = [out / "whole" / precision] if whole else [out / f"piece{k}" / precision for k in range(pieces)]
    times: dict = {s: [0.0] * runs for s in sequences}
    tag = f"{precision}-{whole}" if whole else precision
    for k, folder in enumerate(folders):
        start = time.perf_counter()
        session = _open(ort, folder, precision, whole)
        reply["load_s"] += time.perf_counter() - start
        reply["rss_after_load"] = _rss()
        for sequence in sequences:
            name = f"heldout-{sequence}"
            outputs, piece_times = _timed(session, _feeds(out, k, name, tag), runs)
            _keep(out, k, name, tag, outputs)
            times[sequence] = [a + b for a, b in zip(times[sequence], piece_times, strict=True)]
        del session
    reply.update({str(s): {"times_s": t, "median_s": statistics.median(t)} for s, t in times.items()})
    reply["peak_rss"] = _peak_rss()
    print(json.dumps(reply))


def _rss() -> int:
    """The resident set now, in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _final(out: Path, name: str, tag: str, pieces: int) -> np.ndarray:
    return np.load(out / "flow" / f"{name}-{tag}-{pieces}.npy")


def _run(out: Path, precision: str, pieces: int, sequences: list[int], runs: int, whole: str = "") -> dict:
    done = subprocess.run([sys.executable, __file__, "_child", str(out), precision, str(pieces),
                           ",".join(map(str, sequences)), str(runs), whole], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: the {precision} {whole or 'chain'} failed: {done.stderr.strip().splitlines()[-3:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_all(out: Path, runs: int, sequences: list[int]) -> dict:
    """Every chain, fp32 first (the reference), then each stitched graph as `_open` opens it, every way."""
    from edgediff.export.gate import psnr_db

    record = json.loads((out / "export.json").read_text())
    pieces = record["pieces"]
    results: dict = {}
    for precision in PRECISIONS:
        reply = results[precision] = _run(out, precision, pieces, sequences, runs)
        for sequence in sequences:
            name = f"heldout-{sequence}"
            reference = _final(out, name, "torch" if precision == "fp32" else "fp32", pieces)
            got = _final(out, name, precision, pieces)
            reply[str(sequence)].update(psnr_db=psnr_db(reference, got),
                                        max_abs_err=float(np.abs(reference - got).max()),
                                        reference_max=float(np.abs(reference).max()))
        print(precision, "chain", json.dumps(reply), flush=True)
    for precision in PRECISIONS[1:]:
        if not (out / "whole" / precision / "model.onnx").is_file():
            continue
        for memory in ("normal", "low", "runtime", "runtime"):  # the runtime's twice: cache made, then loaded
            run = f"{precision} whole, {memory}" + (", cache warm" if f"{precision} whole, {memory}" in results else "")
            reply = results[run] = _run(out, precision, pieces, sequences, runs, memory)
            for sequence in sequences:
                name = f"heldout-{sequence}"
                got = _final(out, name, f"{precision}-{memory}", 1)
                chain = _final(out, name, precision, pieces)
                reply[str(sequence)].update(psnr_db=psnr_db(_final(out, name, "fp32", pieces), got),
                                            differs_from_chain=float(np.abs(got - chain).max()))
            reply["bytes"] = _size(out / "whole" / precision)
            print(run, json.dumps(reply), flush=True)
        # the runtime's cache holds the optimised graph and its pre-packed weights: as large again as the weights
        shutil.rmtree(out / "whole" / precision / ".ort-optimized", ignore_errors=True)
    (out / "timings.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def report(out: Path, json_out: Path) -> None:
    record = json.loads((out / "export.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    sequences = [str(s) for s in record["sequences"] if str(s) in timings["fp32"]]
    sizes = {p: sum(r[p]["bytes"] for r in record["records"]) for p in PRECISIONS}
    print(f"\nT5-XXL encoder, {record['layers']} layers in {record['pieces']} pieces (width as t5_layers.py); "
          "ONNX Runtime CPU, 2 threads, batch 1\n")
    print("| run | on disk | load | RSS after load | peak RSS | "
          + " | ".join(f"{s} tokens: time, PSNR vs fp32" for s in sequences) + " |")
    print("|---" * (5 + len(sequences)) + "|")
    for run, t in timings.items():
        precision = run.split()[0]
        size = t.get("bytes", sizes[precision])
        cells = [f"{t[s]['median_s']:.2f} s, " + ("(vs PyTorch) " if precision == "fp32" else "")
                 + f"{t[s]['psnr_db']:.1f} dB" for s in sequences]
        print(f"| {run if ' ' in run else run + ' chain'} | {_gb(size)} | {t['load_s']:.1f} s | "
              f"{_gb(t['rss_after_load'])} | {_gb(t['peak_rss'])} | " + " | ".join(cells) + " |")
    exports = [r["export_s"] + sum(r[p].get("convert_s", 0) for p in PRECISIONS) for r in record["records"]]
    print(f"\nexport: {sum(exports) / 60:.1f} min over the pieces, peak RSS "
          f"{_gb(max(r['peak_rss'] for r in record['records']))} (one piece's); fp32 gate max err "
          f"{max(r['fp32']['gate_max_abs_err'] for r in record['records']):.3g}")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps({"export": record, "timings": timings}, indent=2) + "\n")
    print(f"written: {json_out}")


def main() -> None:
    if sys.argv[1:2] == ["_piece"]:
        out, piece, pieces, layers, tokens = sys.argv[2:7]
        export_piece(Path(out), int(piece), int(pieces), int(layers), [int(s) for s in tokens.split(",")])
        return
    if sys.argv[1:2] == ["_child"]:
        out, precision, pieces, tokens, runs = sys.argv[2:7]
        child(Path(out), precision, int(pieces), [int(s) for s in tokens.split(",")], int(runs),
              sys.argv[7] if len(sys.argv) > 7 else "")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("export", "stitch", "time", "report"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--pieces", type=int, default=4, help="export: how many pieces the layers are cut into")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="export: all of T5-XXL's, or fewer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sequence", default="256,512", help="token counts, comma-separated (export and time)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where `time` and `report` write every figure")
    args = parser.parse_args()
    try:
        sequences = [int(s) for s in args.sequence.split(",")]
    except ValueError:
        parser.error(f"--sequence: comma-separated integers expected, got {args.sequence!r}")
    if args.pieces < 1 or args.layers % args.pieces:
        parser.error(f"--pieces: a divisor of --layers ({args.layers})")
    if args.command != "export" and not (args.out / "export.json").is_file():
        parser.error(f"{args.out / 'export.json'} not found: run `export {args.out}` first")
    if args.command == "export":
        export(args.out, args.pieces, args.layers, sequences)
    elif args.command == "stitch":
        pieces = json.loads((args.out / "export.json").read_text())["pieces"]
        for precision in PRECISIONS[1:]:
            print(f"{precision}: {stitch(args.out, precision, pieces)}", flush=True)
    elif args.command == "time":
        time_all(args.out, args.runs, sequences)
    if args.command in ("time", "report"):
        report(args.out, args.json)


if __name__ == "__main__":
    main()
