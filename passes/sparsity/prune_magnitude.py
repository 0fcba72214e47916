"""prune_magnitude: 2:4 sparsity by weight magnitude.

W ← W ⊙ M with M keeping the 2 largest |W_nk| of every 4 consecutive inputs of a row (algorithms/sparsity.py).
Data-free: the baseline the activation-aware methods (prune_wanda, sparsegpt) are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompiler.algorithms.sparsity import magnitude_scores, mask_2_4
from qcompiler.calib.stats import Stats
from qcompiler.ir.graph import get_tensor, set_tensor
from qcompiler.passes.sparsity.common import mark_pruned, sparse_targets
from qcompiler.pm.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class PruneMagnitude(Pass):
    name = "prune_magnitude"
    summary = "2:4 sparsity keeping the 2 largest |w| of every 4 inputs (data-free)"
    force: bool = False  # prune every quantizable linear even when the scheme is dense

    def uses_calibration(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        targets, skipped = sparse_targets(gm, ctx, self.force)
        layers = {}
        for node, info in targets:
            w = get_tensor(gm, info.weight)
            pruned = w * mask_2_4(magnitude_scores(w)).to(w.dtype)
            set_tensor(gm, info.weight, pruned)
            layers[info.path] = mark_pruned(node, pruned, self.name)
        return PassResult(gm, bool(layers), {"layers": layers, "skipped": skipped})
