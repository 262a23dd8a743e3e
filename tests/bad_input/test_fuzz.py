"""Property-based fuzzing: any manifest field replaced by a bad value, and any mix of `render` options, ends in a
valid image (exit 0) or a one-line refusal (exit 2, exactly one `error:` line), never a traceback.

Derandomized, so CI sees the same examples every run: 40 manifest examples and 40 option examples, about 40 s in
all on 2 cores (each example is one in-process render of the built-in model, or its refusal).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgediff.cli import main
from edgediff.models import builtin_bundle
from edgediff.runtime.sampler_catalogue import SAMPLERS
from edgediff.runtime.schedules import SCHEDULES

SOURCE = builtin_bundle()
assert SOURCE is not None
MANIFEST = json.loads((SOURCE / "manifest.json").read_text())
FUZZ = settings(derandomize=True, deadline=None, max_examples=int(os.environ.get("EDGEDIFF_FUZZ_EXAMPLES", 40)),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in the JSON tree: the keys and indices leading to it."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += json_paths(v, (*prefix, i))
    return out


PATHS = json_paths(MANIFEST)
HUGE = [2**31, 2**53, 10**18, 2**63, 2**64, 10**400, 1e308, math.inf, -math.inf]
bad_values = st.one_of(
    st.sampled_from([None, True, False, "", [], {}, 0, -1, -(10**18), 0.5, -0.5, math.nan, *HUGE]),
    st.sampled_from(["..", "../outside.bin", "/etc/passwd", "/", "a/../../b", "C:\\x", "\x00", "x" * 300,
                     "tokenizer", "unet/model.onnx", "float16", "int8", "lcm", "karras"]),
    st.recursive(st.integers(-3, 3), lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
        st.sampled_from(["a", "min", "path"]), inner, max_size=2), max_leaves=40),  # deep nesting
    st.text(max_size=8),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
)


def assert_one_outcome(result, png: Path) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    if result.exit_code == 0:
        written = [Path(line) for line in result.stdout.splitlines() if line.endswith(".png")]
        assert written and all(p.parent == png.parent and p.stat().st_size > 0 for p in written), result.output
        return
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert len([line for line in lines if line.startswith("error: ")]) == 1, result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return Path(shutil.copytree(SOURCE, tmp_path_factory.mktemp("fuzz") / "pristine"))


def linked_copy(pristine: Path, to: Path) -> Path:
    """The bundle's files as hard links (no copy, and no symbolic links, which loading refuses)."""
    for f in pristine.rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            (to / f.relative_to(pristine)).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, to / f.relative_to(pristine))
    return to


@FUZZ
@given(where=st.sampled_from(PATHS), value=bad_values, verb=st.sampled_from(["info", "render"]))
def test_a_mutated_manifest_renders_or_is_refused_in_one_line(pristine, tmp_path, where, value, verb):
    example = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
    bundle = linked_copy(pristine, example)
    manifest = copy.deepcopy(MANIFEST)
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest, allow_nan=True))
    png = example / "out.png"
    args = ["info", str(bundle)] if verb == "info" else ["render", "a red square", "-m", str(bundle), "-o", str(png)]
    result = CliRunner().invoke(main, args)
    if verb == "info":
        assert result.exit_code in (0, 2) and isinstance(result.exception, (SystemExit, type(None))), result.output
        if result.exit_code == 2:
            assert result.stderr.count("error: ") == 1 and len(result.stderr.strip().splitlines()) == 1
        return
    assert_one_outcome(result, png)


sizes = st.one_of(
    st.tuples(st.integers(1, 8).map(lambda n: n * 8), st.integers(1, 8).map(lambda n: n * 8)).map(
        lambda wh: f"{wh[0]}x{wh[1]}"),
    st.sampled_from(["", "x", "32", "32x", "x32", "0x0", "-8x8", "32x32x32", "1e3x8", "nanxnan", "33x31",
                     "100000000x100000000", "16384x99999999", f"{2**64}x8", " 32 x 32 "]),
    st.text(max_size=6),
)
option = st.one_of(
    st.tuples(st.just("--steps"), st.sampled_from(["1", "2", "4", "0", "-1", "1001", str(10**30), "x", "1.5"])),
    st.tuples(st.just("--guidance"), st.sampled_from(["0", "1", "7.5", "-3", "nan", "inf", "1e308", "x"])),
    st.tuples(st.just("--size"), sizes),
    st.tuples(st.just("--seed"), st.sampled_from(["0", "-1", str(2**64 - 1), str(2**64), str(10**40), "x"])),
    st.tuples(st.just("--sampler"), st.sampled_from([*SAMPLERS, "", "nope", "LCM"])),
    st.tuples(st.just("--schedule"), st.sampled_from([*SCHEDULES, "", "nope"])),
    st.tuples(st.just("--num-images"), st.sampled_from(["1", "2", "0", "-1", "65", str(10**12), "x"])),
    st.tuples(st.just("--strength"), st.sampled_from(["0", "0.5", "1", "1.5", "-1", "nan", "1e-300"])),
    st.tuples(st.just("--eta"), st.sampled_from(["0", "0.3", "1", "2", "-1", "nan", "inf"])),
)


@FUZZ
@given(options=st.lists(option, max_size=4), img2img=st.booleans())
def test_render_options_render_or_are_refused_in_one_line(tmp_path, options, img2img):
    steps = [v for k, v in options if k == "--steps"]
    sampler = [v for k, v in options if k == "--sampler"]
    if steps and sampler and steps[-1] == "1001" and sampler[-1] in SAMPLERS:
        options = [o for o in options if o[0] != "--steps"]  # 1000 real steps would take seconds: not the point
    png = tmp_path / f"out{len(list(tmp_path.iterdir()))}.png"
    args = ["render", "a red square", "-o", str(png), *(part for pair in options for part in pair)]
    if img2img:
        init = tmp_path / "init.png"
        if not init.exists():
            from PIL import Image

            Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
        args += ["--image", str(init)]
    assert_one_outcome(CliRunner().invoke(main, args), png)
