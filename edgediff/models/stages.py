"""The first training stages, VAE and teacher (text encoder + U-Net), and the loop every stage runs in; the
student's distillation is in distill.py.

Each stage is a loop of `steps` optimizer steps that checkpoints every few minutes (checkpoints.py) and
resumes from its checkpoint; `train.py` strings them together and owns the run folder.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import architecture as arch
from . import checkpoints, data
from .diffusion import NoiseSchedule, ema_update, lr_at

WARMUP_STEPS = 100
GRAD_CLIP = 1.0
KL_WEIGHT = 1e-5  # per latent element: keeps the latent scale in check without blurring the reconstruction
EDGE_WEIGHT = 0.5  # an L1 loss on image gradients: crisp corners are what tell squares from circles
TEACHER_EMA = 0.999
SCENE_WEIGHT = 0.5  # the auxiliary scene loss (a sum of 5 cross-entropies) against the v loss (~0.2 at the start)


class ThreadTuner:
    """Picks 1 or 2 torch threads by timing both, again and again, while training.

    On this shared 2-core machine a step with 2 threads ran 0.8 s when it had the machine and 7-12 s while
    another engineer's 2-thread benchmark ran (every op's thread barrier waits for a descheduled thread); one
    thread ran 2 s in both cases, and ~1.1 s alone. So every PERIOD steps a few steps run at the other count,
    and the faster count is kept. (Float sums may round differently with another thread count, so a resumed
    run is exact only up to such rounding.)"""

    PERIOD = 150
    PROBE = 3

    def __init__(self, max_threads: int, log: Callable[[str], None]):
        self.max_threads = max_threads
        self.current = max_threads
        self.recent: list[float] = []
        self.probe: list[float] = []
        self.since = 0
        self.log = log
        torch.set_num_threads(self.current)

    def record(self, seconds: float) -> None:
        if self.max_threads < 2:
            return
        if torch.get_num_threads() != self.current:  # probing the other count
            self.probe.append(seconds)
            usual = float(np.median(self.recent)) if self.recent else seconds
            if len(self.probe) >= self.PROBE or seconds > 3 * usual:  # a hopeless probe stops early
                trial = float(np.median(self.probe))
                if trial < usual:
                    self.log(
                        f"threads {self.current} -> {torch.get_num_threads()} ({trial:.2f} s a step, was {usual:.2f})"
                    )
                    self.current, self.recent = torch.get_num_threads(), [trial]
                torch.set_num_threads(self.current)
                self.probe, self.since = [], 0
            return
        self.recent = (self.recent + [seconds])[-20:]
        self.since += 1
        if self.since >= self.PERIOD:
            torch.set_num_threads(3 - self.current)  # the other of 1 and 2
            self.probe = []


@dataclass
class Loop:
    """What a stage's loop needs: its checkpoint, what goes in it, and one training step."""

    name: str
    steps: int
    state_path: Path
    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    step: Callable[[int], float]  # runs optimizer step i, returns the loss
    checkpoint_seconds: float
    max_threads: int = 2

    def run(self, resume: bool) -> None:
        start = 0
        if self.state_path.is_file():
            if not resume:
                raise SystemExit(
                    f"{self.state_path} holds an interrupted {self.name} stage; pass --resume to continue it"
                )
            start = checkpoints.load(self.state_path, self.modules, self.optimizers)["step"]
            print(f"[{self.name}] resuming at step {start}/{self.steps}", flush=True)
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc=self.name,
                   mininterval=1 if tty else 60, file=sys.stderr, dynamic_ncols=tty)
        began, saved, smooth = time.time(), time.time(), None
        tuner = ThreadTuner(self.max_threads, lambda message: bar.write(f"[{self.name}] {message}"))
        for i in bar:
            step_began = time.perf_counter()
            loss = self.step(i)
            tuner.record(time.perf_counter() - step_began)
            smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
            bar.set_postfix(loss=f"{smooth:.4g}", refresh=False)
            if time.time() - saved > self.checkpoint_seconds and i + 1 < self.steps:
                checkpoints.save(self.state_path, i + 1, self.modules, self.optimizers)
                saved = time.time()
        bar.close()
        done = self.steps - start
        print(f"[{self.name}] {done} steps in {time.time() - began:.0f} s, final loss {smooth}", flush=True)


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------
# VAE


