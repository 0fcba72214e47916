"""A mixture-of-experts block's experts as one com.microsoft::QMoE node (onnxruntime's quantized MoE kernel, the op
onnxruntime-genai's builder writes for Mixtral, Qwen-MoE and gpt-oss).

Our graphs compute an MoE densely (frontends/moe.py):

    combine = qc::expert_routing(top_k_index, top_k_weights, E)             [T, E], zero where not routed
    out     = Σ_e combine[:, e] · down_e(glu(gate_e(x), up_e(x)))            [T, H]

QMoE computes the same sum over the k routed experts only, from router logits r [T, E]:

    selected = top_k(r);  w = softmax over the selected logits                (normalize_routing_weights = 1)
    or, given router_weights ρ [T, E]:  w = ρ at the selected experts          (normalize_routing_weights = 0)
    out[t]   = Σ_{e ∈ selected} w[t, e] · W2_e · swiglu(W1_e · x[t])
    swiglu(g, u) = G·σ(α·G)·(L + β),  G = min(g, limit),  L = clamp(u, −limit, limit)   (limit: none = ∞)

onnxruntime 1.32's CPU kernel always renormalizes over the selected experts unless router_weights is given
(measured: normalize_routing_weights = 0 alone still renormalizes), and takes only the interleaved fused layout
(swiglu_fusion = 1: W1's rows are gate₀, up₀, gate₁, up₁, …). So:

- The routing is read off the graph numerically, not by op pattern: the nodes from the router logits to
  expert_routing are evaluated on random logits and compared with the two routings QMoE computes — softmax → top-k
  → renormalize (Mixtral, Qwen3-MoE; top-k of the logits then softmax is the same function), and softmax → top-k
  without renormalizing (Qwen2-MoE: router_weights = softmax(r)) — and with the bias-corrected selection of GLM-4.5 and
  ERNIE 4.5 (`SelectedRouting`: p = sigmoid or softmax of r, experts chosen by top-k of p + b, weighted by p there,
  renormalized or not, times a scaling factor; b the one [E] constant of the routing nodes). QMoE's own top-k cannot
  compute that selection, so the dense weights w [T, E] are computed in ONNX ops and given as router_weights, and as
  router_probs too: its top-k of w are exactly the k experts with w > 0. Group-limited selection (DeepSeek V3's
  n_group > 1) and anything else is refused by name.
- The gated activation is read the same way: the nodes between an expert's gate / up outputs and its down input are
  evaluated and compared with swiglu(α = 1, β = 0, no limit) = silu(g)·u, and with gpt-oss's clamped form where the
  config has a swiglu_limit.
- Weights: each expert's gate, up (possibly one fused linear, split) and down are weight-only integer linears with
  symmetric codes q and scales s, ŵ = q·s. QMoE dequantizes (u − 2^(b−1))·s with u = q + 2^(b−1) (its default zero
  point), per output channel (scales [E, N]) or per block of K (block_size = the group, a power of two ≥ 16 dividing
  K; scales [E, N, K / block]). int4 codes pack two per byte along K, low nibble first, as MatMulNBits.
  Block-wise int8 is refused: onnxruntime runs it only with int8 activations (not what the artefact computes).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from qcompiler.errors import ExportError
from qcompiler.export.onnx.builder import MS_DOMAIN
from qcompiler.ir.graph import LINEAR, PASSTHROUGH, aten, get_tensor, is_call
from qcompiler.ir.routing import EXPERT_ROUTING
from qcompiler.kernels.packing import load_weight_codes, pack_int4

WOQ = torch.ops.qc.linear_woq.default
W8A8 = torch.ops.qc.linear_w8a8.default
_COLUMN_PLUMBING = PASSTHROUGH | {aten.slice.Tensor, aten.unsqueeze.default, aten.view.default,
                                  aten.reshape.default, aten.contiguous.default}


@dataclass(frozen=True)
class Swiglu:
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (up + self.beta)


@dataclass
class _Projection:
    """A weight-only linear, or rows [start, stop) of one (a fused gate|up projection split in two)."""

    linear: fx.Node
    start: int
    stop: int


@dataclass
class _Expert:
    gate: _Projection
    up: _Projection
    down: _Projection


@dataclass
class MoeRegion:
    """One expert_routing and everything it weights: QMoE's inputs, and the node whose value QMoE computes."""

    x: fx.Node  # the tokens every expert reads, [T, H]
    router: fx.Node  # router logits, [T, E]
    routing: str  # "normalized" | "softmax" (router_weights = softmax(logits)) | "sparse_mixer" | "selected"
    k: int
    jitter_eps: float | None  # the sparse mixer's ε (Phi-3.5-MoE: router_jitter_noise)
    experts: list[_Expert]
    glu: Swiglu
    out: fx.Node
    selected: SelectedRouting | None = None  # routing "selected": how


