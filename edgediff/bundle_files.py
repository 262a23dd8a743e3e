"""A bundle's files: every path confined to the bundle folder, and each file checked against its manifest entry
by size and a fast fingerprint, or by its full sha256.

Standard library only, like bundle.py, which reads the manifest these checks take.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .records import BundleError, FileEntry

if TYPE_CHECKING:
    from .bundle import Manifest

_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_CHUNK = 4096
_HASH_BLOCK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def fingerprint_file(path: Path) -> str:
    """A cheap stand-in for the full hash: the size and 16 chunks spread over the file, head and tail included.

    Hashing a 5 GB bundle at every load would cost seconds; this reads 64 KiB and still catches truncation,
    swapped files and most corruption. `edgediff info --verify` does the full sha256.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        span = max(size - _FINGERPRINT_CHUNK, 0)
        for i in range(_FINGERPRINT_SAMPLES):
            f.seek(span * i // (_FINGERPRINT_SAMPLES - 1))
            h.update(f.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()


def check_confined(root: str | os.PathLike[str], manifest: Manifest, *, allow_symlinks: bool = False) -> None:
    """Every path the manifest names resolves inside the bundle folder, symbolic links followed. The paths are
    already relative and free of `..` (records.py), so only a link can lead out: a bundle laid out as a hub cache
    lays files out (links into a blob store) is refused unless the caller opts in with `allow_symlinks`."""
    root = Path(root)
    base = root.resolve()
    for rel in manifest.all_paths():
        path = root / rel
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as e:  # a loop of links
            raise BundleError(f"{path}: cannot resolve it ({e}); re-export the bundle") from None
        if allow_symlinks or resolved == base or base in resolved.parents:
            continue
        raise BundleError(
            f"{path}: a symbolic link to {resolved}, outside the bundle; copy the bundle with the files themselves "
            "(`cp -rL SRC DST`) or, if you trust where it points, pass --allow-symlinks (allow_symlinks=True)"
        )


def check_files(root: str | os.PathLike[str], manifest: Manifest, *, full: bool = False) -> None:
    """Check every file the manifest lists: present, right size, right fingerprint (or full sha256 when `full`)."""
    root = Path(root)
    for entry in manifest.all_files():
        path = root / entry.path
        try:
            _check_file(path, entry, full)
        except OSError as e:  # unreadable, or a name the file system refuses
            raise BundleError(f"{path}: cannot read it ({e.strerror or e}); re-export the bundle") from None


def _check_file(path: Path, entry: FileEntry, full: bool) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: missing bundle file; re-export the bundle")
    size = path.stat().st_size
    if size != entry.size:
        raise BundleError(
            f"{path}: {size} bytes, the manifest says {entry.size} (truncated or replaced); re-export the bundle"
        )
    if full:
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{path}: sha256 differs from the manifest (corrupt); re-export the bundle")
    elif fingerprint_file(path) != entry.fingerprint:
        raise BundleError(f"{path}: contents differ from the manifest (corrupt); re-export the bundle")
