"""`edgediff batch` in-process: one PNG per line equal to `edgediff render` with the same values, results.jsonl,
resuming after a kill, and one-line errors for a bad prompt file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main

LINES = [
    {"prompt": "a red circle left of a blue square", "seed": 4},
    {"prompt": "a green triangle", "seed": 4, "steps": 2, "negative_prompt": "red", "id": "tri"},
    {"prompt": "a yellow square above a purple circle"},
    {"prompt": "a cyan circle", "seed": 9, "size": "48x32", "guidance": 2.0},
]


def write_prompts(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(*args):
    result = CliRunner().invoke(main, ["batch", *map(str, args)])
    return result


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_batch_equals_render_and_writes_results(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", LINES)
    out = tmp_path / "out"
    result = run(prompts, out, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["00001.png", "00003.png", "00004.png", "tri.png"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["00001", "tri", "00003", "00004"]
    assert records[1]["steps"] == 2 and records[3]["size"] == "48x32" and records[2]["seed"] == 0
    assert records[0]["model"] == "edgediff-builtin"
    for line, args in ((LINES[1], ["--seed", "4", "--steps", "2", "--negative", "red"]),
                       (LINES[3], ["--seed", "9", "--size", "48x32", "--guidance", "2"])):
        render = CliRunner().invoke(main, ["render", line["prompt"], "-o", str(tmp_path / "r.png"), *args])
        assert render.exit_code == 0, render.output
        name = f"{line.get('id', '00004')}.png"
        assert np.abs(pixels(out / name) - pixels(tmp_path / "r.png")).max() <= 1
    assert "Seed: 9" in Image.open(out / "00004.png").text["parameters"]


def test_batch_resumes(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", LINES)
    out = tmp_path / "out"
    assert run(prompts, out).exit_code == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    again = run(prompts, out)
    assert again.exit_code == 0 and "0 rendered, 4 already there" in again.output
    # a run killed mid-way: one PNG never written, the results' last record cut short
    (out / "00003.png").unlink()
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text[: text.rindex("{") + 20])
    changed = [*LINES[:3], {**LINES[3], "seed": 10}]  # and a line edited since: rendered again
    resumed = run(write_prompts(prompts, changed), out)
    assert resumed.exit_code == 0 and "2 rendered, 2 already there" in resumed.output, resumed.output
    assert (out / "00003.png").read_bytes() == first["00003.png"]
    assert (out / "00004.png").read_bytes() != first["00004.png"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and records[3]["seed"] == 10
    assert not list(out.glob(".*partial*"))


@pytest.mark.parametrize("line, message", [
    ("not json", "p.jsonl:2: not a JSON object"),
    ('{"promt": "x"}', 'p.jsonl:2: each line must be a JSON object with a "prompt" string'),
    ('{"prompt": "x", "stepz": 2}', "p.jsonl:2: unknown field 'stepz'"),
    ('{"prompt": "x", "seed": "1"}', "p.jsonl:2: seed has the wrong type (str)"),
    ('{"prompt": "x", "size": "33x33"}', "line 00002: size 33x33 is not a multiple of 8"),
    ('{"prompt": "x", "id": "../evil"}', "p.jsonl:2: id '../evil' must be unique"),
])
def test_bad_lines_get_one_line(tmp_path, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n' + line + "\n")
    result = run(prompts, tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
