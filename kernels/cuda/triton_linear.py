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

  quantize_rows  one pass per row of x: q = clamp(rne(x / s) + z) in int8, or sat(x / s) in e4m3, with s the
             row's absmax / q_max (dynamic) or the given per-tensor scale (static) — the activation prologue of
             every w8a8 / fp8 path on CUDA (the library GEMMs' too), one launch instead of torch's five or six

The exact semantics are the oracle's (kernels/reference.py); tests compare each kernel to it on ragged
shapes under `TRITON_INTERPRET=1` on the CPU. The quantizer divides with IEEE rounding (div_rn) and rounds half
to even with the 1.5·2²³ trick (|x / s| ≤ 128 ≪ 2²²), so its codes are bit-equal to torch's.

Tiles: each GEMM is autotuned over a few Hopper-sized configurations (keyed by N, K and M's power-of-two bucket, so
a new prefill length does not retune), with programs ordered in GROUP_M super-rows so that consecutive programs
share weight tiles in L2. Half-precision activations go through the tensor cores in their own dtype (the weight
rounded once to it, as the dequantize + cuBLAS path does); float32 activations use IEEE float32 dots. Under the
interpreter each kernel has one small configuration (autotuning needs a GPU to time on).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from qcompiler.kernels import reference
from qcompiler.kernels.packing import default_zero
from qcompiler.schemes import FP8_E4M3_MAX

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(tiles: list[tuple[int, int, int, int, int]], bk_free: bool = True,
             split_k: tuple[int, ...] | None = None) -> list[triton.Config]:
    """(BM, BN, BK, warps, stages) → autotuner configs (× SPLIT_K choices when given); one small tile under the
    interpreter (split in two when split-K is tuned, so that the tests run the split path)."""
    if INTERPRETING:
        tiles, split_k = [(16, 32, 32, 4, 1)], (2,) if split_k and max(split_k) > 1 else split_k
    return [triton.Config({"BM": bm, "BN": bn, **({"BK": bk} if bk_free else {}),
                           **({"SPLIT_K": sk} if split_k else {})}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in tiles for sk in (split_k or (1,))]


# Decode-sized tiles (BM = 16: a GEMV's rows, many programs over N) and prefill tiles (Hopper's 128 × 128-256).
GEMM_TILES = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 32, 256, 4, 3), (32, 64, 128, 4, 4),
              (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]
# int8 / e4m3 operands are half the bytes: deeper K tiles and 256-wide tiles for the prefill sizes.
SCALED_TILES = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (64, 128, 128, 4, 4),
                (128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 64, 4, 4)]
# Decode (M ≤ 16): a GEMV's few rows; K split over SPLIT_K programs (float32 partial sums added atomically) so that
# layers with few output tiles (down projections: N = 4096) still fill the GPU's 132 multiprocessors.
GEMV_TILES = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3)]
GEMV_SPLITS = (1, 2, 4)
GROUP_TILES = [(16, 64, 0, 4, 4), (16, 128, 0, 4, 4), (64, 128, 0, 4, 4), (128, 128, 0, 8, 3), (128, 256, 0, 8, 3)]


def _bench(fn: Callable[[], object], quantiles: tuple[float, ...]) -> object:
    """The autotuner's timing: short (a few configurations per shape bucket, tuned once per process)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def m_bucket(m: int) -> int:
    """The autotuner's key for M: its power of two (16 at least), so that each bucket is tuned once."""
    return max(16, triton.next_power_of_2(m))


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Program → (row tile, column tile), GROUP_M row tiles per super-row (weight tiles reused from L2)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


