"""Checks an export makes before it loads anything: a bad argument or a damaged file is refused in one line within
a second, not after a minute of tracing, and the files it touches (SRC, an OUT that is not a bundle) stay as they
were. Also the lock that keeps two exports off one OUT.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..atomic import Locked, exclusive
from ..bundle import FORMAT
from ..lora_format import safetensors_problem
from .checkpoint import SourceError, read_json

MIN_OPSET = 17


def max_opset() -> int:
    """The newest opset both the TorchScript exporter (export/onnx.py uses it) and the installed onnx know."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    try:
        from torch.onnx import _constants  # private, hence the fallback to onnx's own limit

        return min(newest, int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET))
    except (ImportError, AttributeError):
        return newest


def check_opset(opset: int) -> None:
    newest = max_opset()
    if not MIN_OPSET <= opset <= newest:
        raise SourceError(f"--opset {opset}: choose {MIN_OPSET} to {newest} (the newest the installed torch "
                          "exporter and onnx support)")


def check_tiny_vae(folder: str | os.PathLike, latent_channels: int | None = None) -> None:
    """`folder` holds a saved AutoencoderTiny whose weights are whole (and, given `latent_channels`, whose latents
    are this model's)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"--tiny-vae {folder}: no such folder; pass a saved AutoencoderTiny (e.g. madebyollin/taesd)")
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder}: not an AutoencoderTiny folder (no config.json); pass e.g. a saved "
                          "madebyollin/taesd")
    config = read_json(folder / "config.json")
    kind = config.get("_class_name")
    if kind != "AutoencoderTiny":
        raise SourceError(f"--tiny-vae {folder}: its config is for {kind or 'no diffusers class'}, not an "
                          "AutoencoderTiny; pass e.g. a saved madebyollin/taesd")
    check_weights(folder)
    channels = config.get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise SourceError(f"{folder}: a tiny VAE for {channels}-channel latents; this model's have "
                          f"{latent_channels} (TAESD is for SD 1/2, TAESDXL for SDXL)")


def check_paths(src: str | os.PathLike, out: Path) -> None:
    """OUT may not be SRC, lie inside it, or hold it: replacing OUT would destroy the source. Symlinks are resolved
    first, so a link cannot hide the overlap."""
    source = Path(src)
    if not source.exists():
        return  # a hub id: downloaded into the hub's cache, which OUT cannot be asked to replace
    s, o = source.resolve(), out.resolve()
    if o == s:
        raise SourceError(f"{out}: OUT is the source itself; choose another OUT")
    if o.is_relative_to(s):
        raise SourceError(f"{out}: OUT lies inside the source {src}; choose an OUT outside it")
    if s.is_relative_to(o):
        raise SourceError(f"{out}: OUT holds the source {src}; choose an OUT that does not contain it")


def check_replaceable(out: Path, force: bool) -> None:
    """An existing OUT is replaced only with `force`, and only if it is an edgediff bundle or an empty folder:
    --force must never delete a checkpoint or a folder of someone's files."""
    if out.is_symlink():
        raise SourceError(f"{out}: OUT is a symbolic link; give the folder it points to, or another OUT")
    if not out.exists():
        return
    if not out.is_dir():
        raise SourceError(f"{out}: OUT is a file, not a bundle; choose another OUT")
    if not (_is_bundle(out) or not any(out.iterdir())):
        raise SourceError(f"{out}: OUT is a folder that is not an edgediff bundle (no manifest.json of format "
                          f"{FORMAT}); --force replaces only a bundle or an empty folder, so choose another OUT")
    if not force:
        raise SourceError(f"{out} already exists; pass --force to replace it")


def _is_bundle(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_weights(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """A .safetensors file whose header parses and whose tensors all lie within the file (lora_format.py)."""
    problem = safetensors_problem(path)
    if problem:
        raise SourceError(problem)


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Hold the lock for OUT (atomic.exclusive) for the whole export; stale partials beside OUT go first."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive(out))
        except Locked:
            raise SourceError(f"another export to {out} is running; wait for it to finish, or choose another "
                              "OUT") from None
        except OSError as e:
            raise SourceError(f"{out}: cannot write in {out.parent} ({e.strerror or e}); choose an OUT in a "
                              "folder you can write") from None
        yield
