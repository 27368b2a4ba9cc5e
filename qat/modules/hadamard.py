"""Hadamard and random orthogonal matrices for rotations, and a fast Walsh-Hadamard apply.

Every size the models have is built, not tabled: n = m * 2^k with the power-of-two part by Sylvester's
construction and the odd part m from Paley's constructions (Paley I: q + 1 for a prime q = 3 mod 4, e.g. 12, 20,
44; Paley II: 2(q + 1) for a prime q = 1 mod 4, e.g. 12, 28, 36), joined by a Kronecker product
H_n = H_m (x) H_{2^k}. SmolLM2's hidden 576 is H36 (x) H16, its MLP 1536 is H12 (x) H128.

Convention: a rotation Q acts on the last dimension as x @ Q; every matrix here is orthogonal (normalised by
1/sqrt(n)), so the inverse is x @ Q.T.

    H = hadamard(576)                                  # [576, 576], H @ H.T == I
    y = hadamard_apply(x, 576)                         # == x @ hadamard(576), in O(n log n) for the 2^k part
    R = random_hadamard(576, seed=0)                   # diag(+-1) @ H
    R = random_orthogonal(64, seed=0)                  # QR of a Gaussian
"""
from __future__ import annotations

import functools
import math

import torch

from qat.formats.common import divide

ROTATION_KINDS = ("hadamard", "random_hadamard", "random_orthogonal")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Hadamard of order q + 1 for a prime q = 3 mod 4: I + [[0, 1], [-1, Q]] (skew)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Hadamard of order 2(q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _construction(m: int) -> str | None:
    """Which construction gives a Hadamard of order m ("one", "paley1", "paley2"), None when none does."""
    if m == 1:
        return "one"
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def split_size(n: int) -> tuple[int, int]:
    """(m, p): n = m * p with p the largest power of two for which Paley gives a Hadamard of order m.

    Raises:
        ValueError: n for which neither construction gives a Hadamard matrix (naming n).
    Example:
        >>> split_size(576)
        (36, 16)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"hadamard size {n!r}; must be a positive integer")
    p = n & -n
    while p >= 1:
        if _construction(n // p) is not None:
            return n // p, p
        p //= 2
    raise ValueError(f"no Hadamard matrix of size {n} is built here: {n} = m * 2^k needs m = 1, q + 1 "
                     f"(q prime = 3 mod 4) or 2(q + 1) (q prime = 1 mod 4); use random_orthogonal for this size")


@functools.lru_cache(maxsize=64)
def _small(m: int) -> torch.Tensor:
    """The unnormalised +-1 Hadamard of order m (m from `split_size`)."""
    kind = _construction(m)
    if kind == "one":
        return torch.ones(1, 1, dtype=torch.float64)
    return _paley1(m - 1) if kind == "paley1" else _paley2(m // 2 - 1)


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order n, H_m (x) H_{2^k} / sqrt(n) (Sylvester's for a power of two,
    which is llama.cpp's `ggml_gen_hadamard`).

    Raises:
        ValueError: as `split_size`.
    Example:
        >>> torch.allclose(hadamard(12) @ hadamard(12).T, torch.eye(12, dtype=torch.float64))
        True
    """
    m, p = split_size(n)
    return (torch.kron(_small(m), _sylvester(p)) / math.sqrt(n)).to(dtype)  # exact: built on the CPU


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dimension (a power of two): x @ H_sylvester."""
    n = x.shape[-1]
    shape, h = x.shape, 1
    while h < n:
        x = x.reshape(*shape[:-1], n // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(shape)


def hadamard_apply(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ hadamard(n) over the last dimension of x, with the fast transform for the power-of-two factor and a
    dense [m, m] product for the rest. Differentiable; keeps x's dtype.

    Example:
        >>> x = torch.randn(3, 576); torch.allclose(hadamard_apply(x), x @ hadamard(576, x.dtype), atol=1e-5)
        True
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"hadamard_apply: last dimension {x.shape[-1]} is not the rotation size {n}")
    m, p = split_size(n)
    y = fwht(x.reshape(*x.shape[:-1], m, p))
    if m > 1:
        y = torch.einsum("...ib,ia->...ab", y, _small(m).to(dtype=x.dtype, device=x.device))
    return divide(y, math.sqrt(n)).reshape(x.shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1 values from `seed` (float64), drawn from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diag(s) @ hadamard(n) with s random +-1 from `seed` (QuaRot's randomised Hadamard)."""
    return (random_signs(n, seed)[:, None] * hadamard(n)).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal matrix: Q of the QR of a Gaussian from `seed`, column signs fixed by R's diagonal."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)


def rotation_matrix(kind: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The [n, n] orthogonal matrix of `kind` ("hadamard", "random_hadamard", "random_orthogonal").

    Raises:
        ValueError: an unknown kind (listing the known ones), or a size without a Hadamard matrix.
    """
    if kind == "hadamard":
        return hadamard(n, dtype)
    if kind == "random_hadamard":
        return random_hadamard(n, seed, dtype)
    if kind == "random_orthogonal":
        return random_orthogonal(n, seed, dtype)
    raise ValueError(f"rotation kind {kind!r}; choose from {list(ROTATION_KINDS)}")


def block_hadamard_apply(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block, ..., H_block) over the last dimension (llama.cpp's `llama_mul_mat_hadamard`,
    which views each row as chunks of `block` values and multiplies each by the same normalised Sylvester H)."""
    if x.shape[-1] % block:
        raise ValueError(f"block Hadamard: last dimension {x.shape[-1]} is not a multiple of {block}")
    return hadamard_apply(x.reshape(*x.shape[:-1], x.shape[-1] // block, block), block).reshape(x.shape)
