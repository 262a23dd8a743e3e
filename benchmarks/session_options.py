"""Load and run one bundle component under given ONNX Runtime options; print load/run time (wall and CPU) and RSS.

The measurements behind docs/loading.md. Each run is its own process so that peak RSS is this session's alone:

    for level in extended all; do for prepack in on off; do
        python benchmarks/session_options.py benchmarks/bundles/sd-turbo unet --level $level --prepack $prepack
    done; done
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.bundle import SessionOptions, read_manifest  # noqa: E402
from edgediff.runtime import graph_cache  # noqa: E402
from edgediff.runtime.backends.ort import session_options  # noqa: E402

SIZES = {"batch": 1, "sequence": 77, "latent_height": 64, "latent_width": 64, "height": 512, "width": 512}


def feeds_for(component) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for t in component.inputs:
        shape = [d if isinstance(d, int) else SIZES[d] for d in t.shape]
        if t.dtype == "int64":
            feeds[t.name] = rng.integers(0, 49000, shape).astype(np.int64)
        elif t.name == "timestep":
            feeds[t.name] = np.full(shape, 999.0, np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def profile_by_op_type(trace: Path, top: int) -> list[dict]:
    """The last run's kernel time per op type, longest first, from ONNX Runtime's Chrome-trace profile."""
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1e6
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"op_type": op, "s": round(t, 4), "share": round(t / whole, 3)} for op, t in ranked]


def clock(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("component")
    p.add_argument("--level", choices=["disabled", "basic", "extended", "all"], default="all")
    p.add_argument("--prepack", choices=["on", "off"], default="on")
    p.add_argument("--lean", action="store_true",
                   help="memory='low' sessions' options (no pre-planned block, no reuse plan)")
    p.add_argument("--arena", choices=["on", "off"], default="on",
                   help="ONNX Runtime's CPU memory arena (memory='low' turned it off before session 7)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--graph", type=Path, help="run this graph file instead of the component's (same inputs)")
    p.add_argument("--cached", action="store_true",
                   help="load through edgediff's graph cache (optimised once at --level, all or extended, then "
                   "loaded as saved; the CPU backend's fused attention included)")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="also print the N op types that took longest in the last run (ONNX Runtime's profiler)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    component = read_manifest(args.bundle).components[args.component]
    chosen = SessionOptions(graph_optimization_level=args.level, disable_prepacking=args.prepack == "off")
    options = session_options(ort, chosen, threads=None, lean=args.lean)
    options.enable_cpu_mem_arena = args.arena == "on"
    if args.profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "edgediff-session-profile")
    path = str(args.graph or args.bundle / component.file)
    if args.cached:
        session, load_wall, load_cpu = clock(lambda: graph_cache.open_session(
            ort, Path(path), component.files, options, ["CPUExecutionProvider"], cache=True))
    else:
        session, load_wall, load_cpu = clock(
            lambda: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    feeds = feeds_for(component)
    runs = [clock(lambda: session.run(None, feeds))[1:] for _ in range(args.runs)]
    op_types = profile_by_op_type(Path(session.end_profiling()), args.profile) if args.profile else None
    print(json.dumps({
        "component": args.component, "graph": path, "level": args.level, "prepack": args.prepack,
        "lean": args.lean, "arena": args.arena, "cached": args.cached,
        "load_s": load_wall, "load_cpu_s": load_cpu, "rss_after_load_bytes": rss_after_load,
        "runs_s": [r[0] for r in runs], "runs_cpu_s": [r[1] for r in runs],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **({"last_run_by_op_type": op_types} if op_types else {}),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
