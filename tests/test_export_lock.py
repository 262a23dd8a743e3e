"""One export per OUT at a time, and nothing left behind by an export that was killed or stopped.

The lock (atomic.exclusive) is what makes a leftover partial safe to remove: whoever holds the lock for OUT is the
only writer of OUT, so a partial it finds beside OUT belongs to a dead process. The signal tests run the real
command in a subprocess and kill it once its partial folder exists.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.atomic import Locked, exclusive
from edgediff.cli import main

REPO = Path(__file__).resolve().parent.parent


def _beside(out: Path) -> list[str]:
    """What lies beside OUT under its name: partials, lock files, moved-aside folders."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_second_holder_is_refused_and_the_lock_file_goes_with_the_holder(tmp_path):
    out = tmp_path / "bundle"
    with exclusive(out):
        with pytest.raises(Locked), exclusive(out):
            pass
        assert _beside(out) == [".bundle.lock"]
    assert _beside(out) == []
    with exclusive(out):  # free again
        pass


def test_holding_the_lock_clears_what_a_killed_writer_left(tmp_path):
    out = tmp_path / "bundle"
    (tmp_path / ".bundle.partial-123-abcdef").mkdir()
    (tmp_path / ".bundle.partial-123-abcdef" / "unet").mkdir()
    (tmp_path / ".bundle.lock").write_text("")  # a SIGKILLed holder's lock file: nobody holds its lock
    (tmp_path / ".bundle.old-77-0a1b2c").mkdir()  # killed between the two renames of a --force replace
    (tmp_path / ".bundle.old-77-0a1b2c" / "manifest.json").write_text("{}")
    (tmp_path / ".bundle-2.partial-123-abcdef").mkdir()  # another target's: not ours to judge
    (tmp_path / ".bundle.partial-9-abcdef.png").write_bytes(b"")  # a file write's temporary, not a folder's
    with exclusive(out):
        assert (out / "manifest.json").is_file()  # the replaced bundle is put back, not deleted
    assert _beside(out) == [".bundle.partial-9-abcdef.png"]
    assert (tmp_path / ".bundle-2.partial-123-abcdef").is_dir()


def _start_export(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "edgediff.cli", "export", str(src), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_partial(proc: subprocess.Popen, out: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partials = [p for p in out.parent.glob(f".{out.name}.partial-*") if any(p.iterdir())]
        if partials:
            return partials[0]
        if proc.poll() is not None:
            pytest.fail(f"the export ended before writing anything: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no partial folder appeared")


@pytest.mark.slow
def test_an_export_killed_outright_is_cleared_by_the_next_one(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = _start_export(checkpoint("sd1"), out)
    partial = _wait_for_partial(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert partial.is_dir() and not out.exists()  # what SIGKILL (or the OOM killer) leaves
    r = CliRunner().invoke(main, ["export", str(checkpoint("sd1")), str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "manifest.json").is_file()
    assert _beside(out) == []  # the dead export's partial and lock file are gone


@pytest.mark.slow
def test_sigterm_stops_an_export_and_leaves_nothing(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = _start_export(checkpoint("sd1"), out)
    _wait_for_partial(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert b"error: export stopped (SIGTERM)" in stderr and b"Traceback" not in stderr
    assert not out.exists() and _beside(out) == []