@triton.jit
def _load_codes(w_ptr, rn, k0, stride_wn, N, K, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The weight codes of rows rn, columns k0 … k0 + BK − 1 as float32 [BN, BK] (0 outside the matrix), from the
    canonical storage: int8 / uint8 [N, K], or int4 two per byte [N, ceil(K/2)] with the even column low."""
    if BITS == 4:  # load the bytes once, split the nibbles, interleave them back (measured on the H200: reading
        # each byte once per column instead made the GEMM up to 2.5× slower)
        rb = k0 // 2 + tl.arange(0, BK // 2)
        byte = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :],
                       mask=(rn[:, None] < N) & (rb[None, :] < (K + 1) // 2), other=0).to(tl.int32)
        q = tl.reshape(tl.join(byte & 0xF, (byte >> 4) & 0xF), (BN, BK)).to(tl.float32)
    else:
        rk = k0 + tl.arange(0, BK)
        q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                    other=0).to(tl.float32)
    return q


@triton.jit
def _woq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, G, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, DEFAULT_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, HALF_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """SPLIT_K > 1: program (tile, j) sums K tiles j, j + SPLIT_K, … and adds its float32 partial into y
    atomically (y a zeroed float32 buffer)."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, 8)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        wmask = (rn[:, None] < N) & (rk[None, :] < K)
        q = _load_codes(w_ptr, rn, k0, stride_wn, N, K, BITS, BN, BK)
        if GROUP % BK == 0:  # the whole tile lies in one group: one scale (and zero) per output channel
            g1 = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_sn + g1, mask=rn < N, other=0.0)[:, None]
            if HAS_ZERO:
                z = tl.load(z_ptr + rn * stride_zn + g1, mask=rn < N, other=0).to(tl.float32)[:, None]
            else:
                z = DEFAULT_ZERO
        else:
            g = rk[None, :] // GROUP
            gmask = (rn[:, None] < N) & (g < G)
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g, mask=gmask, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + rn[:, None] * stride_zn + g, mask=gmask, other=0).to(tl.float32)
            else:
                z = DEFAULT_ZERO
        w = tl.where(wmask, (q - z) * s, 0.0)
        if HALF_DOT:  # ŵ rounded once to the activations' dtype; tensor cores, float32 accumulation
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), out_dtype=tl.float32)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), out_dtype=tl.float32, input_precision="ieee")
    if HAS_BIAS:  # noqa: SIM102  (a compile-time test around a run-time one)
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


_WOQ_KEY = ["M_BUCKET", "N", "K", "BITS"]
_woq_gemm = triton.autotune(configs=_configs(GEMM_TILES, split_k=(1,)), key=_WOQ_KEY, do_bench=_bench)(
    _woq_gemm_kernel)
_woq_gemv = triton.autotune(configs=_configs(GEMV_TILES, split_k=GEMV_SPLITS), key=_WOQ_KEY, do_bench=_bench,
                            reset_to_zero=["y_ptr"])(_woq_gemm_kernel)


@triton.autotune(configs=_configs(SCALED_TILES), key=["M_BUCKET", "N", "K", "INT_ACC"],
                 do_bench=_bench)
