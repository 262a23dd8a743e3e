"""FLUX.1 at full width, one block at a time: what the 12 B transformer would cost per step on this CPU.

FLUX.1's transformer does not fit this 24 GB machine in fp32 (47 GB) nor its export in bf16, so one double-stream
`FluxTransformerBlock` and one `FluxSingleTransformerBlock` are built with FLUX.1's real sizes (inner dim 3072,
24 heads x 128, MLP ratio 4) and random weights, at 512^2 (64 x 64 latents packed 2 x 2: 1024 image tokens) with
256 (schnell) and 512 (dev) T5 tokens. Each is exported with edgediff's exporter and fp32 parity gate
(export/onnx.py), converted as a bundle's transformer would be: int8 QDQ (export/quantize.py, calibrated on random
block inputs) and 4-bit weights (export/weights4.py, 128 rows per scale; and at 32 rows per scale for comparison), and
timed on ONNX Runtime's CPU backend with 2 threads, each graph in its own process (peak RSS is that session's).
The per-step projection for the whole model (19 double + 38 single blocks + embedders / final layer, parameters
counted from FLUX.1-dev's config) follows from those. docs/flux_streaming.md reads the figures.

    flock /tmp/edgediff-heavy.lock python benchmarks/flux_blocks.py export scratch/flux_blocks
    flock /tmp/edgediff-heavy.lock python benchmarks/flux_blocks.py time scratch/flux_blocks --runs 3

The rotary embedding (cos, sin per token) is an input, as the model computes it once per step for all blocks.
"""

from __future__ import annotations

import argparse
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

# FLUX.1-dev's transformer config (schnell's lacks only the guidance embedder)
# FLUX_BLOCKS_HEADS=2 shrinks the blocks' width for a quick check of this script (not FLUX.1's sizes)
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": int(os.environ.get("FLUX_BLOCKS_HEADS", 24)), "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
WIDTH = 128 * FLUX_DEV["num_attention_heads"]  # 3072
IMAGE_SIDE = 32  # packed tokens a side at 512^2: 512 / 8 (VAE) / 2 (packing)
TEXT_TOKENS = {"schnell": 256, "dev": 512}
KINDS = ("double", "single")
PRECISIONS = ("fp32", "int8", "int4", "int4-b32")


