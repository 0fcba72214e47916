"""Graph surgery that both the passes and the runtime perform: the structure a pass gives a block (fused linears,
a quantized KV cache, kernel ops from a layer record) is rebuilt from the artefact's records when a saved model
loads. Passes decide *whether* and *with what values*; these functions only change the graph.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.errors import ArtifactError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import (
    LINEAR,
    aten,
    delete_tensor,
    get_attr_node,
    get_tensor,
    is_call,
    linear_module_attr,
    module_path,
    set_tensor,
)
from qcompiler.ir.kv_cache import CachePoint, cache_points
from qcompiler.ir.records import KVRecord, LayerRecord
from qcompiler.schemes import QuantArgs

FQ_KV = torch.ops.qc.fake_quant_kv.default
FQ_KV_DYNAMIC = torch.ops.qc.fake_quant_kv_dynamic.default


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


def emit_linear_op(gm: fx.GraphModule, node: fx.Node, x: fx.Node, record: LayerRecord) -> fx.Node:
    """Replace linear `node` by the kernel op `record` describes, reading tensors by the record's names."""
    t = record.tensors
    graph = gm.graph

    def attr(key: str) -> fx.Node | None:
        return get_attr_node(gm, t[key], node) if t.get(key) else None

    bias = get_attr_node(gm, record.bias, node) if record.bias else None
    w = record.weights or {}
    with graph.inserting_before(node):
        if record.op == "linear_woq":
            new = graph.call_function(
                torch.ops.qc.linear_woq.default,
                (x, attr("qweight"), attr("scale"), attr("zero"), bias, w["bits"], record.group_size,
                 record.in_features),
            )
        elif record.op == "linear":  # a float layer the description must still name (e.g. fused)
            new = graph.call_function(LINEAR, (x, attr("weight"), bias) if bias is not None else (x, attr("weight")))
        elif record.op == "linear_w8a8":
            new = graph.call_function(
                torch.ops.qc.linear_w8a8.default,
                (x, attr("qweight"), attr("weight_scale"), attr("input_scale"), attr("input_zero"), bias),
            )
        elif record.op == "linear_int_dynamic":
            acts = record.activations or {}
            clip = float(acts.get("clip_ratio", 1.0))
            new = graph.call_function(
                torch.ops.qc.linear_int_dynamic.default,
                (x, attr("qweight"), attr("weight_scale"), bias, acts["bits"],
                 record.group_size if w["granularity"] == "group" else 0, *((clip,) if clip != 1.0 else ())),
            )
        elif record.op == "linear_fp8":
            new = graph.call_function(
                torch.ops.qc.linear_fp8.default, (x, attr("qweight"), attr("weight_scale"), attr("input_scale"), bias)
            )
        else:
            raise ValueError(f"unknown lowered op '{record.op}' for layer '{record.path}'")
    new.meta.update({k: v for k, v in node.meta.items()
                     if k in ("nn_module_stack", qmeta.PATH, qmeta.ROLE, qmeta.ROTATION)})
    new.meta[qmeta.RECORD] = record
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def insert_kv_node(gm: fx.GraphModule, point: CachePoint, args: QuantArgs) -> fx.Node:
    """Put the quantize → dequantize on `point` (its scale / zero attributes already set for static args);
    every reader of the cached tensor reads the quantized one. Returns the new node."""
    x = point.node
    with gm.graph.inserting_after(x):
        if args.dynamic:
            fq = gm.graph.call_function(FQ_KV_DYNAMIC, (x, args.bits, args.symmetric))
            record = {}
        else:
            s = gm.graph.get_attr(point.attr_prefix + "_scale")
            with gm.graph.inserting_after(s):
                z = gm.graph.get_attr(point.attr_prefix + "_zero")
            with gm.graph.inserting_after(z):
                fq = gm.graph.call_function(FQ_KV, (x, s, z, args.qmin, args.qmax))
            record = {"scale": point.attr_prefix + "_scale", "zero": point.attr_prefix + "_zero",
                      "qmin": args.qmin, "qmax": args.qmax}
    x.replace_all_uses_with(fq, delete_user_cb=lambda u: u is not fq)
    shape = x.meta["val"].shape if "val" in x.meta else (0, 0, 0, 0)
    fq.meta[qmeta.KV_FQ] = {"kind": point.kind, "attention": point.attention, "module": point.module,
                            "heads": int(shape[1]), "head_dim": int(shape[3]), "args": dataclasses.asdict(args),
                            **record}
    if "val" in x.meta:
        fq.meta["val"] = x.meta["val"]
    return fq


