"""The built-in model's figures: load time, render time at the manifest's defaults, and prompt adherence.

Usage (the default bundle is the shipped one; give several to compare precisions):

    python benchmarks/eval_builtin.py [BUNDLE ...] --n 500 --steps 1,2,4,8 \
        --json benchmarks/results/builtin.json --markdown benchmarks/results/builtin.md

Load and render times are medians over fresh `Pipeline.load()` calls and over renders of one image (PIL output,
as `edgediff render` makes), in this process after one warm-up render. Adherence is
`edgediff.models.evaluate` (grammar prompts, fixed seeds, the deterministic detector).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.models import builtin_bundle  # noqa: E402
from edgediff.models.evaluate import evaluate, table  # noqa: E402
from edgediff.runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a red circle above a blue square"


def timings(bundle: Path, loads: int, renders: int, threads: int | None) -> dict:
    load_times = []
    for _ in range(loads):
        began = time.perf_counter()
        pipeline = Pipeline.load(bundle, threads=threads)
        load_times.append(time.perf_counter() - began)
    pipeline(PROMPT, seed=0)  # warm-up: ONNX Runtime's first run allocates
    render_times = []
    for i in range(renders):
        began = time.perf_counter()
        pipeline(PROMPT, seed=i)
        render_times.append(time.perf_counter() - began)
    return {"load_s_median": statistics.median(load_times), "render_s_median": statistics.median(render_times),
            "loads": loads, "renders": renders, "defaults": pipeline.manifest.defaults.__dict__}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundles", nargs="*", type=Path)
    p.add_argument("--n", type=int, default=500, help="prompts per kind")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--renders", type=int, default=50)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    bundles = args.bundles or [builtin_bundle()]
    if bundles[0] is None:
        print("no built-in bundle in this install; pass a bundle folder", file=sys.stderr)
        return 2

    report = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(), "bundles": []}
    markdown = [f"Command: `python {' '.join(sys.argv)}`", ""]
    for bundle in bundles:
        timing = timings(bundle, args.loads, args.renders, args.threads)
        pipeline = Pipeline.load(bundle, threads=args.threads)
        precision = sorted({c.precision for c in pipeline.manifest.components.values()})
        print(f"{bundle} ({'/'.join(precision)}): load {timing['load_s_median']:.3f} s, "
              f"render {timing['render_s_median']:.3f} s (medians)", flush=True)
        scores = []
        for steps in (int(s) for s in args.steps.split(",")):
            for kind in ("one", "two"):
                scores.append(evaluate(pipeline, kind, args.n, steps, seed=args.seed))
                print(table(scores[-1:]).splitlines()[-1], flush=True)
        report["bundles"].append({"bundle": str(bundle), "precision": precision, **timing,
                                  "scores": [s.__dict__ for s in scores]})
        markdown += [f"### {bundle.name} ({'/'.join(precision)})", "",
                     f"`Pipeline.load()` {timing['load_s_median'] * 1000:.0f} ms, one render at the defaults "
                     f"({timing['defaults']['steps']} {timing['defaults']['sampler']} steps) "
                     f"{timing['render_s_median'] * 1000:.0f} ms (medians)", "", table(scores), ""]
    print("\n".join(markdown))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text("\n".join(markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
