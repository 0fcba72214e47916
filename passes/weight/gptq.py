"""gptq: GPTQ weight quantization (inverse-Hessian error feedback), one stage of the block at a time.

For every weight linear (its own scheme; float layers skipped) with input Gram matrix H = Σ_t x_tᵀx_t
collected on calibration data, W is quantized column by column and each column's rounding error is pushed
onto the remaining columns through H⁻¹ (algorithms/gptq.py has the maths and the options: group size,
act_order with static groups, damping, symmetric/asymmetric, min-max, MSE or activation-aware grids).

true_sequential: linears are processed in stages by input (q/k/v, then o, then gate/up, then down), and the
Hessian of a stage is collected with the earlier stages already quantized, so o_proj is fitted to the inputs
it will really see (q/k/v's error included). One run per calibration batch serves all stages: it pauses
after each stage's input node (calib.stats.StagedCollector). Linears sharing an input share one Hessian;
GPTQ treats rows independently, so a fused q/k/v linear gives exactly what quantizing q, k and v one by one
would.

quantized_input (opt-in, `gptq{quantized_input=true}`): a layer with dynamic per-token integer activations
(w8a8_dynamic, w4a8, w4a4) reads x̃ = Q(x) at run time; its statistic is then H̃ = Σ x̃ᵀx̃ with the cross
term C = Σ x̃ᵀx, and GPTQ quantizes the least-squares weight W* = W·Cᵀ·H̃⁻¹ under H̃
(algorithms/gptq.fit_to_quantized_input): the weights absorb what they can of the activations' rounding.
Static activations are calibrated after GPTQ, so their grid is not known here; those layers use H. A layer
FlatQuant gave a learned clip is measured on that clipped grid. Off by default: it lowers each layer's own error
(tests/test_algorithm_passes.py) but not the demo model's perplexity with the plain max grid (w4a4 QuaRot + GPTQ
49.8 against 49.2, w8a8_dynamic +0.74 % against +0.75 %; docs/benchmarks.md); after flatquant it pays (w4a4
37.7 against 39.1; docs/kv-rotation-sparsity.md, run 8). The fit takes a trace of damping only
(fit_to_quantized_input's default): with GPTQ's 1 % it went to 77.9.

Int8 per-token activations go in before GPTQ in the default pipeline (act_quant needs no statistics): each weight is
still fitted on its input before the activation rounding (layer_input), the staged runs carry that rounding to the
later stages as the quantized block computes it, and their finished runs are the final block's outputs, so the
driver runs no block again (w8a8_dynamic SmoothQuant + GPTQ on the demo: 112 s instead of 142 s). There, SmoothQuant
itself goes inside these stages by default (sq_gptq, passes/weight/sq_gptq.py): the staged loop
(passes/weight/staged.py) takes its groups' inputs as extra pause points (a StageSmoothing) and quantizes a smoothed
stage on S⁻¹HS⁻¹.

Like rtn, the graph afterwards holds ŵ = (q − z)·s and node.meta[WQ] the grid, so every later pass
and lowering is the same as after rtn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from qcompiler.algorithms.gptq import GPTQResult, fit_to_quantized_input, gptq_quantize
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import LinearInfo
from qcompiler.ir.graph import get_tensor, set_tensor
from qcompiler.numerics import sqnr_db
from qcompiler.passes.weight.rtn import grid_options, weight_args, weight_targets
from qcompiler.passes.weight.staged import (
    Stage,
    StageSmoothing,
    layer_input,
    quantize_in_stages,
    stages_by_input,
)
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs


def check_gptq_options(damp: float, block_size: int) -> None:
    if not 0.0 <= damp < 1.0:
        raise ValueError(f"damp must be in [0, 1), got {damp}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")


def store_result(gm: fx.GraphModule, node: fx.Node, weight: str, w: torch.Tensor, args: QuantArgs,
                 r: GPTQResult) -> None:
    """GPTQ's ŵ into the graph in place of `w` (the layer's float weight) and its grid into node.meta[WQ]."""
    set_tensor(gm, weight, r.w_hat.to(w.dtype))
    node.meta[qmeta.WQ] = qmeta.WeightQuant(
        args=args, scale=r.scale, zero=r.zero, group_size=r.group_size, weight_sqnr_db=sqnr_db(w, r.w_hat),
    )


@dataclass(frozen=True)
class GPTQ(Pass):
    name = "gptq"
    quantizes_weights = True
    summary = "GPTQ: column-wise quantization with inverse-Hessian error feedback (true-sequential)"
    bits: int | None = None  # None: from the scheme
    group_size: int | None = None  # None: from the scheme; 0 or -1: per channel
    symmetric: bool | None = None
    block_size: int = 128
    damp: float = 0.01
    # Defaults are the best measured on the demo model (w4a16 g64, 4k eval tokens: minmax 35.0, act_order
    # 30.3, act_order + activation-aware grids 26.6 ppl; RTN with MSE clipping 32.2).
    act_order: bool = True
    static_groups: bool = False
    clip: Literal["minmax", "mse", "awq"] = "awq"
    true_sequential: bool = True
    quantized_input: bool = False  # (pays after flatquant only: see the docstring)

    def weight_grid(self) -> dict[str, object]:
        return grid_options(self)

    def __post_init__(self) -> None:
        check_gptq_options(self.damp, self.block_size)

    def _stages(self, gm: fx.GraphModule, ctx: PassContext) -> list[Stage]:
        """Linears to quantize, grouped by input node, in graph order of that input."""
        targets = []
        for node, info, args in weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric)[0]:
            if args.granularity == "tensor":
                continue  # per-tensor weights are left to rtn
            if args.is_float:
                raise PassError(f"gptq: block '{ctx.block}', layer '{info.path}' has fp8 weights; GPTQ's error feedback is written for "
                                "integer grids here: use rtn for fp8 (--algo rtn)")
            targets.append((node, info, args))
        return stages_by_input(gm, targets)

    def request(self, node: fx.Node, info: LinearInfo, ctx: PassContext) -> StatRequest:
        """The input statistic a layer is quantized with: H, or H̃ and C where its activations are quantized
        per token at run time."""
        x = layer_input(node).name
        scheme = ctx.layer_scheme(info)
        acts = scheme.activations if scheme is not None else None
        if (self.quantized_input and acts is not None and acts.dynamic and not acts.is_float
                and acts.granularity == "token"):
            # (the grid the layer runs with: flatquant's learned clip ratio where it set one)
            clip = float(node.meta.get(qmeta.TRANSFORM, {}).get("clip_ratio", 1.0))
            return StatRequest(x, "hessian_quantized", bits=acts.bits, clip_ratio=clip)
        return StatRequest(x, "hessian")

    def quantize_layer(self, gm: fx.GraphModule, node: fx.Node, info: LinearInfo, args: QuantArgs,
                       req: StatRequest | None, stats: Stats) -> dict[str, Any]:
        assert req is not None
        w = get_tensor(gm, info.weight)
        target = w
        if req.kind == "hessian_quantized":
            h, cross, tokens = stats[req]
            target = fit_to_quantized_input(w.float(), h, cross)
        else:
            h, tokens = stats[req]
        r = gptq_quantize(
            target, h, args, tokens=tokens, block_size=self.block_size, damp=self.damp,
            act_order=self.act_order, static_groups=self.static_groups, clip=self.clip,
            mask=(w != 0) if qmeta.SPARSE in node.meta else None,  # a pruned layer stays 2:4 sparse
        )
        store_result(gm, node, info.weight, w, args, r)
        return {
            "output_error_vs_rtn": round(r.proxy_loss / max(r.rtn_proxy_loss, 1e-30), 4),
            "damp": r.damp_used,
            "quantized_input": req.kind == "hessian_quantized",
        }

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        return self.quantize_stages(gm, ctx, None)

    def quantize_stages(self, gm: fx.GraphModule, ctx: PassContext, smoothing: StageSmoothing | None) -> PassResult:
        """The stages in one paused run per batch (passes/weight/staged.py), with `smoothing`'s points among them."""
        stages = self._stages(gm, ctx)
        layers = quantize_in_stages(gm, ctx, stages, self, smoothing, self.true_sequential)
        default = weight_args(ctx.scheme, self.bits, self.group_size, self.symmetric)
        details = {"quantized": len(layers), "weights": default.describe(),
                   "stages": len(stages) if self.true_sequential else 1, "layers": layers}
        if smoothing is not None:
            details.update(smoothing.report())
        return PassResult(gm, bool(layers), details)
