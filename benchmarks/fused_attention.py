"""The U-Net step with ONNX Runtime's fused CPU attention against the exported attention: time and peak RSS.

Each measurement is its own process (peak RSS is that session's alone), fused and unfused interleaved:

    python benchmarks/fused_attention.py benchmarks/bundles/sd-turbo --sizes 512 1024 --pairs 3

The session is opened as `edgediff render` opens it (the CPU backend, the graph cache; --lean for memory="low");
EDGEDIFF_FUSED_ATTENTION=off gives the unfused one.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=[512])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--runs", type=int, default=2, help="steps per process (the fastest counts)")
    p.add_argument("--lean", action="store_true", help="memory='low' session settings")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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
