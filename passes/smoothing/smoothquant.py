"""smoothquant: migrate activation outliers into the weights (Xiao et al., 2023), folded into what produces them.

For a linear input X read by linears W_1..W_n (q/k/v or gate/up after a norm; o_proj, down_proj):
    s_j = max_t|X_tj|^α / max_i,n |W_i[n, j]|^(1−α)
    X' = X·diag(s)⁻¹,   W_i' = W_i·diag(s)
so X'·W_i'ᵀ = X·W_iᵀ: the float model is unchanged (up to rounding) and only the quantization difficulty
moves. The division is folded into X's producer, where it is exact:
  - a norm's output: its multiplier m' = m / s;
  - (producers, default true) down_proj's input act(gate) ⊙ up, by dividing up's rows (and bias) by s; o_proj's input,
    attention over values, by dividing v's rows by s — under grouped-query attention one s per kv channel, tied over
    the query heads that read it (qcompiler/ir/producers.py). Per-channel weight grids absorb a row scaling, so
    up's and v's own quantization does not change. o_proj's is skipped when the scheme quantizes the KV cache (the
    cached values would be rescaled channel by channel under one calibrated scale).
α: unset (the default), searched per input on a coarse-to-fine grid on [0, 1] by the output error under the
scheme's own grids on sampled calibration tokens (qcompiler/algorithms/smoothquant.py); a number fixes it for every
input (0.5 is the paper's default; `smoothquant{alpha=0.5,producers=false}` is the paper's method). Layers without
quantized activations use 0.5. The search also scores leaving the input alone and keeps it where no α beats it.
Needs per-channel absmax of X and a token sample: one calibration run.
Measured on the demo (w8a8_dynamic + RTN, 16k held-out tokens): the paper's +1.26 %, α searched +0.96 %, producers
+0.99 %, both +0.61 % (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.algorithms.smoothquant import search_alpha, tied_smooth_scales
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir.analysis import BlockAnalysis, NormGroup, analyze_block
from qcompiler.ir.graph import get_tensor
from qcompiler.ir.producers import RowProducer, row_divisor, row_producers
from qcompiler.passes.fusion.fold_norm import (
    check_norm_group,
    divide_linear_outputs,
    scale_linear_inputs,
    scale_norm,
)
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs


@dataclass(frozen=True)
class SmoothQuant(Pass):
    name = "smoothquant"
    summary = "SmoothQuant: s = max|X|^α / max|W|^(1-α), folded into the norm (and up's / v's rows with producers)"
    alpha: float | None = None  # None: searched per input
    producers: bool = True

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def _row_sites(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[list[RowProducer], str | None]:
        if not self.producers:
            return [], None
        sites = list(row_producers(gm).values())
        if ctx.scheme.kv_cache is not None and any(rp.kind == "attention" for rp in sites):
            return [rp for rp in sites if rp.kind != "attention"], \
                "o_proj: the KV cache is quantized, so v's rows (the cached values) are not rescaled"
        return sites, None

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        inputs = [g.mul_node for g in analyze_block(gm).norm_groups]
        inputs += [rp.input for rp in self._row_sites(gm, ctx)[0]]
        reqs = [StatRequest(x, "absmax_channel") for x in inputs]
        if self.alpha is None:
            reqs += [StatRequest(x, "token_sample") for x in inputs]
        return reqs

    def _grids(self, ctx: PassContext, analysis: BlockAnalysis, linears: list[str]
               ) -> tuple[QuantArgs, QuantArgs] | None:
        """The (weight, activation) grids the search scores with: the first linear's; None when it has no
        quantized activations (then the fixed α is used)."""
        scheme = ctx.layer_scheme(analysis.linears[linears[0]])
        if scheme is None or scheme.weights is None or scheme.activations is None:
            return None
        return scheme.weights, scheme.activations

    def smoothing_scales(self, gm: fx.GraphModule, ctx: PassContext, analysis: BlockAnalysis, stats: Stats, x: str,
                         linears: list[str], index: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
        """(s over the input's channels — over the tied rows when `index` is given — and the α used); also called by
        sq_gptq's staged SmoothQuant, which measures each input after the earlier ones were smoothed and quantized."""
        w = torch.cat([get_tensor(gm, analysis.linears[lin].weight).float() for lin in linears])
        act_absmax = stats[StatRequest(x, "absmax_channel")]
        grids = self._grids(ctx, analysis, linears) if self.alpha is None else None
        if grids is not None:
            alpha, s, _ = search_alpha(stats[StatRequest(x, "token_sample")], w, act_absmax, grids[0], grids[1], index)
            return s, alpha
        alpha = 0.5 if self.alpha is None else self.alpha
        return tied_smooth_scales(act_absmax, w, alpha, index), alpha

    def groups(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[list[SmoothGroup], dict[str, str], str | None]:
        """The inputs this pass smooths, in order (norm groups, then producer rows), the norm groups it rejects (by
        norm weight, with the reason) and the note on producers it skips (None: none)."""
        analysis = analyze_block(gm)
        groups, rejected = [], {}
        for ng in analysis.norm_groups:
            m = check_norm_group(gm, ng)
            if not m:
                rejected[ng.weight] = m.reason
                continue
            groups.append(SmoothGroup("+".join(analysis.linears[lin].path for lin in ng.linears), ng.mul_node,
                                      list(ng.linears), norm=ng))
        row_sites, skipped = self._row_sites(gm, ctx)
        for rp in row_sites:
            groups.append(SmoothGroup(analysis.linears[rp.consumer].path, rp.input, [rp.consumer], producer=rp.producer,
                                      offset=rp.offset, rows=rp.rows, index=rp.index))
        return groups, rejected, skipped

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        analysis = analyze_block(gm)
        groups, rejected, skipped = self.groups(gm, ctx)
        smoothed, alphas = [], {}
        for g in groups:
            s, alpha = self.smoothing_scales(gm, ctx, analysis, stats, g.input, g.consumers, g.index)
            alphas[g.label] = alpha
            if alpha is None:  # (searched: leaving the input alone scored best)
                continue
            fold_smoothing(gm, ctx, analysis, g, s)
            smoothed.append(g.norm.weight if g.norm is not None else g.label)
        # α by input (None: searched, and leaving the input alone scored best)
        details: dict[str, object] = {"smoothed": smoothed, "rejected": rejected, "alpha": alphas}
        if skipped:
            details["producers_skipped"] = skipped
        return PassResult(gm, bool(smoothed), details)


@dataclass
class SmoothGroup:
    """One smoothed input: its consumers' columns are multiplied by s, and what produces it is divided by s."""

    label: str
    input: str  # the node whose channels s divides (the statistics are measured there)
    consumers: list[str]  # linear nodes whose input columns are multiplied by s
    norm: NormGroup | None = None  # a norm group: its multiplier is divided by s
    producer: str | None = None  # a row group: the linear whose rows [offset, offset + rows) are divided by s
    offset: int = 0
    rows: int = 0
    index: torch.Tensor | None = None  # input channel → producer row (tied scales under grouped-query attention)


def fold_smoothing(gm: fx.GraphModule, ctx: PassContext, analysis: BlockAnalysis, g: SmoothGroup, s: torch.Tensor
                   ) -> torch.Tensor:
    """X·diag(s)⁻¹ folded into g's producer (the norm's multiplier, or the producer's rows) and W·diag(s) into its
    consumers; s over the producer's rows (tied), returned over the input's channels."""
    s_in = s if g.index is None else s[g.index]
    for lin in g.consumers:
        scale_linear_inputs(gm, analysis.linears[lin].weight, s_in)
    if g.norm is not None:
        scale_norm(gm, g.norm, s)
    else:
        assert g.producer is not None
        producer = analysis.linears[g.producer]
        divide_linear_outputs(gm, ctx, producer, row_divisor(producer.out_features, g.offset, g.rows, s))
    return s_in
