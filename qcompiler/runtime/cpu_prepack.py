"""cpu_prepack: swap portable weight-only ops for torch's prepacked CPU kernels (bf16 activations), or — for
float32 evaluation — for one dequantization at load time.

    qc::linear_woq(x, int4 codes, s, z, g)  →  qc::linear_int4pack_cpu(x, pack(u), [s | (8 − z)·s], g')
    qc::linear_woq(x, int8 codes, s[N, 1])  →  qc::linear_int8pack_cpu(x, q, s)     (symmetric per channel)

The int4 kernel computes ŵ = (u − 8)·s + m per group, so m = (8 − z)·s reproduces (u − z)·s exactly in
real arithmetic (bf16 rounding of s and m aside). Layers it cannot take (group not a multiple of 32,
asymmetric or grouped int8) keep qc::linear_woq, which stays exact. A runtime lowering, never saved.

    qc::linear_woq(x, codes, s, z, b, bits, g, K)  →  F.linear(x, ŵ, b)     (dequantize_once, float32 x)

ŵ = reference.dequantize(codes, s, z, bits, g, K) is what the oracle computes on every call; computed once, the
same F.linear gives bit-equal outputs for float32 activations and saves the per-call dequantization (measuring a
quantized model's perplexity, the weights are read 8 times or more). It holds float32 weights: the float model's
memory, not the quantized one's.
"""

from __future__ import annotations

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.ir.graph import eliminate_dead_attrs, get_tensor, is_call, set_tensor, swap_node
from qcompiler.kernels import reference
from qcompiler.kernels.cpu.linear import prepack_int4
from qcompiler.kernels.packing import int4pack_group

WOQ = torch.ops.qc.linear_woq.default


def prepack_for_cpu(gm: fx.GraphModule) -> dict[str, int]:
    counts = {"int4pack": 0, "int8pack": 0, "kept": 0}
    for node in list(gm.graph.nodes):
        if not is_call(node, WOQ):
            continue
        x, qw, sc, zp, bias, bits, group, k = node.args
        qweight, scale = get_tensor(gm, qw.target), get_tensor(gm, sc.target)
        zero = get_tensor(gm, zp.target) if isinstance(zp, fx.Node) else None
        base = str(qw.target).rsplit(".", 1)[0]
        with gm.graph.inserting_before(node):
            if bits == 4 and int4pack_group(group) is not None:
                packed, sz, kernel_group, k_pad = prepack_int4(qweight, scale, zero, group, k)
                set_tensor(gm, base + ".cpu_int4pack", packed)
                set_tensor(gm, base + ".cpu_scales_and_zeros", sz)
                new = gm.graph.call_function(
                    torch.ops.qc.linear_int4pack_cpu.default,
                    (x, gm.graph.get_attr(base + ".cpu_int4pack"), gm.graph.get_attr(base + ".cpu_scales_and_zeros"),
                     bias, kernel_group, k_pad),
                )
                counts["int4pack"] += 1
            elif bits == 8 and zero is None and scale.shape[1] == 1:
                new = gm.graph.call_function(
                    torch.ops.qc.linear_int8pack_cpu.default, (x, qw, sc, bias)
                )
                set_tensor(gm, str(sc.target), scale.reshape(-1).contiguous())
                counts["int8pack"] += 1
            else:
                counts["kept"] += 1
                continue
        swap_node(node, new)
    eliminate_dead_attrs(gm)
    return counts


def dequantize_once(gm: fx.GraphModule) -> int:
    """Rewrite `gm` (run with float32 activations) in place; returns how many weight-only layers were dequantized."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_call(node, WOQ):
            continue
        x, qw, sc, zp, bias, bits, group, k = node.args
        zero = get_tensor(gm, zp.target) if isinstance(zp, fx.Node) else None
        w_hat = reference.dequantize(get_tensor(gm, qw.target), get_tensor(gm, sc.target), zero, bits, group, k)
        base = str(qw.target).rsplit(".", 1)[0]
        set_tensor(gm, base + ".w_hat", w_hat.contiguous())
        if isinstance(bias, fx.Node):
            set_tensor(gm, str(bias.target), get_tensor(gm, bias.target).float())
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.nn.functional.linear, (x, gm.graph.get_attr(base + ".w_hat"), bias))
        swap_node(node, new)
        count += 1
    eliminate_dead_attrs(gm)
    return count
