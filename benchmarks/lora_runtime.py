"""Run-time LoRA on a full-size bundle: the time to apply a LoRA at load and to switch to another, and peak memory,
against a plain load (benchmarks/RESULTS.md, "Run-time LoRA").

    python benchmarks/lora_runtime.py BUNDLE [--rank 64] [--render] [--json OUT.json]

Makes two random rank-R LoRAs in diffusers' keys on every attention (to_q, to_k, to_v, to_out.0) and feed-forward
(ff.net.0.proj, ff.net.2) linear of the bundle's U-Net, from the bundle's own LoRA map, then runs each case in a
fresh process, one after the other: `plain` (Pipeline.load), `lora` (Pipeline.load(..., loras=[A]) then
set_loras([B]) and back to [A]). Peak RSS is the child's ru_maxrss. `--render` adds one render (the bundle's
default steps, 512x512) after loading and after each switch. The bundle must come from an edgediff with run-time
LoRA (its components carry a lora_map).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's edgediff, in the children too

TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2")


def make_lora(bundle: Path, rank: int, seed: int, out: Path) -> int:
    """A random rank-`rank` LoRA on the U-Net's attention and feed-forward linears; returns its layer count."""
    from safetensors.numpy import save_file

    from edgediff.bundle import read_manifest
    from edgediff.lora_format import read_lora_map

    manifest = read_manifest(bundle)
    lora_map = read_lora_map(bundle / str(manifest.components["unet"].lora_map))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, layer in lora_map.layers.items():
        if not name.endswith(TARGETS) or len(layer.shape) != 2:
            continue
        out_features, in_features = layer.shape
        tensors[f"unet.{name}.lora_A.weight"] = (rng.standard_normal((rank, in_features)) / np.sqrt(in_features)
                                                 ).astype(np.float16)
        tensors[f"unet.{name}.lora_B.weight"] = (rng.standard_normal((out_features, rank)) * 0.01).astype(np.float16)
    save_file(tensors, str(out))
    return len(tensors) // 2


def child(bundle: Path, case: str, loras: list[str], render: bool) -> dict:
    """One case in this process: load (with LoRA A), switch to B and back; times, peak RSS."""
    from edgediff import Pipeline

    record: dict = {"case": case}

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB

    def draw(label: str) -> None:
        if render:
            t = time.perf_counter()
            pipe("a lighthouse at dusk", height=512, width=512, seed=1, output_type="np")
            record[f"render_{label}_s"] = round(time.perf_counter() - t, 2)
            record[f"peak_rss_after_render_{label}_gb"] = round(peak(), 2)

    t, cpu = time.perf_counter(), time.process_time()
    pipe = Pipeline.load(bundle, loras=[(loras[0], 0.8)] if case == "lora" else ())
    record["load_s"] = round(time.perf_counter() - t, 2)
    record["load_cpu_s"] = round(time.process_time() - cpu, 2)  # the machine is shared: CPU time says more
    record["peak_rss_after_load_gb"] = round(peak(), 2)
    if pipe.lora_switch is not None:
        record["apply"] = _switch(pipe.lora_switch)
    draw("first")
    if case == "lora":
        cpu = time.process_time()
        record["switch_to_b"] = _switch(pipe.set_loras([(loras[1], 0.8)]), cpu)
        record["peak_rss_after_switch_gb"] = round(peak(), 2)
        draw("b")
        cpu = time.process_time()
        record["switch_back_to_a"] = _switch(pipe.set_loras([(loras[0], 0.8)]), cpu)
        record["peak_rss_after_switch_back_gb"] = round(peak(), 2)
    return record


def _switch(s, cpu: float | None = None) -> dict:
    record = {"layers": s.layers, "rebuilt": list(s.rebuilt), "weights_s": round(s.weights_seconds, 2),
              "total_s": round(s.seconds, 2)}
    if cpu is not None:
        record["cpu_s"] = round(time.process_time() - cpu, 2)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--render", action="store_true", help="also render once after loading and each switch")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, *loras = args.child
        print(json.dumps(child(args.bundle, case, loras, args.render)))
        return
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as scratch:
        files = [Path(scratch) / f"{name}.safetensors" for name in ("a", "b")]
        layers = [make_lora(args.bundle, args.rank, seed, f) for seed, f in enumerate(files)]
        records = {"bundle": str(args.bundle), "rank": args.rank, "lora_layers": layers[0],
                   "lora_file_mb": round(files[0].stat().st_size / 1e6, 1), "cases": []}
        for case in ("plain", "lora"):  # one heavy process at a time
            command = [sys.executable, __file__, str(args.bundle), *(["--render"] if args.render else []),
                       "--child", case, *map(str, files)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            records["cases"].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(records["cases"][-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    print(json.dumps({k: v for k, v in records.items() if k != "cases"}))


if __name__ == "__main__":
    main()
