"""What the 2:4 sparsity passes share: which linears they prune and how a pruned layer is marked.

A layer is pruned when its scheme (after ignore / overrides) has sparsity "2:4" — or every weight-quantizable
linear of the block with a pass's `force=True` — and it is a linear (not a convolution) with at least 4 inputs.
The pruned weight replaces the float weight in the graph (zeros included), and node.meta[SPARSE] records the
pattern, the method and the fraction of zeros; the weight passes after it keep the zeros (RTN maps 0 to 0, GPTQ
takes the mask), lowering copies the mark into the layer record and the exporters write W8A8S / W16A16S /
compressed-tensors' sparsity_config from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qcompiler.algorithms.sparsity import is_2_4
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import LinearInfo, analyze_block
from qcompiler.pm.base import PassContext


def sparse_targets(gm: fx.GraphModule, ctx: PassContext, force: bool) -> tuple[list[tuple[fx.Node, LinearInfo]], dict[str, str]]:
    """(node, info) of every linear to prune, and the others with the reason."""
    nodes = {n.name: n for n in gm.graph.nodes}
    targets, skipped = [], {}
    for name, info in analyze_block(gm).linears.items():
        scheme = ctx.layer_scheme(info)
        if info.kind != "linear":
            skipped[info.path] = "convolution (2:4 applies to linear layers)"
        elif scheme is None:
            skipped[info.path] = "float (ignored or overridden by the scheme)"
        elif scheme.sparsity != "2:4" and not force:
            skipped[info.path] = "its scheme is dense"
        elif info.in_features < 4:
            skipped[info.path] = f"{info.in_features} inputs: fewer than one group of 4"
        elif qmeta.SPARSE in nodes[name].meta:
            skipped[info.path] = "already pruned"
        elif qmeta.WQ in nodes[name].meta:
            skipped[info.path] = "already quantized (prune before the weight quantization)"
        else:
            targets.append((nodes[name], info))
    return targets, skipped


def mark_pruned(node: fx.Node, w: torch.Tensor, method: str) -> dict[str, Any]:
    """Record the 2:4 pattern on the node (after checking it holds); returns the layer's report."""
    if not is_2_4(w):
        raise AssertionError(f"{method}: layer '{node.name}' is not 2:4 sparse after pruning")
    zeros = float((w == 0).float().mean())
    node.meta[qmeta.SPARSE] = {"pattern": "2:4", "method": method, "sparsity": round(zeros, 4)}
    return {"sparsity": round(zeros, 4)}
