"""LCM distillation of the teacher into the student, on the teacher's whole trajectories: the student regresses
each point of a guided DDIM trajectory onto that trajectory's end.

The consistency function is the map from any point of the probability-flow ODE to the ODE's origin (Song et al.
2023, "Consistency Models", Sec. 3). LCM (Luo et al. 2023, Algorithm 1; diffusers' train_lcm_distill_sd) learns
it by bootstrapping: the target is an EMA of the student one DDIM segment later, because a full solve per
training sample is too costly for Stable Diffusion. For this model a 20-segment solve of a batch costs about as
much as the training step it feeds, so the targets can be exact. That was the fix for binding: with bootstrapped
targets the student rendered 68-78 % of two-object prompts right at 4 steps against the teacher's 99.5 %, and
more sampling steps made it worse (errors compound at low noise); on exact targets it renders ~98 %
(docs/builtin-model.md).

A pool of trajectories is solved once per stage (prompts from the dataset's captions, w drawn per trajectory and
given to the student as LCM's guidance embedding), kept in the run folder so that a resumed stage reuses it, and
every training step draws (trajectory, segment) pairs from it. The teacher's solutions are the data: no images.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_file
from . import architecture as arch
from . import data
from .diffusion import DdimSolver, NoiseSchedule, consistency_boundary, ema_update, guidance_embedding, lr_at
from .stages import Loop, _optimizer, _set_lr

CHUNK = 128  # trajectories solved per teacher batch
HUBER_C = 1e-3  # the pseudo-Huber constant of diffusers' LCM distillation
WARMUP_STEPS = 50
GRAD_CLIP = 1.0
EMA = 0.995  # the student kept is an EMA of the one trained


@torch.no_grad()
def solve(text_encoder, teacher, ids: np.ndarray, noise: torch.Tensor, w: torch.Tensor,
          solver: DdimSolver, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's guided DDIM trajectories from pure noise: (states [b, segments, ...] at each segment's start
    timestep, in solver.timesteps order, and the ends [b, ...], the guided x0 of the last segment)."""
    hidden = text_encoder(input_ids=torch.from_numpy(ids)).last_hidden_state
    uncond = text_encoder(input_ids=torch.from_numpy(data.null_tokens()[None])).last_hidden_state.expand_as(hidden)
    scale = w.view(-1, 1, 1, 1)
    x = noise
    states: list[Any] = [None] * solver.segments  # every slot is filled below
    for n in reversed(range(solver.segments)):
        states[n] = x
        index = torch.full((len(x),), n)
        t = solver.timesteps[index]
        v_cond, v_uncond = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([hidden, uncond])).sample.chunk(2)
        x0_c, eps_c = schedule.from_v(x, v_cond, t)
        x0_u, eps_u = schedule.from_v(x, v_uncond, t)
        x0, eps = x0_c + scale * (x0_c - x0_u), eps_c + scale * (eps_c - eps_u)
        x = solver.step(x0, eps, index)
    return torch.stack(states, dim=1), x0


def make_pool(path: Path, text_encoder, teacher, ds: data.Dataset, seed: int, n: int,
              guidance_range: tuple[float, float], progress=None) -> dict[str, np.ndarray]:
    """Solve n trajectories (or load them from `path`, written by an earlier call with the same settings and
    teacher: a resumed stage)."""
    w_min, w_max = guidance_range
    with torch.no_grad():
        fingerprint = float(sum(p.double().abs().sum() for p in [*teacher.parameters(), *text_encoder.parameters()]))
    settings = np.asarray([seed, n, w_min, w_max, fingerprint], np.float64)
    if path.is_file():
        with np.load(path) as stored:
            if np.array_equal(stored["settings"], settings):
                return {k: stored[k] for k in ("ids", "w", "states", "ends")}
    schedule = NoiseSchedule()
    solver = DdimSolver(schedule)
    text_encoder.eval().requires_grad_(False)
    teacher.eval().requires_grad_(False)
    parts: dict[str, list] = {"ids": [], "w": [], "states": [], "ends": []}
    for chunk in range(0, n, CHUNK):
        b = min(CHUNK, n - chunk)
        _, ids = data.sample_batch(ds, seed, "trajectory", chunk, b, null_p=0.0)
        g = torch.Generator().manual_seed(data.torch_seed(seed, "trajectory", chunk))
        size = teacher.config.sample_size
        noise = torch.randn((b, teacher.config.in_channels, size, size), generator=g)
        w = w_min + (w_max - w_min) * torch.rand(b, generator=g)
        states, ends = solve(text_encoder, teacher, ids, noise, w, solver, schedule)
        for key, value in (("ids", ids), ("w", w.numpy()), ("states", states.numpy()), ("ends", ends.numpy())):
            parts[key].append(value)
        if progress:
            progress(chunk + b, n)
    pool = {k: np.concatenate(v) for k, v in parts.items()}
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, settings=settings, **pool)  # type: ignore[arg-type]  # numpy's stub: **pool could be allow_pickle
    return pool


def distill_loop(cfg: arch.ModelConfig, pool: dict[str, np.ndarray], text_encoder, student, seed: int,
                 steps: int, batch: int, lr: float, state_path: Path, checkpoint_seconds: float):
    """Train `student` (arch.student_from_teacher's) so that its consistency output at every pool state equals
    that trajectory's end; returns the EMA student and the loop."""
    torch.manual_seed(seed + 3)
    text_encoder.eval().requires_grad_(False)
    student.train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = _optimizer(student.parameters(), lr, 0.0)
    schedule = NoiseSchedule()
    solver = DdimSolver(schedule)
    states, ends = torch.from_numpy(pool["states"]), torch.from_numpy(pool["ends"])
    w_all, ids_all = torch.from_numpy(pool["w"]), pool["ids"]
    dim = cfg.unet.guidance_embedding_dim

    def step(i: int) -> float:
        _set_lr(optimizer, lr_at(i, steps, lr, WARMUP_STEPS))
        rng = data.batch_rng(seed, "trajectory-train", i)
        which = rng.integers(0, len(ends), batch)
        segment = torch.from_numpy(rng.integers(0, solver.segments, batch))
        t = solver.timesteps[segment]
        x_t = states[torch.from_numpy(which), segment]
        with torch.no_grad():
            hidden = text_encoder(input_ids=torch.from_numpy(ids_all[which])).last_hidden_state
        w_emb = guidance_embedding(w_all[which], dim)
        x0, _ = schedule.from_v(x_t, student(x_t, t, hidden, timestep_cond=w_emb).sample, t)
        c_skip, c_out = consistency_boundary(t)
        predicted = c_skip * x_t + c_out * x0
        loss = (torch.sqrt((predicted - ends[which]).pow(2) + HUBER_C**2) - HUBER_C).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
        optimizer.step()
        ema_update(ema, student, EMA)
        return loss.item()

    loop = Loop("distill", steps, state_path, {"student": student, "ema": ema}, {"student": optimizer}, step,
                checkpoint_seconds)
    return ema, loop