@dataclass(frozen=True)
class SelectedRouting:
    """Bias-corrected top-k selection (GLM-4.5, ERNIE 4.5): p = score(r); chosen = top-k(p + bias); w = p at chosen,
    divided by max(Σ, 1e-20) when `normalize`, times `scale`; zero elsewhere."""

    score: str  # "sigmoid" | "softmax"
    bias: torch.Tensor  # [E]
    normalize: bool
    scale: float

    def dense(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        p = torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, -1)
        idx = (p + self.bias).topk(k, -1).indices
        w = p.gather(-1, idx)
        if self.normalize:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        return torch.zeros_like(p).scatter(-1, idx, w * self.scale)


def _tensor(gm: Any, node: Any) -> torch.Tensor:
    return get_tensor(gm, str(node.target))


def _inputs(n: fx.Node) -> list[fx.Node]:
    """The nodes whose values `n` computes from (a cast's or type_as's second argument only names a dtype)."""
    if is_call(n, PASSTHROUGH) and isinstance(n.args[0], fx.Node):
        return [n.args[0]]
    return n.all_input_nodes


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, Any]) -> None:
    """Run `nodes` (in graph order) with the values in `env` bound; get_attr nodes read the module."""
    for n in nodes:
        if n in env:
            continue
        if n.op == "get_attr":
            env[n] = _tensor(gm, n)
            continue
        if n.op != "call_function":
            raise ExportError(f"node '{n.name}' ({n.op}) cannot be evaluated")
        dtype = n.kwargs.get("dtype") or next((a for a in n.args[1:] if isinstance(a, torch.dtype)), None)
        if is_call(n, PASSTHROUGH) and not (isinstance(dtype, torch.dtype) and not dtype.is_floating_point):
            # (float32 graphs: float casts are identities; type_as's other input names a dtype. A cast to bool or
            # an integer type — GLM-4.5's group mask — is computed.)
            env[n] = env[n.args[0]]
            continue
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        env[n] = n.target(*args, **kwargs)  # type: ignore[operator]


def _between(gm: fx.GraphModule, sources: set[fx.Node], sinks: list[fx.Node], block: str, what: str) -> list[fx.Node]:
    """The nodes computing `sinks` from `sources` (and constants), in graph order; refused if any other input."""
    inside: set[fx.Node] = set()
    stack = list(sinks)
    while stack:
        n = stack.pop()
        if n in inside or n in sources:
            continue
        if n.op == "placeholder" or is_call(n, (LINEAR, WOQ, W8A8)):
            raise ExportError(f"{block}: the {what} reads '{n.name}' besides {sorted(s.name for s in sources)}; "
                              "onnxruntime's QMoE cannot express it")
        inside.add(n)
        stack.extend(_inputs(n))
    return [n for n in gm.graph.nodes if n in inside]


