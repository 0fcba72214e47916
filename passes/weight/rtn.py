"""rtn: round-to-nearest weight quantization, with min-max, MSE-searched or activation-aware clipping.

For every weight linear (and convolution, seen as [O, I/groups·kh·kw], per output channel) of the block
(minus the scheme's ignore list): compute the grid (scale s, zero z per
output channel or per group of K, ragged last group allowed), then replace W by ŵ = (q − z)·s in the graph
and record (s, z, args) in node.meta so lowering can emit integer kernels. `clip=mse` searches a per-group
range shrink ratio r ∈ [0.5, 1] minimising ‖W − ŵ‖² (see numerics.mse_clip_search); `clip=awq` minimises
each group's *output* error δ·H_JJ·δᵀ instead, with H = XᵀX/T of the layer's calibration inputs (AWQ's
auto-clip; see algorithms/awq.activation_aware_clip). Each layer uses its own scheme (mixed precision).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from qcompiler.algorithms.awq import activation_aware_clip
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import LinearInfo, analyze_block
from qcompiler.ir.graph import get_tensor, set_tensor
from qcompiler.numerics import (
    dequantize_weight,
    group_size_of,
    mse_clip_search,
    quantize_weight,
    rows_per_chunk,
    sqnr_from_sums,
    weight_qparams,
)
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs, QuantScheme, with_grid


def layer_weight_args(
    ctx: PassContext, info: LinearInfo, bits: int | None, group_size: int | None, symmetric: bool | None
) -> QuantArgs | None:
    """A layer's weight args: None for a float layer; a per-layer override's own weights as they are;
    otherwise the scheme's weights with the pass's options applied."""
    scheme = ctx.layer_scheme(info)
    if scheme is None or scheme.weights is None:
        return None
    if scheme is not ctx.scheme:
        return scheme.weights
    return weight_args(scheme, bits, group_size, symmetric)


def weight_targets(
    gm: fx.GraphModule, ctx: PassContext, bits: int | None, group_size: int | None, symmetric: bool | None,
    kinds: tuple[str, ...] = ("linear",),
) -> tuple[list[tuple[fx.Node, LinearInfo, QuantArgs]], dict[str, str]]:
    """The layers a weight pass quantizes (linears; convolutions too when `kinds` says so), with their weight
    args, and the others with the reason why not. Convolutions are quantized per output channel."""
    analysis = analyze_block(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    targets, skipped = [], {}
    for name, info in analysis.linears.items():
        node = nodes[name]
        args = layer_weight_args(ctx, info, bits, group_size, symmetric)
        if info.kind not in kinds:
            if args is not None:
                skipped[info.path] = f"{info.kind}: quantized by rtn only"
            continue
        if args is not None and info.kind == "conv":
            if args.bits != 8:
                skipped[info.path] = "conv: int8 only (no int4 convolution kernel on any target)"
                continue
            args = dataclasses.replace(args, granularity="channel", group_size=None, symmetric=True)
        if args is None:
            skipped[info.path] = "float (ignored or overridden by the scheme)"
        elif qmeta.WQ in node.meta:
            skipped[info.path] = "already quantized"
        else:
            targets.append((node, info, args))
    return targets, skipped


def quantize_rows(w: torch.Tensor, args: QuantArgs, clip: str, h: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """(scale, zero, ŵ, SQNR of ŵ in dB) of a weight [N, K], computed over chunks of rows (numerics.
    rows_per_chunk): every row (channel) has its own grid, so the result is the whole-matrix one, while the
    clip search's temporaries stay a few MB instead of several copies of the largest layer (a per-tensor grid
    is one chunk)."""
    rows = w.shape[0] if args.granularity == "tensor" else rows_per_chunk(w)
    gs = group_size_of(args, w.shape[1])
    scales, zeros = [], []
    w_hat = torch.empty(w.shape, dtype=w.dtype)
    signal = noise = 0.0
    for i in range(0, w.shape[0], rows):
        wc = w[i:i + rows]
        if clip == "mse":
            ratio: torch.Tensor | float = mse_clip_search(wc, args)
        elif clip == "awq":
            assert h is not None
            ratio = activation_aware_clip(wc, h, args)
        else:
            ratio = 1.0
        scale, zero = weight_qparams(wc, args, ratio)
        wh = dequantize_weight(quantize_weight(wc, scale, zero, args), scale, zero, gs).to(w.dtype)
        w_hat[i:i + rows] = wh
        signal += float(wc.float().pow(2).sum(dtype=torch.float64))
        noise += float((wc.float() - wh.float()).pow(2).sum(dtype=torch.float64))
        scales.append(scale)
        zeros.append(zero)
    scale = torch.cat(scales)
    zero = None if zeros[0] is None else torch.cat(zeros)  # type: ignore[arg-type]
    return scale, zero, w_hat, sqnr_from_sums(signal, noise)


def quantize_layer(gm: fx.GraphModule, node: fx.Node, weight: str, args: QuantArgs, clip: str,
                   hessian: tuple[torch.Tensor, int] | None) -> None:
    """RTN of one layer in the graph: ŵ replaces its weight and node.meta[WQ] records the grid. `hessian` (Σ xᵀx and
    the token count of its input) is read by the activation-aware clip."""
    w_orig = get_tensor(gm, weight)
    w = w_orig.reshape(w_orig.shape[0], -1)  # a conv kernel as [O, I/groups · kh · kw]
    h = None if hessian is None else (hessian[0] / hessian[1]).float()
    scale, zero, w_hat, sqnr = quantize_rows(w, args, clip, h)
    set_tensor(gm, weight, w_hat.reshape(w_orig.shape))
    node.meta[qmeta.WQ] = qmeta.WeightQuant(
        args=args, scale=scale, zero=zero, group_size=group_size_of(args, w.shape[1]), weight_sqnr_db=sqnr
    )


def grid_options(p: Pass) -> dict[str, object]:
    """A weight pass's grid options that are set (see Pass.weight_grid)."""
    return {k: getattr(p, k) for k in ("bits", "group_size", "symmetric") if getattr(p, k) is not None}


