"""fuse_linears: merge linears that read the same tensor into one linear, then split its output.

    y_i = x·W_iᵀ + b_i  (i = 1..n)   ⇒   [y_1 | … | y_n] = x·[W_1; …; W_n]ᵀ + [b_1; …; b_n]

(q/k/v and gate/up in every decoder family). One GEMM replaces n; the fused group necessarily shares one
quantization scheme, which is what Ascend/vLLM loaders require of fused groups. Numerically exact.
Runs when the target asks for fused linears (or `force=true`). It refuses a group whose members were
already quantized (fuse before weight quantization) and reports why.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompiler.calib.stats import Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import LINEAR, get_tensor
from qcompiler.ir.rebuild import fuse_group
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.pm.rewrite import MATCH, MatchResult, fail


def check_group(gm: fx.GraphModule, nodes: list[fx.Node]) -> MatchResult:
    for n in nodes:
        if qmeta.WQ in n.meta:
            return fail(f"'{n.name}' is already quantized; fuse before weight quantization")
        if not (isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"):
            return fail(f"'{n.name}' has a computed weight")
    dtypes = {get_tensor(gm, str(n.args[1].target)).dtype for n in nodes}  # type: ignore[union-attr]
    if len(dtypes) > 1:
        return fail(f"weights have different dtypes {sorted(map(str, dtypes))}")
    return MATCH


@dataclass(frozen=True)
class FuseSharedInputLinears(Pass):
    name = "fuse_linears"
    summary = "merge linears that share one input (q/k/v, gate/up) into one linear + split"
    keeps_values = True  # (the members' outputs become slices of the fused output: equal values)
    force: bool = False  # fuse even if the target does not ask for it

    def uses_calibration(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        if not (self.force or ctx.target.fuse_shared_input_linears):
            return PassResult(gm, False, {"skipped": f"target '{ctx.target.name}' does not fuse linears"})
        analysis = analyze_block(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        fused, rejected = [], {}
        for group in analysis.shared_input_groups:
            members = [nodes[g] for g in group]
            if not all(m.target == LINEAR for m in members):
                continue
            m = check_group(gm, members)
            if not m:
                rejected[",".join(group)] = m.reason
                continue
            infos = [analysis.linears[g] for g in group]
            schemes = [ctx.layer_scheme(i) for i in infos]
            if any(s != schemes[0] for s in schemes[1:]):
                names = ", ".join(f"{i.path}={s.name if s else 'float'}" for i, s in zip(infos, schemes, strict=True))
                rejected[",".join(group)] = f"members have different schemes ({names})"
                continue
            node = fuse_group(gm, members, [i.path for i in infos], [i.role for i in infos])
            fused.append(node.meta[qmeta.PATH])
        gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(fused), {"fused": fused, "rejected": rejected})
