"""Hadamard matrices and the randomized Hadamard rotations QuaRot uses, as pure tensor functions.

A Hadamard matrix H_n (entries ±1, H Hᵀ = n·I) exists for n = 1, 2 and (conjecturally) every multiple of 4.
We build the orders LLM widths need from two constructions and Kronecker products (H_a ⊗ H_b = H_ab):
  Sylvester   H_2k = [[H_k, H_k], [H_k, −H_k]]                       n a power of two
  Paley I     for a prime q ≡ 3 (mod 4): with χ the quadratic character mod q, Q_ij = χ(j − i) and
              S = [[0, 1ᵀ], [−1, Q]] (skew-symmetric), H = I + S     n = q + 1 (12, 20, 24, 32, 44, 48, 60, …)
e.g. 576 = 12·48 (SmolLM2's hidden size), 1536 = 12·128, 11008 = 44·256, 14336 = 224·64. An order these do not
reach (Paley II, prime powers and the Williamson orders are not implemented) falls back to a random orthogonal matrix (QR of
a Gaussian), which rotates as well but spreads outliers less evenly (reported).

The rotation is R = H_n·diag(σ)/√n with random signs σ (seeded): orthogonal, and it spreads any single outlier
channel evenly over all n channels (|R_ij| = 1/√n).
"""

from __future__ import annotations

import functools

import torch


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def paley(q: int) -> torch.Tensor:
    """Paley construction I of order q + 1 for a prime q ≡ 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in residues else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = chi[idx]
    return torch.eye(q + 1, dtype=torch.float64) + s


@functools.lru_cache(maxsize=32)
def _factors(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) with H_n = A ⊗ B, both Hadamard: a power of two splits into two Sylvester halves (H_2 ⊗ … ⊗ H_2
    regrouped), any other order into its Paley factor and the cofactor's matrix."""
    if n & (n - 1) == 0:
        half = 1 << (n.bit_length() - 1) // 2
        return sylvester(half), sylvester(n // half)
    if n % 4:
        return None
    # a Paley factor m = q + 1 dividing n (largest first: fewer factors), times a buildable cofactor
    for m in range(n, 3, -4):
        if n % m == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            rest = _hadamard(n // m)
            if rest is not None:
                return paley(m - 1), rest
    return None


@functools.lru_cache(maxsize=32)
def _hadamard(n: int) -> torch.Tensor | None:
    f = _factors(n)
    return None if f is None else torch.kron(*f)


def normalized_hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A/√a, B/√b) with H_n/√n = (A/√a) ⊗ (B/√b): the online transform as two small products per token
    (x·(A ⊗ B) = vec(Aᵀ·X·B), n·(a + b) multiply-adds instead of n²); None when no H_n is built."""
    f = _factors(n)
    return None if f is None else (f[0] / f[0].shape[0] ** 0.5, f[1] / f[1].shape[0] ** 0.5)


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (float64), or None when the constructions above do not reach n."""
    h = _hadamard(n)
    return None if h is None else h.clone()


def random_hadamard(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(R, kind): an n×n orthogonal rotation in float64, H_n·diag(σ)/√n with seeded random signs, or a seeded
    random orthogonal matrix where no Hadamard matrix of order n is built (kind says which)."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :], "random-orthogonal"
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return h * signs[None, :] / n**0.5, "hadamard"


def normalized_hadamard(n: int) -> torch.Tensor | None:
    """H_n / √n (orthogonal), the online transform before down_proj; None when no H_n is built."""
    h = hadamard(n)
    return None if h is None else h / n**0.5
