"""Block analysis: roles of linears, norm→linear groups and attention inputs, read from the graph.

Nothing here looks at module *names*: a linear is `k` because its output flows (through views, RoPE,
per-head norms) into the key operand of attention, `down` because its input is act(gate) ⊙ up, and so on.
Module paths from `nn_module_stack` only name things for reports and checkpoints.

Norm detection: a norm's output is h ⊙ m where m is an elementwise function of a 1-D weight γ. We recognise
m = γ (Llama/Qwen/Mistral RMSNorm, LayerNorm's affine weight) and m = γ + c (Gemma's (1 + γ)); the norm's
"multiplier" is what smoothing/folding passes rescale: m' = m / s  ⇔  γ' = (γ + c) / s − c.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx

from qcompiler.ir.graph import (
    ACTIVATION_OPS,
    ADAPTER_PREFIX,
    CONV,
    LINEAR,
    MATMUL_OPS,
    PASSTHROUGH,
    SDPA_OPS,
    SOFTMAX_OPS,
    aten,
    bias_attr,
    get_tensor,
    is_call,
    linear_nodes,
    module_path,
    skip_passthrough,
    weight_attr,
)
from qcompiler.ir.routing import EXPERT_ROUTING


@dataclass
class LinearInfo:
    node: str
    path: str  # module path inside the block, e.g. "self_attn.q_proj"
    weight: str  # get_attr target of the weight
    bias: str | None
    in_features: int
    out_features: int
    role: str = "linear"  # q k v o gate up down linear (fused: e.g. "qkv")
    fused_from: list[dict] | None = None  # members of a fused linear: {"path", "out_features", "role"}
    kind: str = "linear"  # "conv": a convolution, its weight seen as [O, I/groups · prod(kernel)]


@dataclass
class NormGroup:
    """A norm whose output feeds linears directly: the unit SmoothQuant and norm folding act on."""

    mul_node: str  # the h ⊙ m node
    weight: str  # get_attr target of γ
    offset: float  # c in m = γ + c
    linears: list[str] = field(default_factory=list)


@dataclass
class AttentionInfo:
    node: str
    q: list[str]
    k: list[str]
    v: list[str]
    o: list[str]
    operands: tuple[str, str, str] = ("", "", "")  # the nodes attention reads Q, K (eager: Kᵀ) and V from


@dataclass
class BlockAnalysis:
    linears: dict[str, LinearInfo]
    norm_groups: list[NormGroup]
    attention: list[AttentionInfo]
    shared_input_groups: list[list[str]]  # linears reading the same tensor (fusion candidates)

    def by_role(self, role: str) -> list[LinearInfo]:
        return [li for li in self.linears.values() if li.role == role]


def norm_multiplier(node: fx.Node) -> tuple[str, float] | None:
    """If `node` computes m = γ or m = γ + c from a 1-D get_attr γ, return (γ target, c)."""
    node = skip_passthrough(node)
    offset = 0.0
    if is_call(node, aten.add.Tensor) and isinstance(node.args[1], int | float):
        offset = float(node.args[1])
        node = skip_passthrough(node.args[0])  # type: ignore[arg-type]
    if node.op == "get_attr":
        return str(node.target), offset
    return None


def find_norm(gm: fx.GraphModule, x: fx.Node) -> NormGroup | None:
    """The norm (h ⊙ m) that produces the linear input `x`, if any."""
    prod = skip_passthrough(x)
    if not is_call(prod, aten.mul.Tensor):
        return None
    for operand in prod.args:
        if not isinstance(operand, fx.Node):
            continue
        mult = norm_multiplier(operand)
        if mult is None:
            continue
        w = get_tensor(gm, mult[0])
        if w.dim() == 1:
            return NormGroup(mul_node=prod.name, weight=mult[0], offset=mult[1])
    return None


def _nearest(starts: Iterable[fx.Node], targets: object, upstream: bool) -> list[fx.Node]:
    """Nodes calling `targets` reached from `starts` (inclusive) walking inputs (upstream) or users
    (downstream), without walking through a found node. Depth-first, in a deterministic order."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_call(n, targets):
            found.append(n)
            continue
        stack.extend(n.all_input_nodes if upstream else n.users)
    return found


def _attention(gm: fx.GraphModule) -> list[AttentionInfo]:
    result = []
    for n in gm.graph.nodes:
        q = k = v = None
        if is_call(n, SDPA_OPS):
            q, k, v = n.args[0], n.args[1], n.args[2]
            out = n
        elif is_call(n, SOFTMAX_OPS):
            # eager attention: matmul(q, kᵀ) -> (scale, mask) -> softmax -> matmul(p, v)
            scores = _nearest(n.all_input_nodes, MATMUL_OPS, upstream=True)
            probs_users = _nearest(n.users, MATMUL_OPS, upstream=False)
            if not scores or not probs_users:
                continue
            q, k = scores[0].args[0], scores[0].args[1]
            pv = probs_users[0]
            v = pv.args[1]
            out = pv
        else:
            continue
        def producers(x: fx.Node) -> list[str]:
            return sorted(p.name for p in _nearest([x], LINEAR, upstream=True))

        # The first linears after attention are the output projection (the walk stops at them).
        o_nodes = _nearest(out.users, LINEAR, upstream=False)
        result.append(
            AttentionInfo(
                node=n.name, q=producers(q), k=producers(k), v=producers(v), o=sorted(x.name for x in o_nodes),
                operands=(q.name, k.name, v.name),
            )
        )
    return result