def _rotary(tokens: int):
    """FluxPosEmbed's (cos, sin) for `tokens` text tokens (ids 0) followed by the 512^2 image's packed tokens."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from edgediff.export.specs_flow import flux_image_ids

    ids = torch.cat([torch.zeros(tokens, 3), flux_image_ids(IMAGE_SIDE, IMAGE_SIDE)])
    return FluxPosEmbed(theta=10000, axes_dim=list(FLUX_DEV["axes_dims_rope"]))(ids)


def block_spec(kind: str):
    """The export spec of one block: image and text hidden states, the modulation embedding, the rotary tables."""
    import torch
    from diffusers.models.transformers import transformer_flux

    from edgediff.bundle import TensorSpec
    from edgediff.export.specs import ComponentSpec
    from edgediff.export.specs_flow import _plain_rms_norms
    from edgediff.export.specs_flow import _rotary as unflattened_rotary

    class Block(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            _plain_rms_norms(block)  # as the transformer's export does
            self.block = block

        def forward(self, hidden_states, encoder_hidden_states, temb, rotary_cos, rotary_sin):
            from unittest import mock

            with mock.patch.object(transformer_flux, "apply_rotary_emb", unflattened_rotary):
                text, image = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                         temb=temb, image_rotary_emb=(rotary_cos, rotary_sin))
            return image, text

    def sample(dims, g):
        b = dims["batch"]
        cos, sin = _rotary(dims["sequence"])
        return {"hidden_states": torch.randn(b, IMAGE_SIDE**2, WIDTH, generator=g),
                "encoder_hidden_states": torch.randn(b, dims["sequence"], WIDTH, generator=g),
                "temb": torch.randn(b, WIDTH, generator=g), "rotary_cos": cos.float(), "rotary_sin": sin.float()}

    image, text = ("batch", "image_sequence", WIDTH), ("batch", "sequence", WIDTH)
    head = FLUX_DEV["attention_head_dim"]
    return ComponentSpec(
        name=f"{kind} block",
        inputs=(TensorSpec("hidden_states", "float32", image), TensorSpec("encoder_hidden_states", "float32", text),
                TensorSpec("temb", "float32", ("batch", WIDTH)),
                TensorSpec("rotary_cos", "float32", ("tokens", head)),
                TensorSpec("rotary_sin", "float32", ("tokens", head))),
        outputs=(TensorSpec("out_hidden_states", "float32", image),
                 TensorSpec("out_encoder_hidden_states", "float32", text)),
        wrap=Block,
        sample=sample,
    )


def _dims(text: int) -> dict[str, int]:
    return {"batch": 1, "sequence": text, "image_sequence": IMAGE_SIDE**2, "tokens": text + IMAGE_SIDE**2}


def _feeds(spec, text: int, seed: int) -> dict[str, np.ndarray]:
    import torch

    return {k: v.numpy() for k, v in spec.sample(_dims(text), torch.Generator().manual_seed(seed)).items()}


def build_block(kind: str):
    import torch
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(0)
    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    block = cls(dim=WIDTH, num_attention_heads=FLUX_DEV["num_attention_heads"],
                attention_head_dim=FLUX_DEV["attention_head_dim"]).eval()
    # Gaussian weights, not torch's uniform default: a block's largest weight, which sets a 4-bit scale, then
    # stands out as in trained weights (a uniform block's maximum is its bound, whatever the block size)
    for linear in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
        torch.nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
    return block


def export(out: Path) -> None:
    """fp32 graphs (gated against PyTorch at both text lengths), then each reduced precision gated against them."""
    import gc

    from edgediff.export.onnx import check_against_torch, export_component, reference_outputs

    record: dict = {}
    for kind in KINDS:
        spec, block = block_spec(kind), build_block(kind)
        params = sum(p.numel() for p in block.parameters())
        path = out / kind / "fp32" / "model.onnx"
        start = time.perf_counter()
        _, options = export_component(block, spec, _dims(TEXT_TOKENS["dev"]), path)
        exported = time.perf_counter() - start
        references = reference_outputs(block, spec, [_dims(TEXT_TOKENS["schnell"])])
        del block
        gc.collect()
        parity = check_against_torch(spec, path, references, ort_options=options)
        record[kind] = {"parameters": params, "export_s": exported, "fp32_gate_max_abs_err": parity.max_abs_err,
                        "fp32": {"bytes": _size(path.parent)}}
        for precision in PRECISIONS[1:]:
            record[kind][precision] = convert(spec, path, precision)
            print(kind, precision, record[kind][precision], flush=True)
        (out / "blocks.json").write_text(json.dumps(record, indent=2) + "\n")


def variant_copy(fp32: Path, precision: str) -> Path:
    """A fresh copy of the fp32 graph's folder beside it, named for `precision`: the graph to convert in place."""
    folder = fp32.parent.parent / precision
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(fp32.parent, folder)
    return folder / fp32.name


def convert(spec, fp32: Path, precision: str) -> dict:
    from edgediff.export.gate import run_graph
    from edgediff.export.onnx import default_ort_options
    from edgediff.export.quantize import quantize_int8
    from edgediff.export.weights4 import fused_matmuls, quantize_int4

    path = variant_copy(fp32, precision)
    folder = path.parent
    start = time.perf_counter()
    if precision == "int8":  # calibrated on other random inputs than those it is measured on
        _, options, _ = quantize_int8(path, [_feeds(spec, TEXT_TOKENS["dev"], 300 + i) for i in range(2)])
    else:
        _, options, _ = quantize_int4(path, block_size=32 if precision == "int4-b32" else None)
    result: dict = {"convert_s": time.perf_counter() - start, "bytes": _size(folder),
                    "level": options.graph_optimization_level}
    if precision.startswith("int4"):
        ops = fused_matmuls(path, options.graph_optimization_level)
        result["fused"] = {"MatMulNBits": ops["MatMulNBits"], "DequantizeLinear": ops["DequantizeLinear"]}
    names = [t.name for t in spec.outputs]
    for label, text in TEXT_TOKENS.items():
        feeds = [_feeds(spec, text, 500)]
        reference = run_graph(fp32, feeds, default_ort_options(_size(fp32.parent)), output_names=names)[0]
        got = run_graph(path, feeds, options, output_names=names)[0]
        result[label] = {name: _errors(r, g, feeds[0][source]) for name, source, r, g in
                         zip(names, ("hidden_states", "encoder_hidden_states"), reference, got)}
    return result


