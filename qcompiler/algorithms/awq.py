"""AWQ (Lin et al., 2024) and activation-aware clipping as pure tensor functions.

Scale search. For linears W_1..W_n reading the same input X [T, K] (q/k/v, gate/up; or one linear fed by
another: o after v, down after up) a per-input-channel scale s > 0 gives the identical float function
    X·W_iᵀ = (X·diag(s)⁻¹)·(W_i·diag(s))ᵀ
but a different quantization error, since salient input channels (large mean |X|) get finer steps. AWQ
tries s(α) = mean|X|^α / mean|Ŵ|^(1−α) (Ŵ: |W| normalised by each group's max, averaged over rows),
normalised to geometric mean 1, on a grid α ∈ {0, 1/n, ..., (n−1)/n}, plus s = 1, and keeps the s that
minimises the output error over the calibration tokens (searched coarse to fine: every 4th α, then the points
around the best; on the demo model every group's choice equals the exhaustive search's, in 11 products of 21). That error is exact and needs no replay of the
tokens: with H = XᵀX / T and Δ_i = W_i − Q(W_i·diag(s))·diag(s)⁻¹,
    (1/T)·Σ_t ‖x_t·Δ_iᵀ‖² = tr(Δ_i H Δ_iᵀ),
so the search is one Gram matrix ΔᵀΔ [K, K] per candidate. Where the CPU multiplies bfloat16 in hardware the Gram
runs in bf16 (Δ rounded once, float32 sums, the [K, K] result rounded once): each score is then off by at most
3u·⟨|H|, |Δ|ᵀ|Δ|⟩ (u = 2⁻⁸), so only candidates that close can swap (benchmarks/clip_search.py --awq measures the
choices and the chosen scales' exact error against float32 scores on the demo's layers).

Activation-aware clipping. For each group of K (columns J) and output row n, find the range shrink r that
minimises the output error of that group's partial product, δ_nJ H_JJ δ_nJᵀ (δ = w − Q_r(w)): the block-
diagonal part of tr(ΔHΔᵀ), the same criterion as AutoAWQ's auto_clip, computed from H instead of samples.
Groups of ≥ 256 columns (per-channel grids: an N·K² product per candidate, most of an 8-bit GPTQ's arithmetic)
score their candidates with a bfloat16 product where the CPU multiplies bf16 in hardware: the score's error is at
most 3u·|δ|·|H_JJ|·|δ|ᵀ (u = 2⁻⁸: δ, H and δH rounded once, float32 sums), so it can only swap candidates that
close. On the demo's w8a8 layers (benchmarks/clip_search.py): 1.8–1.9× faster, the chosen grids' error 2·10⁻⁷
(relative) above the float32 search's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qcompiler.cpu_features import native_bf16
from qcompiler.numerics import (
    fake_quant_weight,
    gram,
    group_size_of,
    grouped_fake_quant,
    grouped_ranges,
    qparams_from_ranges,
    rows_per_chunk,
    to_groups,
)
from qcompiler.schemes import QuantArgs


@dataclass
class AWQResult:
    scales: torch.Tensor  # [K] multiply the weights' input channels, divide the producer's output
    alpha: float | None  # the chosen α, or None when s = 1 (no scaling) was best
    loss: float  # tr(ΔHΔᵀ) summed over the group's linears, at the chosen s
    loss_unscaled: float  # the same at s = 1


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, bf16: bool = False) -> float:
    """tr((W − Ŵ)·H·(W − Ŵ)ᵀ) = ⟨H, ΔᵀΔ⟩: mean squared output error for inputs with second moment H. ΔᵀΔ is
    symmetric, so numerics.gram computes it in 5/8 of the N·K² products that Δ·H would take. `bf16`: the Gram from
    Δ rounded to bfloat16 (a score within 3u·⟨|H|, |Δ|ᵀ|Δ|⟩, u = 2⁻⁸; the module docstring)."""
    d = w.float() - w_hat.float()
    if bf16:
        return float((gram(d.bfloat16()).float() * h).sum())
    return float((gram(d) * h).sum())


def normalized_weight_mean(ws: Sequence[torch.Tensor], args: QuantArgs) -> torch.Tensor:
    """Per input channel mean over rows of |W| / max|W in its group| (the weights concatenated by rows)."""
    w = torch.cat([x.float() for x in ws], dim=0)
    gs = group_size_of(args, w.shape[1])
    grouped = to_groups(w.abs(), gs)
    normed = grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return normed.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(dim=0)


def awq_candidate_scales(x_absmean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = (x_absmean.float().clamp_min(1e-8).pow(alpha) / (w_mean.float().pow(1.0 - alpha) + 1e-4)).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_search_scales(
    ws: Sequence[torch.Tensor],
    x_absmean: torch.Tensor,
    h: torch.Tensor,
    args: QuantArgs,
    grid: int = 20,
    coarse_step: int = 4,
    bf16: bool | None = None,
) -> AWQResult:
    """Best per-input-channel scales for the linears `ws` ([N_i, K]) reading inputs with mean |x| `x_absmean`
    [K] and second moment `h` [K, K] (= XᵀX / T). `bf16`: score the candidates with bfloat16 Grams (None: where the
    CPU multiplies bf16 in hardware); the losses returned are then those scores."""
    h = h.float()
    w_mean = normalized_weight_mean(ws, args)
    low = native_bf16() if bf16 is None else bf16

    def loss(s: torch.Tensor | None) -> float:
        total = 0.0
        for w in ws:
            wf = w.float()
            if s is None:
                total += output_error(wf, fake_quant_weight(wf, args), h, low)
            else:
                total += output_error(wf, fake_quant_weight(wf * s[None, :], args) / s[None, :], h, low)
        return total

    base = loss(None)
    best_s, best_alpha, best = torch.ones_like(x_absmean, dtype=torch.float32), None, base
    tried: dict[int, float] = {}

    def trial(i: int) -> None:
        nonlocal best_s, best_alpha, best
        if i in tried or not 0 <= i < grid:
            return
        s = awq_candidate_scales(x_absmean, w_mean, i / grid)
        tried[i] = v = loss(s)
        if v < best or (v == best and best_alpha is not None and i / grid < best_alpha):
            best_s, best_alpha, best = s, i / grid, v

    # coarse to fine: every `coarse_step`-th α, then the points around the best of them (each point costs an
    # N·K² product; the loss over α is smooth, so this finds the exhaustive grid's choice in ~half the points)
    for i in range(0, grid, coarse_step):
        trial(i)
    centre = min(tried, key=lambda i: (tried[i], i))
    for i in range(centre - coarse_step + 1, centre + coarse_step):
        trial(i)
    return AWQResult(scales=best_s, alpha=best_alpha, loss=best, loss_unscaled=base)


def activation_aware_clip(
    w: torch.Tensor, h: torch.Tensor, args: QuantArgs, grid: int = 20, min_ratio: float = 0.5
) -> torch.Tensor:
    """Per-group clip ratio r ∈ [min_ratio, 1] ([N, G]) minimising each group's output error δ H_JJ δᵀ.

    Integer grids are searched in the grouped layout, groups first ([G, rows, g]; the grid of ratio r is r times
    the min-max one), so each group's error is one batched product [G, rows, g] @ [G, g, g]; a few hundred rows
    at a time keep every temporary below the allocator's mmap threshold (no page faults per candidate)."""
    w = w.float()
    n, k = w.shape
    gs = group_size_of(args, k)
    g = -(-k // gs)
    pad = g * gs - k
    hp = torch.nn.functional.pad(h.float(), (0, pad, 0, pad))
    h_blocks = torch.stack([hp[j * gs : (j + 1) * gs, j * gs : (j + 1) * gs] for j in range(g)])  # [G, g, g]
    ratios = [1.0 - (1.0 - min_ratio) * i / grid for i in range(grid + 1)]
    if bf16_scores(gs):
        h_blocks = h_blocks.bfloat16()
    if args.is_float or args.granularity == "tensor":
        # fp8 grids round onto e4m3 and a per-tensor grid is one scale for all rows: the whole [N, K] weight
        candidates = (to_groups(fake_quant_weight(w, args, r), gs).transpose(0, 1) for r in ratios)
        return _best_ratio(to_groups(w, gs).transpose(0, 1), candidates, h_blocks, ratios).t().contiguous()
    wg_all = to_groups(w, gs).transpose(0, 1)  # [G, N, g] (a view)
    best = torch.empty(g, n)
    rows = rows_per_chunk(w)
    for r0 in range(0, n, rows):
        wg = wg_all[:, r0 : r0 + rows].contiguous()
        ranges = grouped_ranges(wg, args)  # (once: every ratio's grid is this range shrunk)
        candidates = (grouped_fake_quant(wg, *qparams_from_ranges(ranges, args, r), args) for r in ratios)
        best[:, r0 : r0 + rows] = _best_ratio(wg, candidates, h_blocks, ratios)
    return best.t().contiguous()


BF16_SCORES_MIN_GROUP = 256


def bf16_scores(group_size: int) -> bool:
    """Whether the clip search scores a group of this size in bfloat16 (see the module docstring)."""
    return group_size >= BF16_SCORES_MIN_GROUP and native_bf16()


def _best_ratio(
    wg: torch.Tensor, candidates: Iterator[torch.Tensor], h_blocks: torch.Tensor, ratios: list[float]
) -> torch.Tensor:
    """[G, rows]: the ratio whose candidate ŵ (one per ratio, [G, rows, g]) has the least error δ H_JJ δᵀ (the
    first one on ties). `h_blocks` in bfloat16: the products run in bf16 (bf16_scores)."""
    best_err: torch.Tensor | None = None
    best = torch.ones(wg.shape[:2])
    for ratio, w_hat in zip(ratios, candidates, strict=True):
        d = wg - w_hat
        err = (torch.bmm(d.to(h_blocks.dtype), h_blocks).float() * d).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best
