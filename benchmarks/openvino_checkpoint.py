"""The checkpoint as optimum-intel's exporter can read it; prints the folder to export from.

Recent transformers releases save CLIP text encoders without the "text_model." prefix on their weights; the older
transformers that optimum-intel pins (5.5) then finds none of them and initialises the encoder at random, without
failing ("MISSING" in its load report), so OpenVINO's images would come from another text encoder than edgediff's.
For such a checkpoint this makes VIEW: links to every part of CHECKPOINT, and text encoders whose weights carry the
prefix again. Otherwise it prints CHECKPOINT itself.

    benchmarks/.venv-openvino/bin/python benchmarks/openvino_checkpoint.py CHECKPOINT VIEW
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

PREFIX = "text_model."


def needs_prefix(folder: Path) -> bool:
    config, weights = folder / "config.json", folder / "model.safetensors"
    if not (config.is_file() and weights.is_file()):
        return False
    if not any(a.startswith("CLIPTextModel") for a in json.loads(config.read_text()).get("architectures") or []):
        return False
    from safetensors import safe_open

    with safe_open(str(weights), "np") as f:
        return not any(k.startswith(PREFIX) for k in f.keys())


def prefixed(src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "model.safetensors":
            (dst / item.name).symlink_to(item.resolve())
    weights = load_file(str(src / "model.safetensors"))
    # the projection of SDXL's second encoder sits outside text_model in both layouts
    save_file({k if k.startswith("text_projection") else PREFIX + k: v for k, v in weights.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})


def main(checkpoint: Path, view: Path) -> int:
    fix = [p for p in sorted(checkpoint.iterdir()) if p.is_dir() and needs_prefix(p)]
    if not fix:
        print(checkpoint)
        return 0
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item in fix:
            prefixed(item, view / item.name)
        else:
            (view / item.name).symlink_to(item.resolve())
    print(view)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