def sparse_mixer_top2(scores: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's routing at inference (weights, indices [T, 2]): the largest score, then the largest of the rest,
    each weighted by its softmax over the scores within a relative distance 2ε of it."""
    weights, indices, masked = [], [], scores
    for _ in range(2):
        top, index = masked.max(-1, keepdim=True)
        far = ((top - scores) / scores.abs().clamp(min=top)) > 2 * eps
        weights.append(torch.softmax(masked.masked_fill(far, float("-inf")), -1).gather(-1, index))
        indices.append(index)
        masked = masked.scatter(-1, index, float("-inf"))
    return torch.cat(weights, -1), torch.cat(indices, -1)


def _routing_semantics(gm: fx.GraphModule, router: fx.Node, routing: fx.Node, block: str, cfg: Any
                       ) -> tuple[str, int, SelectedRouting | None]:
    """How the routing from the router logits to expert_routing selects and weights experts, checked on random
    logits against QMoE's routings: "normalized" (softmax → top-k → renormalized), "softmax" (not renormalized),
    "sparse_mixer" (Phi-3.5-MoE's top-2), "selected" (a bias-corrected SelectedRouting, given as dense weights)."""
    jitter_eps = getattr(cfg, "router_jitter_noise", None)
    index, weights, n_experts = routing.args[:3]
    nodes = _between(gm, {router}, [index, weights], block, "routing")  # type: ignore[list-item]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, int(n_experts), generator=gen) * 2.0  # type: ignore[call-overload]
    env: dict[fx.Node, Any] = {router: logits}
    _evaluate(gm, nodes, env)
    k = int(env[index].shape[-1])
    combine = torch.ops.qc.expert_routing(env[index].reshape(-1, k), env[weights].reshape(-1, k).float(),
                                          int(n_experts))  # type: ignore[call-overload]
    p = torch.softmax(logits, -1)
    top, idx = p.topk(k, -1)
    candidates = {"normalized": (top / top.sum(-1, keepdim=True), idx), "softmax": (top, idx)}
    if k == 2 and jitter_eps is not None:
        candidates["sparse_mixer"] = sparse_mixer_top2(logits, jitter_eps)
    for kind, (w, i) in candidates.items():
        if torch.allclose(combine, torch.zeros_like(p).scatter(-1, i, w), atol=1e-6):
            return kind, k, None
    constants = [_tensor(gm, n) for n in nodes if n.op == "get_attr"]
    biases = [t for t in constants if t.numel() == int(n_experts) and t.squeeze().dim() == 1]  # ([E], ERNIE: [1, E])
    if len(biases) <= 1 and (getattr(cfg, "n_group", None) or 1) == 1:
        bias = biases[0].float().reshape(-1) if biases else torch.zeros(int(n_experts))
        # (the config's scaling factor: GLM-4.5 `routed_scaling_factor`, HunYuan 3 `router_scaling_factor`)
        scales = {float(getattr(cfg, f, None) or 1.0) for f in ("routed_scaling_factor", "router_scaling_factor")}
        for score in ("sigmoid", "softmax"):
            for normalize in (True, False):
                for scale in sorted(scales):
                    selected = SelectedRouting(score, bias, normalize, scale)
                    if torch.allclose(combine, selected.dense(logits, k), atol=1e-6):
                        return "selected", k, selected
    raise ExportError(f"{block}: the router '{router.name}' does not route by softmax → top-{k} (renormalized or not), "
                      "Phi-3.5-MoE's sparse mixer or a bias-corrected top-k without expert groups, the routings this "
                      "export gives onnxruntime's QMoE (group-limited routing is not expressible); use --target "
                      "reference for this model")


def _column(node: fx.Node, routing: fx.Node) -> int | None:
    """e where `node` is combine[:, e] (through slices and unsqueezes) of this expert_routing."""
    while is_call(node, _COLUMN_PLUMBING) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if is_call(node, aten.select.int) and node.args[1] == 1:
        src = node.args[0]
        while is_call(src, _COLUMN_PLUMBING) and isinstance(src.args[0], fx.Node):  # type: ignore[union-attr]
            src = src.args[0]  # type: ignore[union-attr]
        if src is routing:
            return int(node.args[2])  # type: ignore[arg-type]
    return None


def _projection_of(n: fx.Node, block: str) -> _Projection:
    """The weight-only linear behind `n` (a linear, or getitem i of its split)."""
    if is_call(n, WOQ):
        rows = int(_tensor(n.graph.owning_module, n.args[2]).shape[0])  # type: ignore[arg-type]
        return _Projection(n, 0, rows)
    if is_call(n, operator.getitem) and is_call(n.args[0], aten.split_with_sizes.default):  # type: ignore[arg-type]
        split = n.args[0]
        sizes, i = list(split.args[1]), int(n.args[1])  # type: ignore[union-attr,arg-type]
        if split.args[2] in (-1, 1) and is_call(split.args[0], WOQ):  # type: ignore[union-attr]
            return _Projection(split.args[0], sum(sizes[:i]), sum(sizes[:i + 1]))  # type: ignore[union-attr,arg-type]
    if is_call(n, (LINEAR, W8A8)) or (is_call(n, operator.getitem) and is_call(n.args[0], aten.split_with_sizes.default)):
        raise ExportError(f"{block}: expert projection '{n.name}' is not a weight-only integer linear; onnxruntime's "
                          "QMoE runs int4 / int8 weight-only experts (w4a16, w8a16)")
    raise ExportError(f"{block}: expected an expert projection, found '{n.name}' ({n.target})")


def _expert(gm: fx.GraphModule, down_out: fx.Node, glus: list[Swiglu], block: str) -> tuple[_Expert, Swiglu]:
    """gate, up, down of the expert whose down projection computes `down_out`, and its activation."""
    down = _projection_of(down_out, block)
    hidden = down.linear.args[0]
    # the linear-like nodes (or splits of one) the activation reads
    sources: list[fx.Node] = []
    stack, seen = [hidden], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if is_call(n, (WOQ, W8A8, LINEAR)) or (is_call(n, operator.getitem)
                                                and is_call(n.args[0], aten.split_with_sizes.default)):
            sources.append(n)
            continue
        if n.op == "placeholder":
            raise ExportError(f"{block}: the activation of expert '{down.linear.name}' reads the block input '{n.name}'")
        stack.extend(n.all_input_nodes)
    sources.sort(key=lambda n: list(gm.graph.nodes).index(n))
    if len(sources) != 2:
        raise ExportError(f"{block}: the expert of '{down.linear.name}' has {len(sources)} projections before its down "
                          "projection; onnxruntime's QMoE runs gated experts (gate, up, down)")
    a, b = (_projection_of(s, block) for s in sources)
    nodes = _between(gm, set(sources), [hidden], block, "expert activation")  # type: ignore[list-item]
    gen = torch.Generator().manual_seed(0)
    va, vb = (torch.randn(16, s.stop - s.start, generator=gen) * 4.0 for s in (a, b))
    env: dict[fx.Node, Any] = {sources[0]: va, sources[1]: vb}
    _evaluate(gm, nodes, env)
    got = env[hidden]
    for glu in glus:
        for gate, up, (vg, vu) in ((a, b, (va, vb)), (b, a, (vb, va))):
            if vg.shape == vu.shape and torch.allclose(got, glu(vg, vu), rtol=1e-5, atol=1e-6):
                return _Expert(gate, up, down), glu
    raise ExportError(f"{block}: the activation of expert '{down.linear.name}' is not a SwiGLU onnxruntime's QMoE "
                      "computes (silu(gate)·up, or gpt-oss's clamped form)")


def find_moe_regions(gm: fx.GraphModule, cfg: Any, block: str) -> list[MoeRegion]:
    """Every expert_routing of the block and the experts it weights, checked to be what QMoE computes."""
    regions = []
    glus = [Swiglu()]
    if getattr(cfg, "swiglu_limit", None):  # gpt-oss: α = 1.702, β = 1, gate and up clamped
        glus.append(Swiglu(1.702, 1.0, float(cfg.swiglu_limit)))
    for routing in [n for n in gm.graph.nodes if is_call(n, EXPERT_ROUTING)]:
        n_experts = int(routing.args[2])  # type: ignore[arg-type]
        # the terms combine[:, e] · down_e(…) and the sum they form
        terms: dict[int, fx.Node] = {}
        for col in [u for u in gm.graph.nodes if _column(u, routing) is not None and is_call(u, aten.select.int)]:
            e = _column(col, routing)
            users = [u for n in _column_chain(col) for u in n.users if is_call(u, aten.mul.Tensor)]
            if len(users) != 1:
                raise ExportError(f"{block}: routing column {e} of '{routing.name}' is not one product with an "
                                  "expert's output")
            terms[e] = users[0]  # type: ignore[index]
        if sorted(terms) != list(range(n_experts)):
            raise ExportError(f"{block}: '{routing.name}' weights experts {sorted(terms)}, expected 0…{n_experts - 1}")
        out = _sum_of(terms.values(), block)
        experts, glu_used = [], set()
        for e in range(n_experts):
            down_out = next(a for a in terms[e].args if isinstance(a, fx.Node) and _column(a, routing) is None)
            expert, glu = _expert(gm, down_out, glus, block)
            experts.append(expert)
            glu_used.add(glu)
        if len(glu_used) != 1:
            raise ExportError(f"{block}: the experts of '{routing.name}' use different activations")
        x = experts[0].gate.linear.args[0]
        stray = [p.linear.name for ex in experts for p in (ex.gate, ex.up) if p.linear.args[0] is not x]
        if stray:
            raise ExportError(f"{block}: expert projections {stray} do not read the tokens the first expert reads")
        router = _router_logits(routing)
        kind, k, selected = _routing_semantics(gm, router, routing, block, cfg)
        regions.append(MoeRegion(x, router, kind, k, getattr(cfg, "router_jitter_noise", None), experts,  # type: ignore[arg-type]
                                 glu_used.pop(), out, selected))
    return regions


def _column_chain(col: fx.Node) -> list[fx.Node]:
    """col and the slices / unsqueezes applied to it on the way to the product."""
    chain = [col]
    while True:
        users = [u for u in chain[-1].users if is_call(u, _COLUMN_PLUMBING)]
        if len(users) != 1:
            return chain
        chain.append(users[0])


def _sum_of(terms: Any, block: str) -> fx.Node:
    """The add-chain node that sums exactly `terms` (from zeros, or from a first term): followed up from any term."""
    terms = set(terms)

    def pure(m: Any) -> bool:  # a term, zeros, or a sum of those
        return isinstance(m, fx.Node) and (m in terms or _is_zeros(m) or (
            is_call(m, aten.add.Tensor) and all(pure(a) for a in m.args[:2])))

    n = next(iter(terms))
    while len(n.users) == 1 and is_call(next(iter(n.users)), aten.add.Tensor) and pure(next(iter(n.users))):
        n = next(iter(n.users))
    covered, stack = set(), [n]
    while stack:
        m = stack.pop()
        if m in terms:
            covered.add(m)
        elif is_call(m, aten.add.Tensor):
            stack.extend(a for a in m.args[:2] if isinstance(a, fx.Node))
        elif not _is_zeros(m):
            raise ExportError(f"{block}: the experts' outputs are summed with '{m.name}'; QMoE computes their sum only")
    if covered != terms:
        raise ExportError(f"{block}: the experts' weighted outputs are not summed in one chain")
    return n


def _is_zeros(n: fx.Node) -> bool:
    return is_call(n, (aten.zeros_like.default, aten.zeros.default))


def _router_logits(routing: fx.Node) -> fx.Node:
    """The float router linear the routing is computed from (the one linear among its ancestors)."""
    found, stack, seen = [], list(routing.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_call(n, (LINEAR, WOQ, W8A8)):
            found.append(n)
            continue
        stack.extend(_inputs(n))
    if len(found) != 1:
        raise ExportError(f"'{routing.name}' is computed from {len(found)} linears ({sorted(n.name for n in found)}), "
                          "expected one router")
    return found[0]


def _codes_and_scales(gm: fx.GraphModule, p: _Projection, block: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor | None, int, int]:
    """(unsigned codes [N, K] as QMoE reads them, scales [N, groups], bias or None, bits, group) of rows of a linear."""
    _, qw, scale, zero, bias, bits, group, k = p.linear.args
    if zero is not None:
        raise ExportError(f"{block}: expert projection '{p.linear.name}' has asymmetric codes; onnxruntime's QMoE "
                          "export takes symmetric ones (the default of w4a16 / w8a16)")
    stored = _tensor(gm, qw)  # type: ignore[arg-type]
    codes = load_weight_codes(stored, int(bits), int(k)).to(torch.int32)  # type: ignore[call-overload]
    if int(bits) == 8:
        codes = codes + 128 if stored.dtype == torch.int8 else codes
    s = _tensor(gm, scale).float()  # type: ignore[arg-type]
    b = None if bias is None else _tensor(gm, bias).float()[p.start:p.stop]  # type: ignore[arg-type]
    return codes[p.start:p.stop], s.reshape(s.shape[0], -1)[p.start:p.stop], b, int(bits), int(group)  # type: ignore[call-overload]


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows a₀, b₀, a₁, b₁, …"""
    return torch.stack([a, b], 1).reshape(a.shape[0] * 2, *a.shape[1:])


def emit_qmoe(em: Any, region: MoeRegion, index: int) -> str:
    """The QMoE node computing `region.out`, its initializers written under model.layers.{index}.moe.*."""
    gm, block = em.gm, em.scope
    fc1_codes, fc1_scales, fc1_bias, fc2_codes, fc2_scales, fc2_bias = [], [], [], [], [], []
    layouts = set()
    for ex in region.experts:
        g, u, d = (_codes_and_scales(gm, p, block) for p in (ex.gate, ex.up, ex.down))
        layouts.add((g[3], g[1].shape[1], u[3], u[1].shape[1], d[3], d[1].shape[1]))
        fc1_codes.append(_interleave(g[0], u[0]))
        fc1_scales.append(_interleave(g[1], u[1]))
        fc2_codes.append(d[0])
        fc2_scales.append(d[1])
        if (g[2] is None) != (u[2] is None):
            raise ExportError(f"{block}: an expert's gate and up projections differ in having a bias")
        if g[2] is not None:
            fc1_bias.append(_interleave(g[2], u[2]))  # type: ignore[arg-type]
        if d[2] is not None:
            fc2_bias.append(d[2])
    bits = {b for layout in layouts for b in layout[0::2]}  # (gate, up and down bits of every expert)
    if len(layouts) != 1 or len(bits) != 1:
        raise ExportError(f"{block}: the experts are quantized with different bits or groups; QMoE takes one grid")
    (n_bits,) = bits
    hidden, inter = int(fc1_codes[0].shape[1]), int(fc2_codes[0].shape[1])
    groups1, groups2 = int(fc1_scales[0].shape[1]), int(fc2_scales[0].shape[1])
    block_size = None
    if groups1 > 1 or groups2 > 1:
        block_size = hidden // groups1
        if inter // groups2 != block_size or block_size < 16 or block_size & (block_size - 1) \
                or hidden % block_size or inter % block_size:
            raise ExportError(f"{block}: QMoE quantizes in blocks of a power of two ≥ 16 dividing both the hidden "
                              f"({hidden}) and the expert ({inter}) widths; these experts have groups of "
                              f"{hidden // groups1} and {inter // max(groups2, 1)}")
        if n_bits == 8:
            raise ExportError(f"{block}: onnxruntime runs block-wise int8 experts only with int8 activations; "
                              "quantize the experts per channel (w8a16) for --target onnxruntime")
    b = em.b
    base = f"model.layers.{index}.moe"

    def weights(codes: list[torch.Tensor]) -> np.ndarray:
        stacked = torch.stack(codes).to(torch.uint8)
        packed = pack_int4(stacked.reshape(-1, stacked.shape[-1])).reshape(*stacked.shape[:2], -1) \
            if n_bits == 4 else stacked
        return packed.contiguous().numpy()

    def scales(values: list[torch.Tensor]) -> np.ndarray:
        s = torch.stack(values)
        return (s if block_size else s[..., 0]).contiguous().numpy().astype(np.float32)

    inputs = [em.v(region.x), _router_input(em, region), b.initializer(f"{base}.fc1.weight", weights(fc1_codes)),
              b.initializer(f"{base}.fc1.scales", scales(fc1_scales)),
              b.initializer(f"{base}.fc1.bias", torch.stack(fc1_bias).numpy()) if fc1_bias else "",
              b.initializer(f"{base}.fc2.weight", weights(fc2_codes)),
              b.initializer(f"{base}.fc2.scales", scales(fc2_scales)),
              b.initializer(f"{base}.fc2.bias", torch.stack(fc2_bias).numpy()) if fc2_bias else ""]
    attrs: dict[str, Any] = {"k": region.k, "activation_type": "swiglu", "swiglu_fusion": 1,
                             "activation_alpha": region.glu.alpha, "activation_beta": region.glu.beta,
                             "normalize_routing_weights": int(region.routing == "normalized"),
                             "use_sparse_mixer": int(region.routing == "sparse_mixer"), "expert_weight_bits": n_bits,
                             "accuracy_level": em.options.accuracy_level}
    if region.glu.limit is not None:
        attrs["swiglu_limit"] = region.glu.limit
    if block_size:
        attrs["block_size"] = block_size
    if region.routing == "softmax":  # aggregate with softmax(logits) at the selected experts, not renormalized
        inputs += ["", "", "", "", "", "", b.op("Softmax", [inputs[1]], f"{block}/moe/router_softmax", axis=-1)]
    elif region.routing == "sparse_mixer":  # (onnxruntime's CPU kernel ignores use_sparse_mixer: weights given)
        inputs += ["", "", "", "", "", "", _sparse_mixer_weights(b, inputs[1], float(region.jitter_eps), block)]
    elif region.routing == "selected":  # dense weights as router_probs (its top-k: the chosen experts) and weights
        assert region.selected is not None
        dense = _selected_weights(b, inputs[1], region.selected, region.k, block)
        inputs[1] = dense
        inputs += ["", "", "", "", "", "", dense]
    return b.op("QMoE", inputs, f"{block}/moe/QMoE", domain=MS_DOMAIN, **attrs)


def _selected_weights(b: Any, logits: str, routing: SelectedRouting, k: int, scope: str) -> str:
    """SelectedRouting.dense in ONNX ops: [T, E] weights, zero off the k chosen experts."""
    name = f"{scope}/moe/selected"
    p = (b.op("Sigmoid", [logits], f"{name}/sigmoid") if routing.score == "sigmoid"
         else b.op("Softmax", [logits], f"{name}/softmax", axis=-1))
    choice = b.op("Add", [p, b.initializer(f"{name}.bias", routing.bias.float().numpy())], f"{name}/choice")
    _, idx = b.node("TopK", [choice, b.const([k], np.int64)], f"{name}/topk", n_out=2, axis=-1, largest=1, sorted=1)
    w = b.op("GatherElements", [p, idx], f"{name}/gather", axis=-1)
    if routing.normalize:
        total = b.op("ReduceSum", [w, b.const([-1], np.int64)], f"{name}/sum", keepdims=1)
        w = b.op("Div", [w, b.op("Max", [total, b.const(1e-20)], f"{name}/clamp")], f"{name}/normalize")
    if routing.scale != 1.0:
        w = b.op("Mul", [w, b.const(routing.scale)], f"{name}/scale")
    zeros = b.op("Mul", [p, b.const(0.0)], f"{name}/zeros")
    return b.op("ScatterElements", [zeros, idx, w], f"{name}/weights", axis=-1)


def _sparse_mixer_weights(b: Any, scores: str, eps: float, scope: str) -> str:
    """sparse_mixer_top2's weights as a dense [T, E] tensor (zero off the two selected experts), in ONNX ops. It selects
    the top 2 of the logits, the experts QMoE selects from router_probs."""
    name = f"{scope}/moe/sparse_mixer"
    neg_inf = b.const(float("-inf"))
    dense, masked = [], scores
    for i in range(2):
        top = b.op("ReduceMax", [masked, b.const([-1], np.int64)], f"{name}/top{i}", keepdims=1)
        factor = b.op("Max", [b.op("Abs", [scores], f"{name}/abs{i}"), top], f"{name}/factor{i}")
        rel = b.op("Div", [b.op("Sub", [top, scores], f"{name}/gap{i}"), factor], f"{name}/rel{i}")
        far = b.op("Greater", [rel, b.const(2 * eps)], f"{name}/far{i}")
        probs = b.op("Softmax", [b.op("Where", [far, neg_inf, masked], f"{name}/masked{i}")], f"{name}/softmax{i}",
                     axis=-1)
        chosen = b.op("Equal", [masked, top], f"{name}/chosen{i}")
        dense.append(b.op("Where", [chosen, probs, b.const(0.0)], f"{name}/weight{i}"))
        masked = b.op("Where", [chosen, neg_inf, masked], f"{name}/drop{i}")
    return b.op("Add", dense, f"{name}/weights")


def _router_input(em: Any, region: MoeRegion) -> str:
    """Router logits as QMoE's [tokens, E] input."""
    logits = em.v(region.router)
    n_experts = len(region.experts)
    return em.b.op("Reshape", [logits, em.b.const([-1, n_experts], np.int64)], f"{em.scope}/moe/router_logits")
