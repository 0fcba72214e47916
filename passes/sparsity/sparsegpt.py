"""sparsegpt: 2:4 sparsity with Hessian error compensation (SparseGPT), optionally quantizing in the same sweep.

For each pruned linear, with H = Σ_t x_tᵀ x_t of its input (the same `hessian` statistic GPTQ requests, so a
stats cache serves both) the GPTQ column sweep runs with a 2:4 choice made every 4 columns on the already-updated
weights by the OBS saliency w² / U_kk² (U: upper Cholesky factor of H⁻¹); pruned weights push their whole
value, kept ones their rounding error, onto the columns not yet processed (algorithms/sparsity.sparsegpt).

quantize=True (default) and a layer scheme with integer weights: the kept weights are quantized in the sweep
(per channel, or static groups) and the layer leaves quantized (node.meta[WQ]; rtn / gptq skip it) —
SparseGPT's joint mode. Float-weight schemes (w16a16s) get the pruned, compensated float weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompiler.algorithms.sparsity import sparsegpt
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.graph import get_tensor, set_tensor
from qcompiler.numerics import sqnr_db
from qcompiler.passes.sparsity.common import mark_pruned, sparse_targets
from qcompiler.pm.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class SparseGPT(Pass):
    name = "sparsegpt"
    quantizes_weights = True
    summary = "2:4 sparsity with Hessian error compensation (SparseGPT), quantizing kept weights in the same sweep"
    quantize: bool = True  # joint prune + quantize when the layer's scheme has integer weights
    block_size: int = 128
    damp: float = 0.01
    force: bool = False  # prune every quantizable linear even when the scheme is dense

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        return [StatRequest(node.args[0].name, "hessian")  # type: ignore[union-attr]
                for node, _ in sparse_targets(gm, ctx, self.force)[0]]

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        targets, skipped = sparse_targets(gm, ctx, self.force)
        layers = {}
        for node, info in targets:
            req = StatRequest(node.args[0].name, "hessian")  # type: ignore[union-attr]
            if req not in stats.values:
                skipped[info.path] = "no calibration token reached it"
                continue
            h, tokens = stats[req]
            scheme = ctx.layer_scheme(info)
            args = scheme.weights if scheme is not None and self.quantize else None
            if args is not None and (args.is_float or args.granularity == "tensor"):
                args = None  # fp8 / per-tensor grids: prune here, quantize in rtn
            w = get_tensor(gm, info.weight)
            r = sparsegpt(w, h, args, tokens=tokens, block_size=self.block_size, damp=self.damp)
            set_tensor(gm, info.weight, r.w_hat.to(w.dtype))
            report = mark_pruned(node, r.w_hat, self.name)
            report.update({"proxy_loss": r.proxy_loss, "magnitude_proxy_loss": r.magnitude_proxy_loss})
            if args is not None:
                assert r.scale is not None
                node.meta[qmeta.WQ] = qmeta.WeightQuant(args=args, scale=r.scale, zero=r.zero, group_size=r.group_size,
                                                        weight_sqnr_db=sqnr_db(w.float(), r.w_hat))
            layers[info.path] = report
        return PassResult(gm, bool(layers), {"layers": layers, "skipped": skipped})
