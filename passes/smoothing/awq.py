"""awq: activation-aware weight scaling (Lin et al., 2024), folded into the op that produces the input.

Three kinds of scale group, each an exact float identity X·Wᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ:
  norm → linears   (q/k/v after the attention norm, gate/up after the MLP norm): m' = m / s,  W_i' = W_i·diag(s)
  v → o            (when v's outputs map one to one onto o's inputs, i.e. no GQA head sharing):
                   v rows and bias / s, o columns · s (attention is linear in V)
  up → down        (down = linear(act(gate) ⊙ up)): up rows and bias / s, down columns · s
For each group the scales come from algorithms/awq.awq_search_scales: a grid over α of
s = mean|X|^α / mean|Ŵ|^(1−α), scored by the exact calibration output error tr(ΔHΔᵀ) with the layers'
own weight grids (H = XᵀX/T, Δ = W − Q(W·s)/s; its Gram in bf16 on bf16 hardware, within 3u of it), keeping s = 1
when nothing beats it. Statistics
(mean |X| and H per group input) are collected once on the float block, like AutoAWQ.

The Hessian of every quantized linear's input is collected in the same run and published after the rewrite
(ctx.known_hessians): a scaled group's input is now X·diag(s)⁻¹, so its Hessian is S⁻¹HS⁻¹ (every other input is
unchanged); the weight pass that follows (rtn{clip=awq}, gptq's first stage) reads them instead of running the
calibration data through the block a second time.

The weights stay float: a weight pass follows (`gptq` for --algo awq+gptq, or `rtn{clip=awq}`). --algo awq on dense
weights runs passes/weight/awq_rtn.py instead: the same search and fold with RTN, stage by stage, in one paused run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.algorithms.awq import awq_search_scales
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir.analysis import BlockAnalysis, analyze_block, up_down_pairs
from qcompiler.ir.graph import get_tensor
from qcompiler.passes.fusion.fold_norm import (
    check_norm_group,
    scale_linear_inputs,
    scale_linear_outputs,
    scale_norm,
)
from qcompiler.passes.weight.rtn import layer_weight_args, weight_targets
from qcompiler.pm.base import Pass, PassContext, PassResult


@dataclass
class _Group:
    kind: str  # "norm", "v_o", "up_down"
    label: str
    input_node: str  # the consumers' input (statistics)
    consumers: list[str]  # linear node names whose input columns are multiplied by s
    producer: str  # norm mul node (norm) or the producing linear (v / up)


@dataclass(frozen=True)
class AWQ(Pass):
    name = "awq"
    summary = "AWQ: activation-aware per-channel scales, searched on the output error, folded into producers"
    grid: int = 20
    bits: int | None = None  # the weight grid the search scores; None: each layer's scheme
    group_size: int | None = None
    symmetric: bool | None = None
    v_o: bool = True
    up_down: bool = True

    def _groups(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[list[_Group], dict[str, str]]:
        analysis = analyze_block(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        groups: list[_Group] = []
        skipped: dict[str, str] = {}

        targets, _ = weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric)
        to_quantize = {node.name for node, _, _ in targets}

        def quantizable(names: list[str]) -> bool:
            return all(n in to_quantize for n in names)

        for ng in analysis.norm_groups:
            label = ",".join(analysis.linears[n].path for n in ng.linears)
            m = check_norm_group(gm, ng)
            if not m:
                skipped[label] = m.reason
            elif not quantizable(ng.linears):
                skipped[label] = "a member is float or already quantized"
            else:
                x = nodes[ng.linears[0]].args[0]
                groups.append(_Group("norm", label, x.name, list(ng.linears), ng.mul_node))  # type: ignore[union-attr]
        if self.v_o:
            for att in analysis.attention:
                if len(att.v) != 1 or len(att.o) != 1:
                    continue
                v, o = analysis.linears.get(att.v[0]), analysis.linears.get(att.o[0])
                if v is None or o is None:
                    continue
                label = f"{v.path}->{o.path}"
                if v.out_features != o.in_features:
                    skipped[label] = f"v has {v.out_features} outputs, o {o.in_features} inputs (GQA): no 1:1 map"
                elif len(nodes[v.node].users) != 1 or not quantizable([o.node]):
                    skipped[label] = "v feeds more than attention, or o is float/quantized"
                else:
                    x = nodes[o.node].args[0]
                    groups.append(_Group("v_o", label, x.name, [o.node], v.node))  # type: ignore[union-attr]
        if self.up_down:
            for up, down in up_down_pairs(gm):
                if up not in analysis.linears or down not in analysis.linears:
                    continue
                label = f"{analysis.linears[up].path}->{analysis.linears[down].path}"
                if len(nodes[up].users) != 1 or not quantizable([down]):
                    skipped[label] = "up feeds more than the gate product, or down is float/quantized"
                else:
                    x = nodes[down].args[0]
                    groups.append(_Group("up_down", label, x.name, [down], up))  # type: ignore[union-attr]
        return groups, skipped

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        groups, _ = self._groups(gm, ctx)
        requests = [StatRequest(g.input_node, k) for g in groups for k in ("absmean_channel", "hessian")]  # type: ignore[arg-type]
        targets, _ = weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric)
        inputs = dict.fromkeys(node.args[0].name for node, _, _ in targets)  # type: ignore[union-attr]
        return requests + [StatRequest(x, "hessian") for x in inputs]

    def search_and_scale(self, gm: fx.GraphModule, ctx: PassContext, analysis: BlockAnalysis, g: _Group,
                         hessian: tuple[torch.Tensor, int], x_mean: torch.Tensor
                         ) -> tuple[dict[str, float | None], torch.Tensor | None]:
        """Search group g's scales on its input statistics (Σ xᵀx and tokens, mean |x|) and fold them into the graph
        (consumers' input columns · s, the norm or producer's outputs / s). Returns the report entry and s (None:
        nothing beat s = 1, the graph is unchanged)."""
        infos = [analysis.linears[c] for c in g.consumers]
        args = layer_weight_args(ctx, infos[0], self.bits, self.group_size, self.symmetric)
        assert args is not None
        h, tokens = hessian
        weights = [get_tensor(gm, i.weight) for i in infos]
        r = awq_search_scales(weights, x_mean, (h / tokens).float(), args, grid=self.grid)
        entry = {
            "alpha": r.alpha,
            "output_error_vs_unscaled": round(r.loss / r.loss_unscaled, 4) if r.loss_unscaled > 0 else None,
        }
        if r.alpha is None:
            return entry, None
        s = r.scales
        for i in infos:
            scale_linear_inputs(gm, i.weight, s)
        if g.kind == "norm":
            ng = next(n for n in analysis.norm_groups if n.mul_node == g.producer)
            scale_norm(gm, ng, s)
        else:
            prod = analysis.linears[g.producer]
            scale_linear_outputs(gm, prod.weight, prod.bias, s)
        return entry, s

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        analysis = analyze_block(gm)
        groups, skipped = self._groups(gm, ctx)
        applied: dict[str, dict[str, float | None]] = {}
        scaled_inputs: dict[str, torch.Tensor] = {}
        for g in groups:
            applied[g.label], s = self.search_and_scale(
                gm, ctx, analysis, g, stats[StatRequest(g.input_node, "hessian")],
                stats[StatRequest(g.input_node, "absmean_channel")])
            if s is not None:
                scaled_inputs[g.input_node] = s
        # every input Hessian measured, as the rewritten graph computes it: X·diag(s)⁻¹ for a scaled group's input
        known = {r.node: stats[r] for r in stats.values if r.kind == "hessian"}
        for node, s in scaled_inputs.items():
            known[node] = scaled_hessian(known[node], s)
        ctx.known_hessians = known
        return PassResult(gm, any(v["alpha"] is not None for v in applied.values()),
                          {"groups": applied, "skipped": skipped})


def scaled_hessian(hessian: tuple[torch.Tensor, int], s: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ xᵀx, tokens) of X·diag(s)⁻¹ from X's: S⁻¹HS⁻¹."""
    h, tokens = hessian
    return h / (s.double()[:, None] * s.double()[None, :]), tokens
