"""Seeded noise: TorchNoise against torch's CPU generator, NumpyNoise, make_noise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgediff.runtime.noise import NumpyNoise, TorchNoise, make_noise

torch = pytest.importorskip("torch")

ATOL = 1e-6
REPO = Path(__file__).resolve().parents[1]

# Around the 16-element switch between torch's scalar and block paths, around whole blocks, and one
# 624-word Mersenne Twister refill and many.
SHAPES = [(), 0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 100, 624, 625, (1, 4, 8, 8), (2, 4, 64, 64), 10**6]
SEEDS = [0, 1, 42, 2**32 + 5, 2**63 - 1, 2**64 - 1, -7]


def native_kernel() -> str:
    """Which Box-Muller kernel the torch under test runs (normal_stub never dispatches to AVX-512 code)."""
    return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "scalar"


def torch_randn(shape, seed: int) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_randn(shape, seed):
    expected = torch_randn(shape, seed)
    got = TorchNoise(seed, kernel=native_kernel()).randn(shape)
    assert got.dtype == np.float32
    assert got.flags.c_contiguous
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_default_kernel_is_avx2():
    assert TorchNoise(3).kernel == "avx2"
    np.testing.assert_array_equal(TorchNoise(3).randn(100), TorchNoise(3, kernel="avx2").randn(100))


# Sizes below 16 leave a cached spare normal in the generator that the next small draw uses, even after
# block draws in between, which do not touch it; uneven sizes recompute a tail block from fresh words.
STREAM = [1, 16, 1, 3, 17, 2, 5, (4, 4), 40, 1, 1, 15, 7, (1, 4, 8, 8), 1, 1000, 1, 2, 33, 6]


@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 3])
def test_successive_draws_follow_one_torch_generator(seed):
    generator = torch.Generator().manual_seed(seed)
    noise = TorchNoise(seed, kernel=native_kernel())
    for shape in STREAM:
        expected = torch.randn(shape, generator=generator).numpy()
        np.testing.assert_allclose(noise.randn(shape), expected, rtol=0, atol=ATOL, err_msg=f"draw of {shape}")


def test_other_torch_kernel_in_a_subprocess(tmp_path):
    """ATEN_CPU_CAPABILITY=default makes this torch run the scalar kernel that aarch64 builds use."""
    if native_kernel() != "avx2":
        pytest.skip("the AVX2 kernel cannot be forced on this CPU")
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        g = torch.Generator().manual_seed(5)
        for i, shape in enumerate({STREAM + [10**5]!r}):
            np.save(r"{tmp_path}/draw%d.npy" % i, torch.randn(shape, generator=g).numpy())
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    noise = TorchNoise(5, kernel="scalar")
    for i, shape in enumerate(STREAM + [10**5]):
        expected = np.load(tmp_path / f"draw{i}.npy")
        np.testing.assert_allclose(noise.randn(shape), expected, rtol=0, atol=ATOL, err_msg=f"draw of {shape}")


def test_noise_module_works_without_torch():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from edgediff.runtime.noise import make_noise
        assert make_noise(1).randn((1, 4, 8, 8)).shape == (1, 4, 8, 8)
        assert make_noise(1, "numpy").randn(3).shape == (3,)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)


def test_numpy_noise_is_deterministic():
    first, second = NumpyNoise(7), NumpyNoise(7)
    a, b = first.randn((2, 4, 8, 8)), second.randn((2, 4, 8, 8))
    assert a.dtype == np.float32 and a.shape == (2, 4, 8, 8) and a.flags.c_contiguous
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.randn(5), second.randn(5))
    assert not np.array_equal(first.randn(16), NumpyNoise(8).randn(16))
    np.testing.assert_array_equal(NumpyNoise(7).randn(10), np.random.default_rng(7).standard_normal(10, np.float32))


def test_successive_draws_differ():
    for noise in (TorchNoise(0), NumpyNoise(0)):
        assert not np.array_equal(noise.randn(64), noise.randn(64))


def test_make_noise_kinds():
    assert isinstance(make_noise(3), TorchNoise)
    assert isinstance(make_noise(3, "torch"), TorchNoise)
    assert isinstance(make_noise(3, "numpy"), NumpyNoise)
    np.testing.assert_array_equal(make_noise(3).randn(20), TorchNoise(3).randn(20))


def test_make_noise_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'torch'.*'numpy'") as info:
        make_noise(3, "cuda")
    assert "cuda" in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        TorchNoise(0, kernel="avx512")
    with pytest.raises(ValueError, match="seed"):
        TorchNoise(2**64)
    with pytest.raises(ValueError, match="negative"):
        TorchNoise(0).randn((2, -1))
    with pytest.raises(TypeError):
        TorchNoise(0).randn(2.5)
