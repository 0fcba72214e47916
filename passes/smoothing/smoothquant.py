"""smoothquant: migrate activation outliers into the weights (Xiao et al., 2023), folded into the norm.

For a norm whose output X feeds linears W_1..W_n (q/k/v, or gate/up):
    s_j = max_t|X_tj|^α / max_i,n |W_i[n, j]|^(1−α)
    X' = X·diag(s)⁻¹  (folded into the norm: m' = m / s),   W_i' = W_i·diag(s)
so X'·W_i'ᵀ = X·W_iᵀ: the float model is unchanged (up to rounding) and only the quantization difficulty
moves. α = 0.5 is the paper's default for most LLMs. Needs per-channel absmax of X: one calibration run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import get_tensor
from qcompiler.numerics import smooth_scales
from qcompiler.passes.fusion.fold_norm import check_norm_group, scale_linear_inputs, scale_norm
from qcompiler.pm.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class SmoothQuant(Pass):
    name = "smoothquant"
    summary = "SmoothQuant: s = max|X|^α / max|W|^(1-α), folded into the preceding norm"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        return [StatRequest(g.mul_node, "absmax_channel") for g in analyze_block(gm).norm_groups]

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        analysis = analyze_block(gm)
        smoothed, rejected = [], {}
        for group in analysis.norm_groups:
            m = check_norm_group(gm, group)
            if not m:
                rejected[group.weight] = m.reason
                continue
            act_absmax = stats[StatRequest(group.mul_node, "absmax_channel")]
            w_absmax = torch.stack(
                [get_tensor(gm, analysis.linears[lin].weight).abs().amax(dim=0).float() for lin in group.linears]
            ).amax(dim=0)
            s = smooth_scales(act_absmax, w_absmax, self.alpha)
            for lin in group.linears:
                scale_linear_inputs(gm, analysis.linears[lin].weight, s)
            scale_norm(gm, group, s)
            smoothed.append(group.weight)
        return PassResult(gm, bool(smoothed), {"smoothed": smoothed, "rejected": rejected})
