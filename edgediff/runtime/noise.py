"""Seeded Gaussian noise for the sampler loop.

Why a torch-compatible stream: diffusers draws the initial latents, and the per-step noise of stochastic samplers,
from ``torch.Generator().manual_seed(seed)`` on the CPU by default. To render the same image as diffusers for the
same seed, the runtime has to reproduce that stream without importing torch. :class:`TorchNoise` does so from
torch's own recipe (``aten/src/ATen/native/cpu/DistributionTemplates.h``, ``core/DistributionsHelper.h``,
``core/MT19937RNGEngine.h``):

* ``manual_seed`` keeps the low 32 bits of the 64-bit seed and runs the reference mt19937 ``init_genrand``; NumPy's
  ``MT19937`` bit generator then yields the same 32-bit words, in bulk.
* ``randn`` of at least 16 float32 elements turns every word into a float uniform ``(w & 0xFFFFFF) / 2**24`` and
  applies Box-Muller to blocks of 16 (cosines in the first 8 slots, sines in the last 8). When ``numel % 16 != 0``,
  16 *fresh* uniforms are drawn and the last 16 outputs are recomputed from them, overwriting part of the last
  full block.
* ``randn`` of fewer than 16 elements takes the scalar ``normal_distribution<double>`` path: two 64-bit draws (two
  words each, 53-bit uniforms) per pair of normals, rounded to float32. The spare sine is cached *in the generator*
  and survives across calls, including across calls of 16 or more elements, which never touch it.

Not matched: torch's CUDA generator (Philox, a different stream altogether) and dtypes other than float32.

The result equals torch within about 1e-6, not bitwise: torch's x86-64 builds on AVX2 and AVX-512 CPUs run the
blocks through the ``avx_mathfun`` polynomials for log and sincos (compiled with fused multiply-adds), other builds
(aarch64 and Apple silicon among them) through ``std::log``/``std::cos`` with the angle rounded from double; NumPy's
float32 transcendental functions round differently from both, by a float32 ulp or so. The two torch builds also
disagree with each other by up to ~2e-6, mostly through the angle's rounding, so ``TorchNoise`` takes
``kernel="avx2"`` (the default) or ``kernel="scalar"`` to say which one to follow.

:class:`NumpyNoise` is the plain choice when parity with diffusers does not matter.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["NOISE_KINDS", "BatchNoise", "NumpyNoise", "TorchNoise", "make_noise"]

# The noise sources a render can draw from (`edgediff render --noise`), with what each means.
NOISE_KINDS: dict[str, str] = {
    "torch": "the seed draws what diffusers' torch CPU generator draws (same seed, same image)",
    "numpy": "NumPy's own generator",
}
TORCH_KERNELS = ("avx2", "scalar")

_FLOAT_MASK = 0xFFFFFF  # float32 uniforms keep the low 24 bits of a word
_FLOAT_SCALE = np.float32(2.0**-24)
_DOUBLE_SCALE = 2.0**-53
_BLOCK = 16  # torch's Box-Muller block; smaller tensors take the scalar path
_TWO_PI_F32 = np.float32(2.0 * math.pi)  # the AVX2 kernel multiplies by 2*pi already rounded to float32


def _shape_tuple(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    dims = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"noise shape {dims} has a negative dimension")
    return dims


def _mt19937_like_torch(seed: int) -> np.random.MT19937:
    """NumPy's MT19937 in the state torch's ``manual_seed(seed)`` leaves its engine in."""
    seed = operator.index(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64)")
    # torch stores the seed as uint64 and then seeds mt19937 from its low 32 bits (init_with_uint32).
    word = seed & 0xFFFFFFFF
    key = np.empty(624, dtype=np.uint32)
    for j in range(624):
        key[j] = word
        word = (1812433253 * (word ^ (word >> 30)) + j + 1) & 0xFFFFFFFF
    bits = np.random.MT19937(0)
    # pos 624 means "twist before the next word", which is where init_genrand leaves the reference engine.
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return bits


class TorchNoise:
    """The stream of ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` calls, float32, CPU.

    Successive :meth:`randn` calls continue one stream, as successive torch calls on one generator do.
    ``kernel`` picks which torch build to follow: ``"avx2"`` for x86-64 torch on CPUs with AVX2 or AVX-512
    (torch.backends.cpu.get_cpu_capability() says "AVX2" or "AVX512"), ``"scalar"`` for the rest.
    """

    def __init__(self, seed: int, *, kernel: str = "avx2") -> None:
        if kernel not in TORCH_KERNELS:
            raise ValueError(f"unknown torch noise kernel {kernel!r}; expected one of {', '.join(TORCH_KERNELS)}")
        self.seed = operator.index(seed)
        self.kernel = kernel
        self._bits = _mt19937_like_torch(self.seed)
        self._spare_normal: float | None = None  # torch's next_double_normal_sample

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        dims = _shape_tuple(shape)
        numel = math.prod(dims)
        if numel >= _BLOCK:
            flat = self._box_muller_fill(numel)
        else:
            flat = np.array([self._scalar_normal() for _ in range(numel)], dtype=np.float32)
        return flat.reshape(dims)

    def _float_uniforms(self, count: int) -> np.ndarray:
        words = self._bits.random_raw(count)
        np.bitwise_and(words, _FLOAT_MASK, out=words)
        uniforms = words.astype(np.float32)
        uniforms *= _FLOAT_SCALE  # exact: 24-bit integers over 2**24
        return uniforms

    def _box_muller_fill(self, numel: int) -> np.ndarray:
        full = numel - numel % _BLOCK
        tail = numel != full
        # One draw covers the numel uniforms torch writes first and, when needed, the 16 it draws for the tail.
        buf = self._float_uniforms(numel + _BLOCK if tail else numel)
        self._box_muller_blocks(buf[:full].reshape(-1, _BLOCK))
        if tail:
            fresh = buf[numel:].reshape(1, _BLOCK)
            self._box_muller_blocks(fresh)
            buf[numel - _BLOCK : numel] = fresh.ravel()
        return buf[:numel]

    def _box_muller_blocks(self, blocks: np.ndarray) -> None:
        """Box-Muller in place on rows of 16 uniforms: u1 from slots 0..7, angle from slots 8..15."""
        if blocks.size == 0:
            return
        low, high = blocks[:, :8], blocks[:, 8:]
        if self.kernel == "avx2":
            radius = np.log(np.float32(1.0) - low)  # 1 - u maps [0, 1) to (0, 1]
            theta = high * _TWO_PI_F32
            cos, sin = np.cos(theta), np.sin(theta)
        else:
            # std::logf/cosf/sinf are (nearly always) correctly rounded: float64 rounded to float32 follows them
            # closer than NumPy's float32 loops. The angle `2.0f * c10::pi<double> * u2` is a double product.
            radius = np.log(np.float32(1.0) - low, dtype=np.float64).astype(np.float32)
            theta = (high.astype(np.float64) * (2.0 * math.pi)).astype(np.float32).astype(np.float64)
            cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        radius *= np.float32(-2.0)
        np.sqrt(radius, out=radius)
        np.multiply(radius, cos, out=low)
        np.multiply(radius, sin, out=high)

    def _scalar_normal(self) -> float:
        """One draw of torch's ``normal_distribution<double>`` with its cached spare sine."""
        if self._spare_normal is not None:
            value, self._spare_normal = self._spare_normal, None
            return value
        hi1, lo1, hi2, lo2 = (int(w) for w in self._bits.random_raw(4))
        # random64() is (first word << 32) | second word; a double uniform keeps its low 53 bits.
        u1 = ((hi1 & 0x1FFFFF) << 32 | lo1) * _DOUBLE_SCALE
        u2 = ((hi2 & 0x1FFFFF) << 32 | lo2) * _DOUBLE_SCALE
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._spare_normal = radius * math.sin(theta)
        return radius * math.cos(theta)


class NumpyNoise:
    """Noise from NumPy's default generator (PCG64): fast and reproducible, but not diffusers' stream."""

    def __init__(self, seed: int) -> None:
        self.seed = operator.index(seed)
        self._rng = np.random.default_rng(self.seed)

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        return self._rng.standard_normal(_shape_tuple(shape), dtype=np.float32)


class BatchNoise:
    """One batch drawn from several streams: each item's slice of axis 0 (``counts[i]`` rows) comes from its own
    source, shaped as that item's render alone would draw it. A server batching requests with their own seeds
    thus gives each the images it would get rendered by itself, through stochastic samplers (LCM, Euler a) too,
    which draw fresh noise every step."""

    def __init__(self, sources: Sequence[TorchNoise | NumpyNoise], counts: Sequence[int]) -> None:
        if len(sources) != len(counts) or not sources or min(counts) < 1:
            raise ValueError("BatchNoise needs one source per item and a positive row count for each")
        self.sources = list(sources)
        self.counts = [operator.index(c) for c in counts]

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        dims = _shape_tuple(shape)
        if not dims or dims[0] != sum(self.counts):
            raise ValueError(f"noise shape {dims} does not split into items of {self.counts} rows")
        parts = [source.randn((count, *dims[1:])) for source, count in zip(self.sources, self.counts)]
        return np.concatenate(parts).astype(np.float32, copy=False)


NoiseSource = TorchNoise | NumpyNoise | BatchNoise


def make_noise(seed: int, kind: str = "torch") -> TorchNoise | NumpyNoise:
    """A noise source for ``seed``: ``"torch"`` for diffusers parity, ``"numpy"`` for NumPy's own generator."""
    if kind == "torch":
        return TorchNoise(seed)
    if kind == "numpy":
        return NumpyNoise(seed)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(repr(k) for k in NOISE_KINDS)}")
