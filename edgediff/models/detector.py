"""A deterministic detector for the coloured-shapes world of `edgediff.models.shapes`.

The evaluator renders a prompt with the model and asks this module whether the picture shows what the prompt
said. It has to hold up on generated images, which are softer and less exactly coloured than the training
data, so everything here is measured against the image's own background and its own brightest colours:

1. colour: each pixel's chroma vector relative to the background (the median of the image border) in an
   opponent-colour plane. Mixing a colour with grey, which is what blur does at an edge, keeps its hue.
2. objects: connected blobs of clearly coloured pixels, named by their chroma-weighted hue (nearest palette
   hue); a blob of two well-separated hues is split, fragments of one colour a pixel apart are merged, and
   specks are dropped.
3. shape: from the third and fourth cumulants of the blob's intensity, which blur does not change
   (see `_classify_shape`); the centroid gives the position.

Pure NumPy + Pillow, no torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import permutations

import numpy as np
from PIL import Image

from edgediff.models.shapes import COLOURS, Scene

_PALETTE_NAMES = tuple(COLOURS)

# Thresholds are fractions of chroma on the 0-255 scale or of a blob's own peak chroma.
CHROMA_FLOOR = 24.0  # below this a pixel is background whatever the image: grey noise and tints stay under it
BLOB_FRACTION = 0.25  # a pixel belongs to a blob above this fraction of the image's peak chroma...
MIN_PEAK_CHROMA = 40.0  # ...and a blob is an object only if its own colour is at least this strong
MIN_AREA_FRACTION = 0.015  # specks under this share of the image are noise (15 px at 32x32; objects are 40+)
SPLIT_SHARE = 0.75  # a blob is two objects only if its second hue holds over 1 - this of its colour...
SPLIT_ANGLE_DEGREES = 35.0  # ...and the two hues' means lie this far apart (palette hues are ~60 apart)
MERGE_DISTANCE = 2  # same-colour fragments at most this many pixels apart (Chebyshev) are one object
TRIANGLE_SKEWNESS = 0.35  # |skewness| from here up is a triangle (0 for circles and squares, ~0.8 triangles)
ROUND_DIAGONAL_RATIO = 0.75  # halfway between a square's 0.5 and a circle's 1.0


@dataclass(frozen=True)
class Detection:
    """One object. x, y is the intensity-weighted centroid in pixels (pixel i spans [i, i+1), y down)."""

    colour: str
    shape: str
    x: float
    y: float
    area: float  # in pixels, coverage-weighted
    # The shape features (see _classify_shape), kept so that an evaluator can see how clear-cut a call was.
    diagonal_ratio: float  # 0.5 square, 1.0 circle
    skewness: float  # 0 circle or square, about -0.8 upright triangle (signed by the vertical skew)


@dataclass(frozen=True)
class Verdict:
    colours_ok: bool  # the detected colours are exactly the requested ones (no missing, no extra)
    shapes_ok: bool  # the detected shapes are exactly the requested ones
    relation_ok: bool  # the requested relation holds between the two objects; True for one object
    all_ok: bool  # every object present with its own colour and shape, nothing extra, relation holds


def _opponent(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] RGB -> [..., 2] chroma plane: a = red-cyan, b = green-blue; grey maps to the origin."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([r - (g + b) / 2, (np.sqrt(3) / 2) * (g - b)], axis=-1)


_PALETTE_DIRECTIONS = _opponent(np.asarray([COLOURS[n] for n in _PALETTE_NAMES], np.float32))
_PALETTE_DIRECTIONS /= np.linalg.norm(_PALETTE_DIRECTIONS, axis=1, keepdims=True)


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """float32 [H, W, 3] on the 0-255 scale; uint8 arrays and PIL images as is, float arrays from [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an image of shape [H, W, 3], got {array.shape}")
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32) * 255.0
    return array.astype(np.float32)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: labels 1..count, 0 for background.

    Vectorised: every pixel takes the largest pixel index among its neighbours, then jumps to the label of
    the pixel it points at (pointer jumping), which converges in a few passes on small images.
    """
    height, width = mask.shape
    index = np.arange(height * width, dtype=np.int64).reshape(height, width)
    labels = np.where(mask, index, -1)
    while True:
        padded = np.pad(labels, 1, constant_values=-1)
        neighbours = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(neighbours, padded[dy : dy + height, dx : dx + width], out=neighbours)
        grown = np.where(mask, neighbours, -1)
        flat = grown.ravel()
        jumped = np.where(mask, flat[np.maximum(grown, 0)].reshape(height, width), -1)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(height, width)
    if roots[0] == -1:
        return dense, len(roots) - 1
    return dense + 1, len(roots)


def detect(image: np.ndarray | Image.Image) -> list[Detection]:
    """The coloured objects in an image, largest first."""
    rgb = _as_rgb(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    chroma_vectors = _opponent(rgb) - _opponent(np.median(border, axis=0))
    chroma = np.linalg.norm(chroma_vectors, axis=-1)
    peak = float(np.percentile(chroma, 99.5))
    hue_class = np.argmax(chroma_vectors @ _PALETTE_DIRECTIONS.T, axis=-1)
    mask = chroma >= max(CHROMA_FLOOR, BLOB_FRACTION * peak)

    blobs: list[tuple[int, np.ndarray]] = []  # (palette index, boolean mask)
    labels, count = label_components(mask)
    for label in range(1, count + 1):
        blob = labels == label
        if not _holds_two_colours(blob, hue_class, chroma_vectors):
            blobs.append((_nearest_colour(chroma_vectors[blob].sum(axis=0)), blob))
            continue
        weights = np.bincount(hue_class[blob], minlength=len(_PALETTE_NAMES))
        for colour in np.flatnonzero(weights):
            part_labels, part_count = label_components(blob & (hue_class == colour))
            blobs.extend((int(colour), part_labels == part) for part in range(1, part_count + 1))

    min_area = MIN_AREA_FRACTION * rgb.shape[0] * rgb.shape[1]
    detections = []
    for palette_index, blob in _merge_fragments(blobs):
        detection = _measure(palette_index, blob, chroma_vectors)
        if detection is not None and detection.area >= min_area:
            detections.append(detection)
    return sorted(detections, key=lambda d: -d.area)


def _nearest_colour(vector: np.ndarray) -> int:
    return int(np.argmax(_PALETTE_DIRECTIONS @ vector))


def _holds_two_colours(blob: np.ndarray, hue_class: np.ndarray, chroma_vectors: np.ndarray) -> bool:
    """Whether a blob is two touching objects of different colours rather than one.

    Per-pixel palette classes alone would cut an object whose hue drifted onto the boundary between two
    palette colours; two objects show instead as two sizeable groups of pixels whose mean hues lie far apart.
    """
    vectors = chroma_vectors[blob]
    classes = hue_class[blob]
    sums = np.stack([vectors[classes == k].sum(axis=0) for k in range(len(_PALETTE_NAMES))])
    strength = np.linalg.norm(sums, axis=1)
    first, second = np.argsort(strength)[::-1][:2]
    if strength[second] < (1 - SPLIT_SHARE) * strength.sum():
        return False
    cosine = sums[first] @ sums[second] / (strength[first] * strength[second])
    return bool(cosine <= np.cos(np.radians(SPLIT_ANGLE_DEGREES)))


def _merge_fragments(blobs: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """Join same-colour blobs that nearly touch: a soft generated edge can break one object in two."""
    merged = list(blobs)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                (colour_i, mask_i), (colour_j, mask_j) = merged[i], merged[j]
                if colour_i == colour_j and _chebyshev_gap(mask_i, mask_j) <= MERGE_DISTANCE:
                    merged[i] = (colour_i, mask_i | mask_j)
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


def _chebyshev_gap(mask_a: np.ndarray, mask_b: np.ndarray) -> int:
    ya, xa = np.nonzero(mask_a)
    yb, xb = np.nonzero(mask_b)
    distance = np.maximum(np.abs(ya[:, None] - yb[None, :]), np.abs(xa[:, None] - xb[None, :]))
    return int(distance.min())


def _measure(colour: int, blob: np.ndarray, chroma_vectors: np.ndarray) -> Detection | None:
    # Coverage of each pixel by the object: its chroma along the object's own hue over the object's peak.
    # The 1-pixel ring around the blob is included, since the faint edge pixels left out by the blob
    # threshold still carry part of the object's extent; a neighbour of another hue projects weakly.
    direction = (chroma_vectors[blob] * np.linalg.norm(chroma_vectors[blob], axis=-1, keepdims=True)).sum(0)
    direction /= np.linalg.norm(direction) + 1e-9
    along = np.clip(chroma_vectors @ direction, 0, None)
    peak = float(np.percentile(along[blob], 90))
    if peak < MIN_PEAK_CHROMA:
        return None
    ring = _dilate(blob)
    alpha = np.where(ring, np.clip(along / peak, 0, 1), 0.0)
    ys, xs = np.nonzero(ring)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch = alpha[y0:y1, x0:x1]
    area = float(patch.sum())
    grid_y, grid_x = np.mgrid[y0:y1, x0:x1] + 0.5
    cx, cy = float((patch * grid_x).sum() / area), float((patch * grid_y).sum() / area)
    shape, diagonal_ratio, skewness = _classify_shape(patch, x0, y0, cx, cy)
    return Detection(_PALETTE_NAMES[colour], shape, cx, cy, area, diagonal_ratio, skewness)


def _dilate(mask: np.ndarray) -> np.ndarray:
    height, width = mask.shape
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def _classify_shape(
    patch: np.ndarray, x0: int, y0: int, cx: float, cy: float
) -> tuple[str, float, float]:
    """Shape from cumulants of the blob's intensity, which a Gaussian blur leaves unchanged.

    Blurring adds a Gaussian to the shape, and Gaussians have zero third and fourth cumulants, so these
    features read the same on a sharp training image and on a soft generated one (matching against sharp
    ideal shapes confused small soft squares and circles).
    - skewness (third cumulant over the fourth's 3/4 power, dimensionless): 0 for circles and squares,
      about -0.8 along y for an upright triangle (mass towards its base).
    - diagonal ratio (fourth cumulant along the diagonals over that along the axes): a square's diagonal
      profile is a sum of two uniform ones, which halves it: 0.5; a circle looks the same every way: 1.0.
    """
    height, width = patch.shape
    grid_y, grid_x = np.mgrid[y0 : y0 + height, x0 : x0 + width] + 0.5
    weights = patch / patch.sum()
    along_x, along_y = grid_x - cx, grid_y - cy
    diagonal_u, diagonal_v = (along_x + along_y) / np.sqrt(2), (along_x - along_y) / np.sqrt(2)

    def fourth_cumulant(u: np.ndarray) -> float:
        return float((weights * u**4).sum() - 3 * (weights * u**2).sum() ** 2)

    axis_kurtosis = fourth_cumulant(along_x) + fourth_cumulant(along_y)
    diagonal_ratio = (fourth_cumulant(diagonal_u) + fourth_cumulant(diagonal_v)) / min(axis_kurtosis, -1e-9)
    skew_x = float((weights * along_x**3).sum()) / (abs(fourth_cumulant(along_x)) + 1e-9) ** 0.75
    skew_y = float((weights * along_y**3).sum()) / (abs(fourth_cumulant(along_y)) + 1e-9) ** 0.75
    skewness = float(np.copysign(np.hypot(skew_x, skew_y), skew_y))
    if abs(skewness) >= TRIANGLE_SKEWNESS:
        return "triangle", diagonal_ratio, skewness
    return ("circle" if diagonal_ratio >= ROUND_DIAGONAL_RATIO else "square"), diagonal_ratio, skewness


def _relation_holds(first: Detection, second: Detection, relation: str) -> bool:
    """first RELATION second, judged by the dominant axis of the centroid offset (y grows downwards)."""
    dx, dy = second.x - first.x, second.y - first.y
    if relation == "left_of":
        return dx > abs(dy)
    if relation == "right_of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def check_detections(detections: list[Detection], scene: Scene) -> Verdict:
    """Whether detections (from `detect`) show the scene; see `check`."""
    colours_ok = Counter(d.colour for d in detections) == Counter(o.colour for o in scene.objects)
    shapes_ok = Counter(d.shape for d in detections) == Counter(o.shape for o in scene.objects)
    bound_ok = Counter((d.colour, d.shape) for d in detections) == Counter(
        (o.colour, o.shape) for o in scene.objects
    )
    relation_ok = True
    if scene.relation is not None:
        wanted_first, wanted_second = scene.objects
        exact = [
            (a, b)
            for a, b in permutations(detections, 2)
            if (a.colour, a.shape, b.colour, b.shape)
            == (wanted_first.colour, wanted_first.shape, wanted_second.colour, wanted_second.shape)
        ]
        # Judge the relation even when a shape is wrong, by colour alone, so that the evaluator can score
        # spatial understanding apart from shape drawing.
        pairs = exact or [
            (a, b)
            for a, b in permutations(detections, 2)
            if (a.colour, b.colour) == (wanted_first.colour, wanted_second.colour)
        ]
        relation_ok = any(_relation_holds(a, b, scene.relation) for a, b in pairs)
    return Verdict(colours_ok, shapes_ok, relation_ok, bound_ok and relation_ok)


def check(image: np.ndarray | Image.Image, scene: Scene) -> Verdict:
    """Whether an image shows exactly the scene: its objects, their colours and shapes, and the relation."""
    return check_detections(detect(image), scene)
