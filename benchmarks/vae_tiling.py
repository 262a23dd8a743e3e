"""The tiled VAE decode against the whole-image decode: error, time and peak RSS, each pass in its own process.

    python benchmarks/vae_tiling.py benchmarks/bundles/sd-turbo --size 1024
    python benchmarks/vae_tiling.py edgediff/models/builtin --size 64

The latents are the VAE encoder's mean for a smooth synthetic picture (gradients, discs, stripes), so the decode
has structure to get right at every scale; both passes decode the same latents.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def picture(size: int) -> np.ndarray:
    """(1, 3, size, size) in -1..1: two gradients, three discs and a band of stripes."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r, g, b = x, y, 0.5 + 0.5 * np.sin(12 * np.pi * x) * (np.abs(y - 0.8) < 0.08)
    for cx, cy, rad, colour in ((0.3, 0.3, 0.15, (1, 0, 0)), (0.7, 0.4, 0.2, (0, 0, 1)), (0.5, 0.7, 0.1, (1, 1, 0))):
        disc = (x - cx) ** 2 + (y - cy) ** 2 < rad ** 2
        r, g, b = (np.where(disc, c, ch) for c, ch in zip(colour, (r, g, b)))
    return (np.stack([r, g, b])[None] * 2 - 1).astype(np.float32)


def child(bundle: Path, size: int, tile: str, latents_file: Path, out_file: Path) -> dict:
    from edgediff.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, memory="low", vae_tiling=tile)
    lat = pipe.manifest.latent
    if not latents_file.exists():
        moments = pipe.session("vae_encoder")(sample=picture(size))["latent_parameters"]
        mean = np.split(moments, 2, axis=1)[0]
        np.save(latents_file, ((mean - lat.shift_factor) * lat.scaling_factor).astype(np.float32))
    latents = np.load(latents_file)
    chosen = pipe.vae_tile(size, size)
    t = time.perf_counter()
    image = pipe.decode(latents, chosen)
    seconds = time.perf_counter() - t
    np.save(out_file, image)
    return {"tiling": tile, "tile_latents": chosen, "decode_s": seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        report = child(args.bundle, args.size, args.child, args.scratch / "latents.npy",
                       args.scratch / f"{args.child}.npy")
        print(json.dumps(report))
        return 0
    from edgediff.bench.harness import instruction_set

    with tempfile.TemporaryDirectory() as scratch:
        runs = {}
        for tile in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, str(args.bundle), "--size", str(args.size), "--child",
                                  tile, "--scratch", scratch], check=True, capture_output=True, text=True).stdout
            runs[tile] = json.loads(out.strip().splitlines()[-1])
        whole, tiled = (np.load(Path(scratch) / f"{t}.npy") for t in ("off", "on"))
    error = np.abs(tiled - whole)
    psnr = 10 * np.log10(1 / max(float(np.mean((tiled - whole) ** 2)), 1e-12))
    print(json.dumps({"bundle": str(args.bundle), "size": args.size, "whole": runs["off"], "tiled": runs["on"],
                      "mean_abs_error": float(error.mean()), "max_abs_error": float(error.max()),
                      "psnr_db": psnr, "instruction_set": instruction_set()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
