"""kv_quant: quantize the KV cache — insert its quantize → dequantize where attention reads K and V.

At every cache point of the block (qcompiler/ir/kv_cache.py: K after the rotary embedding and V, before GQA's
head repetition; MLA's compressed latent and shared rotary key) the cached tensor X [B, H, S, D] becomes

    static (calibrated):  X̂ = (clamp(round(X / s) + z, qmin, qmax) − z)·s          [qc::fake_quant_kv]
        s, z from the range of X over the calibration set per tensor (s scalar), per head (s [H]) or per channel
        (s [H, D]): symmetric s = max(|min|, |max|) / (2^(b−1) − 1), z = 0; asymmetric s = (max − min) / (2^b − 1),
        z = round(−min / s), on the unsigned grid [0, 2^b − 1]
    dynamic:              the same per token and head (over D), computed at run time [qc::fake_quant_kv_dynamic]

for int8 or int4 (scheme.kv_cache, or this pass's options). The op stays in the lowered graph: it is what a
quantized cache gives attention back. Exporters take the scales from the node's KV_FQ record: msModelSlim C8
`kv_cache_scale` / `kv_cache_offset`, compressed-tensors `k_scale` / `v_scale` with `kv_cache_scheme`, the
onnxruntime decoder's quantized GroupQueryAttention cache.

Keys per channel: a cached key is rotated by its position, k'_i = k_i·cos θ − k_j·sin θ with j = i ± D/2 (the
rotate-half layout of Llama, Qwen, Mistral, Gemma, DeepSeek's de-interleaved k_pe), so a channel's range at
positions calibration never reached can exceed its calibrated one; only the pair's amplitude √(k_i² + k_j²) is
position-free. Channel i and its partner therefore share the range ±√(a_i² + a_j²) (a = calibrated max |k'|), an
upper bound of both at every position. (Partial rotary embeddings pair channels differently: use per-head
scales.) `rotary_pairs=false` keeps the calibrated ranges (better for static int4, see the KV table in docs/kv-rotation-sparsity.md).

`query=true` quantizes Q where attention reads it as well (point "q", rotary like K): quantized attention, Q, K and
V int8 into the attention kernel, as msModelSlim's FA3 quantization does for DiTs (the DiT driver turns it on for
schemes with a KV grid, w8a8c8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.errors import PassError, SchemeError
from qcompiler.ir.graph import set_tensor
from qcompiler.ir.kv_cache import CachePoint, cache_points
from qcompiler.ir.rebuild import insert_kv_node
from qcompiler.numerics import act_qparams_from_range
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs


def kv_qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, rotary: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) broadcastable over [B, H, S, D] from per-(head, channel) ranges lo, hi [H, D]; `rotary`: the
    channels are rotary pairs (i, i + D/2) whose per-channel ranges are tied (module docstring)."""
    if rotary and args.granularity == "channel" and lo.shape[1] % 2 == 0:
        a = torch.maximum(lo.abs(), hi.abs())
        amplitude = torch.sqrt(a**2 + torch.roll(a, lo.shape[1] // 2, dims=1) ** 2)
        lo, hi = -amplitude, amplitude
    if args.granularity == "head":
        lo, hi = lo.amin(dim=1, keepdim=True), hi.amax(dim=1, keepdim=True)
    elif args.granularity == "tensor":
        lo, hi = lo.amin().reshape(1, 1), hi.amax().reshape(1, 1)
    scale, zero = act_qparams_from_range(lo, hi, args)
    if args.granularity == "tensor":
        return scale.reshape(()), zero.reshape(())
    return scale.unsqueeze(0).unsqueeze(2).contiguous(), zero.unsqueeze(0).unsqueeze(2).contiguous()


@dataclass(frozen=True)
class InsertKVQuant(Pass):
    name = "kv_quant"
    summary = "quantize the KV cache (int8/int4; static per tensor/head/channel or dynamic per token)"
    bits: int | None = None  # None: from the scheme's kv_cache
    granularity: Literal["tensor", "head", "channel", "token"] | None = None
    symmetric: bool | None = None
    rotary_pairs: bool = True  # per-channel key scales: tie each rotary pair's range (module docstring)
    query: bool = False  # Q too (quantized attention: a DiT's w8a8c8, msModelSlim's FA3), same grid kind as K

    def args(self, ctx: PassContext) -> QuantArgs:
        base = ctx.scheme.kv_cache
        if base is None and self.bits is None:
            raise SchemeError(f"kv_quant: scheme '{ctx.scheme.name}' has no kv_cache; choose one (--kv-cache int8) "
                              "or give the pass its bits (kv_quant{bits=8})")
        base = base or QuantArgs(bits=8, granularity="channel")
        granularity = self.granularity or base.granularity
        return QuantArgs(bits=self.bits or base.bits, granularity=granularity,  # type: ignore[arg-type]
                         symmetric=base.symmetric if self.symmetric is None else self.symmetric,
                         dynamic=granularity == "token")

    def _points(self, gm: fx.GraphModule, ctx: PassContext) -> list[CachePoint]:
        try:
            return cache_points(gm, query=self.query)
        except ValueError as e:
            raise PassError(f"block '{ctx.block}': kv_quant: {e}") from None

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        if self.args(ctx).dynamic:
            return []
        return [StatRequest(p.node.name, "minmax_head_dim") for p in self._points(gm, ctx)]

    def uses_calibration(self) -> bool:
        return True

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        args = self.args(ctx)
        points = self._points(gm, ctx)
        if not points:
            return PassResult(gm, False, {"skipped": "no attention in this block"})
        done = []
        for point in points:
            if not args.dynamic:
                lo, hi = stats[StatRequest(point.node.name, "minmax_head_dim")]
                heads, dim = point.node.meta["val"].shape[1], point.node.meta["val"].shape[3]
                scale, zero = kv_qparams(lo.reshape(heads, dim), hi.reshape(heads, dim), args,
                                         rotary=self.rotary_pairs and point.kind in ("q", "k", "k_rope"))
                set_tensor(gm, point.attr_prefix + "_scale", scale)
                set_tensor(gm, point.attr_prefix + "_zero", zero)
            insert_kv_node(gm, point, args)
            done.append(f"{point.module}.{point.kind}")
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True, {"cache": done, "kv": args.describe()})
