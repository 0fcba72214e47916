"""SmoothQuant's migration strength α, searched per linear input on sampled calibration tokens.

For an input X [T, K] read by linears W_i (stacked: W [N, K]) and per-channel scales
    s(α)_j = max_t|X_tj|^α / max_n|W_nj|^(1−α)
the smoothed layer computes Q_a(X·diag(s)⁻¹)·Q_w(W·diag(s))ᵀ, which equals X·Wᵀ without quantization. The search
picks the α of a grid that minimises the relative output error

    E(α) = ‖X·Wᵀ − Q_a(X/s)·Q_w(W·s)ᵀ‖² / ‖X·Wᵀ‖²

with Q_a the scheme's activation grid (dynamic per token, or one static scale per tensor on the range of X/s over
every calibration token)
and Q_w its weight grid (fake-quant, min-max). One α for the whole input, as the paper's, but chosen per layer
instead of one value for every model (α = 0.5 is poor where a layer's outliers are mild, e.g. o_proj and down_proj
inputs once smoothed from their producers). Coarse to fine: every `coarse` step of [0, 1], then the two points a
half-step either side of the best, then a quarter-step. The family s(α) does not contain s = 1 (α = 0 gives
1/max|W|), so leaving X alone is scored too and kept where it wins.

Tied scales (grouped-query attention, see qcompiler/ir/producers.py): s is chosen over the producer's rows and the
input's channel c is divided by s[index[c]]; the statistics are reduced to the producer rows by a max over the
channels that share one.
"""

from __future__ import annotations

import torch

from qcompiler.numerics import (
    act_qparams_from_range,
    fake_quant_act_per_tensor,
    fake_quant_act_per_token,
    fake_quant_weight,
    int8_matmul,
    quantize_act_fp8,
    quantize_act_per_token,
    quantize_weight,
    smooth_scales,
    weight_qparams,
)
from qcompiler.schemes import FP8_E4M3_MAX, QuantArgs


def fake_quant_activations(x: torch.Tensor, args: QuantArgs, peak: torch.Tensor) -> torch.Tensor:
    """x [T, K] through the scheme's activation grid: dynamic per token (int or fp8), or static per tensor on the
    range ±peak (peak = max |x| over every calibration token, which a sample of them can miss: a min-max observer's
    range, taken symmetric)."""
    if args.is_float:  # (the fp8 kernels' grid: per token when the scale is None)
        x8, scale = quantize_act_fp8(x, None if args.dynamic else (peak / FP8_E4M3_MAX).clamp_min(1e-12))
        return x8.float() * scale
    if args.dynamic:
        return fake_quant_act_per_token(x, args.bits)
    scale, zero = act_qparams_from_range(-peak, peak, args)
    return fake_quant_act_per_tensor(x, scale, zero, args.qmin, args.qmax)


def reduce_tied(values: torch.Tensor, index: torch.Tensor | None, size: int) -> torch.Tensor:
    """Per-channel maxima [K] reduced to the `size` tied scales (max over the channels c with index[c] = r)."""
    if index is None:
        return values
    return torch.full((size,), float("-inf")).scatter_reduce(0, index, values.float(), "amax")


def tied_smooth_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float, index: torch.Tensor | None
                       ) -> torch.Tensor:
    """SmoothQuant's s(α) for an input read by w [N, K] — over the tied rows when `index` ties the K channels."""
    size = int(index.max()) + 1 if index is not None else w.shape[1]
    return smooth_scales(reduce_tied(act_absmax.float(), index, size), reduce_tied(w.abs().amax(dim=0), index, size),
                         alpha)