def _errors(reference: np.ndarray, got: np.ndarray, block_input: np.ndarray) -> dict[str, float]:
    """Against fp32: on the output, and on the block's update (output - input, the residual branch), which the
    output's pass-through of its input would otherwise hide."""
    from edgediff.export.gate import psnr_db

    update = reference - block_input
    return {"psnr_db": psnr_db(reference, got), "max_abs_err": float(np.abs(reference - got).max()),
            "reference_max": float(np.abs(reference).max()),
            "update_psnr_db": psnr_db(update, got - block_input),
            "update_relative_rms": float(np.sqrt(np.mean((got - reference) ** 2) / np.mean(update**2)))}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*"))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(path: Path, precision: str, text: int, runs: int, lean: bool) -> None:
    """One session, as the CPU backend opens this precision's graph, 2 threads: load, one warm-up call, `runs`
    timed calls; resident memory before and after loading and at peak."""
    import onnxruntime as ort

    from edgediff.export.onnx import default_ort_options
    from edgediff.export.quantize import ORT_OPTIONS
    from edgediff.runtime.backends.ort import session_options

    kind = path.parent.parent.name
    feeds = _feeds(block_spec(kind), text, 700)
    chosen = ORT_OPTIONS if precision == "int8" else default_ort_options(_size(path.parent))
    baseline = _rss("VmRSS")
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), session_options(ort, chosen, threads=2, lean=lean),
                                   providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    loaded = _rss("VmRSS")
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    print(json.dumps({"load_s": load, "times_s": times, "median_s": statistics.median(times), "baseline_rss": baseline,
                      "loaded_rss": loaded, "peak_rss": _rss("VmHWM")}))


# (precision, label, lean): every precision at both text lengths, and as memory="low" opens it (no pre-packing, no
# arena) at dev's
VARIANTS = [(p, label, False) for p in PRECISIONS for label in TEXT_TOKENS] + [
    (p, "dev", True) for p in ("fp32", "int8", "int4")]


def variant(precision: str, lean: bool) -> str:
    return precision + ("-lean" if lean else "")


def time_all(out: Path, runs: int) -> dict:
    results = {}
    for kind in KINDS:
        for precision, label, lean in VARIANTS:
            path = out / kind / precision / "model.onnx"
            done = subprocess.run([sys.executable, __file__, "_child", str(path), precision, str(TEXT_TOKENS[label]),
                                   str(runs), str(int(lean))], capture_output=True, text=True, check=True)
            name = variant(precision, lean)
            results[f"{kind} {name} {label}"] = reply = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind:6} {name:10} {label:7} median {reply['median_s']:.3f} s of {reply['times_s']}, "
                  f"load {reply['load_s']:.1f} s, RSS loaded {_gb(reply['loaded_rss'] - reply['baseline_rss'])} "
                  f"(+{_gb(reply['baseline_rss'])} before), peak {_gb(reply['peak_rss'])}", flush=True)
    runs_done = len(list(out.glob("timings-*.json")))
    (out / f"timings-{runs_done + 1}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def median_timings(out: Path) -> tuple[dict, int]:
    """Each figure's median over the `time` runs so far (one timings-N.json each)."""
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("timings-*.json"))]
    keys = set.union(*(set(r) for r in runs))
    return {k: {field: statistics.median(r[k][field] for r in runs if k in r) for field in
                ("median_s", "load_s", "baseline_rss", "loaded_rss", "peak_rss")} for k in keys}, len(runs)