@triton.jit
def _scaled_gemm_kernel(
    qx_ptr, qw_ptr, sx_ptr, sw_ptr, wsum_ptr, b_ptr, y_ptr, x_zero,
    M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
    INT_ACC: tl.constexpr, X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """acc = q_x · q_wᵀ (int8 → int32, or e4m3 → fp32), y = s_x · s_w · (acc − z_x · Σ_k q_w) + b."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, 8)
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


@triton.autotune(configs=_configs(GROUP_TILES, bk_free=False), key=["M_BUCKET", "N", "K", "BK"], do_bench=_bench)
@triton.jit
def _group_scaled_gemm_kernel(
    qx_ptr, qw_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr,
    M, N, K, G, M_BUCKET, stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Each BK tile lies in one group (BK divides GROUP): its exact int32 product is scaled by that group's s_w."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, 8)
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


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, DEFAULT_ZERO: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """ŵ[n, k] = (q[n, k] − z[n, k // g]) · s[n, k // g] in float32, written in out's dtype (one rounding)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = _load_codes(w_ptr, rn, k0, stride_wn, N, K, BITS, BN, BK)
    g = rk[None, :] // GROUP
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g, mask=mask, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + rn[:, None] * stride_zn + g, mask=mask, other=0).to(tl.float32)
    else:
        z = DEFAULT_ZERO
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], ((q - z) * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, k: int,
               dtype: torch.dtype) -> Tensor:
    """reference.dequantize(...).to(dtype) in one launch: reads the codes once, writes ŵ [N, K] in `dtype`."""
    n = qweight.shape[0]
    scale = scale.float().contiguous()
    zero_t = zero.contiguous() if zero is not None else scale
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    bn, bk = 32, 128
    _dequantize_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight.contiguous(), scale, zero_t, out, n, k, qweight.stride(0), scale.stride(0), zero_t.stride(0),
        out.stride(0), GROUP=1 << 30 if scale.shape[1] == 1 else group_size, BITS=bits, HAS_ZERO=zero is not None,
        DEFAULT_ZERO=default_zero(bits), BN=bn, BK=bk)
    return out


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, static_s_ptr, x_zero, K, stride_xm, stride_qm,
    STATIC: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row of x per program. Dynamic: s = max(max_k |x| / QMAX, 1e-12), written to s_ptr[row]; static: the
    per-tensor s (and zero point) given. int8: clamp(rne(x / s) + z, −QMAX − 1, QMAX); fp8: the e4m3 cast
    (round to nearest even) of clamp(x / s, ±QMAX)."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        s = tl.load(static_s_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            rk = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)))
        s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), QMAX * 1.0), 1e-12)
        tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        v = tl.math.div_rn(tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32), s)
        if FP8:  # rounded to the e4m3 grid here (exact, so the cast only re-encodes): step 2^(e − 3) in binade e
            v = tl.clamp(v, -QMAX * 1.0, QMAX * 1.0)
            e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
            step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
            code = (((v / step + 12582912.0) - 12582912.0) * step).to(tl.float8e4nv)
        else:  # round half to even: adding and removing 1.5·2²³ leaves the integer nearest (|v| ≤ 2²²)
            v = tl.clamp(v, -4194304.0, 4194304.0)
            code = tl.clamp((v + 12582912.0) - 12582912.0 + x_zero, -QMAX - 1.0, QMAX * 1.0).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + rk, code, mask=rk < K)


