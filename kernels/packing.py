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


# ---------------------------------------------------------------- torch's int4pack kernels (CPU and CUDA tinygemm)

INT4PACK_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4pack kernels take


def int4pack_group(group_size: int) -> int | None:
    """The int4pack kernels take groups of 32..256; a larger logical group is split into equal ones (each copy
    carries the same scale). None when the group is not a multiple of 32."""
    for g in INT4PACK_GROUPS:
        if group_size % g == 0:
            return g
    return None


def int4pack_operands(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Our int4 storage -> what torch's int4pack kernels read, on the storage's device: unsigned codes u int32
    [N, K'] (K zero-padded to K', a whole number of logical groups; padded columns meet zero activations), the
    scale-and-zero table [K'/g', N, 2] bf16, the kernel's group g' and K'.

    Both kernels (`_weight_int4pack_mm_for_cpu`, CUDA's tinygemm `_weight_int4pack_mm`) compute ŵ = (u − 8)·s + m
    per group; our ŵ = (u − z)·s, so m = (8 − z)·s (z = 8 for symmetric storage: m = 0)."""
    kernel_group = int4pack_group(group_size)
    if kernel_group is None:
        raise ValueError(f"group size {group_size} is not a multiple of 32; no int4pack layout")
    u = unpack_int4(qweight, k).to(torch.int32)
    k_pad = scale.shape[1] * group_size
    u = torch.nn.functional.pad(u, (0, k_pad - k), value=8)
    z = zero.float() if zero is not None else torch.full_like(scale.float(), default_zero(4))
    m = (8.0 - z) * scale.float()
    reps = group_size // kernel_group
    s_rep = scale.float().repeat_interleave(reps, dim=1)
    m_rep = m.repeat_interleave(reps, dim=1)
    scales_and_zeros = torch.stack([s_rep.t(), m_rep.t()], dim=-1).contiguous().to(torch.bfloat16)
    return u.contiguous(), scales_and_zeros, kernel_group, k_pad


def tinygemm_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Unsigned codes int32 [N, K] (K even) -> uint8 [N, K/2] as CUDA's `_convert_weight_to_int4pack` reads them:
    column 2i in the HIGH nibble, 2i+1 in the low one (the opposite of our storage's order)."""
    if u.shape[1] % 2:
        raise ValueError(f"tinygemm packs pairs of columns; K = {u.shape[1]} is odd")
    return ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8).contiguous()


def tinygemm_codes(nibbles: torch.Tensor) -> torch.Tensor:
    """The inverse of tinygemm_nibbles: uint8 [N, K/2] -> int32 codes [N, K]."""
    hi, lo = (nibbles >> 4).to(torch.int32), (nibbles & 0x0F).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(nibbles.shape[0], -1)
