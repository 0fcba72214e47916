"""Block-wise tuning of quantization grids with the integer codes fixed: after a weight quantizer (GPTQ, RTN) has
chosen every code, learn for each quantized linear a per-output-channel gain g ∈ ℝᴺ on its weight scales and, for
each input quantized per token with a learned clip (FlatQuant's sites), that clip ratio c — so that the block with
its activations quantized reproduces the float block's output.

    ŵ_n = (q_n − z_n)·s_n        →   ŵ_n = (q_n − z_n)·(g_n·s_n)      (every group scale of row n times g_n)
    x̃_t = Q_c(x_t), s_t = c·max|x_t|/qmax                            (the layer's run-time activation grid)

The weight quantizer fits each layer to its float output with float inputs; the integer GEMM then reads rounded,
clipped activations, whose error shrinks and biases each output channel in a way no single layer's fit sees (the
clip cuts every token's peaks; the next layers amplify what this one misses). A gain per output channel and a clip
per input are the few numbers that can re-balance that at the block's output without moving a code: the artefact
changes only in stored scales and clip ratios, which every format already holds.

Fitting (`tune_block_grids`): g = exp(θ), θ = 0 and c at the value the layer has at the start; Adam on the mean
squared error between the float block's outputs (`targets`, computed by the pass manager before the first weight
quantizer ran) and the block run with the tuned grids: per-token activations through straight-through rounding
(algorithms/flatquant.fake_quant_act_clipped, whose clamp passes the true gradient to c), weights ŵ·g. Each step
runs `micro_batch` calibration sequences, cosine schedule; the reported losses are the mean over the first batches
before and after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from qcompiler.algorithms.flatquant import (
    REPORT_SEQUENCES,
    fake_quant_act_clipped,
    first_tensor,
    micro_batches,
)


@dataclass
class TunedLayer:
    """One quantized linear: its node, its fake-quantized weight ŵ [N, K] (on its grid), and how it reads its
    input — `act_bits` per token (None: float or static activations, left as they are), with the clip ratio
    `clip` (None: the plain max grid, not tuned) shared by every layer reading the same input node."""

    node: str
    w_hat: torch.Tensor
    act_bits: int | None = None
    clip: float | None = None


@dataclass
class TunedGrids:
    gains: dict[str, torch.Tensor]  # node → g [N] (multiply the layer's scales row-wise)
    clips: dict[str, float]  # input node → c
    loss_start: float
    loss_end: float


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class _TunedRun(fx.Interpreter):
    """The block with every tuned linear computing Q_c(x)·(ŵ·g)ᵀ + b, differentiable in g and c, and through every
    other op: `pure_ops` replaces ops without a gradient of their own (a custom kernel op) by their tensor formula."""

    def __init__(self, gm: fx.GraphModule, layers: dict[str, TunedLayer], theta: dict[str, torch.Tensor],
                 clip_logit: dict[str, torch.Tensor], pure_ops: Mapping[Any, Callable[..., torch.Tensor]]):
        super().__init__(gm)
        self.layers, self.theta, self.clip_logit, self.pure_ops = layers, theta, clip_logit, pure_ops
        self._x: dict[str, torch.Tensor] = {}

    def run_block(self, *args: Any) -> Any:
        self._x = {}
        return self.run(*args)

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        node = self._node
        if target in self.pure_ops:
            return self.pure_ops[target](*args, **kwargs)
        layer = self.layers.get(node.name)
        if layer is None:
            return super().call_function(target, args, kwargs)
        x = args[0]
        bias = args[2] if len(args) > 2 else None
        src = node.args[0].name  # type: ignore[union-attr]
        if layer.act_bits is None:
            xq = x.float()
        elif src in self._x:  # (linears sharing an input share its quantized value)
            xq = self._x[src]
        else:
            c = torch.sigmoid(self.clip_logit[src]) if src in self.clip_logit else 1.0
            xq = self._x[src] = fake_quant_act_clipped(x.float(), layer.act_bits, c)
        w = layer.w_hat * torch.exp(self.theta[node.name])[:, None]
        return F.linear(xq, w, None if bias is None else bias.float()).to(x.dtype)


def tune_block_grids(
    gm: fx.GraphModule,
    layers: Sequence[TunedLayer],
    batches: Sequence[tuple[Any, ...]],
    targets: Sequence[torch.Tensor],
    steps: int,
    lr: float = 2e-3,
    clip_lr: float = 2e-2,
    micro_batch: int = 1,
    seed: int = 0,
    pure_ops: Mapping[Any, Callable[..., torch.Tensor]] | None = None,
) -> TunedGrids:
    """Fit every layer's gain and every clipped input's ratio (see the module docstring); `targets` are the float
    block's outputs on `batches`, batch for batch; `pure_ops`: op → differentiable formula, for the graph's ops that
    autograd cannot go through."""
    if len(targets) != len(batches):
        raise ValueError(f"{len(targets)} targets for {len(batches)} calibration batches")
    by_node = {lay.node: lay for lay in layers}
    nodes = {n.name: n for n in gm.graph.nodes}
    theta = {lay.node: torch.zeros(lay.w_hat.shape[0], requires_grad=True) for lay in layers}
    clip_logit: dict[str, torch.Tensor] = {}
    for lay in layers:
        src = nodes[lay.node].args[0].name  # type: ignore[union-attr]
        if lay.act_bits is not None and lay.clip is not None and src not in clip_logit:
            clip_logit[src] = torch.tensor(_logit(lay.clip), requires_grad=True)
    clip_start = {src: p.detach().clone() for src, p in clip_logit.items()}
    data = micro_batches(batches, micro_batch)
    goal = micro_batches([(t,) for t in targets], micro_batch)
    goals = [g[0].float() for g in goal]
    runner = _TunedRun(gm, by_node, theta, clip_logit, pure_ops or {})

    def mean_loss(count: int) -> float:
        with torch.no_grad():
            return sum(float(F.mse_loss(first_tensor(runner.run_block(*data[j])).float(), goals[j]))
                       for j in range(count)) / max(count, 1)

    window = max(1, min(len(data), REPORT_SEQUENCES))
    start = mean_loss(window)
    groups = [{"params": list(theta.values()), "lr": lr}]
    if clip_logit:
        groups.append({"params": list(clip_logit.values()), "lr": clip_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=0.0)
    order = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    for _ in range(steps):
        if not perm:
            perm = torch.randperm(len(data), generator=order).tolist()
        j = perm.pop()
        loss = F.mse_loss(first_tensor(runner.run_block(*data[j])).float(), goals[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
    end = mean_loss(window)
    if end > start:  # (a fit that made the block worse on its own data is not kept)
        with torch.no_grad():
            for t in theta.values():
                t.zero_()
            for src, p in clip_logit.items():
                p.copy_(clip_start[src])
        end = start
    return TunedGrids(
        gains={k: torch.exp(t.detach()).clone() for k, t in theta.items()},
        clips={k: float(torch.sigmoid(p.detach())) for k, p in clip_logit.items()},
        loss_start=start, loss_end=end,
    )
