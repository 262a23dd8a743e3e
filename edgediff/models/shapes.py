"""The procedural "coloured shapes" dataset the built-in model is trained on.

One or two flat-coloured shapes on a plain grey background, with captions from a small closed grammar. The
same grammar parses captions back into a structured `Scene`, so the evaluator knows what a prompt asks for
and `edgediff.models.detector` can check a generated image against it.

Pure NumPy + Pillow: this module is imported by the evaluator on machines without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")

# Six hues about 60 degrees apart (0, 57, 120, 180, 237, 292 in the opponent-colour plane the detector uses),
# all strongly saturated, so that a soft or colour-shifted generated object still lands nearest its own hue
# and never near the neutral grey of the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (225, 215, 35),
    "green": (45, 200, 45),
    "cyan": (30, 200, 200),
    "blue": (50, 60, 235),
    "purple": (190, 50, 215),
}

# Read as objects[0] RELATION objects[1]; image y grows downwards, so "above" means a smaller y.
RELATIONS = ("left_of", "right_of", "above", "below")
INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

# Geometry as fractions of the image side, so that any `size` gives the same pictures. At 32 px a pair of
# objects is 9-13.4 px each, a single object 12-20 px: big enough for the detector and a 8x8 latent.
ONE_OBJECT_SIZE = (0.38, 0.62)
TWO_OBJECT_SIZE = (0.28, 0.42)
MARGIN = 0.04  # keeps shapes off the border, where a generated image's edges are least reliable
GAP = 0.08  # empty space between the two objects along the relation's axis
# The centre offset across the relation's axis is at most this fraction of the offset along it, so the
# relation is never ambiguous, even after a triangle's centroid (a sixth of its height below its box
# centre) is what the detector measures.
CROSS_AXIS_RATIO = 0.35
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: antialiased edges


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")


@dataclass(frozen=True)
class Scene:
    """One object (relation None) or two objects with `objects[0] relation objects[1]`."""

    objects: tuple[ShapeObject, ...]
    relation: str | None

    def __post_init__(self) -> None:
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a one-object scene has no relation")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise ValueError(f"a two-object scene needs a relation in {RELATIONS}, got {self.relation!r}")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")

    def canonical(self) -> Scene:
        """The same scene stated with "left_of" or "above" only: "b right of a" becomes "a left of b".

        A caption may name the objects in either order, so compare scenes by their canonical forms.
        """
        if self.relation in ("right_of", "below"):
            return Scene((self.objects[1], self.objects[0]), INVERSE_RELATION[self.relation])
        return self


# ---------------------------------------------------------------------------------------------------------
# Sampling and rendering


def sample_scene(rng: np.random.Generator, two_object_fraction: float = 0.5) -> Scene:
    """A random scene; the two objects of a pair always differ in colour, so colour identifies each one."""
    first_colour, second_colour = rng.choice(len(COLOURS), size=2, replace=False)
    names = tuple(COLOURS)
    first = ShapeObject(SHAPES[rng.integers(len(SHAPES))], names[first_colour])
    if rng.random() >= two_object_fraction:
        return Scene((first,), None)
    second = ShapeObject(SHAPES[rng.integers(len(SHAPES))], names[second_colour])
    return Scene((first, second), RELATIONS[rng.integers(len(RELATIONS))])


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The scene drawn with random sizes, positions, background and slight colour jitter."""
    return Image.fromarray(_render_array(scene, rng, size))


