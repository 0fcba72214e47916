"""awq_rtn: AWQ proper (activation-aware scales, then round-to-nearest with the activation-aware clip), stage by
stage through the block: each scale group is searched on inputs that already carry the error of every layer
quantized before it, and the block's calibration outputs come from the same runs.

`awq,rtn{clip=awq}` measures every group's statistics on the float block, then the driver runs the quantized block
once more for the next block's inputs. Here one run per calibration batch pauses at each linear input in graph
order (calib.stats.StagedCollector), like GPTQ's true-sequential stages: at input X

  1. Σ xᵀx and mean |x| of X, with every earlier layer already quantized;
  2. if X is a scale group's input (norm → q/k/v or gate/up, v → o, up → down: passes/smoothing/awq.py), the scale
     search and its exact fold: consumers W·diag(s), the norm's multiplier or the producer's rows / s;
  3. the paused runs' X divided by s, which is what the rewritten graph computes there, so the runs go on;
  4. the linears reading X quantized with RTN and the activation-aware clip, on H' = S⁻¹HS⁻¹.

The producer of a v → o or up → down group (v, up) was quantized at an earlier stage, before its group's scales were
known. A grid with one scale per row (per channel or per group along K) is positively homogeneous: dividing row i
by s_i > 0 divides its min-max range, hence its scale, by s_i and leaves its integer codes and zero point
unchanged, and the activation-aware clip's per-(row, group) error δ·H·δᵀ scales by 1/s_i² for every candidate,
so its choice is unchanged too. So Q(diag(s)⁻¹·W) = diag(s)⁻¹·Q(W): the producer's stored ŵ rows and grid scales
are divided by s. A producer with one scale for the whole tensor is not homogeneous row by row: it is quantized
after its group's scales instead.

When a paused run holds another value the rewrite changed (step 3 would not be exact), the runs start again from
the block's inputs on the rewritten graph (reported as `restarts`). The Hessian a consumer is quantized with, its
search and the fold are those of awq + rtn{clip=awq}; what differs is the statistics of the later groups (they
see the earlier layers quantized) and one block forward fewer per block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.calib.stats import StagedCollector, StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import get_tensor
from qcompiler.numerics import sqnr_db
from qcompiler.passes.smoothing.awq import AWQ, scaled_hessian
from qcompiler.passes.weight.rtn import grid_options, weight_args, weight_targets
from qcompiler.passes.weight.rtn import quantize_layer as rtn_quantize_layer
from qcompiler.pm.base import PassContext, PassResult
from qcompiler.schemes import QuantArgs


def descendants(node: fx.Node) -> set[str]:
    """Names of `node` and of every node computed from it."""
    seen, frontier = {node.name}, list(node.users)
    while frontier:
        n = frontier.pop()
        if n.name not in seen:
            seen.add(n.name)
            frontier.extend(n.users)
    return seen


@dataclass(frozen=True)
class AWQRTN(AWQ):
    name = "awq_rtn"
    quantizes_weights = True
    summary = "AWQ scales and round-to-nearest weights (activation-aware clip), stage by stage (true-sequential)"

    def weight_grid(self) -> dict[str, object]:
        return grid_options(self)

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        return []  # (measured stage by stage in run)

    def quantize_layer(self, gm: fx.GraphModule, node: fx.Node, weight: str, args: QuantArgs,
                       hessian: tuple[torch.Tensor, int]) -> None:
        """Quantize one linear of a stage on its input's (Σ xᵀx, tokens), as the rewritten graph computes it."""
        rtn_quantize_layer(gm, node, weight, args, "awq", hessian)

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        analysis = analyze_block(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        groups, skipped = self._groups(gm, ctx)
        group_at = {g.input_node: g for g in groups}
        targets, not_quantized = weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric, ("linear", "conv"))
        # convolutions (MSE clip, no statistics, as rtn quantizes them) first: every stage then sees them quantized
        for node, info, args in targets:
            if info.kind == "conv":
                rtn_quantize_layer(gm, node, info.weight, args, "mse", None)
        by_input: dict[str, list[tuple[fx.Node, str, QuantArgs]]] = {}
        for node, info, args in targets:
            if info.kind != "conv":
                by_input.setdefault(node.args[0].name, []).append((node, info.weight, args))  # type: ignore[union-attr]
        # producers (v, up) with one scale per tensor wait for their group's scales (not homogeneous row by row)
        producers = {g.producer for g in groups if g.kind != "norm"}
        waiting: dict[str, tuple[fx.Node, str, QuantArgs, tuple[torch.Tensor, int]]] = {}
        producer_float: dict[str, torch.Tensor] = {}

        applied: dict[str, dict[str, float | None]] = {}
        restarts = 0
        staged = StagedCollector(gm, ctx.calib)
        for x in sorted(set(by_input) | set(group_at), key=order.__getitem__):
            g = group_at.get(x)
            requests = [StatRequest(x, "hessian")] + ([StatRequest(x, "absmean_channel")] if g else [])
            measured = ctx.statistics(gm, requests, staged)
            hessian = measured[requests[0]]
            if g is not None:
                applied[g.label], s = self.search_and_scale(gm, ctx, analysis, g, hessian, measured[requests[1]])
                if s is not None:
                    hessian = scaled_hessian(hessian, s)
                    if g.producer in producer_float:  # (quantized at an earlier stage: homogeneous rows)
                        wq = nodes[g.producer].meta[qmeta.WQ]
                        wq.scale = wq.scale / s.float()[:, None]
                        w_float = producer_float.pop(g.producer) / s.float()[:, None]
                        wq.weight_sqnr_db = sqnr_db(w_float, get_tensor(gm, analysis.linears[g.producer].weight))
                    moved = descendants(nodes[g.producer])
                    if not staged.divide_value(x, s, moved):
                        staged.restart()
                        restarts += 1
                if g.producer in waiting:
                    node, weight, args, h_prod = waiting.pop(g.producer)
                    self.quantize_layer(gm, node, weight, args, h_prod)
            for node, weight, args in by_input.get(x, []):
                if node.name in producers and args.granularity == "tensor":
                    waiting[node.name] = (node, weight, args, hessian)
                else:
                    if node.name in producers:  # (its SQNR is measured again once its rows are divided)
                        producer_float[node.name] = get_tensor(gm, weight).float().clone()
                    self.quantize_layer(gm, node, weight, args, hessian)
        for node, weight, args, h_prod in waiting.values():  # (a group that was skipped)
            self.quantize_layer(gm, node, weight, args, h_prod)
        # the runs are paused at the last linear input: finished, they are the quantized block's outputs
        t0 = time.perf_counter()
        with ctx.forwards():
            ctx.block_outputs = staged.outputs()
        ctx.forward_seconds += time.perf_counter() - t0
        ctx.known_hessians = {}
        default = weight_args(ctx.scheme, self.bits, self.group_size, self.symmetric)
        quantized = sum(qmeta.WQ in node.meta for node, _, _ in targets)
        return PassResult(gm, bool(quantized), {
            "groups": applied, "skipped": skipped, "quantized": quantized, "weights": default.describe(),
            "not_quantized": not_quantized, "restarts": restarts,
        })
