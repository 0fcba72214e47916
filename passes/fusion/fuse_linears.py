"""fuse_linears: merge linears that read the same tensor into one linear, then split its output.

    y_i = x·W_iᵀ + b_i  (i = 1..n)   ⇒   [y_1 | … | y_n] = x·[W_1; …; W_n]ᵀ + [b_1; …; b_n]

(q/k/v and gate/up in every decoder family). One GEMM replaces n; the fused group necessarily shares one
quantization scheme, which is what Ascend/vLLM loaders require of fused groups. Numerically exact.
Runs when the target asks for fused linears (or `force=true`). It refuses a group whose members were
already quantized (fuse before weight quantization) and reports why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.calib.stats import Stats
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import LINEAR, aten, delete_tensor, get_tensor, linear_module_attr, set_tensor
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.pm.rewrite import MATCH, MatchResult, fail


def fused_leaf_name(leaves: list[str]) -> str:
    """q_proj,k_proj,v_proj -> qkv_proj; gate_proj,up_proj -> gate_up_proj; a,b -> a_b."""
    suffix = ""
    if all("_" in leaf for leaf in leaves):
        tails = {leaf.rsplit("_", 1)[1] for leaf in leaves}
        if len(tails) == 1:
            suffix = "_" + tails.pop()
    heads = [leaf[: len(leaf) - len(suffix)] if suffix else leaf for leaf in leaves]
    joiner = "" if all(len(h) == 1 for h in heads) else "_"
    return joiner.join(heads) + suffix


def check_group(gm: fx.GraphModule, nodes: list[fx.Node]) -> MatchResult:
    for n in nodes:
        if qmeta.WQ in n.meta:
            return fail(f"'{n.name}' is already quantized; fuse before weight quantization")
        if not (isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"):
            return fail(f"'{n.name}' has a computed weight")
    dtypes = {get_tensor(gm, str(n.args[1].target)).dtype for n in nodes}  # type: ignore[union-attr]
    if len(dtypes) > 1:
        return fail(f"weights have different dtypes {sorted(map(str, dtypes))}")
    return MATCH


def fuse_group(gm: fx.GraphModule, nodes: list[fx.Node], paths: list[str], roles: list[str]) -> fx.Node:
    weights = [get_tensor(gm, str(n.args[1].target)) for n in nodes]  # type: ignore[union-attr]
    biases = []
    for n in nodes:
        b = n.args[2] if len(n.args) > 2 else None
        biases.append(get_tensor(gm, str(b.target)) if isinstance(b, fx.Node) else None)
    parent = paths[0].rsplit(".", 1)[0] if "." in paths[0] else ""
    leaf = fused_leaf_name([p.rsplit(".", 1)[-1] for p in paths])
    path = f"{parent}.{leaf}" if parent else leaf
    # q's weight attr is "block.self_attn.q_proj.weight": keep its parent, swap the module name
    module_attr = linear_module_attr(nodes[0])
    fused_attr = module_attr.rsplit(".", 1)[0] + "." + leaf if "." in module_attr else leaf
    set_tensor(gm, fused_attr + ".weight", torch.cat(weights, dim=0))
    has_bias = any(b is not None for b in biases)
    if has_bias:
        full = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for b, w in zip(biases, weights, strict=True)]
        set_tensor(gm, fused_attr + ".bias", torch.cat(full))
    sizes = [int(w.shape[0]) for w in weights]
    first = min(nodes, key=lambda n: list(gm.graph.nodes).index(n))
    x = first.args[0]
    with gm.graph.inserting_before(first):
        w_node = gm.graph.get_attr(fused_attr + ".weight")
        b_node = gm.graph.get_attr(fused_attr + ".bias") if has_bias else None
        fused = gm.graph.call_function(LINEAR, (x, w_node, b_node) if has_bias else (x, w_node))
        split = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        outs = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(nodes))]
    fused.meta.update(
        {
            "nn_module_stack": first.meta.get("nn_module_stack", {}),
            qmeta.PATH: path,
            qmeta.ROLE: "".join(roles) if all(len(r) == 1 for r in roles) else "_".join(roles),
            qmeta.FUSED_FROM: [
                {"path": p, "out_features": s, "role": r} for p, s, r in zip(paths, sizes, roles, strict=True)
            ],
        }
    )
    old_attrs = []
    for n, out in zip(nodes, outs, strict=True):
        n.replace_all_uses_with(out)
        old_attrs += [a.target for a in n.args[1:] if isinstance(a, fx.Node)]
        gm.graph.erase_node(n)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in old_attrs and not node.users:
            gm.graph.erase_node(node)
            delete_tensor(gm, str(node.target))
    return fused


@dataclass(frozen=True)
class FuseSharedInputLinears(Pass):
    name = "fuse_linears"
    summary = "merge linears that share one input (q/k/v, gate/up) into one linear + split"
    force: bool = False  # fuse even if the target does not ask for it

    def uses_calibration(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        if not (self.force or ctx.target.fuse_shared_input_linears):
            return PassResult(gm, False, {"skipped": f"target '{ctx.target.name}' does not fuse linears"})
        analysis = analyze_block(gm)
        nodes = {n.name: n for n in gm.graph.nodes}
        fused, rejected = [], {}
        for group in analysis.shared_input_groups:
            members = [nodes[g] for g in group]
            if not all(m.target == LINEAR for m in members):
                continue
            m = check_group(gm, members)
            if not m:
                rejected[",".join(group)] = m.reason
                continue
            infos = [analysis.linears[g] for g in group]
            schemes = [ctx.layer_scheme(i) for i in infos]
            if any(s != schemes[0] for s in schemes[1:]):
                names = ", ".join(f"{i.path}={s.name if s else 'float'}" for i, s in zip(infos, schemes, strict=True))
                rejected[",".join(group)] = f"members have different schemes ({names})"
                continue
            node = fuse_group(gm, members, [i.path for i in infos], [i.role for i in infos])
            fused.append(node.meta[qmeta.PATH])
        gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(fused), {"fused": fused, "rejected": rejected})
