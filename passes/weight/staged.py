"""A block's linears quantized stage by stage (the linears reading one input, in graph order of that input) through one
paused run per calibration batch (calib.stats.StagedCollector): stage k's statistics are measured with stages 1..k−1
already quantized, each run only goes on from where the previous stage stopped it, and the finished runs are the
quantized block's outputs (ctx.block_outputs: the driver runs no block again). GPTQ's true-sequential order, and
the loop sq_gptq and sq_rtn share.

A StageSmoothing adds pause points of its own (its groups' inputs). There it measures its statistics in the same runs,
rewrites the graph (X·diag(s)⁻¹ into the producer, W·diag(s) into the consumers) and divides the paused runs' value by
s, so that they go on as the rewritten graph computes. A stage at such a point is then quantized on S⁻¹HS⁻¹, the
Hessian of the smoothed input, from the H measured before the rewrite.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import fx

from qcompiler.calib.stats import StagedCollector, StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import LinearInfo
from qcompiler.ir.graph import get_tensor
from qcompiler.passes.smoothing.awq import scaled_hessian
from qcompiler.pm.base import PassContext
from qcompiler.schemes import QuantArgs

Stage = list[tuple[fx.Node, LinearInfo, QuantArgs]]


def layer_input(node: fx.Node) -> fx.Node:
    """The value a linear's weights are fitted on: its input, or where act_quant went first (dynamic activations,
    before the weight pass in the default pipeline) the input of its activation fake-quant. The staged runs then carry
    the activations' rounding to the later stages, as the quantized block computes them."""
    x = node.args[0]
    assert isinstance(x, fx.Node)
    if qmeta.ACT_FQ in x.meta and isinstance(x.args[0], fx.Node):
        return x.args[0]
    return x


def stages_by_input(gm: fx.GraphModule, targets: Sequence[tuple[fx.Node, LinearInfo, QuantArgs]]) -> list[Stage]:
    """The targets grouped by layer input, in graph order of that input."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    by_input: dict[str, Stage] = {}
    for node, info, args in targets:
        by_input.setdefault(layer_input(node).name, []).append((node, info, args))
    return [by_input[k] for k in sorted(by_input, key=order.__getitem__)]


class StagedQuantizer(Protocol):
    """The weight quantizer of the loop: what it measures for a layer, and how it quantizes it from that."""

    def request(self, node: fx.Node, info: LinearInfo, ctx: PassContext) -> StatRequest | None:
        """The input statistic the layer is quantized with (None: none)."""
        ...

    def quantize_layer(self, gm: fx.GraphModule, node: fx.Node, info: LinearInfo, args: QuantArgs,
                       req: StatRequest | None, stats: Stats) -> dict[str, Any]:
        """Quantize the layer in the graph (ŵ and node.meta[WQ]); its report entry."""
        ...


class StageSmoothing(Protocol):
    """Smoothing done inside the staged runs (sq_gptq, sq_rtn): at each of its points, statistics measured with every
    earlier stage quantized, the graph rewritten, the paused runs' value divided by s."""

    def points(self) -> list[str]:
        """The nodes (group inputs) where it measures and rewrites."""
        ...

    def requests(self, x: str) -> list[StatRequest]:
        """What it measures at `x` ([] where x is not one of its points)."""
        ...

    def smooth(self, gm: fx.GraphModule, ctx: PassContext, x: str, measured: Stats,
               staged: StagedCollector | None) -> torch.Tensor | None:
        """Rewrite the graph for the group at `x`; the divisor s of x's channels (None: x left alone)."""
        ...

    def quantizing(self, node: fx.Node, w_float: torch.Tensor) -> None:
        """`node` is about to be quantized from `w_float`."""
        ...

    def report(self) -> dict[str, object]:
        ...


def quantize_in_stages(gm: fx.GraphModule, ctx: PassContext, stages: list[Stage], quantizer: StagedQuantizer,
                       smoothing: StageSmoothing | None = None, sequential: bool = True) -> dict[str, dict[str, Any]]:
    """Quantize `stages` in order (see the module docstring); the layers' report entries by path. `sequential` False:
    every layer on statistics of the block as it is (one stage, no smoothing points)."""
    layers: dict[str, dict[str, Any]] = {}
    if sequential:
        stage_at = {layer_input(stage[0][0]).name: stage for stage in stages}
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        points = sorted(set(stage_at) | set(smoothing.points() if smoothing is not None else []),
                        key=order.__getitem__)
        plan = [(x, stage_at.get(x, [])) for x in points]
    else:
        plan = [("", [x for s in stages for x in s])]
    staged = StagedCollector(gm, ctx.calib) if len(plan) > 1 else None
    for x, stage in plan:
        requests = [quantizer.request(node, info, ctx) for node, info, _ in stage]
        measured = [r for r in dict.fromkeys(requests) if r is not None]  # (linears sharing the input share one)
        smoothing_requests = smoothing.requests(x) if smoothing is not None else []
        stats = ctx.statistics(gm, measured + smoothing_requests, staged) if measured or smoothing_requests else Stats()
        if smoothing is not None and smoothing_requests:
            s = smoothing.smooth(gm, ctx, x, stats, staged)
            if s is not None:
                for req in measured:
                    if req.kind != "hessian":
                        raise ValueError(f"a smoothed stage needs Hessians, not '{req.kind}'")
                    stats.values[req] = scaled_hessian(stats[req], s)
        for (node, info, args), req in zip(stage, requests, strict=True):
            if smoothing is not None:
                smoothing.quantizing(node, get_tensor(gm, info.weight))
            layers[info.path] = quantizer.quantize_layer(gm, node, info, args, req, stats)
    if staged is not None:
        # the runs are paused at the last point: finishing them gives the block's outputs with every stage
        # quantized, which the driver would otherwise compute in one more run over all batches
        t0 = time.perf_counter()
        with ctx.forwards():
            ctx.block_outputs = staged.outputs()
        ctx.forward_seconds += time.perf_counter() - t0
    return layers
