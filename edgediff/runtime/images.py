"""Between arrays and pictures: decoded samples -> PIL, init images -> VAE input, PNGs with their parameters."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..atomic import atomic_file, atomic_files, probe_write

# an init image: a path, a PIL image, or an (H, W, 3) array in 0..1
ImageSource = str | os.PathLike[str] | Image.Image | np.ndarray


class ImageInputError(ValueError):
    """An init image that cannot be used."""


class OutputError(ValueError):
    """A PNG path that cannot be written (a folder, a device, a read-only place, a full disk)."""


def decoded_to_unit(sample: np.ndarray) -> np.ndarray:
    """VAE output (N, 3, H, W) in about -1..1 -> (N, H, W, 3) float32 in 0..1, as diffusers post-processes."""
    unit: np.ndarray = np.clip(sample / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32, copy=False)
    return unit


def unit_to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


def load_image(source: ImageSource) -> Image.Image:
    """An init image from a path, a PIL image or an (H, W, 3) array in 0..1; ImageInputError if unreadable."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3:
            raise ImageInputError(f"init image array has shape {source.shape}; expected (H, W, 3) in 0..1")
        return unit_to_pil(source[None].astype(np.float32))[0]
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; an image that large is refused all the same
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                rgb: Image.Image = im.convert("RGB")  # Image.open's context manager is untyped
                return rgb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError(f"{source}: the init image has more than {Image.MAX_IMAGE_PIXELS:,} pixels, too many "
                              "to decode safely (a decompression bomb, or a photo far larger than any render "
                              "size); resize it first") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ImageInputError(f"{source}: cannot read the init image ({e})") from None


def pil_to_vae_input(image: Image.Image, width: int, height: int) -> np.ndarray:
    """An RGB image resized to the render size -> (1, 3, H, W) float32 in -1..1 (diffusers' preprocessing)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    sample: np.ndarray = (arr * 2 - 1).transpose(2, 0, 1)[None].copy()
    return sample


def write_png(image: Image.Image, path: str | os.PathLike[str] | BinaryIO, parameters: str) -> None:
    """Write a PNG carrying the generation parameters in a `parameters` text chunk (as A1111-style tools read),
    in place: for a path that atomic_file / atomic_files handed out, or into a file object (a batch render's
    worker sends the bytes to the process that writes them)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path if hasattr(path, "write") else Path(path), format="PNG", pnginfo=info)


def save_png(image: Image.Image, path: str | os.PathLike[str], parameters: str) -> None:
    """write_png through a temporary file: a failed write leaves an existing PNG at `path` as it was."""
    with atomic_file(path) as tmp:
        write_png(image, tmp, parameters)


def check_png_targets(paths: Sequence[Path]) -> None:
    """Refuse (OutputError) PNG paths that a write would fail on, before the slow render rather than after it."""
    for path in paths:
        if not path.name or "\x00" in os.fspath(path):
            raise OutputError(f"{os.fspath(path)!r} is not a file name; give a PNG path, e.g. out.png")
        try:
            _check_target(path)
        except OSError as e:
            raise OutputError(f"{path}: cannot write there ({e.strerror or e}); choose another path") from None


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name, e.g. {path / 'out.png'}")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: not a regular file (a device or a pipe?); give a PNG path, e.g. out.png")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the render creates the missing folders: probe the nearest one that exists
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is a file, not a folder; choose another path")
    probe_write(folder / path.name)


def save_pngs(images: Sequence[Image.Image], paths: Sequence[Path], parameters: str) -> None:
    """write_png for each image, all or none: on a full disk (or any write error) every existing file at `paths`
    is left as it was, and the error is an OutputError line."""
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_files(list(paths)) as temps:
            for im, tmp in zip(images, temps, strict=True):
                write_png(im, tmp, parameters)
    except OSError as e:
        where = paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"
        raise OutputError(f"{where}: cannot write the PNG ({e.strerror or e}); existing files there are unchanged"
                          ) from None
