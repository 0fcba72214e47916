"""cuda_prepack: give every int4 weight-only layer CUDA tinygemm's tiled layout, once, at load time.

    qc::linear_woq(x, int4 codes, s, z, b, 4, g, K)
        →  qc::linear_woq_tinygemm(x, tiled, [s | (8 − z)·s], int4 codes, s, z, b, g, K, g', K')

on a graph whose tensors are already on the CUDA device (the layout is made there, by
`torch._convert_weight_to_int4pack`; kernels/cuda/tinygemm.py has the maths and the tests' oracle). Layers tinygemm
cannot take (int8 weights, groups that are not a multiple of 32, N not a multiple of 8) keep qc::linear_woq, which
the dispatch table sends to dequantize + cuBLAS. A runtime lowering, never saved.
"""

from __future__ import annotations

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.ir.graph import eliminate_dead_attrs, get_tensor, is_call, set_tensor, swap_node
from qcompiler.kernels.cuda.tinygemm import tinygemm_refusal, tinygemm_weight

WOQ = torch.ops.qc.linear_woq.default


def prepack_for_cuda(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite `gm` in place; returns how many layers got the tiled layout and how many kept qc::linear_woq."""
    counts = {"tinygemm": 0, "kept": 0}
    for node in list(gm.graph.nodes):
        if not is_call(node, WOQ):
            continue
        x, qw, sc, zp, bias, bits, group, k = node.args
        qweight = get_tensor(gm, qw.target)
        if bits != 4 or tinygemm_refusal(qweight.shape[0], group, k) is not None:
            counts["kept"] += 1
            continue
        scale = get_tensor(gm, sc.target)
        zero = get_tensor(gm, zp.target) if isinstance(zp, fx.Node) else None
        tiled = tinygemm_weight(qweight, scale, zero, group, k)
        base = str(qw.target)  # (beside the storage: <layer>.qweight_tinygemm)
        set_tensor(gm, base + "_tinygemm", tiled.packed)
        set_tensor(gm, base + "_tinygemm_scales_and_zeros", tiled.scales_and_zeros)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.qc.linear_woq_tinygemm.default,
                (x, gm.graph.get_attr(base + "_tinygemm"), gm.graph.get_attr(base + "_tinygemm_scales_and_zeros"),
                 qw, sc, zp, bias, group, k, tiled.kernel_group, tiled.k_pad),
            )
        swap_node(node, new)
        counts["tinygemm"] += 1
    eliminate_dead_attrs(gm)
    return counts
