"""Pure tensor functions for quantization maths. No graphs, no modules: unit-tested directly.

Weights are [N, K] (output channels × input channels, the nn.Linear layout). With group size g the K axis
splits into G = ceil(K / g) groups; when g does not divide K the last group is simply shorter.
Scales and zero points are [N, G] (G = 1 for per-channel, and N = 1 as well for per-tensor).

Symmetric:  s = absmax / qmax,              q = clamp(round(w / s), qmin, qmax),      ŵ = q·s
            (int4: s = peak / −8, peak the group's largest-magnitude weight with its sign: all 16 codes −8…7
            are used, as onnxruntime, GPTQ/AWQ, compressed-tensors and msModelSlim store them; s may be negative)
Asymmetric: s = (max - min) / (2^b - 1),    z = clamp(round(-min / s), 0, 2^b - 1),
            q = clamp(round(w / s) + z, 0, 2^b - 1),                                  ŵ = (q - z)·s
(min ≤ 0 ≤ max is enforced so that 0 is exactly representable, as every integer kernel assumes.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qcompiler.cpu_features import native_int8
from qcompiler.schemes import FP8_E4M3_MAX, QuantArgs

# K per float32 GEMM in int8_matmul: |a·b| ≤ 128² = 2¹⁴ per product, so every partial sum of 1024 is an integer of
# magnitude ≤ 2²⁴, which float32 holds exactly whatever the summation order
_EXACT_FP32_K = 1024


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 · b [K, N] int8 → int32, exact. torch._int_mm where the device multiplies int8 fast (CUDA, or a
    CPU with VNNI / AMX); elsewhere float32 GEMMs over slices of K ≤ 1024, each exact (_EXACT_FP32_K), summed in
    int32 — the same integers at float32 GEMM speed (torch's CPU int8 GEMM without VNNI: cpu_features.native_int8)."""
    if a.device.type != "cpu" or native_int8():
        return torch._int_mm(a, b)
    af, bf = a.float(), b.float()
    k = a.shape[1]
    acc = (af[:, :_EXACT_FP32_K] @ bf[:_EXACT_FP32_K]).to(torch.int32)
    for s in range(_EXACT_FP32_K, k, _EXACT_FP32_K):
        acc += (af[:, s:s + _EXACT_FP32_K] @ bf[s:s + _EXACT_FP32_K]).to(torch.int32)
    return acc

_EPS = 1e-12


def num_groups(k: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(k / group_size)


def group_size_of(args: QuantArgs, k: int) -> int:
    """Effective group length along K: K itself for per-channel/per-tensor."""
    return args.group_size if args.granularity == "group" and args.group_size else k


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], zero-padded at the end of K (zeros never change min/max ranges that include 0)."""
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, g, group_size)


def expand_groups(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] -> [N, K]: repeat each group's value over its columns (last group may be short)."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def weight_qparams(
    w: torch.Tensor, args: QuantArgs, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales (and zero points) for w [N, K]; `clip_ratio` ([N, G] or scalar) shrinks the range."""
    w = w.float()
    n, k = w.shape
    grouped = w.reshape(1, 1, n * k) if args.granularity == "tensor" else to_groups(w, group_size_of(args, k))
    return grouped_qparams(grouped, args, clip_ratio)