def vae_loop(cfg: arch.ModelConfig, ds: data.Dataset, seed: int, steps: int, batch: int, lr: float,
             state_path: Path, checkpoint_seconds: float):
    torch.manual_seed(seed)
    vae = arch.build_vae(cfg.vae).train()
    optimizer = _optimizer(vae.parameters(), lr, 0.0)

    def step(i: int) -> float:
        _set_lr(optimizer, lr_at(i, steps, lr, WARMUP_STEPS))
        index = data.batch_rng(seed, "vae", i).integers(0, len(ds), batch)
        x = _pixels(ds.images[index])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(torch.Generator().manual_seed(data.torch_seed(seed, "vae", i)))).sample
        error = y - x
        edges = (error[..., 1:, :] - error[..., :-1, :]).abs().mean() + (error[..., 1:] - error[..., :-1]).abs().mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = error.abs().mean() + error.pow(2).mean() + EDGE_WEIGHT * edges + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP)
        optimizer.step()
        return loss.item()

    return vae, Loop("vae", steps, state_path, {"vae": vae}, {"vae": optimizer}, step, checkpoint_seconds)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, float, float]:
    """Posterior means of every image, normalised to unit variance: (latents, shift, scale).

    The scale and shift go into the VAE's config (`scaling_factor`, `shift_factor`), which the exporter copies
    into the manifest, so the runtime decodes with exactly the normalisation the U-Net was trained on."""
    vae.eval()
    means = [vae.encode(_pixels(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    latents = torch.cat(means)
    shift = float(latents.mean())
    scale = float(1.0 / (latents - shift).std())
    return ((latents - shift) * scale).numpy().astype(np.float32), shift, scale


@torch.no_grad()
def reconstruction_check(vae, seed: int, n: int = 300) -> dict[str, float]:
    """The detector's verdicts on VAE reconstructions of fresh images: the ceiling for the whole model."""
    from .detector import check
    from .shapes import make_dataset

    images, _, scenes = make_dataset(
        n, seed + 999_331, size=arch.IMAGE_SIZE, two_object_fraction=data.TWO_OBJECT_FRACTION
    )
    vae.eval()
    decoded = vae.decode(vae.encode(_pixels(images)).latent_dist.mean).sample
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    verdicts = [check(image, scene) for image, scene in zip(pixels, scenes)]
    error = float((decoded - _pixels(images)).abs().mean()) * 127.5
    return {"all_correct": float(np.mean([v.all_ok for v in verdicts])), "mean_abs_error_255": error}


# ---------------------------------------------------------------------------------------------------------
# Teacher


def teacher_loop(cfg: arch.ModelConfig, ds: data.Dataset, latents: np.ndarray, seed: int, steps: int, batch: int,
                 lr: float, state_path: Path, checkpoint_seconds: float):
    """v-prediction, plain v loss; the text encoder learns along (there is no pretrained one), helped by an
    auxiliary loss: a linear head (used in training only) must read the canonical scene off the eos state.

    Without it the pair's order was a coin flip: after 2,800 steps colours and shapes were 95-99% right and the
    relation's axis 99%, but which object went left or up only 45-53%, and a linear probe found no order in
    the text encoder's eos state (52%, chance 50%) - the diffusion loss alone taught the encoder "vertical"
    but not "red on top". Min-SNR weighting was also dropped: it gives the high-noise steps, where the layout
    is decided, almost no weight (x0 loss weight ~snr there); in a 300-step trial from the same weights, plain
    v moved the relation from 45% to 52% where min-SNR stayed at 45%."""
    torch.manual_seed(seed + 1)
    text_encoder = arch.build_text_encoder(cfg.text).train()
    unet = arch.build_unet(cfg.unet, cfg.text.hidden_size, student=False).train()
    scene_head = torch.nn.Linear(cfg.text.hidden_size, sum(data.LABEL_CLASSES))
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    for p in [*ema_text.parameters(), *ema_unet.parameters()]:
        p.requires_grad_(False)
    params = [*text_encoder.parameters(), *unet.parameters(), *scene_head.parameters()]
    optimizer = _optimizer(params, lr, 0.01)
    schedule = NoiseSchedule()
    latents_t = torch.from_numpy(latents)
    labels_t = torch.from_numpy(ds.labels)
    eos = arch.token_ids()[arch.EOS]

    def step(i: int) -> float:
        _set_lr(optimizer, lr_at(i, steps, lr, WARMUP_STEPS))
        index, ids = data.sample_batch(ds, seed, "teacher", i, batch)
        x0 = latents_t[index]
        g = torch.Generator().manual_seed(data.torch_seed(seed, "teacher", i))
        t = torch.randint(0, schedule.steps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        encoded = text_encoder(input_ids=torch.from_numpy(ids))
        v = unet(schedule.add_noise(x0, noise, t), t, encoded.last_hidden_state).sample
        loss = (v - schedule.v_target(x0, noise, t)).pow(2).mean()
        prompted = torch.from_numpy(ids[:, 1] != eos)  # the null prompt says nothing about the scene
        logits = scene_head(encoded.pooler_output[prompted]).split(data.LABEL_CLASSES, dim=1)
        wanted = labels_t[index][prompted]
        scene = sum(F.cross_entropy(part, wanted[:, k]) for k, part in enumerate(logits))
        loss = loss + SCENE_WEIGHT * scene
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        decay = min(TEACHER_EMA, (1 + i) / (10 + i))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        return loss.item()

    modules = {"text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema_text, "ema_unet": ema_unet,
               "scene_head": scene_head}
    loop = Loop("teacher", steps, state_path, modules, {"teacher": optimizer}, step, checkpoint_seconds)
    return (ema_text, ema_unet), loop
