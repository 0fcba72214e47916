"""act_quant: insert activation fake-quantization before every weight-quantized linear (and convolution).

Static (per-tensor, calibrated): observe the linear input X over the calibration set, then
    s = max(|min X|, |max X|) / 127 (symmetric) or (max − min) / 255 with zero point z (asymmetric),
    X̂ = (clamp(round(X / s) + z, qmin, qmax) − z)·s                           [qc::fake_quant_act]
with observer `minmax` (the full range), `percentile` (|X| range clipped at the p-th percentile, which
ignores rare outliers), `mse` or `kl` (thresholds searched on a histogram of |X|, calib/observers.py;
symmetric grids only). Dynamic (per token): s_t = c·max_k |X_tk| / 127 at run time (c = 1, or the clip ratio
the flatquant pass learned for this input)
                                                                              [qc::fake_quant_act_per_token]
fp8 activations: s = max |X| / 448 (static, minmax or percentile) or per token at run time, X̂ = e4m3(X / s)·s
                                                       [qc::fake_quant_act_fp8, qc::fake_quant_act_fp8_per_token]
The graph stays a runnable fake-quantized model; lowering fuses each pair into an int8 GEMM. Dynamic activations
need no statistics, so the pass may also run before the weight pass (the default pipeline puts it before GPTQ for
int8 per-token activations, driver/plan.dynamic_int8_acts): it then marks every linear whose scheme quantizes its
weights.

Timestep groups (a diffusion transformer's --timestep-groups, ctx.calib_groups): activation ranges move with the
denoising step (Q-Diffusion, PTQ4DiT), so besides the grid over every step the pass fits each static grid again on
each group's calibration batches (a group: consecutive sampling steps) and reports the tables
(details["timestep_grids"]: tensor name -> one value per group); the graph keeps the all-steps grid, and the DiT
runtime writes the group's values into it for each call (runtime/diffusers.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.calib.observers import threshold
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.errors import SchemeError
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import CONV, LINEAR, is_call, linear_module_attr, set_tensor
from qcompiler.numerics import act_qparams_from_range
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs


def _targets(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[fx.Node, QuantArgs]]:
    """Weight-quantized linears (and convolutions, static activations only: per-token scales have no meaning
    on an NCHW input) whose layer scheme quantizes activations, with those activation args. Dynamic activations
    need no statistics, so they may also go in before the weight pass (the default pipeline does so before GPTQ,
    whose staged runs then give the final block's outputs): a linear counts once its scheme quantizes its weights.
    A linear that already reads a fake-quantized input is left alone."""
    infos = analyze_block(gm).linears
    out = []
    for n in gm.graph.nodes:
        if not (is_call(n, {LINEAR, CONV}) and n.name in infos):
            continue
        scheme = ctx.layer_scheme(infos[n.name])
        if scheme is None or scheme.activations is None:
            continue
        if is_call(n, CONV) and scheme.activations.dynamic:
            continue
        x = n.args[0]
        if isinstance(x, fx.Node) and qmeta.ACT_FQ in x.meta:
            continue
        if qmeta.WQ in n.meta or (scheme.activations.dynamic and scheme.weights is not None):
            out.append((n, scheme.activations))
    return out


@dataclass(frozen=True)
class InsertActQuant(Pass):
    name = "act_quant"
    summary = "insert activation fake-quant (static per-tensor with observers, or dynamic per-token)"
    observer: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    percentile: float = 99.99

    def _kind(self) -> str:
        return {"minmax": "minmax", "percentile": "percentile"}.get(self.observer, "histogram")

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        reqs = []
        for n, acts in _targets(gm, ctx):
            if acts.dynamic:
                continue
            if self._kind() == "histogram" and acts.is_float:
                raise SchemeError(f"act_quant observer '{self.observer}' searches an integer grid's threshold; "
                                  f"layer '{n.name}' has fp8 activations: use minmax or percentile")
            if self._kind() == "histogram" and not acts.symmetric:
                raise SchemeError(f"act_quant observer '{self.observer}' searches a symmetric threshold; "
                                  f"layer '{n.name}' has asymmetric activations: use minmax or percentile")
            reqs.append(StatRequest(n.args[0].name, self._kind(), self.percentile))  # type: ignore[arg-type,union-attr]
        return reqs

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        targets = _targets(gm, ctx)
        if not targets:
            return PassResult(gm, False, {"skipped": "no layer of this block quantizes activations"})
        inserted = 0
        timestep_grids: dict[str, list[float]] = {}
        # (each timestep group's statistics of every static input: one run over the group's batches)
        group_stats = [self._group_stats(gm, ctx, self.stat_requests(gm, ctx), g) for g in ctx.calib_groups or []]
        for lin, acts in targets:
            x = lin.args[0]
            assert isinstance(x, fx.Node)
            base = linear_module_attr(lin)
            with gm.graph.inserting_before(lin):
                if acts.dynamic and acts.is_float:
                    fq = gm.graph.call_function(torch.ops.qc.fake_quant_act_fp8_per_token.default, (x,))
                    fq.meta[qmeta.ACT_FQ] = {"dynamic": True, "bits": 8, "type": "float"}
                elif acts.dynamic:
                    # (flatquant's learned clip ratio of this input, when it ran)
                    clip = float(lin.meta.get(qmeta.TRANSFORM, {}).get("clip_ratio", 1.0))
                    fq = gm.graph.call_function(torch.ops.qc.fake_quant_act_per_token.default,
                                                (x, acts.bits) if clip == 1.0 else (x, acts.bits, clip))
                    fq.meta[qmeta.ACT_FQ] = {"dynamic": True, "bits": acts.bits}
                    if clip != 1.0:
                        fq.meta[qmeta.ACT_FQ]["clip_ratio"] = clip
                else:
                    request = StatRequest(x.name, self._kind(), self.percentile)  # type: ignore[arg-type]
                    scale, zero = self._grid(stats[request], acts)
                    if group_stats:
                        per_group = [self._grid(stats_g[request], acts) for stats_g in group_stats]
                        timestep_grids[base + ".input_scale"] = [float(s) for s, _ in per_group]
                        if not acts.is_float and not acts.symmetric:  # (a symmetric grid's zero point is 0)
                            timestep_grids[base + ".input_zero"] = [float(z) for _, z in per_group]
                    set_tensor(gm, base + ".input_scale", scale.reshape(()))
                    s_node = gm.graph.get_attr(base + ".input_scale")
                    if acts.is_float:  # (fp8: symmetric, no zero point)
                        fq = gm.graph.call_function(torch.ops.qc.fake_quant_act_fp8.default, (x, s_node))
                        fq.meta[qmeta.ACT_FQ] = {"dynamic": False, "bits": 8, "type": "float",
                                                 "scale": base + ".input_scale"}
                    else:
                        set_tensor(gm, base + ".input_zero", zero.reshape(()))
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
        details: dict[str, object] = {"inserted": inserted, "observer": self.observer}
        if timestep_grids:
            details["timestep_grids"] = timestep_grids
        return PassResult(gm, inserted > 0, details)

    def _grid(self, value: object, acts: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of one static grid from its statistic."""
        if self.observer == "minmax":
            lo, hi = value  # type: ignore[misc]
        elif self.observer == "percentile":
            lo, hi = -value, value  # type: ignore[operator]
        else:
            t = torch.tensor(threshold(value, self.observer, acts.bits))  # type: ignore[arg-type]
            lo, hi = -t, t
        return act_qparams_from_range(lo, hi, acts)

    @staticmethod
    def _group_stats(gm: fx.GraphModule, ctx: PassContext, requests: list[StatRequest], batches: list[int]) -> Stats:
        """`requests` measured on the calibration batches of one timestep group only (no cache: a subset)."""
        sub = dataclasses.replace(ctx, calib=[ctx.calib[j] for j in batches], calib_digest=None, stats_cache=None,
                                  known_hessians={}, calib_groups=None)
        return sub.statistics(gm, requests)
