"""Atomic writes: build beside the target, rename into place, leave nothing behind on failure.

A reader sees the old target or the new one, never half of either: an interrupted export, engine build, graph cache,
training stage or PNG leaves at most a hidden `.NAME.partial-*` that the next run does not mistake for the real
thing. Standard library only, so every stage (and bench workers under other environments) can use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_files", "atomic_folder", "probe_write"]


def _partial(target: Path, *, keep_suffix: bool = True) -> Path:
    # A file's suffix is kept last: writers that pick a format from it (PIL, NumPy, matplotlib) still see .png /
    # .npy. A folder's name is kept whole (graph cache keys hold dots).
    stem, suffix = (target.stem, target.suffix) if keep_suffix else (target.name, "")
    return target.with_name(f".{stem}.partial-{os.getpid()}-{secrets.token_hex(3)}{suffix}")


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; when the block ends, rename it to `target`.

    An existing `target` raises FileExistsError (and the new folder is dropped) unless `replace`: then the old
    folder is moved aside first and removed only once the new one is in place. On any failure the new folder is
    removed and the exception goes on."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(target, keep_suffix=False)
    tmp.mkdir()
    try:
        yield tmp
        _rename_folder(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_folder(tmp: Path, target: Path, replace: bool) -> None:
    old = None
    if target.exists():
        if not replace:
            raise FileExistsError(f"{target} already exists")
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)  # put the old one back: a failed replace loses nothing
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(targets: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield one temporary path beside each target to write; when the block ends, sync them all and rename each
    into place. A failure before the renames leaves every target as it was and no temporary file behind, so a
    set of files is written all or none (short of a rename failing midway, which a full disk cannot cause)."""
    paths = [Path(t) for t in targets]
    temps = [_partial(p) for p in paths]
    try:
        yield temps
        for tmp in temps:
            _sync(tmp)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write (by path or by open()); when the block ends, sync it and
    rename it over `target`. On failure `target` is untouched and the temporary file removed."""
    with atomic_files([target]) as (tmp,):
        yield tmp


def probe_write(target: str | os.PathLike) -> None:
    """Create and remove the temporary file a write of `target` would start with; OSError where that fails (a
    read-only folder or mount, no permission, a name too long), so a caller can refuse before the slow work."""
    tmp = _partial(Path(target))
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    tmp.unlink()


def _sync(path: Path) -> None:
    # Without fsync, a crash soon after the rename can leave the new name pointing at an empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
