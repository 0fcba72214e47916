"""tune_grids: after the weight quantizer, tune each quantized linear's per-output-channel scale gain and each
learned activation clip on the block's output, with every integer code fixed (maths: algorithms/tune_grids.py).

    weights   ŵ_n = (q_n − z_n)·s_n  →  (q_n − z_n)·(g_n·s_n)      scales [N, G] ← scales·g[:, None]; codes unchanged
    clips     c of each input FlatQuant quantizes per token with a learned clip (qmeta.TRANSFORM), re-fitted with
              the quantized weights in place; inputs without one keep the plain max grid

g and c minimise ‖block_float(x) − block_q(x)‖² on the calibration inputs, block_q running every linear with its
activations quantized per token (where the scheme does so at run time) and its weights ŵ·g. The float outputs are
the block's as the graph computed them just before the first weight quantizer of the pipeline (the pass manager
keeps them when a pass reads them: ctx.reference_outputs), so the pass must follow one (gptq, rtn). A fit that
does not lower the block's own error is not applied. Static activations are calibrated later (act_quant): their
layers are tuned with float inputs.

What a format stores changes only in numbers it already holds (per-channel or group scales; FlatQuant's clip_ratio),
so every target that held the weight quantizer's output holds this one's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.algorithms.flatquant import first_tensor, kronecker_apply
from qcompiler.algorithms.tune_grids import TunedLayer, tune_block_grids
from qcompiler.calib.stats import Stats
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import get_tensor, set_tensor
from qcompiler.pm.base import Pass, PassContext, PassResult

KRONECKER = torch.ops.qc.kronecker_transform.default
ROUTED = torch.ops.qc.routed.default


@dataclass(frozen=True)
class TuneGrids(Pass):
    name = "tune_grids"
    summary = "per-output-channel scale gains and activation clips fitted on the block's output, codes fixed"
    reads_reference_outputs = True
    steps: int = 100
    lr: float = 2e-3
    clip_lr: float = 2e-2
    micro_batch: int = 1
    clips: bool = True  # re-fit FlatQuant's learned clips too
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.micro_batch < 1 or self.lr <= 0 or self.clip_lr < 0:
            raise ValueError("tune_grids: steps ≥ 0, micro_batch ≥ 1, lr > 0 and clip_lr ≥ 0")

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list:
        return []

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        if any(n.target == ROUTED for n in gm.graph.nodes):
            raise PassError(f"tune_grids: block '{ctx.block}' routes tokens to experts (qc::routed), which has no "
                            "gradient to fit through; MoE models are not supported by tune_grids yet: drop it")
        if ctx.reference_outputs is None:
            raise PassError(f"tune_grids: block '{ctx.block}' has no float outputs to fit to; it must follow a weight "
                            "quantizer (gptq, rtn) in the pipeline, e.g. 'gptq,tune_grids,act_quant'")
        nodes = {n.name: n for n in gm.graph.nodes}
        layers: list[TunedLayer] = []
        infos = {}
        for name, info in analyze_block(gm).linears.items():
            node = nodes[name]
            if qmeta.WQ not in node.meta or info.kind != "linear":
                continue
            scheme = ctx.layer_scheme(info)
            acts = scheme.activations if scheme is not None else None
            per_token = acts is not None and acts.dynamic and not acts.is_float and acts.granularity == "token"
            clip = node.meta.get(qmeta.TRANSFORM, {}).get("clip_ratio") if self.clips and per_token else None
            layers.append(TunedLayer(name, get_tensor(gm, info.weight).float(), acts.bits if per_token else None,
                                     None if clip is None else float(clip)))
            infos[name] = info
        if not layers:
            return PassResult(gm, False, {"skipped": "no quantized linear in this block"})
        t0 = time.perf_counter()
        tuned = tune_block_grids(
            gm, layers, ctx.calib, [first_tensor(o) for o in ctx.reference_outputs], self.steps, lr=self.lr,
            clip_lr=self.clip_lr, micro_batch=self.micro_batch, seed=self.seed, pure_ops={KRONECKER: kronecker_apply})
        ctx.forward_seconds += time.perf_counter() - t0  # (all of it is forward/backward runs of the block)
        for layer in layers:
            node, info, g = nodes[layer.node], infos[layer.node], tuned.gains[layer.node]
            w = get_tensor(gm, info.weight)
            set_tensor(gm, info.weight, (layer.w_hat * g[:, None]).to(w.dtype))
            wq: qmeta.WeightQuant = node.meta[qmeta.WQ]
            node.meta[qmeta.WQ] = dataclasses.replace(wq, scale=wq.scale * g[:, None])
            src = node.args[0].name  # type: ignore[union-attr]
            if src in tuned.clips:
                node.meta[qmeta.TRANSFORM] = {**node.meta[qmeta.TRANSFORM], "clip_ratio": tuned.clips[src]}
        gains = torch.cat(list(tuned.gains.values()))
        details: dict[str, Any] = {
            "steps": self.steps,
            "block_mse": {"loss_start": float(f"{tuned.loss_start:.4g}"), "loss_end": float(f"{tuned.loss_end:.4g}")},
            "gain_range": [round(float(gains.min()), 4), round(float(gains.max()), 4)],
        }
        if tuned.clips:
            details["clips"] = {infos[next(lay.node for lay in layers if nodes[lay.node].args[0].name == src)].path:  # type: ignore[union-attr]
                                round(c, 4) for src, c in tuned.clips.items()}
        return PassResult(gm, True, details)