def per_block(timings: dict) -> None:
    print("| block | precision | text | time per call | RSS after load | peak RSS |\n|---|---|---|---|---|---|")
    for kind in KINDS:
        for precision, label, lean in VARIANTS:
            t = timings[f"{kind} {variant(precision, lean)} {label}"]
            print(f"| {kind} | {variant(precision, lean)} | {TEXT_TOKENS[label]} | {t['median_s']:.3f} s | "
                  f"{_gb(t['loaded_rss'] - t['baseline_rss'])} | {_gb(t['peak_rss'] - t['baseline_rss'])} |")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def whole_model(text: int) -> dict[str, float]:
    """FLUX.1-dev's parameters per double block, per single block and in the rest (embedders, final layer),
    counted on the meta device from its config; and the rest's multiply-adds per step relative to a double block's."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    double, single = count(model.transformer_blocks[0]), count(model.single_transformer_blocks[0])
    total = count(model)
    image, d = IMAGE_SIDE**2, WIDTH
    tokens = image + text
    # per token, both block kinds: 12 d^2 in their linears (double: q k v o + 4x MLP in and out per stream; single:
    # q k v + MLP in 4d + out 5d); the attention's two products 2 tokens^2 d; the modulation on one token
    double_macs = 12 * d * d * tokens + 2 * tokens**2 * d + 12 * d * d
    rest = total - 19 * double - 38 * single
    per_token = {image: 64 * d + d * 64, text: 4096 * d}  # x_embedder and proj_out; context_embedder
    # the embedders on their tokens; the rest (time, guidance and pooled-text embedders, norm_out) once per step
    rest_macs = sum(n * w for n, w in per_token.items()) + rest - sum(per_token.values())
    return {"double": double, "single": single, "rest": rest, "total": total, "rest_share": rest_macs / double_macs}


def project(out: Path) -> None:
    """Per-step time and peak memory of the whole transformer, from the per-block measurements.

    A block holds what its session took at load (pre-packed weights; RSS after load less the interpreter's) and
    needs its activations on top (peak less loaded). The whole model holds 57 blocks' and the rest's weights (at
    the double block's bytes per parameter) and one block's activations at a time. Sessions without pre-packing
    (memory="low") read the memory-mapped weights only as a call touches them, so their load figure says nothing
    of what they hold: they are timed, not projected."""
    blocks = json.loads((out / "blocks.json").read_text())
    timings, runs = median_timings(out)
    print(f"medians over {runs} runs of `time`, each figure the median of its run's calls; RSS less the "
          "interpreter's before loading\n")
    per_block(timings)
    print()
    print("| precision | text | double block | single block | per step (19 + 38 + rest) | weights on disk | "
          "held per double / single block | projected peak RSS |\n|---|---|---|---|---|---|---|---|")
    for precision, label, _ in (v for v in VARIANTS if not v[2]):  # memory="low" reads weights as it runs
        text = TEXT_TOKENS[label]
        counts = whole_model(text)
        timed = [timings[f"{kind} {precision} {label}"] for kind in KINDS]
        activations = [t["peak_rss"] - t["loaded_rss"] for t in timed]
        held = [t["loaded_rss"] - t["baseline_rss"] for t in timed]
        d, s = (t["median_s"] for t in timed)
        step = 19 * d + 38 * s + counts["rest_share"] * d
        per_param = blocks["double"][precision]["bytes"] / blocks["double"]["parameters"]
        disk = (19 * blocks["double"][precision]["bytes"] + 38 * blocks["single"][precision]["bytes"]
                + counts["rest"] * per_param)
        whole = 19 * held[0] + 38 * held[1] + counts["rest"] * held[0] / blocks["double"]["parameters"]
        print(f"| {precision} | {label} {text} | {d:.2f} s | {s:.2f} s | {step:.0f} s | {_gb(disk)} | "
              f"{_gb(held[0])} / {_gb(held[1])} | {_gb(whole + max(activations))} |")
    print(f"\nparameters: {json.dumps(whole_model(TEXT_TOKENS['dev']))}")


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        child(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("export", "time", "project"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.command == "export":
        export(args.out)
    elif args.command == "time":
        time_all(args.out, args.runs)
    if args.command != "export":
        project(args.out)


if __name__ == "__main__":
    main()