def quantize_rows(x2: Tensor, bits_or_fp8: int | str, x_scale: Tensor | None = None,
                  x_zero: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x2 [M, K] → (codes [M, K] int8 or e4m3, scale): dynamic per token (scales [M, 1] float32) when x_scale is
    None, else the static per-tensor scale given (and an int8 zero point). Bit-equal to reference.quantize_act_*
    and numerics.quantize_act_per_token (Triton's interpreter casts some values to e4m3 one binade low, so the kernel
    puts them on the grid itself)."""
    x2 = x2.contiguous()
    m, k = x2.shape
    fp8 = bits_or_fp8 == "fp8"
    qmax = FP8_E4M3_MAX if fp8 else 2 ** (int(bits_or_fp8) - 1) - 1
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x2.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    static = x_scale.float().reshape(()).contiguous() if x_scale is not None else scales
    zero = float(x_zero) if x_scale is not None and x_zero is not None else 0.0
    if m:
        _quantize_rows_kernel[(m,)](x2, codes, scales, static, zero, k, x2.stride(0), codes.stride(0),
                                    STATIC=x_scale is not None, FP8=fp8, QMAX=qmax,
                                    BLOCK=min(1024, triton.next_power_of_2(max(k, 16))))
    return codes, (x_scale if x_scale is not None else scales)


def quantize_act_w8a8(x2: Tensor, x_scale: Tensor | None, x_zero: Tensor | None) -> tuple[Tensor, Tensor]:
    """reference.quantize_act_w8a8 in one launch."""
    return quantize_rows(x2, 8, x_scale, x_zero)


def quantize_act_fp8(x2: Tensor, x_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """reference.quantize_act_fp8 in one launch."""
    return quantize_rows(x2, "fp8", x_scale)


def _grid(m: int, n: int) -> object:
    return lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)


def linear_woq(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
               bits: int, group_size: int, in_features: int) -> Tensor:
    """qc::linear_woq on a GPU (semantics: reference.linear_woq; half-precision x: ŵ rounded once to x's dtype).
    M ≤ 16: the split-K GEMV configurations into a float32 buffer; larger M: the tiled GEMM."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k, n = x2.shape[0], in_features, qweight.shape[0]
    scale = scale.float().contiguous()
    zero_t = zero.contiguous() if zero is not None else scale  # (unused pointer when HAS_ZERO is False)
    decode = m <= 16
    y = (torch.zeros if decode else torch.empty)((m, n), dtype=torch.float32 if decode else x.dtype, device=x.device)
    kernel = _woq_gemv if decode else _woq_gemm

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), meta["SPLIT_K"]

    # one group per channel: a power of two larger than any K (every k in group 0), so that each K does not
    # compile its own kernel and the tile-wide scale path applies
    group = 1 << 30 if scale.shape[1] == 1 else group_size
    kernel[grid](
        x2, qweight.contiguous(), scale, zero_t, bias if bias is not None else scale, y,
        m, n, k, scale.shape[1], m_bucket(m), x2.stride(0), qweight.stride(0), scale.stride(0), zero_t.stride(0),
        y.stride(0), GROUP=group, BITS=bits, HAS_ZERO=zero is not None, DEFAULT_ZERO=default_zero(bits),
        HAS_BIAS=bias is not None, HALF_DOT=x.dtype in (torch.bfloat16, torch.float16),
    )
    return y.to(x.dtype).reshape(*shape[:-1], n)


def _scaled_gemm(qx: Tensor, qweight: Tensor, sx: Tensor, sw: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                 x_zero: int = 0, x_per_token: bool = True) -> Tensor:
    m, k = qx.shape
    n = qweight.shape[0]
    sx, sw = sx.float().reshape(-1).contiguous(), sw.float().reshape(-1).contiguous()
    wsum = qweight.to(torch.int32).sum(dim=1).contiguous() if x_zero else sw
    y = torch.empty((m, n), dtype=out_dtype, device=qx.device)
    _scaled_gemm_kernel[_grid(m, n)](
        qx.contiguous(), qweight.contiguous(), sx, sw, wsum, bias if bias is not None else sw, y, x_zero,
        m, n, k, m_bucket(m), qx.stride(0), qweight.stride(0), y.stride(0),
        INT_ACC=qx.dtype == torch.int8, X_PER_TOKEN=x_per_token, W_PER_CHANNEL=sw.numel() > 1,
        HAS_ZERO=x_zero != 0, HAS_BIAS=bias is not None,
    )
    return y


def linear_w8a8(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, x_zero: Tensor | None,
                bias: Tensor | None) -> Tensor:
    """qc::linear_w8a8 on a GPU (semantics: reference.linear_w8a8)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = quantize_act_w8a8(x2, x_scale, x_zero)
    zero = int(x_zero) if x_scale is not None and x_zero is not None else 0
    y = _scaled_gemm(qx, qweight, sx, w_scale, bias, x.dtype, zero, x_per_token=x_scale is None)
    return y.reshape(*shape[:-1], -1)


def linear_fp8(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """qc::linear_fp8 on a GPU (semantics: reference.linear_fp8)."""
    shape = x.shape
    x8, sx = quantize_act_fp8(x.reshape(-1, shape[-1]), x_scale)
    y = _scaled_gemm(x8, qweight, sx, w_scale, bias, x.dtype, x_per_token=x_scale is None)
    return y.reshape(*shape[:-1], -1)


def linear_int_dynamic(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int,
                       group_size: int) -> Tensor:
    """qc::linear_int_dynamic on a GPU (semantics: reference.linear_int_dynamic). Group sizes the int8 tensor-core
    tile (16) does not divide run the oracle."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = quantize_rows(x2, act_bits)
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
        m, n, k, sw.shape[1], m_bucket(m), qx.stride(0), qw.stride(0), sw.stride(0), y.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, BK=bk,
    )
    return y.reshape(*shape[:-1], n)
