"""PSNR of one bundle's images against another's (int8 or fp16 against fp32): same prompts, seeds and settings.

Usage:

    python benchmarks/int8_quality.py benchmarks/bundles/sd-turbo benchmarks/bundles/sd-turbo-int8 \
        --size 512 --steps 1 --n 8 --json benchmarks/results/sd-turbo-int8-psnr.json

Several candidates are each compared with one set of reference renders; `--memory low` for bundles that fill the
machine (SD3.5 Medium's fp32 bundle):

    python benchmarks/int8_quality.py benchmarks/bundles/sd3.5-medium benchmarks/bundles/sd3.5-medium-int8 \
        benchmarks/bundles/sd3.5-medium-int4 --steps 4 --n 2 --memory low

The prompts are not the export's calibration prompts (those are edgediff.export.calibrate.PROMPTS), so the
figure is for images the quantizer never saw. Each bundle renders in turn, one loaded at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.export.gate import psnr_db  # noqa: E402
from edgediff.runtime.pipeline import Pipeline  # noqa: E402

PROMPTS = [
    "a cozy cabin in a snowy forest at night, warm light in the windows",
    "a corgi wearing sunglasses on a beach",
    "a bustling market street in Marrakech, golden hour",
    "a futuristic city skyline, cyberpunk, rain",
    "still life with apples and a jug, oil on canvas",
    "a hummingbird drinking from a red flower, high speed photo",
    "a medieval knight in ornate armour, studio portrait",
    "a mountain lake reflecting pine trees, morning mist",
]


def render_all(bundle: Path, prompts: list[str], size: int, steps: int, memory: str = "normal") -> list[np.ndarray]:
    pipe = Pipeline.load(bundle, memory=memory)
    return [pipe(p, height=size, width=size, num_inference_steps=steps, seed=i, output_type="np").images[0]
            for i, p in enumerate(prompts)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path, nargs="+", help="one or more bundles, each against the reference")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--n", type=int, default=len(PROMPTS))
    p.add_argument("--memory", choices=["normal", "low"], default="normal",
                   help="low: one component loaded at a time (models whose bundles fill the machine, e.g. SD3.5)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    prompts = PROMPTS[: args.n]
    ref = render_all(args.reference, prompts, args.size, args.steps, args.memory)
    records = [compare(args, ref, candidate, prompts) for candidate in args.candidate]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records[0] if len(records) == 1 else records, indent=2) + "\n")
    return 0


def compare(args: argparse.Namespace, ref: list, candidate: Path, prompts: list[str]) -> dict:
    got = render_all(candidate, prompts, args.size, args.steps, args.memory)
    # pixels in 0..1: PSNR over the full 0..1 range, as image-quality PSNR is usually stated
    values = [10 * np.log10(1.0 / max(float(np.mean((r - g) ** 2)), 1e-12)) for r, g in zip(ref, got)]
    record = {"reference": str(args.reference), "candidate": str(candidate), "size": args.size,
              "steps": args.steps, "psnr_db": values, "median_psnr_db": statistics.median(values),
              "min_psnr_db": min(values), "range_psnr_db": [psnr_db(r, g) for r, g in zip(ref, got)]}
    print(f"PSNR of {candidate} against {args.reference}: median {record['median_psnr_db']:.2f} dB, "
          f"min {record['min_psnr_db']:.2f} dB over {len(values)} images")
    return record


if __name__ == "__main__":
    sys.exit(main())
