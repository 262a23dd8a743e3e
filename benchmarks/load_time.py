"""Load time of a bundle with the page cache and graph cache warm: `Pipeline.load` in fresh processes, and each
CPU component's session alone. The figures behind benchmarks/RESULTS.md's load lines (session 6):

    python benchmarks/load_time.py benchmarks/bundles/sd-turbo-int8-cached --runs 4

The first load warms the page cache (and builds graph caches a bundle lacks); the report is of the later ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(bundle: str) -> dict:
    """One process: the whole pipeline's load, then each of its components' CPU sessions opened alone."""
    import onnxruntime as ort

    from edgediff import Pipeline
    from edgediff.bundle import read_manifest
    from edgediff.runtime import graph_cache
    from edgediff.runtime.backends.ort import session_options

    start = time.perf_counter()
    Pipeline.load(bundle, threads=2)
    result = {"pipeline_s": time.perf_counter() - start}
    root = Path(bundle)
    manifest = read_manifest(root)
    for name in (*(e.component for e in manifest.text_encoders), "unet" if "unet" in manifest.components
                 else "transformer", "vae_decoder"):
        c = manifest.components[name]
        start = time.perf_counter()
        graph_cache.open_session(ort, root / c.file, c.files, session_options(ort, c.ort_options, 2, lean=False),
                                 ["CPUExecutionProvider"], cache=c.ort_options.cache_optimized_graph)
        result[name] = time.perf_counter() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.bundle)))
        return 0
    for run in range(args.runs):
        out = subprocess.run([sys.executable, __file__, args.bundle, "--child"], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        times = json.loads(out)
        print(("(page cache warming) " if run == 0 else "") + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
