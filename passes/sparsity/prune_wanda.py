"""prune_wanda: 2:4 sparsity by |weight| × input norm (Wanda, Sun et al. 2023).

W ← W ⊙ M with M keeping, in every 4 consecutive inputs of a row, the 2 largest s_nk = |W_nk|·‖X_k‖₂, where
‖X_k‖₂² = Σ_t x_tk² over the calibration tokens (statistic `sqsum_channel`, the Hessian's diagonal). No weight
update; one calibration statistic per distinct linear input (q/k/v share one).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompiler.algorithms.sparsity import mask_2_4, wanda_scores
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir.graph import get_tensor, set_tensor
from qcompiler.passes.sparsity.common import mark_pruned, sparse_targets
from qcompiler.pm.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class PruneWanda(Pass):
    name = "prune_wanda"
    summary = "2:4 sparsity keeping the 2 largest |w|·‖x‖ of every 4 inputs (Wanda)"
    force: bool = False  # prune every quantizable linear even when the scheme is dense

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        return [StatRequest(node.args[0].name, "sqsum_channel")  # type: ignore[union-attr]
                for node, _ in sparse_targets(gm, ctx, self.force)[0]]

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        targets, skipped = sparse_targets(gm, ctx, self.force)
        layers = {}
        for node, info in targets:
            req = StatRequest(node.args[0].name, "sqsum_channel")  # type: ignore[union-attr]
            if req not in stats.values:  # (an expert no calibration token reached: magnitude is all we know)
                skipped[info.path] = "no calibration token reached it"
                continue
            w = get_tensor(gm, info.weight)
            pruned = w * mask_2_4(wanda_scores(w, stats[req])).to(w.dtype)
            set_tensor(gm, info.weight, pruned)
            layers[info.path] = mark_pruned(node, pruned, self.name)
        return PassResult(gm, bool(layers), {"layers": layers, "skipped": skipped})
