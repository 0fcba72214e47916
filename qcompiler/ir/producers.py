"""Linear inputs whose channels are a producing linear's output rows: where a per-channel division folds exactly.

Two shapes in a transformer block carry a linear's input channel by channel from an earlier linear's output rows,
through operations that commute with a per-channel scale:

  down_proj's input  act(gate) ⊙ up          channel c is up's row c (times act(gate)_c)
  o_proj's input     softmax(QKᵀ)·V, heads   channel h·d + j is v's row (h // g)·d + j (g query heads per kv head)

So x/s reaches the consumer when the producer's rows (and bias) are divided by s — exactly, because per-channel
multiplication commutes with ⊙ by another tensor and with attention's mixing of tokens. SmoothQuant, AWQ-style
scalings and FlatQuant's per-channel divisors use this to smooth the inputs no norm precedes. Under grouped-query
attention the g query heads of a group read one kv head's channels, so the division is tied: s is chosen over v's
rows and o_proj's input channel c sees s[index[c]].
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import ACTIVATION_OPS, LINEAR, PASSTHROUGH, get_tensor, is_call, skip_passthrough

aten = torch.ops.aten

VIEW_OPS = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.unsqueeze.default, aten.slice.Tensor,
            aten.expand.default, aten.contiguous.default, aten._unsafe_view.default, aten.clone.default}


@dataclass(frozen=True)
class RowProducer:
    """`consumer` (a linear) reads `input`, whose channel c is row `offset + index[c]` of `producer`'s output
    (index None: row offset + c). kind: "mlp" (act(gate) ⊙ up) or "attention" (o_proj over v)."""

    consumer: str
    input: str
    producer: str
    offset: int
    rows: int  # how many producer rows the input reads (= the input's channels unless tied by `index`)
    index: torch.Tensor | None
    kind: str


def row_divisor(out_features: int, offset: int, rows: int, s: torch.Tensor) -> torch.Tensor:
    """The [out_features] divisor of a producer's rows that smooths one of its outputs: s on rows
    [offset, offset + rows), 1 on the others (the rows other consumers read, e.g. q and k of a fused qkv)."""
    divisor = torch.ones(out_features)
    divisor[offset:offset + rows] = s
    return divisor


def rows_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """The linear whose output rows `node` is, the first row and how many: the linear itself, or one output of a
    fused linear's split (fuse_linears: getitem(split_with_sizes(linear, sizes, -1), i))."""
    node = skip_passthrough(node)
    if is_call(node, LINEAR) and isinstance(node.args[1], fx.Node):
        return node, 0, int(get_tensor(gm, str(node.args[1].target)).shape[0])
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        split = node.args[0]
        if (is_call(split, aten.split_with_sizes.default) and isinstance(split.args[0], fx.Node)
                and is_call(split.args[0], LINEAR) and len(split.args) > 2 and split.args[2] == -1):
            i = int(node.args[1])  # type: ignore[arg-type]
            sizes = [int(t) for t in split.args[1]]  # type: ignore[union-attr]
            return split.args[0], sum(sizes[:i]), sizes[i]
    return None


def value_rows(gm: fx.GraphModule, v: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """Attention's value operand traced back through views (heads split, repeat_kv's expand) to the linear rows
    it reads: (linear, first row, rows, head size), where every node on the way feeds the next alone; or None."""
    val = v.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    head_dim = int(val.shape[-1])
    node = v
    while is_call(node, VIEW_OPS) or is_call(node, PASSTHROUGH):
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or len(prev.users) != 1:
            return None
        if is_call(node, aten.slice.Tensor) and node.args[2:4] not in ((0, 9223372036854775807), (0,)):
            return None  # (a slice that drops channels)
        node = prev
    rows = rows_of(gm, node)
    return None if rows is None else (*rows, head_dim)


def row_producers(gm: fx.GraphModule) -> dict[str, RowProducer]:
    """Every linear input (by node name) read by one linear alone whose channels are producer rows, as above."""
    analysis = analyze_block(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, RowProducer] = {}
    for name in analysis.linears:
        lin = nodes[name]
        x = lin.args[0]
        if not isinstance(x, fx.Node) or set(x.users) != {lin} or not is_call(x, aten.mul.Tensor):
            continue
        for act, other in (x.args[:2], x.args[1::-1]):  # act(gate) ⊙ up, either order
            if isinstance(act, fx.Node) and is_call(act, ACTIVATION_OPS) and isinstance(other, fx.Node):
                found = rows_of(gm, other)
                if found is not None and len(other.users) == 1:
                    out[x.name] = RowProducer(name, x.name, found[0].name, found[1], found[2], None, "mlp")
    for att in analysis.attention:
        if not att.operands[2]:
            continue
        for o in att.o:
            lin = nodes[o]
            x = lin.args[0]
            if not isinstance(x, fx.Node) or set(x.users) != {lin}:
                continue
            k = analysis.linears[o].in_features
            y = x
            while y.name != att.node and (is_call(y, VIEW_OPS) or is_call(y, PASSTHROUGH)) and isinstance(
                    y.args[0], fx.Node):
                y = y.args[0]
            if y.name != att.node:  # (o_proj reads something else than attention's output, e.g. a Hadamard of it)
                continue
            found_v = value_rows(gm, nodes[att.operands[2]])
            if found_v is None:
                continue
            v_lin, offset, v_size, head_dim = found_v
            if k % v_size or v_size % head_dim:
                continue
            # o_proj's input channel h·head_dim + j comes from v's channel (h // group)·head_dim + j (repeat_kv)
            group = k // v_size
            c = torch.arange(k)
            index = (c // head_dim // group) * head_dim + c % head_dim
            out[x.name] = RowProducer(o, x.name, v_lin.name, offset, v_size, None if group == 1 else index,
                                      "attention")
    return out
