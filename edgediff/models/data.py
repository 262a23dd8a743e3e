"""The training data: coloured-shapes images and captions rendered once into cached arrays, and seeded batches.

Rendering is cheap (~0.2 ms an image) but not free inside a training step, so the dataset is drawn once from
the run's seed and kept as .npy files. Batches are drawn from a generator seeded by (seed, stage, step) rather
than one running stream, so a resumed run draws exactly the batches the uninterrupted run would have drawn
without saving any generator state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_file
from . import architecture as arch
from .shapes import COLOURS, SHAPES, Scene, caption_for, make_dataset

CAPTIONS_PER_IMAGE = 4  # paraphrases per image: the model must not tie an image to one wording
TWO_OBJECT_FRACTION = 0.6  # pairs are the harder half of the task (binding, relation), so they get more data
# Caption augmentations, applied per batch to the token ids.
NULL_PROMPT_P = 0.1  # classifier-free guidance: the empty prompt, learnt as the unconditional model
UNKNOWN_WORD_P = 0.05  # an unknown word inserted somewhere: prompts with words outside the grammar still work
FULL_STOP_P = 0.1  # a final "."

# random streams per stage (3 was the retired bootstrapped distillation's)
STAGE_CODES = {"vae": 1, "teacher": 2, "trajectory": 4, "trajectory-train": 5}
# What each image shows, in canonical form (stages.py's auxiliary loss teaches the text encoder to say it):
# relation axis (none, horizontal, vertical), then colour and shape of the left or upper object, then of the
# other one ("none" as the last class for a single object).
LABEL_CLASSES = (3, len(COLOURS), len(SHAPES), len(COLOURS) + 1, len(SHAPES) + 1)


@dataclass
class Dataset:
    images: np.ndarray  # uint8 [n, 32, 32, 3]
    tokens: np.ndarray  # int64 [n, CAPTIONS_PER_IMAGE, MAX_LENGTH]
    labels: np.ndarray  # int64 [n, len(LABEL_CLASSES)], see scene_labels

    def __len__(self) -> int:
        return len(self.images)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def load_or_make(folder: Path, n: int, seed: int) -> Dataset:
    """The dataset cached in `folder`, rendered first if missing (or made for a different n or seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"n": n, "seed": seed, "captions_per_image": CAPTIONS_PER_IMAGE, "two_object_fraction": TWO_OBJECT_FRACTION,
            "max_length": arch.MAX_LENGTH, "vocabulary": arch.vocabulary(), "label_classes": LABEL_CLASSES}
    meta_path = folder / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == json.loads(json.dumps(meta)):
        return Dataset(*(np.load(folder / f"{name}.npy") for name in ("images", "tokens", "labels")))
    images, _, scenes = make_dataset(n, seed, size=arch.IMAGE_SIZE, two_object_fraction=TWO_OBJECT_FRACTION)
    rng = np.random.default_rng([seed, 7])
    captions = [caption_for(scene, rng) for scene in scenes for _ in range(CAPTIONS_PER_IMAGE)]
    tokens = arch.encode_captions(captions).reshape(n, CAPTIONS_PER_IMAGE, arch.MAX_LENGTH)
    labels = scene_labels(scenes)
    _save_npy(folder / "images.npy", images)
    _save_npy(folder / "tokens.npy", tokens)
    _save_npy(folder / "labels.npy", labels)
    meta_path.write_text(json.dumps(meta) + "\n")
    return Dataset(images, tokens, labels)


def scene_labels(scenes: list[Scene]) -> np.ndarray:
    """Each scene as LABEL_CLASSES indices, in canonical form ("b right of a" is "a left of b")."""
    colours, shapes = list(COLOURS), list(SHAPES)
    rows = []
    for scene in scenes:
        scene = scene.canonical()
        first, *rest = scene.objects
        axis = {None: 0, "left_of": 1, "above": 2}[scene.relation]
        second = (colours.index(rest[0].colour), shapes.index(rest[0].shape)) if rest else (len(colours), len(shapes))
        rows.append((axis, colours.index(first.colour), shapes.index(first.shape), *second))
    return np.array(rows, dtype=np.int64)


def batch_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGE_CODES[stage], step])


def torch_seed(seed: int, stage: str, step: int) -> int:
    return int(batch_rng(seed, stage, step).integers(2**62)) ^ 0x5EED


def null_tokens() -> np.ndarray:
    """The empty prompt's ids: bos, eos, padding."""
    return arch.encode_captions([""])[0]


def augment(tokens: np.ndarray, rng: np.random.Generator, *, null_p: float = NULL_PROMPT_P) -> np.ndarray:
    """Per-row caption augmentations on [b, MAX_LENGTH] ids (copy); see the probabilities above."""
    ids = arch.token_ids()
    out = tokens.copy()
    empty = null_tokens()
    for row in out:
        if rng.random() < null_p:
            row[:] = empty
            continue
        length = int(np.flatnonzero(row == ids[arch.EOS])[0])  # the eos position = bos + words
        if rng.random() < FULL_STOP_P and length + 1 < len(row):
            row[length], row[length + 1] = ids["."], ids[arch.EOS]
            length += 1
        if rng.random() < UNKNOWN_WORD_P and length + 1 < len(row):
            at = int(rng.integers(1, length + 1))  # after bos, up to just before eos
            row[at + 1 : length + 2] = row[at : length + 1].copy()
            row[at] = ids[arch.UNK]
    return out


def sample_batch(data: Dataset, seed: int, stage: str, step: int, batch: int, *, null_p: float = NULL_PROMPT_P):
    """(indices [b], augmented token ids [b, MAX_LENGTH]) for one training step."""
    rng = batch_rng(seed, stage, step)
    index = rng.integers(0, len(data), batch)
    caption = rng.integers(0, CAPTIONS_PER_IMAGE, batch)
    return index, augment(data.tokens[index, caption], rng, null_p=null_p)