def _render_array(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = _background(rng, size)
    for obj, box in zip(scene.objects, _layout(scene, rng, size)):
        alpha = _coverage(obj.shape, box, size)[..., None]
        canvas = canvas * (1.0 - alpha) + _jittered_colour(obj.colour, rng) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A neutral grey, light or dark, with a faint gradient and faint noise.

    Gradient and noise are luminance only: the background stays at zero chroma, which is what separates
    it from every object colour.
    """
    level = rng.uniform(175, 235) if rng.random() < 0.5 else rng.uniform(20, 80)
    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, 12)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    noise = rng.normal(0.0, rng.uniform(0, 2.0), (size, size)).astype(np.float32)
    grey = level + amplitude * ramp + noise
    return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)


def _jittered_colour(name: str, rng: np.random.Generator) -> np.ndarray:
    # Small enough (a few degrees of hue at most) that colours never drift towards a neighbour.
    rgb = np.asarray(COLOURS[name], np.float32) * rng.uniform(0.88, 1.0) + rng.uniform(-6, 6, 3)
    return np.clip(rgb, 0, 255).astype(np.float32)


def _layout(scene: Scene, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """(centre x, centre y, side) in pixels for each object, in the order of scene.objects."""
    margin = MARGIN * size
    if scene.relation is None:
        side = rng.uniform(*ONE_OBJECT_SIZE) * size
        cx, cy = rng.uniform(margin + side / 2, size - margin - side / 2, 2)
        return [(cx, cy, side)]
    sides = rng.uniform(*TWO_OBJECT_SIZE, 2) * size
    # "low" is the object with the smaller coordinate along the relation's axis (left, or upper).
    low, high = (0, 1) if scene.relation in ("left_of", "above") else (1, 0)
    half_low, half_high = sides[low] / 2, sides[high] / 2
    nearest = half_low + half_high + GAP * size
    farthest = size - 2 * margin - half_low - half_high  # >= nearest: the size ranges are chosen so
    offset = rng.uniform(nearest, max(nearest, farthest))
    along_low = rng.uniform(margin + half_low, max(margin + half_low, size - margin - half_high - offset))
    across_low = rng.uniform(margin + half_low, size - margin - half_low)
    reach = CROSS_AXIS_RATIO * offset
    across_high = rng.uniform(
        max(margin + half_high, across_low - reach), min(size - margin - half_high, across_low + reach)
    )
    centres = {low: (along_low, across_low), high: (along_low + offset, across_high)}
    horizontal = scene.relation in ("left_of", "right_of")
    boxes = []
    for index in (0, 1):
        along, across = centres[index]
        cx, cy = (along, across) if horizontal else (across, along)
        boxes.append((cx, cy, sides[index]))
    return boxes


def _coverage(shape: str, box: tuple[float, float, float], size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, from a supersampled drawing."""
    scale = SUPERSAMPLE
    cx, cy, side = (v * scale for v in box)
    x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    mask = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(mask)
    # Pillow's boxes include their last pixel, hence the -1 on the far edges.
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:  # upright triangle, base as wide as it is tall
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), (cx - 0.5, y0)], fill=255)
    return np.asarray(mask.reduce(scale), np.float32) / 255.0


def make_dataset(
    n: int, seed: int, size: int = 32, two_object_fraction: float = 0.5
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n images (uint8 [n, size, size, 3]), their captions and scenes; the same seed gives the same data."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions: list[str] = []
    scenes: list[Scene] = []
    for i in range(n):
        scene = sample_scene(rng, two_object_fraction)
        images[i] = _render_array(scene, rng, size)
        captions.append(caption_for(scene, rng))
        scenes.append(scene)
    return images, captions, scenes


# ---------------------------------------------------------------------------------------------------------
# Caption grammar. Captions and the parser come from the same tables, so every caption parses.

PREFIXES = ("", "a picture of ", "an image of ")
_PREFIX_WEIGHTS = (0.6, 0.2, 0.2)  # most captions are bare, as most prompts are
# {x} is the object named first, {y} the second; the relation is that of x to y.
TWO_OBJECT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{x} to the left of {y}", "left_of"),
    ("{x} left of {y}", "left_of"),
    ("{x} on the left of {y}", "left_of"),
    ("{x} to the right of {y}", "right_of"),
    ("{x} right of {y}", "right_of"),
    ("{x} on the right of {y}", "right_of"),
    ("{x} above {y}", "above"),
    ("{x} below {y}", "below"),
    ("{x} under {y}", "below"),
    ("{x} beneath {y}", "below"),
    ("{x}, {y} on its right", "left_of"),
    ("{x}, {y} on its left", "right_of"),
    ("{x}, {y} above it", "below"),
    ("{x}, {y} below it", "above"),
    ("{x} with {y} on its right", "left_of"),
    ("{x} with {y} on its left", "right_of"),
    ("{x} with {y} above it", "below"),
    ("{x} with {y} below it", "above"),
)
_ARTICLES = ("a ", "")
_ONE_OBJECT_ARTICLES = ("a ", "", "one ")


def caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A random paraphrase from the grammar that describes `scene`."""
    prefix = PREFIXES[rng.choice(len(PREFIXES), p=_PREFIX_WEIGHTS)]
    if scene.relation is None:
        articles = ("a ",) if prefix else _ONE_OBJECT_ARTICLES
        article = articles[rng.integers(len(articles))]
        obj = scene.objects[0]
        if rng.random() < 0.3:
            return f"{prefix}{article}{obj.shape} that is {obj.colour}"
        return f"{prefix}{article}{obj.colour} {obj.shape}"
    article = "a " if prefix else _ARTICLES[rng.integers(len(_ARTICLES))]
    first, second = scene.objects
    relation = scene.relation
    if rng.random() < 0.5:  # name the second object first, with the inverse relation
        first, second, relation = second, first, INVERSE_RELATION[relation]
    templates = [t for t, r in TWO_OBJECT_TEMPLATES if r == relation]
    template = templates[rng.integers(len(templates))]
    body = template.format(
        x=f"{article}{first.colour} {first.shape}", y=f"{article}{second.colour} {second.shape}"
    )
    return prefix + body


def split_caption(text: str) -> list[str]:
    """A caption's tokens: lowercase words and ","; for captions of the grammar, all are in VOCABULARY."""
    return re.findall(r"[a-z]+|,", text.lower())


def _normalise(text: str) -> str:
    return " ".join(split_caption(text)).replace(" ,", ",")


def _grammar_words() -> tuple[str, ...]:
    words = set(COLOURS) | set(SHAPES) | {"that", "is", "a", "one", ","}
    for phrase in PREFIXES + tuple(t for t, _ in TWO_OBJECT_TEMPLATES):
        words |= set(split_caption(phrase.replace("{x}", "").replace("{y}", "")))
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _grammar_words()

_COLOUR_PATTERN = "|".join(COLOURS)
_SHAPE_PATTERN = "|".join(SHAPES)
_PREFIX_PATTERN = "(?:a picture of |an image of )?"


def _object_pattern(tag: str) -> str:
    return rf"(?:(?:a|one) )?(?P<c{tag}>{_COLOUR_PATTERN}) (?P<s{tag}>{_SHAPE_PATTERN})"


_ONE_OBJECT_PATTERNS = (
    re.compile(_PREFIX_PATTERN + _object_pattern("0")),
    re.compile(
        _PREFIX_PATTERN + rf"(?:(?:a|one) )?(?P<s0>{_SHAPE_PATTERN}) that is (?P<c0>{_COLOUR_PATTERN})"
    ),
)
_TWO_OBJECT_PATTERNS = tuple(
    (
        re.compile(
            _PREFIX_PATTERN
            + re.escape(template)
            .replace(r"\{x\}", _object_pattern("0"))
            .replace(r"\{y\}", _object_pattern("1"))
        ),
        relation,
    )
    for template, relation in TWO_OBJECT_TEMPLATES
)


def parse_caption(text: str) -> Scene:
    """The scene a caption of the grammar describes, objects in the order the caption names them.

    Case, extra spaces, spacing around "," and a final "." are forgiven; anything else outside the grammar
    raises ValueError.
    """
    normal = _normalise(text)
    for pattern in _ONE_OBJECT_PATTERNS:
        match = pattern.fullmatch(normal)
        if match:
            return Scene((ShapeObject(match["s0"], match["c0"]),), None)
    for pattern, relation in _TWO_OBJECT_PATTERNS:
        match = pattern.fullmatch(normal)
        if match:
            objects = (ShapeObject(match["s0"], match["c0"]), ShapeObject(match["s1"], match["c1"]))
            return Scene(objects, relation)
    raise ValueError(
        f"cannot parse caption {text!r}: expected e.g. 'a red circle' or 'a red circle above a blue square' "
        f"using colours {tuple(COLOURS)} and shapes {SHAPES}"
    )
