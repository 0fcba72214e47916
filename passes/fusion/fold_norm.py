"""fold_norm: fold a norm's elementwise weight into the linears it feeds.

    y = (h ⊙ m)·Wᵀ = h·(W·diag(m))ᵀ      so      W' = W·diag(m),  m' = 1   (γ' = 1 − c for m = γ + c)

Exact in real arithmetic. It is the prerequisite of rotation-based smoothing (a rotation commutes with an
RMSNorm only once the norm has no weight). Refused when the norm output also feeds something other than
the group's linears (that consumer would see a changed value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.calib.stats import Stats
from qcompiler.ir.analysis import LinearInfo, NormGroup, analyze_block, norm_multiplier_value
from qcompiler.ir.graph import PASSTHROUGH, get_tensor, is_call, set_tensor
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.pm.rewrite import MATCH, MatchResult, fail


def check_norm_group(gm: fx.GraphModule, group: NormGroup) -> MatchResult:
    """The norm output must reach nothing but the group's linears (through value-preserving casts)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    mul = nodes[group.mul_node]
    frontier, linears = list(mul.users), set(group.linears)
    while frontier:
        u = frontier.pop()
        if u.name in linears:
            continue
        if is_call(u, PASSTHROUGH):
            frontier.extend(u.users)
            continue
        return fail(f"norm output '{group.mul_node}' also feeds '{u.name}' ({u.target}), not only linears")
    if not group.linears:
        return fail(f"norm '{group.weight}' feeds no linear")
    return MATCH


def scale_norm(gm: fx.GraphModule, group: NormGroup, divide_by: torch.Tensor) -> None:
    """m' = m / s, written back as γ' = (γ + c) / s − c in γ's dtype."""
    gamma = get_tensor(gm, group.weight)
    m = norm_multiplier_value(gm, group) / divide_by
    set_tensor(gm, group.weight, (m - group.offset).to(gamma.dtype))


def scale_linear_outputs(gm: fx.GraphModule, weight_attr: str, bias_attr: str | None, divide_by: torch.Tensor) -> None:
    """W' = diag(s)⁻¹·W, b' = b / s: the linear's output channel j divided by s_j (its consumer multiplies back)."""
    for attr in (weight_attr, bias_attr):
        if attr is None:
            continue
        t = get_tensor(gm, attr)
        s = divide_by if t.dim() == 1 else divide_by[:, None]
        set_tensor(gm, attr, (t.float() / s).to(t.dtype))


def divide_linear_outputs(gm: fx.GraphModule, ctx: PassContext, info: LinearInfo, divide_by: torch.Tensor) -> None:
    """scale_linear_outputs on `info`'s linear, recorded in ctx.output_divisors by module path (each member of a
    fused linear its own rows), so that the error report compares the layer in the float block's basis."""
    scale_linear_outputs(gm, info.weight, info.bias, divide_by)
    members = info.fused_from or [{"path": info.path, "out_features": info.out_features}]
    start = 0
    for m in members:
        rows = divide_by[start:start + int(m["out_features"])].float()
        start += int(m["out_features"])
        prev = ctx.output_divisors.get(m["path"])
        ctx.output_divisors[m["path"]] = rows if prev is None else prev * rows


def scale_linear_inputs(gm: fx.GraphModule, weight_attr: str, multiply_by: torch.Tensor) -> None:
    w = get_tensor(gm, weight_attr)
    set_tensor(gm, weight_attr, (w.float() * multiply_by[None, :]).to(w.dtype))


@dataclass(frozen=True)
class FoldNormWeight(Pass):
    name = "fold_norm"
    summary = "fold norm weights into the following linears (W' = W·diag(γ), γ' = 1)"

    def uses_calibration(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        analysis = analyze_block(gm)
        folded, rejected = [], {}
        for group in analysis.norm_groups:
            m = check_norm_group(gm, group)
            if not m:
                rejected[group.weight] = m.reason
                continue
            mult = norm_multiplier_value(gm, group)
            for lin in group.linears:
                scale_linear_inputs(gm, analysis.linears[lin].weight, mult)
            scale_norm(gm, group, mult)
            folded.append(group.weight)
        return PassResult(gm, bool(folded), {"folded": folded, "rejected": rejected})
