"""Prompts -> text conditioning: for one text encoder (SD 1.x / 2.x) or two (SDXL); each encoder's outputs for
SD3 and FLUX (runtime/families/sd3.py, flux.py), which combine them their own way.

Each encoder of the manifest has its own tokenizer and a graph that already outputs the hidden state the U-Net
takes (the layer choice, clip skip included, was baked in at export). With several encoders their hidden states are
concatenated on the feature axis, and the pooled embedding comes from the encoder that the manifest says gives it,
as diffusers' StableDiffusionXLPipeline.encode_prompt does.

Runtime module: numpy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import Manifest
from .sessions import Session
from .timing import StageTimer
from .tokenizers import ClipTokenizer, open_tokenizer


@dataclass
class Embeddings:
    """Text conditioning for a batch of prompts: hidden states (B, S, D) and, for SDXL, pooled embeddings (B, P)."""

    hidden: np.ndarray
    pooled: np.ndarray | None = None

    def __getitem__(self, rows: slice) -> Embeddings:
        return Embeddings(self.hidden[rows], None if self.pooled is None else self.pooled[rows])

    def repeat(self, n: int) -> Embeddings:
        pooled = None if self.pooled is None else np.repeat(self.pooled, n, axis=0)
        return Embeddings(np.repeat(self.hidden, n, axis=0), pooled)

    def zeros_like(self) -> Embeddings:
        """SDXL's force_zeros_for_empty_prompt: no negative prompt means all-zero negative embeddings."""
        return Embeddings(np.zeros_like(self.hidden), None if self.pooled is None else np.zeros_like(self.pooled))


class PromptEncoder:
    """The manifest's tokenizers and text encoders, run in order; `session(name)` supplies each encoder's session."""

    def __init__(self, root: Path, manifest: Manifest):
        self.encoders = manifest.text_encoders
        legacy = manifest.migrated_from is not None  # a version-1 bundle: its files as 0.1 copied them
        records = {e.tokenizer: manifest.tokenizers[e.tokenizer] for e in self.encoders}
        self.tokenizers = {
            key: open_tokenizer(root / r.path, r.max_length, legacy=legacy) for key, r in records.items()
        }

    def __call__(self, texts: list[str], session: Callable[[str], Session], warnings: list[str], timer: StageTimer
                 ) -> Embeddings:
        """The U-Net families' conditioning: hidden states concatenated on features, the pooled embedding from
        the encoder that gives one."""
        outputs = self.run(texts, session, warnings, timer)
        hidden = [h for h, _ in outputs]
        pooled = [p for _, p in outputs if p is not None]
        return Embeddings(hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1),
                          pooled[-1] if pooled else None)

    def run(self, texts: list[str], session: Callable[[str], Session], warnings: list[str], timer: StageTimer
            ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Each encoder's (hidden state, pooled embedding or None), in the manifest's order. What a tokenizer cut
        off is reported once per token length (SD3 and FLUX: CLIP's 77, then T5's)."""
        outputs = []
        reported: set[int] = set()
        for encoder in self.encoders:
            t = time.perf_counter()
            tokenizer = self.tokenizers[encoder.tokenizer]
            batch = tokenizer.encode(texts)
            if tokenizer.max_length not in reported:  # every encoder sees the same text
                _warn(tokenizer, texts, batch.dropped, warnings)
                reported.add(tokenizer.max_length)
            t = timer.stage("tokenize", t)
            out = session(encoder.component)(input_ids=batch.input_ids)
            outputs.append((out[encoder.output], out[encoder.pooled_output] if encoder.pooled_output else None))
            timer.stage("text_encoder", t)
        return outputs


# words of a truncated prompt's cut-off part that its warning shows (a 10,000-word prompt would repeat them all)
SHOWN_WORDS = 8


def printable(text: str) -> str:
    """`text` with control and other invisible characters as visible escapes (a newline as \\n, ESC as \\x1b, a
    bidi override as \\u202e): prompts are echoed to terminals and written into PNG text chunks, where raw ones
    would move the cursor or forge a field. Ordinary text, accents and scripts included, comes back unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _warn(tokenizer: ClipTokenizer, texts: list[str], dropped: list[str], warnings: list[str]) -> None:
    for cut in dropped:  # one per text
        if cut:
            warnings.append(f"prompt truncated to {tokenizer.max_length} tokens; {_dropped(cut)}")
    for text in texts:
        unknown = tokenizer.unknown_words(text)
        if unknown:
            more = f" and {len(unknown) - SHOWN_WORDS} more" if len(unknown) > SHOWN_WORDS else ""
            shown = printable(", ".join(unknown[:SHOWN_WORDS]))
            line = f"words this model does not know (ignored): {shown}{more}"
            if line not in warnings:  # SD3 / FLUX: CLIP's and T5's vocabularies may both miss a word
                warnings.append(line)


def _dropped(cut: str) -> str:
    words = cut.split()
    more = f" and {len(words) - SHOWN_WORDS} more" if len(words) > SHOWN_WORDS else ""
    shown = printable(" ".join(words[:SHOWN_WORDS]))
    return f"dropped {len(words)} word{'s' if len(words) != 1 else ''}: '{shown}'{more}"


def time_ids(height: int, width: int, crops_top_left: tuple[int, int], batch: int) -> np.ndarray:
    """SDXL's size conditioning per image: original size, crop top-left, target size, each (height, width); the
    original and target sizes are the render's, as diffusers defaults them."""
    row = np.array([height, width, *crops_top_left, height, width], dtype=np.float32)
    return np.repeat(row[None, :], batch, axis=0)
