"""flatquant: learned Kronecker transforms x' = x·(L ⊗ R) and activation clip ratios before every linear whose
activations are quantized per token at run time (w4a4, w4a8, w8a8_dynamic), fitted block by block (FlatQuant).

For each input node read by such linears (one "site": the shared input of q/k/v, of gate/up, o_proj's, down_proj's),
with K = a·b its size (algorithms/flatquant.kronecker_factors, vllm-ascend's split):

  graph     x  →  qc::kronecker_transform(x, L, R)  →  the site's linears      (x' = x·P, P = L ⊗ R)
  weights   W ← W·P⁻ᵀ                                 (so x'·(W·P⁻ᵀ)ᵀ = x·Wᵀ: the float block is unchanged)
  act grid  s_t = c·max|x'_t| / qmax                  (c the site's clip ratio, on the linear's meta; act_quant
                                                       writes it into the per-token fake-quant, lowering into
                                                       qc::linear_int_dynamic)

Per-channel scaling (diag_scale, default true; FlatQuant's "PS"): where the site's input comes from a producer that
can absorb a per-channel division exactly — a norm's multiplier (q/k/v, gate/up), up_proj's rows (down_proj's
input act(gate)·up, fused gate_up included) or v_proj's rows (o_proj's input, when v maps 1:1 onto o: not under
GQA) — the site also learns d ∈ ℝᴷ, started at d_j = max|x_j|^α / max|W_:,j|^(1−α) (α = diag_alpha, 0.3):

  x' = (x / d)·P,   W ← W·diag(d)·P⁻ᵀ,   producer: norm multiplier m ← m / d, or rows W_p ← diag(d)⁻¹·W_p

so nothing is added at run time (d lives in weights every format already stores).

L, R, c (and d) minimise ‖block(x) − block_q(x)‖² on the calibration inputs of the block, the quantized block computing
every site as Q_a(x·P)·Q_w(W·P⁻ᵀ)ᵀ with straight-through rounding (algorithms/flatquant.learn_block_transforms:
`steps` Adam steps of `micro_batch` sequences, cosine schedule). It runs after `rotate` and `fuse_linears`, before
the weight quantizer (GPTQ then sees x' in its Hessian and quantizes W·P⁻ᵀ). P starts at the identity, so step 0 is
QuaRot — except where rotate put an online Hadamard H_K = H_a ⊗ H_b before the site (o_proj, down_proj) and both
factors are built: there the Hadamard is folded in (absorb_hadamard, default true: W ← W·H_Kᵀ back, P₀ = H_a/√a ⊗
H_b/√b), so the layer reads one online transform L ⊗ R, which msModelSlim's W4A4_FLATQUANT_DYNAMIC holds.

targets: "block" (default) fits the quantized block to the float block on the same inputs — the quantized model's
hidden states, which carry the error of the blocks before; "model" fits it to the float model's own outputs of the
block (the driver carries the float model's inputs beside the quantized ones: Pass.uses_float_stream), so each block
also learns to pull back the error it inherited, as OmniQuant's float targets do.

weights_in_loop (default false): false trains against float weights, the choice SpinQuant makes when GPTQ follows —
on the demo with GPTQ after it, 39.18 ppl against 51.0 with the weights fake-quantized (RTN) in the loop, as
FlatQuant trains; true suits an RTN weight pass.

fit_precision (default "float32"): "bfloat16" runs each fitting step's quantized block under bfloat16 autocast, as
`--calib-precision bfloat16` runs calibration forwards (GEMMs and attention on bfloat16-rounded inputs, float32
accumulation; parameters, loss and Adam in float32). On one demo block (40 steps) 1.4–1.55× faster, block loss 4.67
against 4.75.

Stored per layer: `<layer>.left_trans` [a, a], `<layer>.right_trans` [b, b] (float32) and the clip ratio in the
layer's record; msModelSlim's W4A4_FLATQUANT_DYNAMIC layout has the same three per layer. Layers with static or
float activations are left alone (reported).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.algorithms.flatquant import Site, kronecker_factors, kronecker_weight, learn_block_transforms
from qcompiler.algorithms.hadamard import normalized_hadamard
from qcompiler.calib.precision import CalibPrecision
from qcompiler.calib.stats import Stats
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import (
    get_tensor,
    linear_module_attr,
    set_tensor,
)
from qcompiler.ir.producers import row_divisor, row_producers
from qcompiler.passes.fusion.fold_norm import (
    check_norm_group,
    divide_linear_outputs,
    scale_linear_inputs,
    scale_norm,
)
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs

KRONECKER = torch.ops.qc.kronecker_transform.default
HADAMARD = torch.ops.qc.hadamard_transform.default
ROUTED = torch.ops.qc.routed.default
aten = torch.ops.aten


Producer = tuple[str, str, int, torch.Tensor | None]  # (kind, node, first row, index): see _scale_producers


@dataclass(frozen=True)
class FlatQuant(Pass):
    name = "flatquant"
    summary = "FlatQuant: learned Kronecker transforms and activation clip ratios per linear input, fitted per block"
    # (measured on the demo, w4a4 + GPTQ: 100 steps 39.18 ppl, 200 steps 39.36; weights in the loop 51.0)
    steps: int = 100
    lr: float = 1e-2
    clip_lr: float = 1e-1
    micro_batch: int = 1
    weights_in_loop: bool = False
    absorb_hadamard: bool = True
    diag_scale: bool = True
    diag_alpha: float = 0.3
    targets: str = "block"
    seed: int = 0
    fit_precision: CalibPrecision = "float32"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.micro_batch < 1 or self.lr <= 0 or self.clip_lr < 0:
            raise ValueError("flatquant: steps ≥ 0, micro_batch ≥ 1, lr > 0 and clip_lr ≥ 0")
        if self.targets not in ("block", "model"):
            raise ValueError(f"flatquant: targets is 'block' or 'model', got '{self.targets}'")
        if not 0.0 <= self.diag_alpha <= 1.0:
            raise ValueError(f"flatquant: diag_alpha must be in [0, 1], got {self.diag_alpha}")

    def uses_float_stream(self) -> bool:
        return self.targets == "model"

    def _sites(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[list[Site], dict[str, QuantArgs | None],
                                                                        list[str]]:
        """Sites (by input node, graph order), each linear's weight grid, and the linears left alone."""
        infos = analyze_block(gm).linears
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        nodes = {n.name: n for n in gm.graph.nodes}
        by_input: dict[str, Site] = {}
        weights: dict[str, QuantArgs | None] = {}
        skipped = []
        for name, info in infos.items():
            scheme = ctx.layer_scheme(info)
            acts = scheme.activations if scheme is not None else None
            if (scheme is None or acts is None or not acts.dynamic or acts.is_float or acts.granularity != "token"
                    or info.kind != "linear"):
                skipped.append(info.path)
                continue
            x = nodes[name].args[0]
            assert isinstance(x, fx.Node)
            site = by_input.setdefault(x.name, Site(x.name, [], info.in_features, acts.bits))
            if site.act_bits != acts.bits:
                raise PassError(f"flatquant: block '{ctx.block}': the linears reading '{x.name}' quantize it with "
                                f"different activation bits; give them one scheme")
            site.linears.append(name)
            weights[name] = scheme.weights
        return sorted(by_input.values(), key=lambda s: order[s.input]), weights, skipped

    def _target_batches(self, ctx: PassContext) -> Any:
        if self.targets == "block":
            return None
        if ctx.float_calib is None or len(ctx.float_calib) != len(ctx.calib):
            raise PassError(f"flatquant: block '{ctx.block}': targets=model needs the float model's inputs of the "
                            "block beside the calibration inputs (the HF driver carries them); use targets=block")
        return ctx.float_calib

    @staticmethod
    def _absorb_hadamard(gm: fx.GraphModule, site: Site) -> bool:
        """Replace the online Hadamard feeding `site` (rotate's x·H_K, with W·H_K in the weights) by the starting
        point P₀ = H_a/√a ⊗ H_b/√b of the site's own transform: the weights go back to W (H_K orthogonal), the site
        reads x, and the whole online transform is L ⊗ R, which a format with per-layer L and R holds. Only where
        both factors' Hadamard matrices are built; returns whether it did."""
        nodes = {n.name: n for n in gm.graph.nodes}
        h = nodes[site.input]
        if h.target != HADAMARD or set(h.users) != {nodes[name] for name in site.linears}:
            return False
        a, b = kronecker_factors(site.k)
        left, right = normalized_hadamard(a), normalized_hadamard(b)
        full = normalized_hadamard(site.k)
        if left is None or right is None or full is None:
            return False
        x = h.args[0]
        assert isinstance(x, fx.Node)
        for name in site.linears:
            lin = nodes[name]
            w_attr = str(lin.args[1].target)  # type: ignore[union-attr]
            w = get_tensor(gm, w_attr)
            set_tensor(gm, w_attr, (w.double() @ full.t()).to(w.dtype))
            lin.replace_input_with(h, x)
            lin.meta.pop(qmeta.ROTATION, None)
        gm.graph.erase_node(h)
        site.input, site.init = x.name, (left.float(), right.float())
        return True

    @staticmethod
    def _scale_producers(gm: fx.GraphModule, sites: list[Site]) -> dict[str, Producer]:
        """For each site whose input can absorb a per-channel division exactly, (kind, producer, first row, index):
        ("norm", the norm's multiplier node, 0, None) when the input is a norm output read by the site's linears
        alone; ("rows", the producing linear, its first row, None) when the input is act(gate)·up with up's output
        read by nothing else (up's rows, also inside a fused gate_up); ("rows", v's linear, its first row, index)
        when the input is attention's output over values read from v alone: under grouped-query attention the query
        heads of a group read one kv head's channels, so `index` ties o_proj's input channels to v's rows."""
        analysis = analyze_block(gm)
        rows = row_producers(gm)  # (qcompiler/ir/producers.py)
        out: dict[str, Producer] = {}
        for site in sites:
            for ng in analysis.norm_groups:
                if ng.mul_node == site.input and set(ng.linears) == set(site.linears) and check_norm_group(gm, ng):
                    out[site.input] = ("norm", ng.mul_node, 0, None)
            rp = rows.get(site.input)
            if rp is not None and site.linears == [rp.consumer]:
                out[site.input] = ("rows", rp.producer, rp.offset, rp.index)
        return out

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        if any(n.target == ROUTED for n in gm.graph.nodes):
            raise PassError(f"flatquant: block '{ctx.block}' routes tokens to experts (qc::routed), which has no "
                            "gradient to fit the transforms through; MoE models are not supported by flatquant yet: "
                            "drop it (rotate + gptq)")
        sites, weights, skipped = self._sites(gm, ctx)
        if not sites:
            return PassResult(gm, False, {"skipped": "no linear of this block quantizes activations per token"})
        if not ctx.calib:
            raise PassError(f"flatquant: block '{ctx.block}' has no calibration inputs to fit the transforms on")
        absorbed = [s.input for s in sites if self.absorb_hadamard and self._absorb_hadamard(gm, s)]
        if not ctx.target.online_rotation:  # (its formats hold L ⊗ R, not a Hadamard before it)
            infos = analyze_block(gm).linears
            for site in sites:
                producer = next(n for n in gm.graph.nodes if n.name == site.input)
                if producer.target == HADAMARD:
                    raise PassError(f"flatquant: block '{ctx.block}': the online Hadamard before "
                                    f"{', '.join(infos[n].path for n in site.linears)} ({site.k} inputs) has no Hadamard Kronecker factors "
                                    f"{kronecker_factors(site.k)} to fold into the learned transform, and target "
                                    f"'{ctx.target.name}' has no online Hadamard; use rotate{{online=false}}")
        if absorbed:
            gm.recompile()
        analysis = analyze_block(gm)
        producers = self._scale_producers(gm, sites) if self.diag_scale else {}
        for site in sites:
            if site.input in producers:
                site.scale_index = producers[site.input][3]
                site.weight_absmax = torch.stack([get_tensor(gm, analysis.linears[n].weight).abs().amax(dim=0).float()
                                                  for n in site.linears]).amax(dim=0)
        t0 = time.perf_counter()
        transforms, losses = learn_block_transforms(
            gm, sites, ctx.calib, weights if self.weights_in_loop else {}, self.steps, lr=self.lr,
            clip_lr=self.clip_lr, micro_batch=self.micro_batch, seed=self.seed,
            diag_alpha=self.diag_alpha if producers else None, target_batches=self._target_batches(ctx),
            precision=self.fit_precision)
        ctx.forward_seconds += time.perf_counter() - t0  # (all of it is forward/backward runs of the block)
        nodes = {n.name: n for n in gm.graph.nodes}
        report: dict[str, Any] = {}
        for site in sites:
            t = transforms[site.input]
            if t.scale is not None:  # x/d: the producer divides, the site's weights multiply (before P⁻ᵀ)
                kind, producer, offset, _ = producers[site.input]
                if kind == "norm":
                    scale_norm(gm, next(ng for ng in analysis.norm_groups if ng.mul_node == producer), t.scale)
                else:
                    assert t.producer_scale is not None
                    prod = analysis.linears[producer]
                    divide_linear_outputs(gm, ctx, prod, row_divisor(prod.out_features, offset,
                                                                     t.producer_scale.numel(), t.producer_scale))
                for name in site.linears:
                    scale_linear_inputs(gm, analysis.linears[name].weight, t.scale)
            linears = [nodes[name] for name in site.linears]
            base = linear_module_attr(linears[0])
            left, right = base + ".left_trans", base + ".right_trans"
            set_tensor(gm, left, t.left.float().contiguous())
            set_tensor(gm, right, t.right.float().contiguous())
            x = nodes[site.input]
            first = min(linears, key=list(gm.graph.nodes).index)
            with gm.graph.inserting_before(first):
                kron = gm.graph.call_function(KRONECKER, (x, gm.graph.get_attr(left), gm.graph.get_attr(right)))
            for lin in linears:
                w_attr = str(lin.args[1].target)  # type: ignore[union-attr]
                w = get_tensor(gm, w_attr)
                set_tensor(gm, w_attr, kronecker_weight(w.double(), t.left.double(), t.right.double()).to(w.dtype))
                lin.replace_input_with(x, kron)
                rotation = lin.meta.get(qmeta.ROTATION)
                lin.meta[qmeta.ROTATION] = f"{rotation}+kronecker" if rotation else "kronecker"
                lin.meta[qmeta.TRANSFORM] = {"left": left, "right": right, "clip_ratio": t.clip_ratio}
            report[base.removeprefix("block.")] = {
                "clip_ratio": round(t.clip_ratio, 4), "kronecker": [t.left.shape[0], t.right.shape[0]],
                "diag_scale": None if t.scale is None else producers[site.input][0]}
        gm.graph.lint()
        gm.recompile()
        details: dict[str, Any] = {"sites": report, "steps": self.steps, "absorbed_hadamards": len(absorbed),
                                   "block_mse": {k: float(f"{v:.4g}") for k, v in losses.items()}}
        if skipped:
            details["left_alone"] = skipped
        return PassResult(gm, True, details)
