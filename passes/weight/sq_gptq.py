"""sq_gptq: SmoothQuant's scales and GPTQ's weights, stage by stage in one paused run per calibration batch, for
int8 per-token activations (w8a8_dynamic and its overrides), where act_quant goes in before the weights.

`smoothquant,fuse_linears,act_quant,gptq` runs every block once for SmoothQuant's statistics (per-channel max |x| and a
token sample at each group input) and once more through GPTQ's stages. Here GPTQ's stages (passes/weight/staged.py)
carry SmoothQuant's groups too: at each group input X, in graph order, with every earlier stage already quantized,

  1. max_t |X_tj| and a token sample of X (and Σ xᵀx where X is also a stage's input);
  2. SmoothQuant's α search and scales s (passes/smoothing/smoothquant.py, qcompiler/algorithms/smoothquant.py: the
     same groups, grids and search), folded exactly: consumers W·diag(s), and the norm's multiplier m / s or the
     producer's rows / s (up's for down_proj's input, v's for o_proj's, one s per kv channel under grouped-query
     attention, fused q/k/v or gate/up rows included);
  3. the paused runs' X divided by s, what the rewritten graph computes there, so the runs go on (when a run holds
     another value the rewrite changed, the runs start again from the block's inputs: `restarts`);
  4. the stage's linears quantized by GPTQ on S⁻¹HS⁻¹, the Hessian of X·diag(s)⁻¹.

The producer of a row group (v, up: fused q/k/v or gate/up) was quantized by GPTQ at an earlier stage, before its
group's scales were known. GPTQ on a grid with one scale per row is equivariant to a positive row scaling (each row's
errors, updates and grid scale by it: see awq_gptq), so dividing the stored ŵ's rows and their scales by s is the
quantization of the divided rows, with the same integer codes. A producer with one scale for the whole tensor is
not homogeneous row by row: its group is left unsmoothed (reported).

What differs from `smoothquant,…,gptq`: the statistics of every group after the first see the earlier stages quantized
(as GPTQ's own Hessians do), and each block runs once instead of twice. The groups are found on the block without
its activation fake-quant nodes (which act_quant put before every linear), so they are SmoothQuant's own.
sq_rtn (passes/weight/sq_rtn.py) is the same with RTN weights: the default for w8a8_dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from qcompiler.calib.stats import StagedCollector, StatRequest, Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import BlockAnalysis, analyze_block
from qcompiler.ir.graph import get_tensor
from qcompiler.ir.producers import row_divisor
from qcompiler.numerics import sqnr_db
from qcompiler.passes.smoothing.smoothquant import SmoothGroup, SmoothQuant, fold_smoothing
from qcompiler.passes.weight.awq_rtn import descendants
from qcompiler.passes.weight.gptq import GPTQ
from qcompiler.pm.base import PassContext, PassResult


def without_activation_fake_quant(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the block's graph (node names kept, tensors shared) in which every activation fake-quant node is
    bypassed: the block as the smoothing passes see it before act_quant. For analysis only: rewrite `gm` itself."""
    graph = fx.Graph()  # (a plain copy: deepcopy would also copy the pytree codegen, which warns)
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in list(graph.nodes):
        if qmeta.ACT_FQ in node.meta and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(gm, graph)


@dataclass
class StagedSmoothQuant:
    """SmoothQuant's groups as points of the weight pass's staged runs (a staged.StageSmoothing)."""

    sq: SmoothQuant
    analysis: BlockAnalysis
    groups: dict[str, SmoothGroup]  # by input node
    skipped: dict[str, str]
    alphas: dict[str, float | None] = field(default_factory=dict)
    smoothed: list[str] = field(default_factory=list)
    restarts: int = 0
    producer_float: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule, ctx: PassContext, sq: SmoothQuant) -> StagedSmoothQuant:
        groups, skipped, note = sq.groups(without_activation_fake_quant(gm), ctx)
        if note:
            skipped["o_proj"] = note
        return cls(sq, analyze_block(gm), {g.input: g for g in groups}, skipped)

    def points(self) -> list[str]:
        return list(self.groups)

    def requests(self, x: str) -> list[StatRequest]:
        if x not in self.groups:
            return []
        return [StatRequest(x, "absmax_channel")] + ([StatRequest(x, "token_sample")] if self.sq.alpha is None else [])

    def smooth(self, gm: fx.GraphModule, ctx: PassContext, x: str, measured: Stats,
               staged: StagedCollector | None) -> torch.Tensor | None:
        g = self.groups[x]
        nodes = {n.name: n for n in gm.graph.nodes}
        if g.producer is not None:
            wq = nodes[g.producer].meta.get(qmeta.WQ)
            if wq is not None and wq.args.granularity == "tensor":
                self.skipped[g.label] = "its producer was quantized with one scale per tensor, which a row scaling changes"
                return None
        s, alpha = self.sq.smoothing_scales(gm, ctx, self.analysis, measured, x, g.consumers, g.index)
        self.alphas[g.label] = alpha
        if alpha is None:  # (searched: leaving the input alone scored best)
            return None
        s_in = fold_smoothing(gm, ctx, self.analysis, g, s)
        if g.norm is not None:
            moved = descendants(nodes[g.norm.mul_node])
        else:
            assert g.producer is not None
            wq = nodes[g.producer].meta.get(qmeta.WQ)
            if wq is not None:  # (quantized at an earlier stage: the same codes, the rows' scales divided)
                divisor = row_divisor(wq.scale.shape[0], g.offset, g.rows, s)
                wq.scale = wq.scale / divisor[:, None]
                w_float = self.producer_float[g.producer] / divisor[:, None]
                self.producer_float[g.producer] = w_float
                wq.weight_sqnr_db = sqnr_db(w_float, get_tensor(gm, self.analysis.linears[g.producer].weight))
            moved = descendants(nodes[g.producer])
        self.smoothed.append(g.label)
        if staged is not None and not staged.divide_value(x, s_in, moved):
            staged.restart()
            self.restarts += 1
        return s_in

    def quantizing(self, node: fx.Node, w_float: torch.Tensor) -> None:
        if any(g.producer == node.name for g in self.groups.values()):  # (its SQNR is measured again once divided)
            self.producer_float[node.name] = w_float.float().clone()

    def report(self) -> dict[str, object]:
        return {"smoothquant": {"smoothed": self.smoothed, "skipped": self.skipped, "alpha": self.alphas},
                "restarts": self.restarts}


@dataclass(frozen=True)
class SQGPTQ(GPTQ):
    name = "sq_gptq"
    summary = "SmoothQuant scales and GPTQ weights, stage by stage in one paused run (int8 per-token activations)"
    alpha: float | None = None  # None: searched per input (smoothquant's default)
    producers: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        SmoothQuant(alpha=self.alpha, producers=self.producers)  # (its checks)
        if not self.true_sequential:
            raise ValueError("sq_gptq smooths between GPTQ's stages: true_sequential must stay true")
        if self.quantized_input:
            raise ValueError("sq_gptq: quantized_input fits the weights to Q(x), which a channel scaling does not "
                             "commute with; use smoothquant,...,gptq{quantized_input=true}")

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        smoothing = StagedSmoothQuant.of(gm, ctx, SmoothQuant(alpha=self.alpha, producers=self.producers))
        return self.quantize_stages(gm, ctx, smoothing)