def grouped_qparams(
    grouped: torch.Tensor, args: QuantArgs, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight_qparams on a weight already cut into groups ([N, G, g], float32): scales (and zeros) [N, G]."""
    return qparams_from_ranges(grouped_ranges(grouped, args), args, clip_ratio)


def grouped_ranges(grouped: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, ...]:
    """The per-group reductions a min-max grid is made of ([N, G] each), which do not depend on the clip ratio:
    a clip search computes them once and every candidate ratio from them (qparams_from_ranges)."""
    if args.symmetric and args.bits == 4 and not args.is_float:
        # the full signed grid −8…7 is set by the group's largest-magnitude weight, with its sign
        return (grouped.gather(-1, grouped.abs().argmax(dim=-1, keepdim=True)).squeeze(-1),)
    if args.symmetric:
        return (grouped.abs().amax(dim=-1),)
    return grouped.amin(dim=-1).clamp_max(0), grouped.amax(dim=-1).clamp_min(0)


def qparams_from_ranges(
    ranges: tuple[torch.Tensor, ...], args: QuantArgs, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) [N, G] of the grid whose range is `ranges` (grouped_ranges) shrunk by `clip_ratio`."""
    if args.symmetric and args.bits == 4 and not args.is_float:
        # the group's largest-magnitude weight lands exactly on −8 (scale = peak / −8, negative where the peak is
        # positive); every weight of the peak's sign then has 8 steps, the other side 7
        scale = ranges[0] * clip_ratio / args.qmin
        return torch.where(scale.abs() < _EPS, torch.full_like(scale, _EPS), scale), None
    if args.symmetric:  # (fp8: qmax = 448, the largest e4m3)
        absmax = ranges[0] * clip_ratio
        return (absmax / args.qmax).clamp_min(_EPS), None
    wmin, wmax = ranges[0] * clip_ratio, ranges[1] * clip_ratio
    scale = ((wmax - wmin) / (args.qmax - args.qmin)).clamp_min(_EPS)
    zero = torch.clamp(torch.round(-wmin / scale), args.qmin, args.qmax)
    return scale, zero


def grouped_fake_quant(
    grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """ŵ for a grouped integer-grid weight [N, G, g] with scales (zeros) [N, G]: the numbers quantize_weight then
    dequantize_weight give on the [N, K] weight, without expanding the grids to [N, K]."""
    s = scale[..., None]
    q = torch.round(grouped / s)
    if zero is None:
        return torch.clamp(q, args.qmin, args.qmax) * s
    z = zero[..., None]
    return (torch.clamp(q + z, args.qmin, args.qmax) - z) * s


def _full(t: torch.Tensor, shape: torch.Size, gs: int) -> torch.Tensor:
    if t.shape[0] == 1 and t.shape[1] == 1:
        return t.expand(shape)
    return expand_groups(t, gs, shape[1])


ROW_CHUNK_BYTES = 2 << 20  # rows per step of the elementwise weight maths: temporaries below the mmap threshold


def rows_per_chunk(w: torch.Tensor) -> int:
    """Rows of a weight [N, K] that fit in ROW_CHUNK_BYTES of float32 (at least 1)."""
    return max(1, ROW_CHUNK_BYTES // (4 * max(1, w.shape[1])))


def _by_rows(fn: Callable[..., torch.Tensor], out_dtype: torch.dtype, w: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor | None, *rest: object) -> torch.Tensor:
    """fn(w, scale, zero, *rest) over chunks of rows written into one output, when every row has its own
    grid (scale and zero have a row per weight row) and the weight spans several chunks; else in one go."""
    n, rows = w.shape[0], rows_per_chunk(w)
    if w.dim() != 2 or rows >= n or any(t is not None and t.shape[0] != n for t in (scale, zero)):
        return fn(w, scale, zero, *rest)
    out = torch.empty(w.shape, dtype=out_dtype)
    for i in range(0, n, rows):
        out[i:i + rows] = fn(w[i:i + rows], scale[i:i + rows], None if zero is None else zero[i:i + rows], *rest)
    return out


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    """Integer codes as int32 (symmetric in [qmin, qmax] around 0; asymmetric in [0, 2^b - 1]); for fp8 the
    e4m3 values as float32 (exactly representable). Computed over chunks of rows (each row has its own
    grid), so the temporaries of a large layer stay small."""
    return _by_rows(_quantize_weight, torch.float32 if args.is_float else torch.int32, w, scale, zero, args)


def _quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs
) -> torch.Tensor:
    gs = group_size_of(args, w.shape[1])
    s = _full(scale, w.shape, gs)
    if args.is_float:
        return to_fp8(w.float() / s).float()
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + _full(zero, w.shape, gs)
    return torch.clamp(q, args.qmin, args.qmax).to(torch.int32)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturate to ±448 and round to the e4m3 grid (torch's cast: round to nearest even)."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """ŵ = (q - z)·s, float32, with groups of `group_size` along K (over chunks of rows)."""
    return _by_rows(_dequantize_weight, torch.float32, q, scale, zero, group_size)


def _dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    s = _full(scale.float(), q.shape, group_size)
    qf = q.float()
    if zero is not None:
        qf = qf - _full(zero.float(), q.shape, group_size)
    return qf * s


def fake_quant_weight(w: torch.Tensor, args: QuantArgs, clip_ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
    """ŵ = dequantize(quantize(w)) on the min-max grid shrunk by `clip_ratio`. Integer grids per channel or group
    are computed in the grouped layout a chunk of rows at a time (the same operations on the same numbers as
    quantize_weight then dequantize_weight, without expanding the grids to [N, K]: the scale searches call this
    once per candidate)."""
    if args.is_float or args.granularity == "tensor" or w.dim() != 2:
        scale, zero = weight_qparams(w, args, clip_ratio)
        q = quantize_weight(w, scale, zero, args)
        return dequantize_weight(q, scale, zero, group_size_of(args, w.shape[1])).to(w.dtype)
    n, k = w.shape
    gs = group_size_of(args, k)
    per_row = isinstance(clip_ratio, torch.Tensor) and clip_ratio.dim() > 0 and clip_ratio.shape[0] == n
    out = torch.empty(n, k, dtype=w.dtype)
    rows = rows_per_chunk(w)
    for r0 in range(0, n, rows):
        grouped = to_groups(w[r0:r0 + rows].float(), gs)
        ratio = clip_ratio[r0:r0 + rows] if per_row else clip_ratio  # type: ignore[index]
        scale, zero = grouped_qparams(grouped, args, ratio)
        out[r0:r0 + rows] = grouped_fake_quant(grouped, scale, zero, args).reshape(grouped.shape[0], -1)[:, :k]
    return out


def mse_clip_search(
    w: torch.Tensor, args: QuantArgs, grid: int = 20, min_ratio: float = 0.5, norm: float = 2.0
) -> torch.Tensor:
    """Per-group clip ratio in [min_ratio, 1] minimising Σ|w - ŵ|^norm over the group ([N, G]).

    Shrinking the range trades clipping error on outliers for finer steps on everything else; for
    4-bit weights the best ratio is typically 0.8–0.95.
    """
    w = w.float()
    n, k = w.shape
    gs = group_size_of(args, k) if args.granularity != "tensor" else k
    best_err: torch.Tensor | None = None
    best_ratio: torch.Tensor | None = None
    for i in range(grid + 1):
        ratio = 1.0 - (1.0 - min_ratio) * i / grid
        wq = fake_quant_weight(w, args, ratio)
        err = (w - wq).abs().pow(norm)
        if args.granularity == "tensor":
            err_g = err.sum().reshape(1, 1)
        else:
            err_g = to_groups(err, gs).sum(dim=-1)
        if best_err is None or best_ratio is None:
            best_err, best_ratio = err_g, torch.full_like(err_g, ratio)
        else:
            better = err_g < best_err
            best_err = torch.where(better, err_g, best_err)
            best_ratio = torch.where(better, torch.full_like(err_g, ratio), best_ratio)
    assert best_ratio is not None
    return best_ratio


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """xᵀx [K, K] for x [T, K], computing only the blocks on and above the diagonal (a band of K/blocks columns
    against the columns from it on) and mirroring the rest: (blocks+1)/(2·blocks) of the products (5/8 for 4).
    Calibration's Hessians are a large part of a GPTQ run's arithmetic."""
    k = x.shape[1]
    band = max(1, -(-k // blocks))
    if band >= k:
        return x.t() @ x
    h = torch.empty(k, k, dtype=x.dtype)
    for i in range(0, k, band):
        row = x[:, i:i + band].t() @ x[:, i:]  # [band, K − i]
        h[i:i + band, i:] = row
        h[i + band:, i:i + band] = row[:, band:].t()
    return h


# ---------------------------------------------------------------- activations


def act_qparams_from_range(
    amin: torch.Tensor, amax: torch.Tensor, args: QuantArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor static activation (scale, zero_point) from an observed range (0-d tensors)."""
    amin = amin.float().clamp_max(0)
    amax = amax.float().clamp_min(0)
    if args.symmetric:
        scale = (torch.maximum(-amin, amax) / args.qmax).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((amax - amin) / (args.qmax - args.qmin)).clamp_min(_EPS)
    zero = torch.clamp(torch.round(args.qmin - amin / scale), args.qmin, args.qmax)
    return scale, zero


def fake_quant_act_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).to(x.dtype)


def quantize_act_per_token(x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token quantization of x [..., K]: int8 codes and fp32 scales [..., 1],
    s_t = clip_ratio·max_k |x_tk| / qmax (a clip ratio below 1 clamps each token's largest values: FlatQuant's
    learned activation clip, passes/rotation/flatquant.py)."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = ((amax * clip_ratio if clip_ratio != 1.0 else amax) / qmax).clamp_min(_EPS)
    q = torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax).to(torch.int8)
    return q, scale


def quantize_act_fp8(x: torch.Tensor, x_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of x [M, K] and their scale: static per-tensor `x_scale`, or (None) dynamic per token
    with s = absmax / 448 [M, 1]. Values are saturated to ±448 before the (round-to-nearest-even) cast.
    (The fp8 kernels' oracle, kernels/reference.py, and SmoothQuant's α search share it.)"""
    if x_scale is None:
        x_scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp_min(_EPS)
    x8 = to_fp8(x.float() / x_scale.float())
    return x8, x_scale


def fake_quant_act_per_token(x: torch.Tensor, bits: int = 8, clip_ratio: float = 1.0) -> torch.Tensor:
    q, scale = quantize_act_per_token(x, bits, clip_ratio)
    return (q.float() * scale).to(x.dtype)


# ---------------------------------------------------------------- smoothing


def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant per-input-channel scales s_j = max|X_j|^α / max|W_j|^(1-α) (clamped to stay finite).

    Y = X·Wᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ: dividing activations by s and multiplying weight columns by s
    moves quantization difficulty from activation outliers to weights.
    """
    a = act_absmax.float().clamp_min(1e-5)
    wmax = w_absmax.float().clamp_min(1e-5)
    s = a.pow(alpha) / wmax.pow(1.0 - alpha)
    return s.clamp(1e-5, 1e5)


def module_norm_multiplier(norm: torch.nn.Module, d: int) -> torch.Tensor:
    """The per-channel multiplier m of an RMSNorm module (γ, or 1 + γ for Gemma), float64, measured rather than
    assumed: on a constant input c·1 (rms = c, so eps is negligible for a large c) the norm returns m."""
    x = torch.full((1, d), 1e4, dtype=norm.weight.dtype)
    with torch.no_grad():
        return norm(x)[0].double()


# ---------------------------------------------------------------- error metrics


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σref² / Σ(ref - approx)²).

    Float32 elementwise, float64 sums (a float64 copy of every activation would cost more than the rest of
    the measurement)."""
    ref = reference.float()
    noise = (ref - approx.float()).pow(2).sum(dtype=torch.float64)
    signal = ref.pow(2).sum(dtype=torch.float64)
    return sqnr_from_sums(float(signal), float(noise))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10·log10(signal / noise) from sums of squares (accumulated in pieces, e.g. over row chunks)."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)
