"""The U-Net step with ONNX Runtime's fused CPU attention against the exported attention: time and peak RSS.

Each measurement is its own process (peak RSS is that session's alone), fused and unfused interleaved:

    python benchmarks/fused_attention.py benchmarks/bundles/sd-turbo --sizes 512 1024 --pairs 3

The session is opened as `edgediff render` opens it (the CPU backend, the graph cache; --lean for memory="low");
EDGEDIFF_FUSED_ATTENTION=off gives the unfused one.

One attention alone, in the three forms docs/attention.md compares (as exported at opset 17, onnxruntime's
MultiHeadAttention, ONNX's Attention of opset 23), each in its own process for its memory:

    python benchmarks/fused_attention.py --probe 4096 [--context 77] [--heads 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step(bundle: Path, size: int, runs: int, lean: bool) -> dict:
    from edgediff.bench.harness import instruction_set
    from edgediff.bundle import load_manifest
    from edgediff.runtime.backends import open_session
    from edgediff.runtime.sessions import SessionSettings

    manifest = load_manifest(bundle)
    unet = manifest.components["unet"]
    t = time.perf_counter()
    session = open_session(bundle, "unet", unet, "cpu", SessionSettings(threads=2, lean=lean))
    load = time.perf_counter() - t
    rng = np.random.default_rng(0)
    latent = size // manifest.latent.downscale
    dims = {"batch": 1, "latent_height": latent, "latent_width": latent, "sequence": 77}
    feeds = {}
    for spec in unet.inputs:
        shape = tuple(dims.get(d, d) if isinstance(d, str) else d for d in spec.shape)
        feeds[spec.name] = (rng.standard_normal(shape) if spec.dtype == "float32" else np.full(shape, 999)).astype(
            spec.dtype)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session(**feeds)
        times.append(time.perf_counter() - t)
    return {"size": size, "fused": os.environ.get("EDGEDIFF_FUSED_ATTENTION", "on") != "off", "load_s": load,
            "step_s": min(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "instruction_set": instruction_set(), "lean": lean}


FORMS = ("exported", "MultiHeadAttention", "Attention-23")


def attention_model(form: str, tokens: int, context: int, heads: int, dim: int = 64):
    """One attention over (1, tokens, heads x dim) queries and (1, context, heads x dim) keys and values."""
    from onnx import TensorProto, helper

    width = heads * dim
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, t, width])
              for n, t in (("q", tokens), ("k", context), ("v", context))]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, tokens, width])
    if form != "exported":
        domain, opset = ("com.microsoft", 1) if form == "MultiHeadAttention" else ("", 23)
        heads_attrs = {"num_heads": heads} if domain else {"q_num_heads": heads, "kv_num_heads": heads}
        node = helper.make_node(form.split("-")[0], ["q", "k", "v"], ["o"], domain=domain, **heads_attrs)
        graph = helper.make_graph([node], "attention", inputs, [output])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17 if domain else 23),
                                                       *([helper.make_opsetid(domain, opset)] if domain else [])])
    inits = [helper.make_tensor("q_shape", TensorProto.INT64, [4], [1, tokens, heads, dim]),
             helper.make_tensor("kv_shape", TensorProto.INT64, [4], [1, context, heads, dim]),
             helper.make_tensor("o_shape", TensorProto.INT64, [3], [1, tokens, width]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [dim ** -0.25])]
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "q_shape" if name == "q" else "kv_shape"], [name + "_r"]),
                  helper.make_node("Transpose", [name + "_r"], [name + "_t"], perm=perm)]
    nodes += [helper.make_node("Mul", ["q_t", "scale"], ["q_s"]), helper.make_node("Mul", ["k_t", "scale"], ["k_s"]),
              helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v_t"], ["o_t"]),
              helper.make_node("Transpose", ["o_t"], ["o_r"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o_r", "o_shape"], ["o"])]
    graph = helper.make_graph(nodes, "attention", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def probe(form: str, tokens: int, context: int, heads: int, runs: int = 3) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(attention_model(form, tokens, context, heads).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, t, heads * 64)).astype(np.float32)
             for n, t in (("q", tokens), ("k", context), ("v", context))}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return {"form": form, "tokens": tokens, "context": context, "heads": heads, "s": min(times),
            "added_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, nargs="?")
    p.add_argument("--probe", type=int, metavar="TOKENS", help="time one attention of TOKENS queries instead")
    p.add_argument("--context", type=int, help="--probe: keys and values [default: TOKENS, self-attention]")
    p.add_argument("--heads", type=int, default=5, help="--probe: heads of 64 [default: 5, SD-Turbo's first level]")
    p.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=[512])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--runs", type=int, default=2, help="steps per process (the fastest counts)")
    p.add_argument("--lean", action="store_true", help="memory='low' session settings")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        context = args.context or args.probe
        if args.form:
            print(json.dumps(probe(args.form, args.probe, context, args.heads)))
            return 0
        for form in FORMS:
            command = [sys.executable, __file__, "--probe", str(args.probe), "--context", str(context), "--heads",
                       str(args.heads), "--form", form]
            print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip(), flush=True)
        return 0
    if args.bundle is None:
        p.error("give a BUNDLE, or --probe TOKENS")
    if args.child:
        print(json.dumps(step(args.bundle, args.child, args.runs, args.lean)))
        return 0
    results = []
    for size in args.sizes:
        for _ in range(args.pairs):
            for fused in ("on", "off"):
                command = [sys.executable, __file__, str(args.bundle), "--child", str(size), "--runs", str(args.runs)]
                env = {**os.environ, "EDGEDIFF_FUSED_ATTENTION": fused}
                out = subprocess.run([*command, *(["--lean"] if args.lean else [])], env=env, check=True,
                                     capture_output=True, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    for size in args.sizes:
        rows = [r for r in results if r["size"] == size]
        ratios = [a["step_s"] / b["step_s"] for a, b in zip(rows[::2], rows[1::2])]
        on = [r for r in rows if r["fused"]]
        off = [r for r in rows if not r["fused"]]
        print(f"{size}²: fused/unfused step {np.median(ratios):.3f} (pairs {', '.join(f'{x:.3f}' for x in ratios)}); "
              f"peak RSS {max(r['peak_rss_gb'] for r in on):.2f} vs {max(r['peak_rss_gb'] for r in off):.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
