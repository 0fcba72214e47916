"""sq_rtn: SmoothQuant's scales and round-to-nearest weights, stage by stage in one paused run per calibration batch,
for int8 per-token activations (w8a8_dynamic's default pipeline, where act_quant goes in before the weights).

`smoothquant,fuse_linears,rtn,act_quant` runs every block once for SmoothQuant's statistics, then the driver runs the
quantized block once more for the next block's inputs. Here sq_gptq's stages (passes/weight/sq_gptq.py: the same
groups, α search and exact folds, measured at each group input with the earlier stages quantized, the paused value
divided by s) quantize each stage with RTN instead of GPTQ, and the finished runs are the block's outputs: one run.

RTN needs no statistics (min-max or MSE clip), so a stage that is no group's input is quantized without pausing there
(`clip=awq` measures its Hessian). A producer already quantized (v, up) takes its group's s on its rows: a grid with one
scale per row is positively homogeneous (awq_rtn's argument), so its codes are unchanged. Convolutions are quantized
first, as rtn quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import fx

from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import LinearInfo
from qcompiler.passes.smoothing.smoothquant import SmoothQuant
from qcompiler.passes.weight.rtn import grid_options, quantize_layer, weight_args, weight_targets
from qcompiler.passes.weight.sq_gptq import StagedSmoothQuant
from qcompiler.passes.weight.staged import layer_input, quantize_in_stages, stages_by_input
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs


@dataclass(frozen=True)
class SQRTN(Pass):
    name = "sq_rtn"
    quantizes_weights = True
    summary = "SmoothQuant scales and round-to-nearest weights, stage by stage in one paused run (int8 per-token acts)"
    bits: int | None = None  # None: from the scheme
    group_size: int | None = None  # None: from the scheme; 0 or -1: per channel
    symmetric: bool | None = None
    clip: Literal["minmax", "mse", "awq"] = "minmax"
    alpha: float | None = None  # None: searched per input (smoothquant's default)
    producers: bool = True

    def __post_init__(self) -> None:
        SmoothQuant(alpha=self.alpha, producers=self.producers)  # (its checks)

    def weight_grid(self) -> dict[str, object]:
        return grid_options(self)

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        return []  # (measured stage by stage in run)

    def request(self, node: fx.Node, info: LinearInfo, ctx: PassContext) -> StatRequest | None:
        return StatRequest(layer_input(node).name, "hessian") if self.clip == "awq" else None

    def quantize_layer(self, gm: fx.GraphModule, node: fx.Node, info: LinearInfo, args: QuantArgs,
                       req: StatRequest | None, stats: Stats) -> dict[str, Any]:
        quantize_layer(gm, node, info.weight, args, self.clip, None if req is None else stats[req])
        return {"weight_sqnr_db": round(node.meta[qmeta.WQ].weight_sqnr_db, 2)}

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        targets, skipped = weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric, ("linear", "conv"))
        for node, info, args in targets:
            if info.kind == "conv":  # (no Hessian for a convolution's activation-aware clip: MSE, as rtn does)
                quantize_layer(gm, node, info.weight, args, "mse" if self.clip == "awq" else self.clip, None)
        linears = [t for t in targets if t[1].kind != "conv"]
        smoothing = StagedSmoothQuant.of(gm, ctx, SmoothQuant(alpha=self.alpha, producers=self.producers))
        layers = quantize_in_stages(gm, ctx, stages_by_input(gm, linears), self, smoothing)
        default = weight_args(ctx.scheme, self.bits, self.group_size, self.symmetric)
        return PassResult(gm, bool(targets), {"quantized": len(targets), "weights": default.describe(),
                                              "skipped": skipped, "layers": layers, **smoothing.report()})
