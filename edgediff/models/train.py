"""Train the built-in model from a seed, on the CPU: `python -m edgediff.models.train --out DIR`.

Stages, each resumable (`--resume`) from the checkpoint it writes every few minutes into DIR:
  data     render the coloured-shapes dataset once into DIR/data (cached arrays)
  vae      the KL autoencoder (32x32 RGB <-> 8x8x4), then every image encoded once into DIR/latents.npy
  teacher  text encoder + U-Net (v-prediction, classifier-free guidance dropout), kept as EMA weights
  distill  the LCM student with a guidance embedding, distilled on the teacher's guided trajectories (distill.py)
  export   a diffusers pipeline folder (DIR/pipeline) -> the edgediff bundle (DIR/bundle, or --bundle-out)
`--stage all` runs whatever is not done yet, in order. A finished stage leaves a folder (DIR/vae, DIR/teacher,
DIR/student) and is skipped afterwards; delete the folder to redo it. The run's settings are kept in
DIR/config.json; a later call may leave them out but not contradict them (settings the run predates are added).
A run folder from an older recipe (settings this code no longer has) is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgediff.atomic import atomic_file, atomic_folder
from edgediff.export import PRECISIONS

# Set before torch loads its OpenMP runtime: on a shared 2-core machine, spinning worker threads that wait for
# a descheduled sibling made a training step up to 10x slower; sleeping waits cost ~20% when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STAGES = ("vae", "teacher", "distill", "export")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the trained weights (the run folder is tied to it)."""

    preset: str = "full"
    seed: int = 0
    n_images: int = 100_000
    vae_steps: int = 1200
    vae_batch: int = 64
    vae_lr: float = 1e-3
    teacher_steps: int = 5000
    teacher_batch: int = 128
    teacher_lr: float = 5e-4
    distill_steps: int = 1500
    distill_batch: int = 96
    distill_lr: float = 2e-4
    distill_trajectories: int = 6144  # the teacher's solutions the student learns from (~6 min to solve)
    # LCM's w (guidance scale - 1) of those solutions, around the shipped default (guidance 4); for the earlier,
    # bootstrapped distillation, narrowing w from [1, 9] to this range was worth 8-9 points on two-object prompts
    distill_w_min: float = 1.5
    distill_w_max: float = 3.5


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgediff.models.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the run folder (checkpoints, stage outputs, bundle)")
    p.add_argument("--stage", default="all", choices=("all", "data", *STAGES, "export-teacher"))
    p.add_argument("--resume", action="store_true", help="continue a stage interrupted in DIR")
    p.add_argument("--bundle-out", type=Path, help="where export writes the bundle (default DIR/bundle)")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                   help="export: the bundle's precision (int8 default folder: DIR/bundle-int8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (at most 2 here)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    for f in fields(RunConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    return p.parse_args(argv)


def _config(args: argparse.Namespace) -> RunConfig:
    """The run's config: DIR/config.json where it exists, else the defaults; explicit flags must agree."""
    path = args.out / "config.json"
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored and set(stored) - {f.name for f in fields(RunConfig)}:
        unknown = sorted(set(stored) - {f.name for f in fields(RunConfig)})
        raise SystemExit(f"{args.out} was made by an older recipe (settings {unknown} are gone); use a new --out")
    config = RunConfig(**stored) if stored else RunConfig()
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name) is not None}
    if stored:
        clash = {k: (stored[k], v) for k, v in given.items() if k in stored and stored[k] != v}
        if clash:
            raise SystemExit(f"{args.out} was started with other settings {clash} (stored, given); use a new --out")
        added = {k: v for k, v in given.items() if k not in stored}  # settings newer than the run (a later stage's)
        if added:
            config = RunConfig(**{**asdict(config), **added})
            path.write_text(json.dumps(asdict(config), indent=2) + "\n")
    else:
        config = RunConfig(**{**asdict(config), **given})
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(config), indent=2) + "\n")
    return config


def _with_guidance(bundle: Path, manifest, guidance: float):
    """The exporter's lcm default is LCM-Dreamshaper's guidance 8; this model renders best at its own (the
    manifest's defaults are not part of any checksum, so this is a plain rewrite of manifest.json)."""
    import dataclasses

    from edgediff.bundle import write_manifest

    manifest = dataclasses.replace(manifest, defaults=dataclasses.replace(manifest.defaults, guidance_scale=guidance))
    write_manifest(bundle, manifest)
    return manifest