def weight_args(scheme: QuantScheme, bits: int | None, group_size: int | None, symmetric: bool | None
                ) -> QuantArgs | None:
    """The scheme's weight args with a pass's options applied (None: the scheme keeps weights float)."""
    return with_grid(scheme.weights, bits, group_size, symmetric)


@dataclass(frozen=True)
class RTN(Pass):
    name = "rtn"
    quantizes_weights = True
    summary = "round-to-nearest weight quantization (min-max, MSE or activation-aware clipping)"
    bits: int | None = None  # None: from the scheme
    group_size: int | None = None  # None: from the scheme; 0 or -1: per channel
    symmetric: bool | None = None

    def weight_grid(self) -> dict[str, object]:
        return grid_options(self)
    clip: Literal["minmax", "mse", "awq"] = "minmax"

    def uses_calibration(self) -> bool:
        return self.clip == "awq"

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        if self.clip != "awq":
            return []
        targets, _ = weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric)
        return [StatRequest(node.args[0].name, "hessian") for node, _, _ in targets]  # type: ignore[union-attr]

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        targets, skipped = weight_targets(gm, ctx, self.bits, self.group_size, self.symmetric, ("linear", "conv"))
        done = []
        for node, info, args in targets:
            # (the activation-aware clip needs the linear's input Hessian: convolutions use MSE clipping)
            clip = "mse" if info.kind == "conv" and self.clip == "awq" else self.clip
            hessian = stats[StatRequest(node.args[0].name, "hessian")] if clip == "awq" else None  # type: ignore[union-attr]
            quantize_layer(gm, node, info.weight, args, clip, hessian)
            done.append(info.path)
        default = weight_args(ctx.scheme, self.bits, self.group_size, self.symmetric)
        return PassResult(gm, bool(done), {"quantized": len(done), "weights": default.describe(), "skipped": skipped})
