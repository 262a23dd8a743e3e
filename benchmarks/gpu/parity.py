"""A GPU backend's fp16 bundle against the CPU's fp32 bundle, component by component, within the fp16 bundle's
own recorded gate (its parity record: relative tolerance and PSNR floor against the fp32 graph).

    python benchmarks/gpu/parity.py FP32_BUNDLE FP16_BUNDLE --backend cuda [--size 512]

The feeds are the ones a real render gives each component: one CPU fp32 render is recorded through
`Pipeline.load(..., session_factory=...)`. Then a whole render on the backend (through its I/O binding) is
compared with the CPU fp32 render, reported as PSNR. Exit 1 if any component is past its gate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgediff import Pipeline
from edgediff.bundle import read_manifest
from edgediff.export.gate import psnr_db
from edgediff.runtime.backends import open_session

PROMPT = "a photograph of an astronaut riding a horse"


def recorded_feeds(root: Path, size: int | None) -> dict[str, dict[str, np.ndarray]]:
    """The first feeds each component got in a CPU render of `root`."""
    feeds: dict[str, dict[str, np.ndarray]] = {}

    class Recording:
        def __init__(self, name, component):
            self.name, self._session = name, open_session(root, name, component, "cpu")
            self.inputs, self.outputs = self._session.inputs, self._session.outputs

        def __call__(self, **given):
            feeds.setdefault(self.name, {k: np.array(v, copy=True) for k, v in given.items()})
            return self._session(**given)

        def bind(self, **fixed):
            return lambda **rest: self(**fixed, **rest)

        def close(self):
            self._session.close()

    pipe = Pipeline.load(root, session_factory=Recording)
    pipe(PROMPT, seed=0, height=size, width=size, output_type="np")
    return feeds


def compare(fp32: Path, fp16: Path, backend: str, size: int | None) -> list[dict]:
    feeds = recorded_feeds(fp32, size)
    m32, m16 = read_manifest(fp32), read_manifest(fp16)
    rows = []
    for name, given in feeds.items():
        c16 = m16.components[name]
        reference = open_session(fp32, name, m32.components[name], "cpu")(**given)
        got = open_session(fp16, name, c16, backend)(**given)
        gate = c16.parity
        for output, ref in reference.items():
            err = float(np.max(np.abs(ref.astype(np.float64) - got[output])))
            limit = (gate.relative_tolerance or 0.0) * max(1.0, float(np.max(np.abs(ref)))) if gate else 0.0
            psnr = psnr_db(ref, got[output])
            ok = gate is None or (err <= limit and (gate.min_psnr_db is None or psnr >= gate.min_psnr_db))
            rows.append({"component": name, "output": output, "precision": c16.precision, "max_abs_err": err,
                         "limit": limit, "psnr_db": psnr, "min_psnr_db": gate.min_psnr_db if gate else None,
                         "ok": ok})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("fp16", type=Path)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--size", type=int, help="render size in pixels [default: the bundle's]")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = compare(args.fp32, args.fp16, args.backend, args.size)
    for r in rows:
        print(f"{args.backend} {r['component']}.{r['output']} ({r['precision']}): max abs {r['max_abs_err']:.3g} "
              f"(limit {r['limit']:.3g}), PSNR {r['psnr_db']:.1f} dB (floor {r['min_psnr_db']}): "
              f"{'ok' if r['ok'] else 'PAST THE GATE'}")
    ours = Pipeline.load(args.fp16, backend=args.backend)(PROMPT, seed=0, height=args.size, width=args.size,
                                                          output_type="np")
    theirs = Pipeline.load(args.fp32)(PROMPT, seed=0, height=args.size, width=args.size, output_type="np")
    render_psnr = psnr_db(np.asarray(theirs.images), np.asarray(ours.images))
    print(f"{args.backend} whole render (I/O binding) against the CPU fp32 render: PSNR {render_psnr:.1f} dB, "
          f"{ours.timings['total']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"components": rows, "render_psnr_db": render_psnr}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
