"""Tiled VAE decode and encode: a large image in overlapping tiles, blended, so that the VAE's activation memory is
that of one tile whatever the image size.

The VAE's convolutions see only a few pixels around each output, so a tile's interior is what the whole-image pass
computes there; what differs is its GroupNorms, whose statistics are taken over the tile rather than the whole
image, and the mid-block's attention, which sees only the tile. Overlapping tiles cross-faded over the overlap hide
the seams; the remaining error against the whole-image pass is measured in docs/tiling.md.

The functions are pure: `tiled(fn, x, tile, overlap, up, down)` runs `fn` on tiles of `x` (N, C, H, W), where
`fn` maps an (h, w) input to an (h * up / down, w * up / down) output (the decoder: up 8; the encoder: down 8),
and blends the outputs by weights that ramp linearly across each overlap and sum to 1 everywhere.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

VAE_TILING = ("auto", "on", "off")
# Overlap between neighbouring tiles, as a fraction of the tile (diffusers' AutoencoderKL tiling uses a quarter too)
OVERLAP = 0.25
# "auto" tiles an image of at least this many times the model's native pixel count, and never below AUTO_MIN_PIXELS:
# a tile smaller than 512² is too small for a VAE's GroupNorm statistics (the built-in model's 32² tiles read
# 12.9 dB against its whole-image decode; docs/tiling.md)
AUTO_AREA = 4
AUTO_MIN_PIXELS = 1024 * 1024


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, length), neighbours overlapping by at least `overlap`; the last
    tile ends at `length` (it may overlap its neighbour by more)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def ramp(size: int, before: int, after: int) -> np.ndarray:
    """Weights along one axis of a tile of `size`: rising linearly over the first `before` samples and falling over
    the last `after`, 1 elsewhere (0 overlap at an image border: weight 1 up to the edge)."""
    w = np.ones(size, np.float32)
    if before:
        w[:before] = (np.arange(before, dtype=np.float32) + 0.5) / before
    if after:
        w[size - after:] = np.minimum(w[size - after:], (np.arange(after, 0, -1, dtype=np.float32) - 0.5) / after)
    return w


def _overlaps(starts: list[int], tile: int) -> list[tuple[int, int]]:
    """For each tile, how far it overlaps its neighbour before and after it (0 at the image's borders)."""
    result = []
    for i, s in enumerate(starts):
        before = starts[i - 1] + tile - s if i > 0 else 0
        after = s + tile - starts[i + 1] if i + 1 < len(starts) else 0
        result.append((before, after))
    return result


def tiled(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile: int, overlap: int, *, up: int = 1,
          down: int = 1) -> np.ndarray:
    """`fn(x)` computed tile by tile (tiles of tile x tile input pixels) and blended; see the module docstring.
    Tile sizes and offsets must be multiples of `down`."""
    n, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    rows, cols = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out: np.ndarray | None = None
    weight = np.zeros((h * up // down, w * up // down), np.float32)
    for r, (rb, ra) in zip(rows, _overlaps(rows, th)):
        wr = ramp(th * up // down, rb * up // down, ra * up // down)
        for c, (cb, ca) in zip(cols, _overlaps(cols, tw)):
            y = fn(np.ascontiguousarray(x[:, :, r:r + th, c:c + tw]))
            if out is None:
                out = np.zeros((n, y.shape[1], *weight.shape), np.float32)
            wt = np.outer(wr, ramp(tw * up // down, cb * up // down, ca * up // down))
            oy, ox = r * up // down, c * up // down
            out[:, :, oy:oy + y.shape[2], ox:ox + y.shape[3]] += y * wt
            weight[oy:oy + y.shape[2], ox:ox + y.shape[3]] += wt
    assert out is not None
    out /= weight
    return out


def latent_tile(native_latent: int) -> tuple[int, int]:
    """(tile, overlap) in latent pixels for a model whose native image is `native_latent` latents on a side: one
    native image a tile, a quarter of it overlapping."""
    tile = max(1, native_latent)
    return tile, max(1, int(tile * OVERLAP))


def choose_tile(mode: str, height: int, width: int, native: tuple[int, int], down: int,
                fits: Callable[[], bool]) -> int | None:
    """The tile side in latent pixels for an image of height x width pixels, or None for one pass: by `mode`
    (VAE_TILING), for "auto" whether the image is AUTO_AREA x the `native` (height, width) pixel count or more (and
    AUTO_MIN_PIXELS), or the whole-image pass does not `fits()`."""
    tile, _ = latent_tile(min(native) // down)
    if mode == "off" or (height // down <= tile and width // down <= tile):
        return None
    large = height * width >= max(AUTO_AREA * native[0] * native[1], AUTO_MIN_PIXELS)
    return tile if mode == "on" or large or not fits() else None


def vae_pass(session: Any, feed: str, output: str, x: np.ndarray, tile: int | None, *, up: int = 1,
             down: int = 1) -> np.ndarray:
    """`session(feed=x)[output]` on the whole of `x`, or with `tile` (latent pixels) in overlapping tiles; the
    decoder scales by `up`, the encoder by 1 / `down`."""
    def run(part: np.ndarray) -> np.ndarray:
        result: np.ndarray = session(**{feed: part})[output]
        return result

    if tile is None:
        return run(x)
    overlap = latent_tile(tile)[1]
    return tiled(run, x, tile * down, overlap * down, up=up, down=down)
