"""Where a block's KV cache is: the tensors attention keeps for later tokens, found on the graph.

Multi-head / grouped-query attention (Llama, Qwen, Mistral with a sliding window, Gemma, ...): the cache holds K
after the rotary embedding (and after per-head q/k norms where a model has them) and V, both [B, H_kv, S, D],
*before* any repetition of the KV heads for GQA. From attention's key / value operand we walk up through the
ops that only repeat, re-lay or window the cached tensor — expand / unsqueeze / reshape of repeat_kv, a sliding
window's slice, clone / contiguous / casts — and stop at the first op that computes something (the rotary
add for K, the head transpose of the v projection for V).

Multi-head latent attention (DeepSeek-V2/V3): K and V come out of one projection (kv_b_proj) of a compressed
latent, and what serving engines cache is that latent c_kv (the input of kv_b_proj, [B, 1, S, r]) and the
rotary part of the key k_pe ([B, 1, S, d_rope], shared by all heads: broadcast by an expand). Those two are
the cache points "kv_latent" and "k_rope".

Quantized attention (a DiT's `w8a8c8`, msModelSlim's FA3): Q, K and V all enter the attention kernel in int8; Q is
the point "q", found like K from attention's query operand.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import LINEAR, PASSTHROUGH, SDPA_OPS, aten, is_call, module_path

# ops that re-lay or repeat the cached tensor without computing new values
_REPEAT = PASSTHROUGH | {
    aten.expand.default, aten.unsqueeze.default, aten.reshape.default, aten.view.default, aten._unsafe_view.default,
    aten.clone.default, aten.contiguous.default,
    aten.slice.Tensor,  # (a sliding window's view of the cache)
}
KINDS = ("q", "k", "v", "kv_latent", "k_rope")


@dataclass(frozen=True)
class CachePoint:
    kind: str  # "q" | "k" | "v" | "kv_latent" | "k_rope"
    node: fx.Node  # its output is the cached tensor [B, H_kv, S, D]
    attention: int  # index of the attention in the block (graph order)
    module: str  # the attention module's path in the block, e.g. "self_attn"

    @property
    def attr_prefix(self) -> str:
        """Graph attribute prefix of this point's quantization tensors (checkpoint name after the block's)."""
        return f"block.{self.module}.{self.kind}_cache" if self.module else f"block.{self.kind}_cache"


def _cached(operand: fx.Node, transposed: bool = False) -> fx.Node:
    """Walk up from an attention operand through repetition / layout ops to the cached tensor. `transposed`: the
    operand is Kᵀ (eager attention's matmul(q, kᵀ)): the one transpose of the last two axes is walked through too."""
    n = operand
    while isinstance(n, fx.Node):
        if transposed and is_call(n, aten.transpose.int) and _last_two(n):
            transposed = False
        elif not is_call(n, _REPEAT):
            break
        src = n.args[0]
        if not isinstance(src, fx.Node):
            break
        n = src
    return n


def _last_two(n: fx.Node) -> bool:
    """A transpose of the last two axes of a rank-4 tensor."""
    src = n.args[0]
    rank = src.meta["val"].dim() if isinstance(src, fx.Node) and "val" in src.meta else 0
    return rank == 4 and {d % rank for d in n.args[1:3]} == {rank - 2, rank - 1}  # type: ignore[operator]


def _rank4(n: fx.Node) -> bool:
    """A [B, H, S, D] tensor: rank 4 with fixed heads and channels (batch and sequence may be symbolic)."""
    val = n.meta.get("val")
    return getattr(val, "dim", lambda: 0)() == 4 and all(isinstance(val.shape[i], int) for i in (1, 3))


def cache_points(gm: fx.GraphModule, query: bool = False) -> list[CachePoint]:
    """Every cache point of the block, in attention order (K before V; MLA: latent before k_rope). `query`: Q as
    attention reads it too, before K (quantized attention — a DiT's Q, K, V int8 into the attention kernel — not a
    cache; MLA has none here)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    points: list[CachePoint] = []
    for i, att in enumerate(analyze_block(gm).attention):
        node = nodes[att.node]
        module = module_path(node)
        if att.k and att.k == att.v and att.k != att.q:  # K and V (not Q) from one projection: MLA
            kv = nodes[att.k[0]]
            latent = kv.args[0]
            if isinstance(latent, fx.Node) and qmeta.ACT_FQ in latent.meta:  # (the cache holds the latent itself,
                latent = latent.args[0]                                      # not kv_b_proj's quantized input)
            rope = [e.args[0] for e in gm.graph.nodes if is_call(e, aten.expand.default)
                    and isinstance(e.args[0], fx.Node) and _rank4(e.args[0])
                    and e.args[0].meta["val"].shape[1] == 1 and module_path(e) == module]
            if not isinstance(latent, fx.Node) or not _rank4(latent) or len(rope) != 1:
                raise ValueError(f"attention '{att.node}': K and V come from one projection ('{kv.name}') but "
                                 "its latent / shared rotary key are not the [B, 1, S, ·] tensors of MLA")
            points += [CachePoint("kv_latent", latent, i, module), CachePoint("k_rope", rope[0], i, module)]
            continue
        # scaled_dot_product_attention(q, k, v), or eager attention's softmax(q·kᵀ)·v (soft-capping, sinks)
        eager = not is_call(node, SDPA_OPS)
        q_in, k_in, v_in = (nodes[name] for name in att.operands)
        if query and eager:
            raise ValueError(f"attention '{att.node}' is written out as matmul/softmax (eager attention); quantized "
                             "attention (Q, K and V int8) is inserted on scaled_dot_product_attention")
        operands = (("q", q_in),) if query else ()
        for kind, operand in (*operands, ("k", k_in), ("v", v_in)):
            point = _cached(operand, transposed=eager and kind == "k")
            if not _rank4(point) or is_call(point, LINEAR):
                raise ValueError(f"attention '{att.node}': the cached {kind} ('{point.name}') is not a "
                                 "[B, H, S, D] tensor")
            points.append(CachePoint(kind, point, i, module))
    return points