def _source_linear(n: object) -> fx.Node | None:
    """The linear producing `n`, looking through casts and through the split of a fused linear."""
    if not isinstance(n, fx.Node):
        return None
    n = skip_passthrough(n)
    if n.op == "call_function" and n.target is operator.getitem:
        n = n.args[0]  # type: ignore[assignment]
        if is_call(n, aten.split_with_sizes.default):
            n = n.args[0]  # type: ignore[assignment]
    return n if is_call(n, LINEAR) else None


def _through_online_rotation(x: fx.Node) -> fx.Node:
    """The input of QuaRot's online Hadamard (qc::hadamard_transform before down_proj), else x: a rotated down_proj
    keeps its role (its scheme, its overrides). Roles only: the rotation mixes channels, so nothing that trades
    per-channel scales across it (up_down_pairs) may see through it."""
    if x.op == "call_function" and str(x.target) == "qc.hadamard_transform.default":
        return skip_passthrough(x.args[0])  # type: ignore[arg-type]
    return x


def _mlp_roles(gm: fx.GraphModule, roles: dict[str, str]) -> None:
    """down = linear(act(gate) ⊙ up); a non-gated MLP: down = linear(act(up))."""
    for lin in linear_nodes(gm):
        x = _through_online_rotation(skip_passthrough(lin.args[0]))  # type: ignore[arg-type]
        if is_call(x, aten.mul.Tensor):
            a, b = (skip_passthrough(t) if isinstance(t, fx.Node) else t for t in x.args[:2])
            for act, other in ((a, b), (b, a)):
                if isinstance(act, fx.Node) and is_call(act, ACTIVATION_OPS):
                    gate, up = _source_linear(act.args[0]), _source_linear(other)
                    if gate is not None and up is not None:
                        roles.setdefault(gate.name, "gate")
                        roles.setdefault(up.name, "up")
                        roles.setdefault(lin.name, "down")
        elif is_call(x, ACTIVATION_OPS):
            src = _source_linear(x.args[0])
            if src is not None:
                roles.setdefault(src.name, "up")
                roles.setdefault(lin.name, "down")


def _router_roles(gm: fx.GraphModule, roles: dict[str, str]) -> None:
    """router: a linear whose output reaches a top-k or the experts' routing without passing another linear, or a
    one-output linear whose sigmoid gates a branch (Qwen2-MoE's shared_expert_gate)."""
    for lin in linear_nodes(gm):
        w = get_tensor(gm, weight_attr(lin)) if weight_attr(lin) is not None else None
        if w is not None and w.shape[0] == 1 and any(is_call(skip_passthrough_down(u), aten.sigmoid.default)
                                                     for u in lin.users):
            roles[lin.name] = "router"
            continue
        seen: set[fx.Node] = set()
        stack = list(lin.users)
        while stack:
            n = stack.pop()
            if n in seen or is_call(n, LINEAR) or is_call(n, SDPA_OPS):
                continue
            seen.add(n)
            if is_call(n, aten.topk.default) or is_call(n, EXPERT_ROUTING):
                # (EXPERT_ROUTING: the experts' routing input, whatever picked them: Phi-3.5-MoE's sparsemixer
                # takes a max, not a top-k)
                roles[lin.name] = "router"
                break
            stack.extend(n.users)


def skip_passthrough_down(node: fx.Node) -> fx.Node:
    """Follow a chain of single-user value-preserving ops downstream."""
    while is_call(node, PASSTHROUGH) and len(node.users) == 1:
        node = next(iter(node.users))
    return node


