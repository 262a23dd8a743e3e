"""int8 calibration data: what the U-Net and the VAE decoder are fed along real denoising trajectories.

The fp32 bundle just exported renders a small prompt set through edgediff's own Pipeline and samplers (the bundle's
default sampler, schedule and guidance), and every feed of the components to quantize is recorded. Activation
ranges then come from the inputs these graphs meet in use (scaled latents at each sigma of the schedule, real text
embeddings, CFG batches) rather than from random tensors, whose ranges are nothing like them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import CalibrationRecord
from ..runtime.sessions import Session, SessionBase, SessionSettings

# (what is being done, steps done, steps in all): the export's long phases report through it (the CLI's bars)
Phase = Callable[[str, int, int], None]

PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolour painting of a lighthouse on a cliff at sunset",
    "portrait of an old fisherman, dramatic lighting, detailed skin",
    "a bowl of ramen on a wooden table, studio photo",
    "isometric pixel art of a tiny city with trees",
    "a red sports car in the rain, neon reflections",
    "macro photo of a dewdrop on a green leaf",
    "an oil painting of a stormy sea with a small boat",
)


@dataclass(frozen=True)
class Calibration:
    """What the calibration renders run. The last `held_out` prompts only feed the parity gate, never the ranges."""

    prompts: tuple[str, ...] = PROMPTS
    steps: int | None = None  # default: the bundle's default steps, clamped to 2..8 (several sigmas, bounded cost)
    size: int | None = None  # square side in pixels; default: the bundle's default size
    held_out: int = 1

    def __post_init__(self):
        if len(self.prompts) <= self.held_out or self.held_out < 1:
            raise ValueError(f"calibration needs more prompts ({len(self.prompts)}) than held out ({self.held_out})")


class _Recorder(SessionBase):
    """A session that keeps a copy of every feed (the denoiser reuses its input buffer between steps)."""

    def __init__(self, session: Session, store: list):
        super().__init__(getattr(session, "name", "recorded"), session.inputs, session.outputs)
        self._session = session
        self._store = store

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._store[-1].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self._session(**feeds)

    def close(self) -> None:
        self._session.close()


def record_trajectories(
    bundle: Path, components: tuple[str, ...], settings: Calibration, phase: Phase | None = None
) -> dict[str, tuple[list[dict], list[dict]]]:
    """Render the prompt set with the bundle at `bundle`; per component, (calibration feeds, held-out gate feeds).
    `phase("calibration renders", done, total)` after each prompt."""
    from ..runtime.backends import open_session
    from ..runtime.pipeline import Pipeline

    records: dict[str, list[list[dict]]] = {name: [] for name in components}
    lean = SessionSettings(lean=True)

    def recording(name: str, component) -> Session:
        session = open_session(bundle, name, component, "cpu", lean)
        return _Recorder(session, records[name]) if name in records else session

    # memory="low": one session at a time, so that calibrating costs no more memory than the largest component
    # (8.9 GB -> about 5 GB for SD-Turbo's fp32 bundle; the reloads cost ~2 s a prompt)
    pipe = Pipeline.load(bundle, memory="low", session_factory=recording)
    d = pipe.manifest.defaults
    steps = settings.steps or min(max(d.steps, 2), 8)
    side = settings.size or max(d.height, d.width)
    for i, prompt in enumerate(settings.prompts):
        for store in records.values():
            store.append([])  # one list per prompt, so prompts (not steps) are held out
        pipe(prompt, num_inference_steps=steps, height=side, width=side, seed=i, output_type="np")
        if phase:
            phase("calibration renders", i + 1, len(settings.prompts))
    del pipe
    split = len(settings.prompts) - settings.held_out
    return {
        name: ([f for p in per_prompt[:split] for f in p], [f for p in per_prompt[split:] for f in p])
        for name, per_prompt in records.items()
    }


def describe(settings: Calibration, records: dict[str, tuple[list, list]]) -> CalibrationRecord:
    """What the manifest's provenance records about the calibration."""
    return CalibrationRecord(
        prompts=tuple(settings.prompts),
        held_out=settings.held_out,
        steps=settings.steps,
        size=settings.size,
        samples={name: {"calibration": len(c), "gate": len(g)} for name, (c, g) in records.items()},
    )
