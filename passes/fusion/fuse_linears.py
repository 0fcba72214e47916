"""fuse_linears: merge linears that read the same tensor into one linear, then split its output.

    y_i = x·W_iᵀ + b_i  (i = 1..n)   ⇒   [y_1 | … | y_n] = x·[W_1; …; W_n]ᵀ + [b_1; …; b_n]

(q/k/v and gate/up in every decoder family). One GEMM replaces n; the fused group necessarily shares one
quantization scheme, which is what Ascend/vLLM loaders require of fused groups. Numerically exact.
Runs when the target asks for fused linears (or `force=true`). Members already quantized (awq_rtn quantizes
before fusion) fuse when they share one grid with a scale per row or group: rows are independent, so the fused
grid is the members' scales stacked. It refuses, and reports why, a group mixing quantized and float members or
grids, and quantized members with a per-tensor scale, a 2:4 mask or a learned transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.calib.stats import Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import LINEAR, get_tensor
from qcompiler.ir.rebuild import fuse_group
from qcompiler.numerics import sqnr_from_sums
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.pm.rewrite import MATCH, MatchResult, fail


def check_group(gm: fx.GraphModule, nodes: list[fx.Node]) -> MatchResult:
    quantized = [qmeta.WQ in n.meta for n in nodes]
    if any(quantized) and not all(quantized):
        done = next(n.name for n, q in zip(nodes, quantized, strict=True) if q)
        return fail(f"'{done}' is already quantized and other members are not; fuse before weight quantization")
    if all(quantized):
        grids = {(n.meta[qmeta.WQ].args, n.meta[qmeta.WQ].group_size, n.meta[qmeta.WQ].zero is None) for n in nodes}
        if len(grids) > 1:
            return fail("members were quantized on different grids (" + "; ".join(
                f"{n.name}: {n.meta[qmeta.WQ].args.describe()}, group {n.meta[qmeta.WQ].group_size}" for n in nodes)
                + "); fuse before weight quantization")
        if any(qmeta.SPARSE in n.meta or qmeta.TRANSFORM in n.meta for n in nodes):
            return fail("quantized members carry a 2:4 mask or a learned transform; fuse before weight quantization")
        if any(n.meta[qmeta.WQ].args.granularity == "tensor" for n in nodes):
            return fail("members were quantized with one scale per tensor each; fuse before weight quantization")
    for n in nodes:
        if not (isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"):
            return fail(f"'{n.name}' has a computed weight")
    dtypes = {get_tensor(gm, str(n.args[1].target)).dtype for n in nodes}  # type: ignore[union-attr]
    if len(dtypes) > 1:
        return fail(f"weights have different dtypes {sorted(map(str, dtypes))}")
    return MATCH


def fused_weight_quant(members: list[qmeta.WeightQuant], w_hats: list[torch.Tensor]) -> qmeta.WeightQuant:
    """The grid of a fused linear whose members were quantized on one grid with a scale per row or group: rows are
    independent, so the members' scales (and zero points) stack in row order. Its weight SQNR combines the members'
    noise energies ‖ŵ_i‖²·10^(−SQNR_i/10) over their signal energies, with ‖ŵ_i‖² standing for ‖W_i‖² (they differ by
    the noise, ≤ 10^(−SQNR/20) relative)."""
    first = members[0]
    sqnr = None
    db = [m.weight_sqnr_db for m in members]
    if all(d is not None for d in db):
        signal = [float(w.float().pow(2).sum(dtype=torch.float64)) for w in w_hats]
        noise = sum(e * 10.0 ** (-float(d) / 10) for e, d in zip(signal, db, strict=True))  # type: ignore[arg-type]
        sqnr = sqnr_from_sums(sum(signal), noise)
    return qmeta.WeightQuant(
        args=first.args, scale=torch.cat([m.scale for m in members]),
        zero=None if first.zero is None else torch.cat([m.zero for m in members]),  # type: ignore[misc]
        group_size=first.group_size, weight_sqnr_db=sqnr)


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
            quant = [m.meta[qmeta.WQ] for m in members] if qmeta.WQ in members[0].meta else None
            hats = [get_tensor(gm, i.weight) for i in infos] if quant else []
            node = fuse_group(gm, members, [i.path for i in infos], [i.role for i in infos])
            if quant:
                node.meta[qmeta.WQ] = fused_weight_quant(quant, hats)
            fused.append(node.meta[qmeta.PATH])
        gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(fused), {"fused": fused, "rejected": rejected})
