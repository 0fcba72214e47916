"""lower: rewrite quantized patterns into the target's kernel ops, using the target's rule set.

Each rule is pattern → check → rewrite (see qcompiler.pm.rewrite); the pass reports how many rewrites each
rule made and, for quantized linears no rule took, why. After lowering the float weights the kernels replace
are deleted from the graph module, so a lowered block holds only what its kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompiler.calib.stats import Stats
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, eliminate_dead_attrs, is_call
from qcompiler.ir.routing import strip_routing_markers
from qcompiler.passes.lowering.linear_rules import record_float_linear
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.pm.rewrite import apply_rules


@dataclass(frozen=True)
class LowerLinears(Pass):
    name = "lower"
    summary = "lower quantized linears to the target's kernel ops (qc::linear_woq, qc::linear_w8a8, ...)"
    strict: bool = True  # a quantized linear that no rule can lower is an error (never silently float)

    def uses_calibration(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        strip_routing_markers(gm)
        report = apply_rules(gm, ctx.target.lowering_rules())
        left = [n.name for n in gm.graph.nodes if is_call(n, LINEAR) and qmeta.WQ in n.meta]
        if left and self.strict:
            reasons = {k: v for k, v in report.rejected.items() if k in left}
            raise PassError(
                f"block '{ctx.block}': target '{ctx.target.name}' cannot lower quantized linears {left}: {reasons}"
            )
        for n in gm.graph.nodes:  # float layers the description must name: fused, 2:4 sparse, online-rotated
            if is_call(n, LINEAR) and any(k in n.meta for k in (qmeta.FUSED_FROM, qmeta.SPARSE, qmeta.ROTATION)):
                record_float_linear(gm, n)
        eliminate_dead_attrs(gm)
        return PassResult(gm, report.total > 0, {"lowered": dict(report.applied), "rejected": report.rejected})