class Run:
    def __init__(self, args: argparse.Namespace):
        from . import architecture as arch

        self.args = args
        self.out: Path = args.out
        self.config = _config(args)
        self.model = arch.PRESETS[self.config.preset]
        self.checkpoint_seconds = args.checkpoint_minutes * 60
        self._data = None

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    @property
    def data(self):
        if self._data is None:
            from . import data

            began = time.time()
            self._data = data.load_or_make(self.out / "data", self.config.n_images, self.config.seed)
            self.log(f"dataset: {len(self._data)} images ({time.time() - began:.0f} s)")
        return self._data

    def _run(self, loop) -> None:
        loop.max_threads = max(1, min(2, self.args.threads))
        loop.run(self.args.resume)

    def latents(self):
        import numpy as np

        return np.load(self.out / "latents.npy")

    def stage_vae(self) -> None:
        import numpy as np

        from .stages import encode_latents, reconstruction_check, vae_loop

        c = self.config
        if not (self.out / "vae").is_dir():
            vae, loop = vae_loop(self.model, self.data, c.seed, c.vae_steps, c.vae_batch, c.vae_lr,
                                 self.out / "state-vae.safetensors", self.checkpoint_seconds)
            self._run(loop)
            with atomic_folder(self.out / "vae", replace=True) as tmp:  # a stage is either done or not
                vae.save_pretrained(tmp, safe_serialization=True)
            (self.out / "state-vae.safetensors").unlink(missing_ok=True)
        if not (self.out / "latents.npy").is_file():
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(self.out / "vae")
            latents, shift, scale = encode_latents(vae, self.data.images)
            vae.register_to_config(scaling_factor=scale, shift_factor=shift)
            with atomic_folder(self.out / "vae", replace=True) as tmp:
                vae.save_pretrained(tmp, safe_serialization=True)
            with atomic_file(self.out / "latents.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, latents)
            self.log(f"latents {latents.shape}: shift {shift:.4f}, scale {scale:.4f}")
            self.log(f"reconstructions, as the detector sees them: {reconstruction_check(vae, self.config.seed)}")

    def stage_teacher(self) -> None:
        from .stages import teacher_loop

        c = self.config
        if (self.out / "teacher").is_dir():
            return
        (text_encoder, unet), loop = teacher_loop(self.model, self.data, self.latents(), c.seed, c.teacher_steps,
                                                  c.teacher_batch, c.teacher_lr, self.out / "state-teacher.safetensors",
                                                  self.checkpoint_seconds)
        self._run(loop)
        with atomic_folder(self.out / "teacher", replace=True) as tmp:
            text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (self.out / "state-teacher.safetensors").unlink(missing_ok=True)

    def _teacher(self):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = self.out / "teacher"
        return CLIPTextModel.from_pretrained(folder / "text_encoder"), UNet2DConditionModel.from_pretrained(
            folder / "unet"
        )

    def stage_distill(self) -> None:
        from . import architecture as arch
        from .distill import distill_loop, make_pool

        c = self.config
        if (self.out / "student").is_dir():
            return
        text_encoder, teacher = self._teacher()
        pool_path = self.out / "trajectories.npz"
        began = time.time()

        def progress(done: int, total: int) -> None:
            if done == total or done % 1024 == 0:
                self.log(f"teacher trajectories: {done}/{total}")

        pool = make_pool(pool_path, text_encoder, teacher, self.data, c.seed, c.distill_trajectories,
                         (c.distill_w_min, c.distill_w_max), progress=progress)
        self.log(f"{c.distill_trajectories} teacher trajectories in {time.time() - began:.0f} s")
        student = arch.student_from_teacher(teacher, self.model.unet)
        student, loop = distill_loop(self.model, pool, text_encoder, student, c.seed, c.distill_steps,
                                     c.distill_batch, c.distill_lr, self.out / "state-distill.safetensors",
                                     self.checkpoint_seconds)
        self._run(loop)
        with atomic_folder(self.out / "student", replace=True) as tmp:
            student.save_pretrained(tmp / "unet", safe_serialization=True)
        (self.out / "state-distill.safetensors").unlink(missing_ok=True)
        pool_path.unlink(missing_ok=True)

    def stage_export(self, teacher: bool = False) -> Path:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from edgediff.export.calibrate import Calibration
        from edgediff.export.convert import export_bundle

        from . import architecture as arch
        from .evaluate import prompts

        text_encoder, unet = self._teacher()
        if not teacher:
            unet = UNet2DConditionModel.from_pretrained(self.out / "student" / "unet")
        pipeline = self.out / ("pipeline-teacher" if teacher else "pipeline")
        with atomic_folder(pipeline, replace=True) as tmp:
            arch.save_pipeline(tmp, text_encoder, unet, AutoencoderKL.from_pretrained(self.out / "vae"),
                               teacher=teacher)
        precision = self.args.precision
        default = self.out / (
            "bundle-teacher" if teacher else "bundle" if precision == "fp32" else f"bundle-{precision}"
        )
        bundle = default if teacher else (self.args.bundle_out or default)
        # int8 ranges come from renders of the model's own grammar, not the exporter's photographic prompts.
        calibration = Calibration(prompts=tuple(prompts("one", 4, 7) + prompts("two", 8, 7)), held_out=2)
        # the guidance rewrite happens before the bundle appears: readers never see the exporter's default
        with atomic_folder(bundle, replace=True) as staging:
            manifest = export_bundle(
                pipeline, staging, preset="standard" if teacher else "lcm", force=True, precision=precision,
                calibration=calibration if precision == "int8" else None, description=arch.DESCRIPTION,
                progress=lambda what, done, total: self.log(f"export: {what} proven ({done}/{total})"),
            )
            if not teacher and arch.DEFAULT_GUIDANCE is not None:
                manifest = _with_guidance(staging, manifest, arch.DEFAULT_GUIDANCE)
        self.log(f"bundle written to {bundle} ({manifest.preset}, defaults {manifest.defaults})")
        return bundle


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    torch.set_num_threads(max(1, min(2, args.threads)))
    run = Run(args)
    run.log(f"run {args.out}: {run.config}")
    wanted = {"all": STAGES, "export-teacher": ()}.get(args.stage, (args.stage,))
    began = time.time()
    if args.stage == "data":
        run.data  # noqa: B018 (renders and caches it)
    for stage in STAGES:
        if stage in wanted:
            started = time.time()
            getattr(run, f"stage_{stage}")()
            run.log(f"stage {stage} done in {time.time() - started:.0f} s")
    if args.stage == "export-teacher":
        run.stage_export(teacher=True)
    run.log(f"finished in {time.time() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
