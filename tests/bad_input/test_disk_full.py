"""A full disk during the PNG write: exit 2, one line, and the good PNG already there byte for byte as it was.

Tested for real on a 64 KiB tmpfs (the machine and CI run as root; skipped where mount is not permitted), and
always by injecting the write error.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.cli import main

from .conftest import refused, tmpfs


def good_png(path: Path) -> bytes:
    result = CliRunner().invoke(main, ["render", "a red square", "-o", str(path), "--seed", "7"])
    assert result.exit_code == 0, result.output
    return path.read_bytes()


@pytest.fixture
def small_tmpfs(tmp_path):
    # where mount is not permitted, test_an_injected_write_error covers the rest
    with tmpfs(tmp_path / "small") as folder:
        yield folder


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 1024)
        except OSError as e:
            assert e.errno == errno.ENOSPC


@pytest.mark.parametrize("images", [1, 2])
def test_a_full_disk_keeps_the_good_pngs(small_tmpfs, images):
    names = ["cat.png"] if images == 1 else ["cat-1.png", "cat-2.png"]
    old = {name: good_png(small_tmpfs / name) for name in names}
    fill(small_tmpfs)
    refused(["render", "a blue circle", "-o", small_tmpfs / "cat.png", "--num-images", images, "--seed", "8"],
            "No space left on device", watch=[small_tmpfs])
    assert {name: (small_tmpfs / name).read_bytes() for name in names} == old


def test_an_injected_write_error(tmp_path, monkeypatch):
    from edgediff.runtime import images

    target = tmp_path / "cat.png"
    old = good_png(target)

    def half_then_full(image, path, parameters):
        Path(path).write_bytes(old[: len(old) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images, "write_png", half_then_full)
    refused(["render", "a blue circle", "-o", target, "--seed", "8"], "cat.png: cannot write the PNG (No space left",
            watch=[tmp_path])
    assert target.read_bytes() == old