def quantized_product(x: torch.Tensor, w: torch.Tensor, weight_args: QuantArgs, act_args: QuantArgs,
                      peak: torch.Tensor) -> torch.Tensor:
    """Q_a(x)·Q_w(w)ᵀ [T, N] for x [T, K], w [N, K] on the scheme's grids (`peak`: the static activation range).

    Where both grids are symmetric integer grids of ≤ 8 bits with one scale per token (or tensor) and per output row
    (or tensor), Q_a(x) = a·σ and Q_w(w) = b·ω with integer codes a, b, so the product is σ ⊙ (a·bᵀ) ⊙ ωᵀ: one int8
    GEMM (numerics.int8_matmul, exact int32 sums; torch._int_mm ≈ 3.7× a float32 GEMM on a CPU with AMX) and two scalings — the same
    numbers as multiplying the fake-quantized operands, to float32 rounding. Otherwise those fake-quantized
    operands are multiplied in float32."""
    if _int8_codes(weight_args, act_args):
        if act_args.dynamic:
            a, sigma = quantize_act_per_token(x, act_args.bits)
        else:
            sigma, _ = act_qparams_from_range(-peak, peak, act_args)
            a = torch.clamp(torch.round(x.float() / sigma), act_args.qmin, act_args.qmax).to(torch.int8)
        omega, _ = weight_qparams(w, weight_args)
        b = quantize_weight(w, omega, None, weight_args).to(torch.int8)
        return int8_matmul(a, b.t()).float() * sigma * omega.reshape(1, -1)
    return fake_quant_activations(x, act_args, peak) @ fake_quant_weight(w, weight_args).t()


def _int8_codes(weight_args: QuantArgs, act_args: QuantArgs) -> bool:
    """Whether quantized_product can multiply integer codes: symmetric int grids of ≤ 8 bits, weights per channel
    or per tensor, activations per token (dynamic) or per tensor (static)."""
    return (not weight_args.is_float and not act_args.is_float and weight_args.symmetric and act_args.symmetric
            and weight_args.bits <= 8 and act_args.bits <= 8 and weight_args.granularity in ("channel", "tensor"))


def smoothing_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, reference: torch.Tensor,
                    weight_args: QuantArgs, act_args: QuantArgs, act_absmax: torch.Tensor) -> float:
    """E = ‖reference − Q_a(X/s)·Q_w(W·s)ᵀ‖² / ‖reference‖², reference = X·Wᵀ; act_absmax [K] over every token."""
    peak = (act_absmax.float() / s).amax()
    y = quantized_product(x / s, w * s, weight_args, act_args, peak)
    return float((reference - y).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def search_alpha(x: torch.Tensor, w: torch.Tensor, act_absmax: torch.Tensor, weight_args: QuantArgs,
                 act_args: QuantArgs, index: torch.Tensor | None = None, coarse: float = 0.25
                 ) -> tuple[float | None, torch.Tensor, dict[float, float]]:
    """(best α, its scales over the tied rows, E by α tried); α None and scales 1 when no α beats leaving X alone.
    x [T, K] sampled inputs, w [N, K] the stacked weights, act_absmax [K] over every calibration token; index [K]
    ties input channels to rows (None: untied)."""
    x, w = x.float(), w.float()
    reference = x @ w.t()
    tried: dict[float, float] = {}

    def score(alpha: float) -> float:
        alpha = round(min(max(alpha, 0.0), 1.0), 6)
        if alpha not in tried:
            s = tied_smooth_scales(act_absmax, w, alpha, index)
            tried[alpha] = smoothing_error(x, w, s if index is None else s[index], reference, weight_args, act_args,
                                           act_absmax)
        return tried[alpha]

    steps = round(1.0 / coarse)
    for i in range(steps + 1):
        score(i * coarse)
    best = min(tried, key=tried.__getitem__)
    for step in (coarse / 2, coarse / 4):
        for cand in (best - step, best + step):
            score(cand)
        best = min(tried, key=tried.__getitem__)
    # no α of the family may beat leaving the input alone (s = 1; e.g. int4 weights under per-token activations):
    # then it stays unsmoothed, α reported as None
    unsmoothed = smoothing_error(x, w, torch.ones(x.shape[1]), reference, weight_args, act_args, act_absmax)
    if unsmoothed <= tried[best]:
        return None, torch.ones(int(index.max()) + 1 if index is not None else x.shape[1]), tried
    return best, tied_smooth_scales(act_absmax, w, best, index), tried
