"""rotate: QuaRot-style rotations — a randomized Hadamard rotation of the residual stream fused into the weights,
and online Hadamard transforms before o_proj and down_proj inserted as graph ops.

Residual stream (d = hidden size, R = H_d·diag(σ)/√d orthogonal, algorithms/hadamard.py, the same R for every
block — seeded). Write every residual value h as h' = h·R:
  1. norms first: each RMSNorm feeding linears is folded, W ← W·diag(γ), γ ← 1 (fold_norm); a weight-free RMSNorm
     commutes with R because ‖h·R‖ = ‖h‖, so norm(h·R) = norm(h)·R;
  2. linears reading a norm of the stream: y = n·Wᵀ = (n·R)·(W·R)ᵀ, so W ← W·R (columns);
  3. linears writing into the stream (their output is added to it: o_proj, down_proj): W ← Rᵀ·W, b ← Rᵀ·b, so
     they produce out·R;
  4. outside the blocks (`transform_outer`, run by the driver on the model): embeddings E ← E·R, the final norm
     folded into the head, W_head ← W_head·diag(γ_f)·R, γ_f ← 1 (a head tied to the embeddings is untied).
The model computes the same function (exactly, up to float rounding), but every activation the quantized
linears read is rotated: an outlier channel is spread over all d channels, which is what 4-bit activations need.

Online (online=True): the inputs of the linears that write into the stream from outside it — down_proj's
(intermediate size k) and o_proj's (the attention heads' outputs, heads × head size) — are rotated at run time,
x' = x·H_k (H_k normalized Hadamard, qc::hadamard_transform: deterministic, nothing stored), with W ← W·H_k.
QuaRot rotates both; o_proj's input is the worst-conditioned activation of a 4-bit run without it (the demo model
at w4a4: o_proj output SQNR 4–9 dB in most blocks; with it +88 % perplexity instead of +107 %). Skipped
(reported) for a size no Hadamard matrix is built for.

Learned (learn=N, SpinQuant's R1): R = R₀·C(B) is fitted first, on the whole float model and the calibration tokens,
to the quantized model's next-token loss (algorithms/spinquant.py: Cayley parametrization, straight-through
quantizers, N Adam steps at lr, bfloat16 autocast; float weights when GPTQ follows, as SpinQuant trains for it); the
driver hands R to the pass before any block runs, and every block and the outer weights use it. Only the Hugging
Face driver learns (it reads the whole model); dynamic per-token or no activation grids only.

Refused with the reason (before changing anything): a vision-language model (its projector's image features enter
the stream unrotated), a residual add whose other operand is not a linear's output
(Gemma 2/3 post-norms, MoE mixtures), a stream read by something other than an RMSNorm or the next add
(LayerNorm's mean subtraction does not commute with R), norms that cannot be folded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qcompiler.algorithms.hadamard import normalized_hadamard, random_hadamard
from qcompiler.calib.stats import Stats
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import BlockAnalysis, LinearInfo, NormGroup, analyze_block, norm_multiplier_value
from qcompiler.ir.graph import (
    LINEAR,
    PASSTHROUGH,
    aten,
    bias_attr,
    get_tensor,
    is_call,
    set_tensor,
)
from qcompiler.numerics import module_norm_multiplier
from qcompiler.passes.fusion.fold_norm import check_norm_group, scale_linear_inputs, scale_norm
from qcompiler.pm.base import Pass, PassContext, PassResult

HADAMARD = torch.ops.qc.hadamard_transform.default


def _through_passthrough(node: fx.Node) -> list[fx.Node]:
    """node and every value-preserving cast of it (what the stream's readers may read)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(u for u in n.users if is_call(u, PASSTHROUGH) and u.args[0] is n)  # (type_as(y, n) is y)
    return out


def _eval_dropout(node: fx.Node) -> bool:
    """aten.dropout(x, p, train=False): the identity a model traced in eval mode keeps (Phi-3's resid dropouts)."""
    return is_call(node, aten.dropout.default) and len(node.args) > 2 and node.args[2] is False


def residual_stream(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """(values of the residual stream — the block input and each residual add —, the linears writing into it).
    Raises ValueError naming the node when the block is not a pre-norm residual stack rotation keeps exact."""
    cur = next(n for n in gm.graph.nodes if n.op == "placeholder")
    values, writers = [], []
    while True:
        aliases = _through_passthrough(cur)
        values.extend(aliases)
        adds = [u for a in aliases for u in a.users if is_call(u, aten.add.Tensor)
                and all(isinstance(x, fx.Node) for x in u.args[:2])]
        if not adds:
            break
        if len(adds) > 1:
            raise ValueError(f"the residual value '{cur.name}' feeds {len(adds)} adds ({[a.name for a in adds]})")
        add = adds[0]
        other = next(x for x in add.args[:2] if x not in aliases)
        src = other
        while is_call(src, PASSTHROUGH) or _eval_dropout(src):
            src = src.args[0]  # type: ignore[assignment]
        if not is_call(src, LINEAR):
            raise ValueError(f"the residual add '{add.name}' adds '{src.name}' ({src.target}), not a linear's output "
                             "(a post-norm, as in Gemma 2/3, or an MoE mixture): its rotation is not implemented")
        writers.append(src)
        cur = add
    for v in values:
        for u in v.users:
            if u in values:
                continue
            if is_call(u, aten.type_as.default) and u.args[0] is not v:
                continue  # (v only lends its dtype)
            rms = is_call(u, aten.pow.Tensor_Scalar) and u.args[1] == 2
            normalize = is_call(u, aten.mul.Tensor) and any(
                isinstance(x, fx.Node) and is_call(x, aten.rsqrt.default) for x in u.args[:2])
            shape_only = u.op == "call_module" or is_call(u, aten.sym_size.int)  # (export's shape guards)
            if not (rms or normalize or shape_only or u.op == "output" or u in writers or is_call(u, aten.add.Tensor)):
                raise ValueError(f"the residual stream is read by '{u.name}' ({u.target}), not by an RMSNorm: "
                                 "only weight-free RMSNorms commute with a rotation")
    return values, writers


def _stream_roles(gm: fx.GraphModule) -> tuple[list[fx.Node], list[NormGroup], list[LinearInfo], BlockAnalysis]:
    """(linears writing into the residual stream, the norm groups reading it, the linears those norms feed, the
    block's analysis). Raises ValueError with the reason when the block is not one the rotation keeps exact; changes
    nothing."""
    values, writers = residual_stream(gm)
    analysis = analyze_block(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    value_set = set(values)
    groups = []
    for g in analysis.norm_groups:  # the norms of the stream (not e.g. MLA's q_a_layernorm of a projection)
        if _reads_stream(nodes[g.mul_node], value_set):
            m = check_norm_group(gm, g)
            if not m:
                raise ValueError(m.reason)
            groups.append(g)
    readers = [analysis.linears[name] for g in groups for name in g.linears]
    all_readers = {n.name for n in gm.graph.nodes if is_call(n, LINEAR) and any(
        x in value_set for x in n.all_input_nodes)}
    if all_readers:
        raise ValueError(f"linears {sorted(all_readers)} read the residual stream without a norm in between; "
                         "fold-then-rotate needs a norm before every reader")
    return writers, groups, readers, analysis


def block_refusal(gm: fx.GraphModule) -> str | None:
    """Why the residual rotation cannot rotate this traced block (None: it can); nothing is changed."""
    try:
        _stream_roles(gm)
    except ValueError as e:
        return str(e)
    return None


def model_refusal(model: torch.nn.Module) -> str | None:
    """Why the rotation cannot be applied outside the blocks of `model` (None: it can)."""
    from qcompiler.frontends.multimodal import is_multimodal

    if is_multimodal(model.config):
        # the projector writes image features into the stream unrotated: the blocks would read them as if rotated
        return (f"'{model.config.model_type}' is a vision-language model, whose projector writes image features into "
                "the residual stream that the rotation of the embeddings does not reach; rotating it is not "
                "implemented (use a scheme without rotation: w8a8_dynamic, w4a16, ...)")
    norm = getattr(model.get_decoder(), "norm", None) if hasattr(model, "get_decoder") else None
    if model.get_input_embeddings() is None or model.get_output_embeddings() is None or norm is None \
            or getattr(norm, "bias", None) is not None:
        return "the model needs input embeddings, an output head and a final RMSNorm named 'norm' (no bias)"
    return None


@dataclass(frozen=True)
class Rotate(Pass):
    name = "rotate"
    summary = ("QuaRot: randomized Hadamard rotation of the residual stream fused into weights, online Hadamards before "
               "o_proj and down_proj")
    seed: int = 0
    online: bool = True  # the online Hadamards before o_proj and down_proj
    learn: int = 0  # > 0: SpinQuant's R1 — the residual rotation learned in this many steps (algorithms/spinquant.py)
    lr: float = 1e-4  # the learning rate of those steps (Adam on the Cayley parameter)
    # the learned R (float64), set by the driver before any block runs (not an option)
    learned: torch.Tensor | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    def uses_calibration(self) -> bool:
        return self.learn > 0

    def refusal(self, model: torch.nn.Module, blocks: Iterable[tuple[str, fx.GraphModule]]) -> str | None:
        if (reason := model_refusal(model)) is not None:
            return reason
        for name, gm in blocks:
            if (reason := block_refusal(gm)) is not None:
                return f"block '{name}': {reason}"
        return None

    def rotation(self, d: int) -> tuple[torch.Tensor, str]:
        if self.learned is not None:
            if tuple(self.learned.shape) != (d, d):
                raise PassError(f"rotate: the learned rotation is {tuple(self.learned.shape)}, the residual stream "
                                f"has {d} channels")
            return self.learned, f"learned (SpinQuant R1, {self.learn} steps from a randomized Hadamard)"
        if self.learn:
            raise PassError("rotate{learn=...} learns the rotation on the whole model before the blocks run; only "
                            "the Hugging Face checkpoint driver (qcompile quant --model FOLDER) does that")
        return random_hadamard(d, self.seed)

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        try:
            writers, groups, readers, analysis = _stream_roles(gm)
        except ValueError as e:
            raise PassError(f"block '{ctx.block}': rotate: {e}") from None
        nodes = {n.name: n for n in gm.graph.nodes}
        d = int(get_tensor(gm, readers[0].weight).shape[1]) if readers else None
        if d is None:
            return PassResult(gm, False, {"skipped": "no norm-fed linear in this block"})
        r, kind = self.rotation(d)
        for g in groups:  # 1. fold the norm weights
            mult = norm_multiplier_value(gm, g)
            for lin in g.linears:
                scale_linear_inputs(gm, analysis.linears[lin].weight, mult)
            scale_norm(gm, g, mult)
        for info in readers:  # 2. W ← W·R
            w = get_tensor(gm, info.weight)
            set_tensor(gm, info.weight, (w.double() @ r).to(w.dtype))
        for node in writers:  # 3. W ← Rᵀ·W, b ← Rᵀ·b
            attr = str(node.args[1].target)  # type: ignore[union-attr]
            w = get_tensor(gm, attr)
            set_tensor(gm, attr, (r.t() @ w.double()).to(w.dtype))
            b = bias_attr(node)
            if b is not None:
                bias = get_tensor(gm, b)
                set_tensor(gm, b, (bias.double() @ r).to(bias.dtype))
        online, no_hadamard = [], []
        if self.online:
            for info in [*analysis.by_role("o"), *analysis.by_role("down")]:
                h = normalized_hadamard(info.in_features)
                if h is None:
                    no_hadamard.append(info.path)
                    continue
                node = nodes[info.node]
                w = get_tensor(gm, info.weight)
                set_tensor(gm, info.weight, (w.double() @ h).to(w.dtype))
                x = node.args[0]
                with gm.graph.inserting_before(node):
                    rot = gm.graph.call_function(HADAMARD, (x,))
                node.replace_input_with(x, rot)  # type: ignore[arg-type]
                node.meta[qmeta.ROTATION] = "hadamard"
                online.append(info.path)
        gm.graph.lint()
        gm.recompile()
        details: dict[str, Any] = {"residual_rotation": kind, "hidden_size": d, "folded_norms": len(groups),
                                   "rotated_inputs": len(readers), "rotated_outputs": len(writers), "online": online}
        if no_hadamard:
            details["online_skipped_no_hadamard_order"] = no_hadamard
        return PassResult(gm, True, details)

    def transform_outer(self, model: torch.nn.Module) -> dict[str, Any]:
        """The residual rotation outside the blocks: E ← E·R; W_head ← W_head·diag(γ_f)·R; γ_f ← 1; untied head."""
        if (reason := model_refusal(model)) is not None:
            raise PassError(f"rotate: {reason}")
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        norm = model.get_decoder().norm
        # (float32 products: the vocabulary-sized matrices are the largest of the model; float64 copies of them
        # doubled the run's peak memory for no accuracy a float32 model keeps)
        d = embed.weight.shape[1]
        gamma = module_norm_multiplier(norm, d).float()
        r = self.rotation(d)[0].float()
        w_head = (head.weight.detach().float() * gamma[None, :]) @ r  # (before the embedding: they may be tied)
        e = embed.weight.detach().float() @ r
        embed.weight = torch.nn.Parameter(e.to(embed.weight.dtype), requires_grad=False)
        head.weight = torch.nn.Parameter(w_head.to(head.weight.dtype), requires_grad=False)
        norm.weight = torch.nn.Parameter((norm.weight.detach().float() - (gamma - 1.0)).to(norm.weight.dtype),
                                         requires_grad=False)
        untied = bool(getattr(model.config, "tie_word_embeddings", False))
        model.config.tie_word_embeddings = False
        return {"untied_head": untied}


def _reads_stream(mul: fx.Node, stream: set[fx.Node], depth: int = 8) -> bool:
    """The norm product h ⊙ m computes from a residual stream value within a few ops (not across a linear)."""
    frontier, seen = [mul], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for x in n.all_input_nodes:
                if x in stream:
                    return True
                if x not in seen and not is_call(x, LINEAR) and x.op == "call_function":
                    seen.add(x)
                    nxt.append(x)
        frontier = nxt
    return False