def up_down_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(up, down) linear pairs of gated MLPs, down = linear(act(gate) ⊙ up): down's input is linear in up's
    output, channel by channel, so up's output rows and down's input columns can trade a scale."""
    pairs = []
    for lin in linear_nodes(gm):
        x = skip_passthrough(lin.args[0])  # type: ignore[arg-type]
        if not is_call(x, aten.mul.Tensor):
            continue
        a, b = (skip_passthrough(t) if isinstance(t, fx.Node) else t for t in x.args[:2])
        for act, other in ((a, b), (b, a)):
            if isinstance(act, fx.Node) and is_call(act, ACTIVATION_OPS) and isinstance(other, fx.Node):
                up = other if is_call(other, LINEAR) else None
                if up is not None and _source_linear(act.args[0]) is not None:
                    pairs.append((up.name, lin.name))
    return pairs


def analyze_block(gm: fx.GraphModule) -> BlockAnalysis:
    roles: dict[str, str] = {}
    attention = _attention(gm)
    for att in attention:
        for role in ("q", "k", "v", "o"):
            for name in getattr(att, role):
                roles.setdefault(name, role)
    _mlp_roles(gm, roles)
    _router_roles(gm, roles)

    linears: dict[str, LinearInfo] = {}
    for conv in (n for n in gm.graph.nodes if is_call(n, CONV)):
        w_attr = weight_attr(conv)
        if w_attr is not None:
            w = get_tensor(gm, w_attr)
            linears[conv.name] = LinearInfo(
                node=conv.name, path=conv.meta.get("qc.path") or module_path(conv), weight=w_attr,
                bias=bias_attr(conv), in_features=int(w[0].numel()), out_features=int(w.shape[0]), kind="conv",
            )
    for lin in linear_nodes(gm):
        w_attr = weight_attr(lin)
        if w_attr is None:
            continue  # a linear on a computed weight is not a weight layer
        w = get_tensor(gm, w_attr)
        linears[lin.name] = LinearInfo(
            node=lin.name,
            path=lin.meta.get("qc.path") or module_path(lin),
            weight=w_attr,
            bias=bias_attr(lin),
            in_features=int(w.shape[1]),
            out_features=int(w.shape[0]),
            role=lin.meta.get("qc.role", roles.get(lin.name, "linear")),
            fused_from=lin.meta.get("qc.fused_from"),
        )

    # norm -> linear groups; networkx gives the bipartite norm/linear structure and its components.
    nodes = {n.name: n for n in gm.graph.nodes}
    g = nx.Graph()
    norms: dict[str, NormGroup] = {}
    for name in linears:
        if linears[name].kind != "linear":
            continue
        norm = find_norm(gm, nodes[name].args[0])  # type: ignore[arg-type]
        if norm is not None:
            norms.setdefault(norm.mul_node, norm)
            g.add_edge(("norm", norm.mul_node), ("linear", name))
    groups = []
    for comp in nx.connected_components(g):
        norm_keys = [k for kind, k in comp if kind == "norm"]
        for key in norm_keys:
            ng = norms[key]
            ng.linears = sorted(k for kind, k in comp if kind == "linear")
            groups.append(ng)

    by_input: dict[fx.Node, list[str]] = defaultdict(list)
    for name in linears:
        if linears[name].kind == "linear":
            by_input[nodes[name].args[0]].append(name)  # type: ignore[index]
    shared = [sorted(v, key=list(linears).index) for v in by_input.values() if len(v) > 1]
    return BlockAnalysis(linears=linears, norm_groups=groups, attention=attention, shared_input_groups=shared)


def norm_multiplier_value(gm: fx.GraphModule, group: NormGroup) -> torch.Tensor:
    return get_tensor(gm, group.weight).float() + group.offset


__all__ = ["BlockAnalysis", "LinearInfo", "NormGroup", "AttentionInfo", "analyze_block", "find_norm", "norm_multiplier", "up_down_pairs"]


def expert_of(node: fx.Node) -> str | None:
    """The module path of the expert whose input `node` (a qc::routed marker) is: its linear's path less the
    projection name (e.g. "mlp.experts.3")."""
    for user in node.users:
        if is_call(user, LINEAR):
            path = module_path(user)
            return path.rsplit(".", 1)[0] if "." in path else None
    return None


# products of an activation with a stored weight that are not aten.linear: GPT-2's Conv1D (addmm with W [in, out]),
# einsum / bmm projections, fused expert matmuls. qcompiler quantizes linears (and imported convolutions) only.
_OTHER_WEIGHT_PRODUCTS = {
    torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.matmul.default, torch.ops.aten.einsum.default, torch.ops.aten.baddbmm.default,
}


_TRANSPOSES = (torch.ops.aten.t.default, torch.ops.aten.numpy_T.default, torch.ops.aten.permute.default,
               torch.ops.aten.transpose.int)


def weight_products_not_linear(gm: fx.GraphModule) -> list[str]:
    """Module paths (with the op) of weights that enter a matrix product other than aten.linear: layers that are
    linear in the maths but that no weight pass would see (a run must refuse them by name, never skip them)."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _OTHER_WEIGHT_PRODUCTS:
            continue
        operands = n.args[1] if n.target is torch.ops.aten.einsum.default else n.args
        operands = [a.args[0] if isinstance(a, fx.Node) and a.op == "call_function" and a.target in _TRANSPOSES
                    else a for a in operands]
        for w in (a for a in operands if isinstance(a, fx.Node) and a.op == "get_attr"):
            t = get_tensor(gm, str(w.target))
            if t.dim() >= 2 and t.is_floating_point():
                found.append(f"{str(w.target).removeprefix(ADAPTER_PREFIX).rsplit('.', 1)[0]} ({n.target.__name__})")
    return sorted(set(found))
