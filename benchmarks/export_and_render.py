"""Export a checkpoint with `edgediff export`, then render from the bundle; record time and peak memory of each.

Each stage runs in its own process so that its peak resident memory is its own. Usage:

    python benchmarks/export_and_render.py benchmarks/checkpoints/sd-turbo benchmarks/bundles/sd-turbo \
        --preset turbo --size 512 --steps 1 --runs 3 --json benchmarks/results/sd-turbo-fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RENDER = r"""
import json, sys, time
t0 = time.perf_counter()
from edgediff import Pipeline
pipe = Pipeline.load(sys.argv[1])
load = time.perf_counter() - t0
size, steps, runs = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
results = []
for i in range(runs):
    out = pipe("a photograph of an astronaut riding a horse", height=size, width=size, num_inference_steps=steps,
               seed=i)
    results.append(out.timings)
print(json.dumps({"load_s": load, "renders": results}))
"""


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run `cmd`; return wall seconds, its peak RSS in bytes, and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("bundle", type=Path)
    p.add_argument("--preset")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-export", action="store_true", help="render an existing bundle only")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    record: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    if not args.skip_export:
        cmd = [sys.executable, "-m", "edgediff.cli", "export", str(args.src), str(args.bundle), "--force"]
        cmd += ["--preset", args.preset] if args.preset else []
        cmd += ["--precision", args.precision]
        wall, rss, _ = run_measured(cmd)
        size = sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file())
        record["export"] = {"seconds": wall, "peak_rss_bytes": rss, "bundle_bytes": size}
        print(f"export: {wall:.1f} s, peak RSS {rss / 1e9:.2f} GB, bundle {size / 1e9:.2f} GB", flush=True)
    wall, rss, out = run_measured(
        [sys.executable, "-c", RENDER, str(args.bundle), str(args.size), str(args.steps), str(args.runs)]
    )
    render = json.loads(out)
    record["render"] = {"process_seconds": wall, "peak_rss_bytes": rss, **render}
    last = render["renders"][-1]
    print(f"load {render['load_s']:.2f} s; render peak RSS {rss / 1e9:.2f} GB")
    for i, t in enumerate(render["renders"]):
        steps = ", ".join(f"{s:.2f}" for s in t["steps"])
        print(f"run {i}: total {t['total']:.2f} s = tokenize {t['tokenize'] * 1e3:.1f} ms, text encoder "
              f"{t['text_encoder']:.2f} s, steps [{steps}] s, vae decoder {t['vae_decoder']:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0 if last else 1


if __name__ == "__main__":
    sys.exit(main())
