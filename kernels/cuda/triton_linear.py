"""Triton GEMM kernels for the `qc::` linear ops on CUDA GPUs.

Each kernel reads our canonical storage (kernels/packing.py) as it is, so a lowered graph needs no repacking:

  woq_gemm   y = x · ŵᵀ + b with ŵ[n, k] = (q[n, k] − z[n, k // g]) · s[n, k // g] dequantized inside the
             K loop (int8 codes [N, K]; int4 codes two per byte [N, ceil(K/2)], low nibble = even k)
  scaled_gemm  acc = Σ_k q_x[m, k] · q_w[n, k], in int32 for int8 × int8 (w8a8) or in float32 for
             e4m3 × e4m3 (fp8); epilogue y = s_x[m] · s_w[n] · (acc − z_x · Σ_k q_w[n, k]) + b[n]
             (s_x per token or per tensor, s_w per channel or per tensor; z_x only for static int8)
  group_scaled_gemm  acc = Σ_g s_w[n, g] · Σ_{k ∈ g} q_x[m, k] · q_w[n, k], int32 per K tile (a tile never
             straddles two groups), y = s_x[m] · acc + b[n]: int8 or int4 per-token activations × int4 codes
             with group scales (qc::linear_int_dynamic; per channel it is scaled_gemm)

The exact semantics are the oracle's (kernels/reference.py); tests compare each kernel to it on ragged
shapes under `TRITON_INTERPRET=1` on the CPU. Activation quantization (per-token absmax, round-half-even)
stays in torch so that its rounding is bit-identical to the oracle's; the kernels do the O(M·N·K) work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.kernels import reference
from qcompiler.kernels.packing import default_zero
from qcompiler.numerics import quantize_act_per_token

BLOCK_M = 16
BLOCK_N = 32
BLOCK_K = 32


@triton.jit
def _woq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, G, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, DEFAULT_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0).to(tl.float32)
        wmask = (rn[:, None] < N) & (rk[None, :] < K)
        if BITS == 4:
            byte = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] // 2, mask=wmask, other=0).to(tl.int32)
            q = ((byte >> ((rk[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        else:
            q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=wmask, other=0).to(tl.float32)
        g = rk[None, :] // GROUP
        gmask = (rn[:, None] < N) & (g < G)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g, mask=gmask, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[:, None] * stride_zn + g, mask=gmask, other=0).to(tl.float32)
        else:
            z = DEFAULT_ZERO
        w = tl.where(wmask, (q - z) * s, 0.0)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _scaled_gemm_kernel(
    qx_ptr, qw_ptr, sx_ptr, sw_ptr, wsum_ptr, b_ptr, y_ptr, x_zero,
    M, N, K, stride_xm, stride_wn, stride_ym,
    INT_ACC: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """acc = q_x · q_wᵀ (int8 → int32, or e4m3 → fp32), y = s_x · s_w · (acc − z_x · Σ_k q_w) + b."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.int32 if INT_ACC else tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a_ptrs = qx_ptr + rm[:, None] * stride_xm + rk[None, :]
        b_ptrs = qw_ptr + rn[:, None] * stride_wn + rk[None, :]
        a_mask = (rm[:, None] < M) & (rk[None, :] < K)
        b_mask = (rn[:, None] < N) & (rk[None, :] < K)
        if INT_ACC:
            a = tl.load(a_ptrs, mask=a_mask, other=0)
            b = tl.load(b_ptrs, mask=b_mask, other=0)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        else:  # (e4m3 operands: the padding value must be a float)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32)
    if HAS_ZERO:  # (q_x − z)·q_wᵀ = q_x·q_wᵀ − z·Σ_k q_w[n, k], exact in int32
        acc -= x_zero * tl.load(wsum_ptr + rn, mask=rn < N, other=0)[None, :]
    if X_PER_TOKEN:
        sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)[:, None]
    else:
        sx = tl.load(sx_ptr)
    if W_PER_CHANNEL:
        sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        sw = tl.load(sw_ptr)
    y = acc.to(tl.float32) * sx * sw
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _group_scaled_gemm_kernel(
    qx_ptr, qw_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr,
    M, N, K, G, stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Each BK tile lies in one group (BK divides GROUP): its exact int32 product is scaled by that group's s_w."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(qx_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        b = tl.load(qw_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        s = tl.load(sw_ptr + rn * stride_sn + k0 // GROUP, mask=rn < N, other=0.0)  # (k0 < K: a valid group)
        acc += part.to(tl.float32) * s[None, :]
    y = acc * tl.load(sx_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _grid(m: int, n: int) -> tuple[int, int]:
    return triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)


def linear_woq(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
               bits: int, group_size: int, in_features: int) -> Tensor:
    """qc::linear_woq on a GPU (semantics: reference.linear_woq)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k, n = x2.shape[0], in_features, qweight.shape[0]
    scale = scale.float().contiguous()
    zero_t = zero.contiguous() if zero is not None else scale  # (unused pointer when HAS_ZERO is False)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _woq_gemm_kernel[_grid(m, n)](
        x2, qweight.contiguous(), scale, zero_t, bias if bias is not None else scale, y,
        m, n, k, scale.shape[1], x2.stride(0), qweight.stride(0), scale.stride(0), zero_t.stride(0), y.stride(0),
        GROUP=group_size, BITS=bits, HAS_ZERO=zero is not None, DEFAULT_ZERO=default_zero(bits),
        HAS_BIAS=bias is not None, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )
    return y.reshape(*shape[:-1], n)


def _scaled_gemm(qx: Tensor, qweight: Tensor, sx: Tensor, sw: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                 x_zero: int = 0, x_per_token: bool = True) -> Tensor:
    m, k = qx.shape
    n = qweight.shape[0]
    sx, sw = sx.float().reshape(-1).contiguous(), sw.float().reshape(-1).contiguous()
    wsum = qweight.to(torch.int32).sum(dim=1).contiguous() if x_zero else sw
    y = torch.empty((m, n), dtype=out_dtype, device=qx.device)
    _scaled_gemm_kernel[_grid(m, n)](
        qx.contiguous(), qweight.contiguous(), sx, sw, wsum, bias if bias is not None else sw, y, x_zero,
        m, n, k, qx.stride(0), qweight.stride(0), y.stride(0),
        INT_ACC=qx.dtype == torch.int8, X_PER_TOKEN=x_per_token, W_PER_CHANNEL=sw.numel() > 1,
        HAS_ZERO=x_zero != 0, HAS_BIAS=bias is not None, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )
    return y


def linear_w8a8(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, x_zero: Tensor | None,
                bias: Tensor | None) -> Tensor:
    """qc::linear_w8a8 on a GPU (semantics: reference.linear_w8a8)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = reference.quantize_act_w8a8(x2, x_scale, x_zero)
    zero = int(x_zero) if x_scale is not None and x_zero is not None else 0
    y = _scaled_gemm(qx, qweight, sx, w_scale, bias, x.dtype, zero, x_per_token=x_scale is None)
    return y.reshape(*shape[:-1], -1)


def linear_fp8(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """qc::linear_fp8 on a GPU (semantics: reference.linear_fp8)."""
    shape = x.shape
    x8, sx = reference.quantize_act_fp8(x.reshape(-1, shape[-1]), x_scale)
    y = _scaled_gemm(x8, qweight, sx, w_scale, bias, x.dtype, x_per_token=x_scale is None)
    return y.reshape(*shape[:-1], -1)


def linear_int_dynamic(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int,
                       group_size: int) -> Tensor:
    """qc::linear_int_dynamic on a GPU (semantics: reference.linear_int_dynamic). Group sizes the int8 tensor-core
    tile (16) does not divide run the oracle."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = quantize_act_per_token(x2, act_bits)
    m, k = qx.shape
    n = qweight.shape[0]
    if group_size <= 0 or group_size >= k:  # one scale per output channel: the scaled GEMM's epilogue
        y = _scaled_gemm(qx, qweight, sx, w_scale.reshape(-1), bias, x.dtype)
        return y.reshape(*shape[:-1], -1)
    if group_size % 16:
        return reference.linear_int_dynamic(x, qweight, w_scale, bias, act_bits, group_size)
    bk = 32 if group_size % 32 == 0 else 16
    sw = w_scale.float().contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    qx, qw = qx.contiguous(), qweight.contiguous()
    _group_scaled_gemm_kernel[_grid(m, n)](
        qx, qw, sx.float().reshape(-1).contiguous(), sw, bias if bias is not None else sw, y,
        m, n, k, sw.shape[1], qx.stride(0), qw.stride(0), sw.stride(0), y.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, BM=BLOCK_M, BN=BLOCK_N, BK=bk,
    )
    return y.reshape(*shape[:-1], n)
