"""The two concurrency results that hold: threads sharing one Pipeline, and processes rendering at once, each
give what the same renders give one after another (the built-in model; a few seconds each)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime.pipeline import Pipeline

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow star", "two red squares",
           "a blue square", "a green circle", "a yellow triangle"]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()


def render(pipe: Pipeline, i: int) -> np.ndarray:
    images = pipe(PROMPTS[i % len(PROMPTS)], seed=100 + i, output_type="np").images
    assert isinstance(images, np.ndarray)
    return images


def test_eight_threads_sharing_one_pipeline_match_serial_renders(pipe):
    serial = [render(pipe, i) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda i: render(pipe, i), range(8)))
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


SCRIPT = """
import sys
import numpy as np
from edgediff.runtime.pipeline import Pipeline
i = int(sys.argv[1])
prompts = {prompts!r}
images = Pipeline.load()(prompts[i % len(prompts)], seed=100 + i, output_type="np").images
np.save(sys.argv[2], images)
"""


def test_four_processes_at_once_match_serial_renders(pipe, tmp_path):
    script = tmp_path / "render_one.py"
    script.write_text(SCRIPT.format(prompts=PROMPTS))
    outputs = [tmp_path / f"{i}.npy" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(out)], cwd=Path(__file__).parents[1])
             for i, out in enumerate(outputs)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(np.load(out), render(pipe, i), rtol=0, atol=1e-6)
