"""act_quant: insert activation fake-quantization before every weight-quantized linear.

Static (per-tensor, calibrated): observe the linear input X over the calibration set, then
    s = max(|min X|, |max X|) / 127 (symmetric) or (max − min) / 255 with zero point z (asymmetric),
    X̂ = (clamp(round(X / s) + z, qmin, qmax) − z)·s                           [qc::fake_quant_act]
with observer `minmax` (the full range) or `percentile` (|X| range clipped at the p-th percentile, which
ignores rare outliers). Dynamic (per token): s_t = max_k |X_tk| / 127 at run time
                                                                              [qc::fake_quant_act_per_token]
The graph stays a runnable fake-quantized model; lowering fuses each pair into an int8 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, is_call, linear_module_attr, set_tensor
from qcompiler.numerics import act_qparams_from_range
from qcompiler.pm.base import Pass, PassContext, PassResult


def _targets(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_call(n, LINEAR) and qmeta.WQ in n.meta]


@dataclass(frozen=True)
class InsertActQuant(Pass):
    name = "act_quant"
    summary = "insert activation fake-quant (static per-tensor with observers, or dynamic per-token)"
    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.99

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        acts = ctx.scheme.activations
        if acts is None or acts.dynamic:
            return []
        kind = "minmax" if self.observer == "minmax" else "percentile"
        return [StatRequest(n.args[0].name, kind, self.percentile) for n in _targets(gm)]  # type: ignore[union-attr]

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        acts = ctx.scheme.activations
        if acts is None:
            return PassResult(gm, False, {"skipped": f"scheme {ctx.scheme.name} is weight-only"})
        inserted = 0
        for lin in _targets(gm):
            x = lin.args[0]
            assert isinstance(x, fx.Node)
            base = linear_module_attr(lin)
            with gm.graph.inserting_before(lin):
                if acts.dynamic:
                    fq = gm.graph.call_function(torch.ops.qc.fake_quant_act_per_token.default, (x, acts.bits))
                    fq.meta[qmeta.ACT_FQ] = {"dynamic": True, "bits": acts.bits}
                else:
                    if self.observer == "minmax":
                        lo, hi = stats[StatRequest(x.name, "minmax", self.percentile)]
                    else:
                        p = stats[StatRequest(x.name, "percentile", self.percentile)]
                        lo, hi = -p, p
                    scale, zero = act_qparams_from_range(lo, hi, acts)
                    set_tensor(gm, base + ".input_scale", scale.reshape(()))
                    set_tensor(gm, base + ".input_zero", zero.reshape(()))
                    s_node = gm.graph.get_attr(base + ".input_scale")
                    z_node = gm.graph.get_attr(base + ".input_zero")
                    fq = gm.graph.call_function(
                        torch.ops.qc.fake_quant_act.default, (x, s_node, z_node, acts.qmin, acts.qmax)
                    )
                    fq.meta[qmeta.ACT_FQ] = {
                        "dynamic": False, "bits": acts.bits, "scale": base + ".input_scale",
                        "zero": base + ".input_zero", "qmin": acts.qmin, "qmax": acts.qmax,
                    }
            lin.replace_input_with(x, fq)
            inserted += 1
        return PassResult(gm, inserted > 0, {"inserted": inserted, "activations": acts.describe()})
