"""Atomic writes: build beside the target, rename into place, leave nothing behind on failure.

A reader sees the old target or the new one, never half of either: an interrupted export, engine build, graph cache,
training stage or PNG leaves at most a hidden `.NAME.partial-*` that the next run does not mistake for the real
thing. Standard library only, so every stage (and bench workers under other environments) can use it.

`exclusive(target)` is the one writer's lock: it also makes leftovers safe to clear. A writer killed outright
(SIGKILL, the OOM killer) cannot clean up, so its `.NAME.partial-*` would stay forever; but while a writer holds
the lock nobody else writes NAME, so any partial beside NAME that the new holder finds is dead and is removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Locked", "atomic_file", "atomic_files", "atomic_folder", "exclusive", "probe_write", "scratch_folder"]


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


class Locked(Exception):
    """Another process holds the lock on the target (`exclusive`)."""


@contextlib.contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold an OS lock on `target` (flock on `.NAME.lock` beside it) while the block runs, or raise Locked at
    once. Holding it, first clear what a killed writer left beside `target` (partials; a replaced folder that
    was moved aside and never put back is put back). The lock dies with its process, so staleness never
    depends on process ids, which are reused. Creates `target`'s parent folder if need be (an OSError if it
    cannot)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    fd = _acquire(lock)
    try:
        _clear_leftovers(target)
        yield
    finally:
        # Unlinked while still held: a process that opened the old file re-checks the inode and retries.
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path) -> int:
    import fcntl  # POSIX only; imported here so that atomic writes still import elsewhere

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Locked(f"{lock} is held") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            held, now = os.fstat(fd), os.stat(lock)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file its last holder had already unlinked: lock the one at the path now


def _clear_leftovers(target: Path) -> None:
    name = re.escape(target.name)
    partial = re.compile(rf"\.{name}\.partial-\d+-[0-9a-f]{{6}}")
    old = re.compile(rf"\.{name}\.old-\d+-[0-9a-f]{{6}}")
    for path in sorted(target.parent.iterdir()):
        if partial.fullmatch(path.name):
            _remove(path)
        elif old.fullmatch(path.name):
            if target.exists() or target.is_symlink():
                _remove(path)  # killed after the new folder was in place: the old one is garbage
            else:
                path.rename(target)  # killed between the two renames: the old folder is all there is


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def scratch_folder(beside: str | os.PathLike) -> Iterator[Path]:
    """An empty working folder named as a partial of `beside` (so `exclusive` clears it if its writer is
    killed), removed when the block ends."""
    folder = _partial(Path(beside), keep_suffix=False)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
