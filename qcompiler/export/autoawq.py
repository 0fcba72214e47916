"""AutoAWQ "gemm" and GPTQ (v1) checkpoints: int4 (GPTQ also int8) weight-only, read by LMDeploy TurboMind,
vLLM and SGLang.

AWQ gemm, per linear (K inputs, N outputs, groups of g along K):
  qweight int32 [K, N/8]   row k holds outputs 8c..8c+7 of input k; nibble i (bits 4i..4i+3) holds output
                           8c + AWQ_ORDER[i]; values u ∈ [0, 15]
  qzeros  int32 [K/g, N/8] the zero points u_z ∈ [0, 15], same interleave
  scales  fp16  [K/g, N]   ŵ[n, k] = (u − u_z) · s
GPTQ v1 (`checkpoint_format: gptq`), 32/b values per int32, in order, low bits first:
  qweight int32 [K·b/32, N] packed along K; qzeros int32 [K/g, N·b/32] packed along N, storing u_z − 1
  (the v1 convention); scales fp16 [K/g, N]; g_idx int32 [K] = k // g (no act-order permutation)
Symmetric layers get u_z = 2^(b−1). Both need K divisible by the group, and N by the values per word.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import ExportError
from qcompiler.export.layers import ExportLayer, WrittenLayer
from qcompiler.ir.records import KVRecord
from qcompiler.kernels.packing import pack_int32
from qcompiler.schemes import QuantScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output column AWQ_ORDER[i]


def _unsigned(layer: ExportLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(u [N, K], u_z [N, G], s [N, G], g) for a weight-only layer whose groups divide K."""
    assert layer.codes is not None and layer.scale is not None and layer.bits is not None
    if layer.act is not None:
        raise ExportError("weight-only formats cannot hold quantized activations")
    g = layer.group_size or layer.in_features
    if layer.in_features % g:
        raise ExportError(f"in_features {layer.in_features} is not a multiple of the group size {g}")
    offset = 2 ** (layer.bits - 1)
    u = layer.codes + offset
    uz = (torch.round(layer.zero).to(torch.int32) + offset if layer.zero is not None
          else torch.full_like(layer.scale, offset, dtype=torch.int32))
    return u, uz, layer.scale, g


def awq_pack(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [R, N] -> int32 [R, N/8] in the AWQ interleave."""
    r, n = u.shape
    if n % 8:
        raise ExportError(f"AWQ packs 8 outputs per int32; {n} outputs is not a multiple of 8")
    reordered = u.reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)].reshape(r, n)
    return pack_int32(reordered, 4)


class AwqFormat:
    name = "awq"
    folder = "awq"
    shard_prefix = "model"
    consumers = "LMDeploy TurboMind, vLLM, SGLang"
    unstacked_experts: bool | frozenset[str] = False  # (its clients read a stacked checkpoint's experts stacked)
    learned_transforms = False
    expert_leaves: Mapping[str, Mapping[str, str]] = {}  # (per-expert linears keep our names)

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        if scheme.kv_cache is not None:
            return "AWQ checkpoints have no KV-cache scales"
        for s in scheme.all_schemes():
            w = s.weights
            if s.activations is not None or w is None or w.bits != 4 or w.granularity != "group":
                return "AWQ gemm holds int4 weight-only layers with group scales only"
        return None

    def layer_tensors(self, layer: ExportLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if layer.bits != 4:
            raise ExportError("AWQ gemm holds int4 weights only")
        u, uz, s, g = _unsigned(layer)
        out = {"qweight": awq_pack(u.t().contiguous()), "qzeros": awq_pack(uz.t().contiguous()),
               "scales": s.t().contiguous().to(torch.float16)}
        if layer.bias is not None:
            out["bias"] = layer.bias.to(torch.float16)
        return out

    def kv_cache_tensors(self, records: Sequence[KVRecord], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise ExportError(f"the {self.name} format has no KV-cache scales")

    def finish(self, folder: Path, config: dict[str, Any], layers: Sequence[WrittenLayer],
               float_tensors: Sequence[str], float_linears: Sequence[str], kv_tensors: Sequence[str],
               kv_args: dict[str, Any] | None) -> None:
        groups = {layer.group_size for layer in layers}
        if len(groups) > 1:
            raise ExportError(f"AWQ config has one group size; layers use {sorted(g or 0 for g in groups)}")
        config["quantization_config"] = {
            "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": groups.pop() if groups else 128,
            "zero_point": True,
            "modules_to_not_convert": sorted({n.rsplit(".", 1)[-1] for n in float_linears}) or None,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))


class GptqFormat:
    name = "gptq"
    folder = "gptq"
    shard_prefix = "model"
    consumers = "vLLM, SGLang, LMDeploy TurboMind (int4)"
    unstacked_experts: bool | frozenset[str] = False  # (its clients read a stacked checkpoint's experts stacked)
    learned_transforms = False
    expert_leaves: Mapping[str, Mapping[str, str]] = {}  # (per-expert linears keep our names)

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        if scheme.kv_cache is not None:
            return "GPTQ checkpoints have no KV-cache scales"
        for s in scheme.all_schemes():
            if s.activations is not None or s.weights is None:
                return "GPTQ checkpoints hold integer weight-only layers only"
        return None

    def layer_tensors(self, layer: ExportLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        assert layer.bits is not None
        u, uz, s, g = _unsigned(layer)
        per_word = 32 // layer.bits
        if layer.in_features % per_word or layer.out_features % per_word:
            raise ExportError(f"GPTQ packs {per_word} values per int32 along K and N; the layer is "
                              f"{layer.out_features}×{layer.in_features}")
        out = {
            "qweight": pack_int32(u.contiguous(), layer.bits).t().contiguous(),  # [N, K/w] -> [K/w, N]
            # v1 stores u_z − 1, wrapped to b bits (a zero point of 0 is stored as 2^b − 1)
            "qzeros": pack_int32(((uz - 1) & (2**layer.bits - 1)).t().contiguous(), layer.bits),  # [G, N/w]
            "scales": s.t().contiguous().to(torch.float16),
            "g_idx": (torch.arange(layer.in_features, dtype=torch.int32) // g),
        }
        if layer.bias is not None:
            out["bias"] = layer.bias.to(torch.float16)
        return out

    def kv_cache_tensors(self, records: Sequence[KVRecord], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise ExportError(f"the {self.name} format has no KV-cache scales")

    def finish(self, folder: Path, config: dict[str, Any], layers: Sequence[WrittenLayer],
               float_tensors: Sequence[str], float_linears: Sequence[str], kv_tensors: Sequence[str],
               kv_args: dict[str, Any] | None) -> None:
        kinds = {(layer.bits, layer.group_size or -1, layer.symmetric) for layer in layers}
        if len(kinds) > 1:
            raise ExportError(f"a GPTQ config has one bit width, group size and symmetry; layers use {sorted(kinds)}")
        bits, group, sym = kinds.pop() if kinds else (4, 128, True)
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
            "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01,
            "modules_in_block_to_quantize": None,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
