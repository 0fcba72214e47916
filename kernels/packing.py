"""Storage layouts for quantized weights in our own artefact (the portable, canonical form).

int8 weights: int8 [N, K] (symmetric codes) or uint8 [N, K] (asymmetric codes with uint8 zero points).
int4 weights: uint8 [N, ceil(K / 2)], two unsigned codes u ∈ [0, 15] per byte, column 2i in the low
nibble and 2i+1 in the high nibble (the order MatMulNBits and compressed-tensors also use along K).
Symmetric int4 codes q ∈ [-8, 7] are stored as u = q + 8 (so the implicit zero point is 8).
"""

from __future__ import annotations

import torch


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes in [0, 15] -> uint8 [N, ceil(K/2)], low nibble first."""
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("pack_int4 expects unsigned 4-bit codes in [0, 15]")
    n, k = u.shape
    u = u.to(torch.uint8)
    if k % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> uint8 codes [N, K] in [0, 15]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def store_weight_codes(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """int32 codes from numerics.quantize_weight -> the storage tensor described above."""
    if bits == 4:
        return pack_int4(q + 8 if symmetric else q)
    return q.to(torch.int8 if symmetric else torch.uint8)


def load_weight_codes(stored: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Storage tensor -> unsigned-or-signed codes as float32, [N, K] (int4: unsigned 0..15)."""
    if bits == 4:
        return unpack_int4(stored, k).float()
    return stored.float()


def default_zero(bits: int) -> float:
    """The implicit zero point of symmetric storage (int4 is stored offset by +8)."""
    return 8.0 if bits == 4 else 0.0


def pack_int4_pairs(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Signed int4 codes -> int8 with codes 2i (low nibble) and 2i+1 (high nibble) of `dim` in one byte."""
    q = q.to(torch.int8)
    if q.shape[dim] % 2:
        raise ValueError(f"int4 packing needs an even size along dim {dim}, got {tuple(q.shape)}")
    lo, hi = q.unflatten(dim, (-1, 2)).unbind(dim + 1)
    return ((hi << 4) | (lo & 0x0F)).to(torch.int8)


def unpack_int4_pairs(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of pack_int4_pairs: int8 -> signed int4 codes (int8), size doubled along `dim`."""
    lo = ((packed << 4).to(torch.int8) >> 4)  # sign-extend the low nibble
    hi = packed >> 4  # arithmetic shift keeps the sign
    return torch.stack([lo, hi], dim=dim + 1).flatten(dim, dim + 1)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit values [R, C] (b divides 32) -> int32 [R, ceil(C·b/32)], element j of a row at bits
    b·(j mod 32/b) of word j // (32/b). Computed in int64 and wrapped to int32 (bit 31 is the sign bit)."""
    per_word = 32 // bits
    rows, cols = values.shape
    v = values.to(torch.int64)
    pad = (-cols) % per_word
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (v << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of pack_int32: int32 [R, W] -> the first `count` unsigned b-bit values of each row, int64."""
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    return ((w.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)[:, :count]