def apply_kv_records(gm: fx.GraphModule, records: list[KVRecord], block: str) -> None:
    """Re-insert recorded KV-cache quantization into a freshly traced block (the runtime's rebuild); the scale
    tensors are read from the artefact afterwards like every other tensor of the block."""
    if not records:
        return
    points = {(p.attention, p.kind): p for p in cache_points(gm, query=any(r.kind == "q" for r in records))}
    for rec in records:
        point = points.get((rec.attention, rec.kind))
        if point is None:
            raise ArtifactError(f"block '{block}': the artefact quantizes KV cache '{rec.kind}' of attention "
                                f"{rec.attention}, which the traced block does not have")
        args = QuantArgs(**rec.args)
        if not args.dynamic:
            for key in ("scale", "zero"):
                set_tensor(gm, point.attr_prefix + "_" + key, torch.empty(0, device="meta"))
        insert_kv_node(gm, point, args)
    gm.recompile()


def local_record(record: LayerRecord, prefix: str) -> LayerRecord:
    """A record with block-local paths and graph attribute names (the inverse of the writer's mapping)."""
    return record.renamed(lambda p: p.removeprefix(prefix + "."), lambda t: "block." + t.removeprefix(prefix + "."))


def rebuild_block(gm: fx.GraphModule, records: list[LayerRecord], block: str) -> None:
    """Apply the recorded structure (fusions, kernel ops) to a freshly traced float block graph."""
    linears = {module_path(n): n for n in gm.graph.nodes if is_call(n, LINEAR)}
    for rec in records:
        if rec.fused_from:
            paths = [m.path for m in rec.fused_from]
            missing = [p for p in paths if p not in linears]
            if missing:
                raise ArtifactError(f"block '{block}': fused layer '{rec.path}' names unknown linears {missing}")
            fused = fuse_group(gm, [linears[p] for p in paths], paths, [str(m.role) for m in rec.fused_from])
            linears[rec.path] = fused
    for rec in records:
        node = linears.get(rec.path)
        if node is None:
            raise ArtifactError(f"block '{block}': layer '{rec.path}' is not in the traced block")
        for target in rec.tensors.values():  # placeholders until fill_block reads the artefact
            set_tensor(gm, target, torch.empty(0, device="meta"))
        x = node.args[0]
        rotations = rec.input_rotation.split("+") if rec.input_rotation else []
        if set(rotations) - {"hadamard", "kronecker"}:
            raise ArtifactError(f"block '{block}': layer '{rec.path}' names an unknown input rotation "
                                f"'{rec.input_rotation}'")
        with gm.graph.inserting_before(node):
            if "hadamard" in rotations:  # QuaRot's online Hadamard before the layer
                x = gm.graph.call_function(torch.ops.qc.hadamard_transform.default, (x,))
            if "kronecker" in rotations:  # FlatQuant's learned transform after it
                if not (rec.tensors.get("left_trans") and rec.tensors.get("right_trans")):
                    raise ArtifactError(f"block '{block}': layer '{rec.path}' has a Kronecker input transform but "
                                        "no left_trans / right_trans tensors")
                x = gm.graph.call_function(torch.ops.qc.kronecker_transform.default, (
                    x, get_attr_node(gm, rec.tensors["left_trans"], node),
                    get_attr_node(gm, rec.tensors["right_trans"], node)))
        emit_linear_op(gm, node, x, rec)  # type: ignore[arg-type]
    gm.graph.eliminate_dead_code()
