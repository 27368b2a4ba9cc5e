"""Hadamard matrices of every size the models have, random Hadamard / orthogonal, and the fast apply."""
from __future__ import annotations

import pytest
import torch

from qat.modules.hadamard import (block_hadamard_apply, fwht, hadamard, hadamard_apply, random_hadamard,
                                  random_orthogonal, rotation_matrix, split_size)

# powers of two, Paley I / II bases (12, 20, 28, 36), and model sizes: SmolLM2 hidden 576 / MLP 1536 / head 64,
# Llama hidden 4096 / MLP 11008 (= 43 * 256), Qwen2.5-0.5B hidden 896 (= 28 * 32) / MLP 4864 (= 76 * 64)
SIZES = (1, 2, 4, 12, 20, 28, 32, 36, 64, 128, 576, 896, 1536)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


@pytest.mark.parametrize("n", (64, 576, 896, 1536))
def test_fast_apply_equals_the_dense_product(n):
    x = torch.randn(3, 5, n)
    assert torch.allclose(hadamard_apply(x), x @ hadamard(n, torch.float32), atol=1e-5)
    x64 = x.double()
    assert torch.allclose(hadamard_apply(x64), x64 @ hadamard(n), atol=1e-12)


def test_split_sizes_and_refusal():
    assert split_size(576) == (36, 16) and split_size(1536) == (12, 128) and split_size(64) == (1, 64)
    assert split_size(4864) == (76, 64) and split_size(14336) == (28, 512) and split_size(11008) == (5504, 2)
    with pytest.raises(ValueError, match="no Hadamard matrix of size 18"):
        hadamard(18)


def test_sylvester_is_llama_cpps_matrix():
    """ggml_gen_hadamard: data[0] = 1/sqrt(n); blocks [[v, v], [v, -v]] doubled up to n: symmetric, H @ H = I."""
    h = hadamard(64)
    assert torch.equal(h, h.T) and torch.allclose(h @ h, torch.eye(64, dtype=torch.float64))
    assert torch.allclose(fwht(torch.eye(64, dtype=torch.float64)) / 8, h)


def test_block_apply_is_block_diagonal():
    x = torch.randn(2, 128, dtype=torch.float64)
    dense = torch.block_diag(hadamard(64), hadamard(64))
    assert torch.allclose(block_hadamard_apply(x, 64), x @ dense)


@pytest.mark.parametrize("kind", ("random_hadamard", "random_orthogonal"))
def test_random_rotations_are_orthogonal_and_seeded(kind):
    a, b, c = (rotation_matrix(kind, 36, seed=s) for s in (0, 0, 1))
    assert torch.allclose(a @ a.T, torch.eye(36, dtype=torch.float64), atol=1e-10)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="choose from"):
        rotation_matrix("givens", 4)


def test_random_hadamard_is_signed_rows():
    r = random_hadamard(12, seed=3)
    assert torch.allclose(r.abs(), hadamard(12).abs()) and not torch.equal(r, hadamard(12))
    assert random_orthogonal(8).dtype == torch.float64
