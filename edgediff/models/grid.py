"""A grid of the built-in model's renders for the README: `python -m edgediff.models.grid -o docs/builtin.png`.

One row per prompt (labelled), one column per seed, each image rendered at the bundle's defaults and enlarged
so that 32-pixel renders can be seen. Runtime only: no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PROMPTS = (
    "a red circle above a blue square",
    "a green triangle",
    "a yellow square to the left of a purple circle",
    "a cyan circle below a red triangle",
    "an image of a blue triangle",
    "a purple square, a green circle on its right",
)
LABEL_WIDTH = 270
PAD = 4


def grid(pipeline, prompts=PROMPTS, seeds=(0, 1, 2, 3), scale: int = 4, steps: int | None = None) -> Image.Image:
    side = pipeline.manifest.defaults.width * scale
    cell = side + PAD
    canvas = Image.new("RGB", (LABEL_WIDTH + cell * len(seeds) + PAD, cell * len(prompts) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, prompt in enumerate(prompts):
        y = PAD + row * cell
        draw.text((PAD, y + side // 2 - 6), prompt, fill="black", font=font)
        for col, seed in enumerate(seeds):
            image = pipeline(prompt, seed=seed, num_inference_steps=steps, output_type="np").images[0]
            tile = Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
            canvas.paste(tile.resize((side, side), Image.Resampling.NEAREST), (LABEL_WIDTH + col * cell, y))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgediff.models.grid", description=__doc__.split("\n")[0])
    p.add_argument("bundle", nargs="?", type=Path, help="default: the built-in model")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--steps", type=int, help="default: the bundle's")
    args = p.parse_args(argv)

    from edgediff.bundle import BundleError
    from edgediff.runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline.load(args.bundle)  # None: the built-in model
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = tuple(int(s) for s in args.seeds.split(","))
    image = grid(pipeline, seeds=seeds, steps=args.steps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
