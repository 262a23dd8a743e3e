"""`edgediff bench`: per-stage timings of bundles side by side with diffusers and Optimum, against the machine's
own peak. The harness needs only the runtime; `--compare diffusers` needs the export extra, `--compare optimum` a
virtual environment of its own (benchmarks/setup_optimum.sh)."""

from .harness import Settings, run_bench

__all__ = ["Settings", "run_bench"]
