"""The coloured-shapes dataset, its caption grammar, and the detector the evaluator relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edgediff.models.detector import Verdict, check, check_detections, detect
from edgediff.models.shapes import (
    COLOURS,
    INVERSE_RELATION,
    SHAPES,
    VOCABULARY,
    Scene,
    ShapeObject,
    caption_for,
    make_dataset,
    parse_caption,
    render_scene,
    sample_scene,
    split_caption,
)

N_PER_KIND = 1000


def _scene(*parts: tuple[str, str], relation: str | None = None) -> Scene:
    return Scene(tuple(ShapeObject(shape, colour) for colour, shape in parts), relation)


def test_captions_round_trip_through_the_parser() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scene = sample_scene(rng)
        caption = caption_for(scene, rng)
        assert parse_caption(caption).canonical() == scene.canonical(), caption
        assert caption == caption.lower()
        assert set(split_caption(caption)) <= set(VOCABULARY), caption


RED_LEFT_OF_BLUE = _scene(("red", "circle"), ("blue", "square"), relation="left_of")


@pytest.mark.parametrize(
    "caption, scene",
    [
        ("a red circle", _scene(("red", "circle"))),
        ("red circle", _scene(("red", "circle"))),
        ("a circle that is red", _scene(("red", "circle"))),
        ("An image of a Green Triangle.", _scene(("green", "triangle"))),
        ("a red circle above a blue square", _scene(("red", "circle"), ("blue", "square"), relation="above")),
        ("a blue square below a red circle", _scene(("blue", "square"), ("red", "circle"), relation="below")),
        ("red circle, blue square on its right", RED_LEFT_OF_BLUE),
        ("red circle ,blue square on its right", RED_LEFT_OF_BLUE),
        (
            "a blue square to the right of a red circle",
            _scene(("blue", "square"), ("red", "circle"), relation="right_of"),
        ),
        (
            "a cyan square with a yellow circle below it",
            _scene(("cyan", "square"), ("yellow", "circle"), relation="above"),
        ),
    ],
)
def test_parse_caption_examples(caption: str, scene: Scene) -> None:
    assert parse_caption(caption) == scene


def test_paraphrases_of_one_scene_agree() -> None:
    assert (
        parse_caption("a red circle above a blue square").canonical()
        == parse_caption("a blue square below a red circle").canonical()
        == parse_caption("blue square with red circle above it").canonical()
    )


@pytest.mark.parametrize(
    "caption",
    ["", "a red dog", "a circle", "a red circle near a blue square", "two red circles", "a red circle above"],
)
def test_parse_caption_rejects_text_outside_the_grammar(caption: str) -> None:
    with pytest.raises(ValueError, match="cannot parse caption"):
        parse_caption(caption)


def test_scene_rejects_inconsistent_relations() -> None:
    with pytest.raises(ValueError):
        _scene(("red", "circle"), relation="above")
    with pytest.raises(ValueError):
        _scene(("red", "circle"), ("blue", "square"))
    with pytest.raises(ValueError):
        ShapeObject("hexagon", "red")


def test_make_dataset_is_deterministic_and_well_formed() -> None:
    images, captions, scenes = make_dataset(64, seed=7)
    again_images, again_captions, again_scenes = make_dataset(64, seed=7)
    other_images, _, _ = make_dataset(64, seed=8)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == len(scenes) == 64
    assert np.array_equal(images, again_images) and captions == again_captions and scenes == again_scenes
    assert not np.array_equal(images, other_images)
    assert all(parse_caption(c).canonical() == s.canonical() for c, s in zip(captions, scenes))
    assert 10 < sum(s.relation is not None for s in scenes) < 54


def test_make_dataset_size_and_object_count_options() -> None:
    images, _, scenes = make_dataset(8, seed=1, size=48, two_object_fraction=1.0)
    assert images.shape == (8, 48, 48, 3)
    assert all(len(s.objects) == 2 and s.objects[0].colour != s.objects[1].colour for s in scenes)
    _, _, singles = make_dataset(8, seed=1, two_object_fraction=0.0)
    assert all(len(s.objects) == 1 for s in singles)
    image = render_scene(scenes[0], np.random.default_rng(0), size=48)
    assert isinstance(image, Image.Image) and image.size == (48, 48) and image.mode == "RGB"


def _soften(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roughly how a small generative model's output differs from its training data: softer, noisier."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), np.float32)
    return np.clip(np.rint(blurred + rng.normal(0, 3.0, image.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def generated() -> dict[str, tuple[list[Scene], list, list]]:
    """Scenes with the detections on their clean and softened images, one and two objects, computed once."""
    rng = np.random.default_rng(123)
    data = {}
    for kind, fraction, seed in (("one", 0.0, 101), ("two", 1.0, 102)):
        images, _, scenes = make_dataset(N_PER_KIND, seed=seed, two_object_fraction=fraction)
        clean = [detect(image) for image in images]
        soft = [detect(_soften(image, rng)) for image in images]
        data[kind] = (scenes, clean, soft)
    return data


def _accuracy(scenes: list[Scene], detections: list) -> float:
    return float(np.mean([check_detections(d, s).all_ok for d, s in zip(detections, scenes)]))


@pytest.mark.parametrize("kind", ["one", "two"])
def test_detector_is_right_on_generated_images(generated, kind: str) -> None:
    scenes, clean, _ = generated[kind]
    accuracy = _accuracy(scenes, clean)
    assert accuracy >= 0.99, f"{kind}-object clean accuracy {accuracy:.3f}"


@pytest.mark.parametrize("kind", ["one", "two"])
def test_detector_holds_up_on_blurred_noisy_images(generated, kind: str) -> None:
    scenes, _, soft = generated[kind]
    accuracy = _accuracy(scenes, soft)
    assert accuracy >= 0.97, f"{kind}-object blurred+noisy accuracy {accuracy:.3f}"


def _wrong_prompts(scene: Scene, rng: np.random.Generator) -> list[Scene]:
    """Prompts the image does not show: another colour or shape, swapped colours, the inverse relation."""
    if scene.relation is None:
        (obj,) = scene.objects
        colour = rng.choice([c for c in COLOURS if c != obj.colour])
        shape = rng.choice([s for s in SHAPES if s != obj.shape])
        return [_scene((str(colour), obj.shape)), _scene((obj.colour, str(shape)))]
    first, second = scene.objects
    swapped = _scene((second.colour, first.shape), (first.colour, second.shape), relation=scene.relation)
    inverted = Scene(scene.objects, INVERSE_RELATION[scene.relation])
    return [swapped, inverted]


@pytest.mark.parametrize("kind", ["one", "two"])
def test_detector_rejects_wrong_prompts(generated, kind: str) -> None:
    rng = np.random.default_rng(5)
    scenes, clean, _ = generated[kind]
    verdicts = [check_detections(d, wrong) for d, s in zip(clean, scenes) for wrong in _wrong_prompts(s, rng)]
    rejected = float(np.mean([not v.all_ok for v in verdicts]))
    assert rejected >= 0.99, f"{kind}-object wrong prompts rejected {rejected:.3f}"


def test_verdict_says_which_part_is_wrong() -> None:
    scene = parse_caption("a red square to the left of a blue circle")
    rng = np.random.default_rng(3)
    image = render_scene(scene, rng)
    assert check(image, scene) == Verdict(True, True, True, True)
    assert check(image, Scene(scene.objects, "right_of")) == Verdict(True, True, False, False)
    # Shapes swapped between the colours: the colours and the shapes are there, but not bound right.
    swapped = parse_caption("a red circle to the left of a blue square")
    assert check(image, swapped) == Verdict(True, True, True, False)
    assert check(image, parse_caption("a green square left of a blue circle")).colours_ok is False
    assert check(np.full((32, 32, 3), 128, np.uint8), scene) == Verdict(False, False, False, False)


def test_detect_accepts_pil_uint8_and_float_images() -> None:
    scene = parse_caption("a yellow triangle")
    image = render_scene(scene, np.random.default_rng(9))
    array = np.asarray(image)
    for form in (image, array, array.astype(np.float32) / 255.0):
        (found,) = detect(form)
        assert (found.colour, found.shape) == ("yellow", "triangle")
    assert detect(np.full((32, 32, 3), 200, np.uint8)) == []


def test_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edgediff.models.shapes, edgediff.models.detector\n"
        "assert 'torch' not in {m for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
