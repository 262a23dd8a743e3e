"""The bad-input corpus: each case is one refusal, held to the one-line promise.

`refused(args, tmp_path, ...)` runs `edgediff ARGS` in-process (a subprocess per case would import torch each
time) and asserts what the README promises for bad input: exit code 2, exactly one line on stderr and no traceback,
no file written or changed under the watched folders except the intended output, and no partial or temporary file
left. API cases use `pytest.raises` with the library's error types instead.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgediff.cli import main

# what an interrupted write leaves behind: atomic.py's temporaries, graph-cache and export partials, calibration
TEMPORARY_MARKERS = (".partial", ".tmp", ".calibrate-", ".quantize-")


def snapshot(folders: Iterable[Path]) -> dict[Path, str]:
    """Every file under `folders` with a hash of its contents (what a case must leave unchanged)."""
    files: dict[Path, str] = {}
    for folder in folders:
        if folder.is_file():
            files[folder] = hashlib.sha256(folder.read_bytes()).hexdigest()
            continue
        for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if path.is_file() and not path.is_symlink():
                files[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def refused(args: Sequence[object], message: str, watch: Iterable[Path] = (), *, allowed: Iterable[Path] = (),
            stdin: str | bytes | None = None) -> Result:
    """Run `edgediff *args`; assert one `error: ...` line containing `message` on stderr, exit 2, and nothing under
    `watch` written, changed or left half-written (paths in `allowed` may appear)."""
    watch = [Path(w) for w in watch]
    before = snapshot(watch)
    result = CliRunner().invoke(main, [str(a) for a in args], input=stdin)
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(stderr_lines) == 1 and stderr_lines[0].startswith("error: "), result.stderr
    assert message in stderr_lines[0], stderr_lines[0]
    assert "Traceback" not in result.output
    after = snapshot(watch)
    allowed_paths = {Path(a) for a in allowed}
    assert {p: h for p, h in after.items() if p not in allowed_paths} == \
        {p: h for p, h in before.items() if p not in allowed_paths}, "files written or changed"
    leftovers = [p for w in watch if w.is_dir() for p in w.rglob("*") if any(m in p.name for m in TEMPORARY_MARKERS)]
    assert not leftovers, leftovers
    return result


@contextmanager
def tmpfs(folder: Path, options: str = "size=64k") -> Iterator[Path]:
    """A small tmpfs mounted on `folder` (an empty folder) for the block, unmounted after: a full disk, or with
    "ro," a read-only one, for real. The tests run as root here and in CI; elsewhere the test is skipped."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount not permitted here ({mounted.stderr.strip()}); needs root or CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
