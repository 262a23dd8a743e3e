"""Prompt adherence of a bundle on the coloured-shapes grammar: `python -m edgediff.models.evaluate BUNDLE`.

Renders n random one-object and n random two-object grammar prompts with fixed seeds, runs the deterministic
detector on every image, and reports, per step count, how often the colours, the shapes, the relation and
everything at once came out right. Prompts come from `--seed`; image i of a kind is rendered with seed
`--seed + i` (or, with `--batch B`, batch j with seed `--seed + j`), so a figure is reproducible from the
command alone.

Runtime only (NumPy + ONNX Runtime): no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detector import check
from .shapes import caption_for, parse_caption, sample_scene

KINDS = {"one": 0.0, "two": 1.0}  # kind -> two_object_fraction of the prompts drawn
PROMPT_SEED_OFFSET = 1_000_003  # prompts and render noise come from unrelated streams of the one --seed


@dataclass(frozen=True)
class Score:
    steps: int
    kind: str
    n: int
    colours: float
    shapes: float
    relation: float
    all_correct: float
    seconds_per_image: float


def prompts(kind: str, n: int, seed: int) -> list[str]:
    """n grammar prompts of one kind ("one" or "two" objects), the same for the same seed."""
    rng = np.random.default_rng([seed + PROMPT_SEED_OFFSET, len(kind)])
    return [caption_for(scene, rng) for scene in (sample_scene(rng, KINDS[kind]) for _ in range(n))]


def evaluate(pipeline, kind: str, n: int, steps: int, *, seed: int = 0, batch: int = 1, sampler: str | None = None,
             guidance: float | None = None, failures: Path | None = None, max_failures: int = 16) -> Score:
    texts = prompts(kind, n, seed)
    verdicts = []
    began = time.perf_counter()
    for j, start in enumerate(range(0, n, batch)):
        chunk = texts[start:start + batch]
        out = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                       seed=seed + (start if batch == 1 else j), output_type="np")
        for text, image in zip(chunk, out.images):
            verdict = check(image, parse_caption(text))
            verdicts.append(verdict)
            if failures is not None and not verdict.all_ok and max_failures > 0:
                max_failures -= 1
                _save(image, failures / f"{kind}-{steps}steps-{len(verdicts) - 1:04d}.png", text)
    elapsed = time.perf_counter() - began
    rate = lambda key: float(np.mean([getattr(v, key) for v in verdicts]))  # noqa: E731
    return Score(steps, kind, n, rate("colours_ok"), rate("shapes_ok"), rate("relation_ok"), rate("all_ok"),
                 elapsed / n)


def _save(image: np.ndarray, path: Path, text: str) -> None:
    from PIL import Image, PngImagePlugin

    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", text)
    Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)).resize(
        (128, 128), Image.Resampling.NEAREST
    ).save(path, pnginfo=info)


def table(scores: list[Score]) -> str:
    lines = ["| steps | objects | n | colours | shapes | relation | all correct | s / image |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in scores:
        relation = "-" if s.kind == "one" else f"{s.relation:.1%}"
        lines.append(f"| {s.steps} | {s.kind} | {s.n} | {s.colours:.1%} | {s.shapes:.1%} | {relation} | "
                     f"**{s.all_correct:.1%}** | {s.seconds_per_image:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgediff.models.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("bundle", nargs="?", type=Path, help="bundle folder (default: the built-in model)")
    p.add_argument("--n", type=int, default=500, help="prompts per kind (one object, two objects)")
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="one,two")
    p.add_argument("--batch", type=int, default=1, help="prompts per render call (changes the noise per image)")
    p.add_argument("--sampler", help="default: the bundle's")
    p.add_argument("--guidance", type=float, help="default: the bundle's")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", type=Path, help="also write the scores here")
    p.add_argument("--failures", type=Path, help="save up to 16 failing images per row here, for a look")
    args = p.parse_args(argv)

    from edgediff.bundle import BundleError
    from edgediff.runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline.load(args.bundle, threads=args.threads)  # None: the built-in model
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bundle = pipeline.root
    m = pipeline.manifest
    precision = {name: c.precision for name, c in m.components.items()}
    sampler = args.sampler or m.defaults.sampler
    guidance = m.defaults.guidance_scale if args.guidance is None else args.guidance
    print(f"{bundle}: {m.preset}, sampler {sampler}, guidance {guidance}, precision {precision}", flush=True)
    scores = []
    for steps in (int(s) for s in args.steps.split(",")):
        for kind in args.kinds.split(","):
            score = evaluate(pipeline, kind, args.n, steps, seed=args.seed, batch=args.batch, sampler=sampler,
                             guidance=guidance, failures=args.failures)
            scores.append(score)
            print(table([score]).splitlines()[-1], flush=True)
    print()
    print(table(scores))
    if args.json:
        report = {"bundle": str(bundle), "sampler": sampler, "guidance": guidance, "precision": precision,
                  "seed": args.seed, "batch": args.batch, "command": " ".join(sys.argv),
                  "scores": [s.__dict__ for s in scores]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
