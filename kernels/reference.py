"""The pure-torch oracle: the exact semantics of every `qc::` op, in float32. Every fast implementation
(CPU here, Triton/Ascend later) is tested against these functions.
"""

from __future__ import annotations

import functools
import math

import torch

from qcompiler.kernels.packing import default_zero, load_weight_codes
from qcompiler.numerics import quantize_act_fp8, quantize_act_per_token


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int, k: int
) -> torch.Tensor:
    """ŵ[n, j] = (q[n, j] - z[n, j // g]) · s[n, j // g], float32 [N, K]."""
    q = load_weight_codes(qweight, bits, k)
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :k]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :k] if zero is not None else default_zero(bits)
    return (q - z) * s


def linear_woq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Weight-only quantized linear: y = x · ŵᵀ + b, computed in float32, returned in x.dtype."""
    w = dequantize(qweight, scale, zero, bits, group_size, in_features)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def quantize_act_static(x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
    """int8 codes of x with one per-tensor scale and zero point (zero in [-128, 127])."""
    return torch.clamp(torch.round(x.float() / x_scale) + x_zero, -128, 127).to(torch.int8)


def quantize_act_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: codes [M, K] and fp32 scales [M, 1] (scale = absmax / 127)."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)
    return q, scale


def quantize_act_w8a8(x: torch.Tensor, x_scale: torch.Tensor | None, x_zero: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """qc::linear_w8a8's activation codes and scales for x [M, K]: static per tensor (x_scale, zero point x_zero,
    0 when None) or, when x_scale is None, dynamic symmetric per token (scales [M, 1])."""
    if x_scale is None:
        return quantize_act_dynamic(x)
    zero = x_zero if x_zero is not None else x.new_zeros((), dtype=torch.float32)
    return quantize_act_static(x, x_scale, zero), x_scale


def linear_w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    x_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """int8 × int8 linear. Activations static per-tensor (x_scale, x_zero) or, when x_scale is None,
    dynamic symmetric per-token. Weights symmetric per-channel int8 [N, K] with w_scale [N].

    y = s_x · s_w ⊙ ((q_x - z_x) · q_wᵀ) + b, where the integer product is exact (int32 accumulation
    is emulated here in float64, exact for K < 2^37 / 2^14).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = quantize_act_w8a8(x2, x_scale, x_zero)
    zx = x_zero.double() if x_scale is not None and x_zero is not None else 0.0
    acc = (qx.double() - zx) @ qweight.double().t()
    y = acc.float() * sx.float() * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def linear_int_dynamic(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       act_bits: int, group_size: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Integer GEMM with dynamic per-token activations of `act_bits` (8: w4a8, 4: w4a4) and symmetric integer
    weight codes [N, K] (int4 values held in int8) with scales per output channel (w_scale [N, 1], group_size 0)
    or per group of `group_size` inputs (w_scale [N, G], the last group may be shorter):

        y[m, n] = s_x[m] · Σ_g s_w[n, g] · Σ_{k ∈ g} q_x[m, k] · q_w[n, k]  + b[n]

    Each group's integer dot product is exact (emulated in float64 here); the scales are applied per group.
    s_x[m] = clip_ratio·max_k |x[m, k]| / qmax (values beyond the clipped range clamp to the grid's ends)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    k = x2.shape[1]
    qx, sx = quantize_act_per_token(x2, act_bits, clip_ratio)
    sw = w_scale.float().reshape(qweight.shape[0], -1)
    g = group_size if group_size > 0 else k
    y = torch.zeros(x2.shape[0], qweight.shape[0], dtype=torch.float32, device=x2.device)
    for j, start in enumerate(range(0, k, g)):
        acc = qx[:, start:start + g].double() @ qweight[:, start:start + g].double().t()
        y += acc.float() * sw[:, j]
    y = y * sx.float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def linear_fp8(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """fp8 e4m3 × e4m3 linear: y = s_x · s_w ⊙ (x8 · w8ᵀ) + b, products accumulated in float32.
    w8 [N, K] float8_e4m3fn with s_w per tensor (scalar) or per output channel [N]; s_x static per tensor
    or dynamic per token (x_scale None)."""
    shape = x.shape
    x8, sx = quantize_act_fp8(x.reshape(-1, shape[-1]), x_scale)
    acc = x8.float() @ qweight.float().t()
    y = acc * sx.float() * w_scale.float().reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def quantize_kv_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
                       ) -> torch.Tensor:
    """KV-cache codes of x [B, H, S, D] with calibrated scales broadcast over it (per tensor [], per head
    [1, H, 1, 1], per channel [1, H, 1, D]): q = clamp(round(x / s) + z, qmin, qmax), as float32 integers."""
    return torch.clamp(torch.round(x.float() / scale.float()) + zero.float(), qmin, qmax)


def quantize_kv_dynamic(x: torch.Tensor, bits: int, symmetric: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token and head (one scale per [b, h, s] over D): (codes, scale, zero), float32, [..., 1] qparams.
    Symmetric: s = max|x| / (2^(b−1) − 1), z = 0, codes in [−2^(b−1), 2^(b−1) − 1]. Asymmetric: s = (max − min) /
    (2^b − 1) over a range that includes 0, z = round(−min / s), codes in [0, 2^b − 1]."""
    if symmetric:
        q, scale = quantize_act_per_token(x, bits)
        return q.float(), scale, torch.zeros_like(scale)
    xf = x.float()
    qmax = 2**bits - 1
    lo = xf.amin(dim=-1, keepdim=True).clamp_max(0)
    hi = xf.amax(dim=-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return torch.clamp(torch.round(xf / scale) + zero, 0, qmax), scale, zero


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """What attention reads back from a statically quantized KV cache: (q − z)·s in x's dtype."""
    return ((quantize_kv_static(x, scale, zero, qmin, qmax) - zero.float()) * scale.float()).to(x.dtype)


def fake_quant_kv_dynamic(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """What attention reads back from a KV cache quantized per token and head at run time."""
    q, scale, zero = quantize_kv_dynamic(x, bits, symmetric)
    return ((q - zero) * scale).to(x.dtype)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """y = x·H_K/√K over the last axis (K = x.shape[-1]; algorithms/hadamard.py builds H_K), in float32, returned
    in x's dtype. Deterministic: nothing is stored, fast Walsh–Hadamard kernels compute the same on accelerators.
    Computed through H_K = A ⊗ B as two small products per token (K·(a + b) instead of K² multiply-adds)."""
    a, b = _normalized_hadamard_factors(x.shape[-1], x.device)
    return kronecker_transform(x, a, b)


def hadamard_transform_transposed(x: torch.Tensor) -> torch.Tensor:
    """x·(H_K/√K)ᵀ over the last axis: the gradient of hadamard_transform ((A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ)."""
    a, b = _normalized_hadamard_factors(x.shape[-1], x.device)
    return kronecker_transform(x, a.t(), b.t())


def kronecker_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """y = x·(L ⊗ R) over the last axis (K = a·b, L [a, a], R [b, b]): each row viewed row-major as X [a, b] becomes
    Lᵀ·X·R (row-major vec(A·X·B) = (A ⊗ Bᵀ)·vec(X)). In float32, returned in x's dtype."""
    a, b = left.shape[0], right.shape[0]
    if a * b != x.shape[-1]:
        raise ValueError(f"kronecker_transform: L [{a}, {a}] ⊗ R [{b}, {b}] does not match the input size {x.shape[-1]}")
    n = x.numel() // (a * b)
    # two plain GEMMs over all tokens (X·R, then Lᵀ·(X·R) as ((X·R)ᵀ·L)ᵀ), not n small batched products
    xr = x.float().reshape(n * a, b) @ right.float()
    y = xr.reshape(n, a, b).transpose(1, 2).reshape(n * b, a) @ left.float()
    return y.reshape(n, b, a).transpose(1, 2).reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _normalized_hadamard_factors(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from qcompiler.algorithms.hadamard import normalized_hadamard_factors

    f = normalized_hadamard_factors(k)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {k} is built here (algorithms/hadamard.py)")
    return f[0].float().to(device), f[1].float().to(device)


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, l2norm_qk: bool) -> torch.Tensor:
    """Gated DeltaNet's linear-attention recurrence (Qwen3-Next), token by token, from a zero state, in float32:

        S_t = exp(g_t)·S_{t−1};  S_t += k_t ⊗ β_t·(v_t − S_tᵀk_t);  o_t = S_tᵀ q_t / √d_k

    q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g (log decay, ≤ 0) and β [B, T, Hv]; each q/k head serves Hv/Hk value
    heads; q and k are L2-normalised first (eps 1e-6 under the root) when l2norm_qk. Returns o [B, T, Hv, Dv] in
    q's dtype. (The op's CPU implementation computes the same chunk-parallel; this loop states what it computes.)"""
    b, t, hk, dk = key.shape
    hv, dv = value.shape[-2:]
    q, k = query.float(), key.float()
    if l2norm_qk:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q, k = q.repeat_interleave(hv // hk, dim=2) / math.sqrt(dk), k.repeat_interleave(hv // hk, dim=2)
    v, decay, rate = value.float(), g.float().exp(), beta.float()
    state = torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=value.device)
    out = torch.empty(b, t, hv, dv, dtype=torch.float32, device=value.device)
    for i in range(t):
        state = state * decay[:, i, :, None, None]
        delta = (v[:, i] - torch.einsum("bhkv,bhk->bhv", state, k[:, i])) * rate[:, i, :, None]
        state = state + k[:, i, :, :, None] * delta[:, :, None, :]
        out[:, i] = torch.einsum("bhkv,bhk->bhv", state, q[:, i])
    return out.to(query.dtype)


def lightning_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """MiniMax's lightning attention (causal linear attention with a per-head exponential decay), token by token from
    a zero state, in float32:

        S_t = e^(−λ_h)·S_{t−1} + k_tᵀ v_t;   o_t = q_t S_t      (= Σ_{s≤t} e^(−λ_h (t − s)) (q_t·k_s) v_s)

    q, k [B, H, T, Dk], v [B, H, T, Dv], slope λ [H]. Returns o [B, H, T, Dv] in q's dtype."""
    b, h, t, dk = key.shape
    q, k, v = query.float(), key.float(), value.float()
    decay = torch.exp(-slope.float().reshape(1, h, 1, 1))
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float32, device=value.device)
    out = torch.empty(b, h, t, v.shape[-1], dtype=torch.float32, device=value.device)
    for i in range(t):
        state = state * decay + k[:, :, i, :, None] * v[:, :, i, None, :]
        out[:, :, i] = torch.einsum("bhk,bhkv->bhv", q[:, :, i], state)
    return out.to(query.dtype)
