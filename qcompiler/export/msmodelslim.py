"""msModelSlim "ascend v1" checkpoints, read by vllm-ascend (`--quantization ascend`) and MindIE.

Files: quant_model_description.json (every tensor name -> its layer type, then the global keys
model_quant_type, version, metadata, group_size, optional), quant_model_weights-0000i-of-0000N.safetensors with
quant_model_weights.safetensors.index.json, the source config.json (without quantization_config), tokenizer.

Per layer type (signed codes q, signed zero point z, ŵ = (q − z)·s; weight int8 [N, K]):
  W8A8          weight; input_scale fp32 [1]; input_offset fp32 [1] (= z_x, the kernel quantizes
                q_x = round(x / s_x + z_x)); deq_scale = s_x·s_w [N] (the fp32 bits in int64 unless the model is
                bf16, then fp32); quant_bias int32 [N] = round(b / deq_scale − z_x·Σ_k q[n, k])
  W8A8_DYNAMIC  weight; weight_scale fp32 [N, 1]; weight_offset fp32 [N, 1] zeros (per-token activations)
  W8A16         weight; weight_scale fp32 [N, G]; weight_offset fp32 [N, G] = z (the loader negates it: the
                NPU kernel adds its offset)
  W4A16         as W8A16 with int4 codes packed two per int8 (low nibble first) along N for group scales
                ([N/2, K]) and along K for channel scales ([N, K/2]) (msModelSlim's W4A16 packing)
  W4A8_DYNAMIC  int4 codes packed in pairs along N [N/2, K]; weight_scale, weight_offset (zeros) [N, 1];
                scale_bias fp32 (see w4a8_scale_bias); per-token int8 activations. With group scales s [N, G]
                (two-level, as the loaders read it: antiquant scale = weight_scale · weight_scale_second):
                weight_scale = max_g s [N, 1], weight_scale_second = s / weight_scale [N, G],
                weight_offset_second zeros [N, G]; the global group_size
  W4A4_DYNAMIC  weight int8 [N, K] holding int4 codes (the loader packs them); weight_scale, weight_offset (zeros)
                [N, 1]; per-token int4 activations (absmax / 7)
  W4A4_FLATQUANT_DYNAMIC  W4A4_DYNAMIC's tensors plus left_trans [a, a] and right_trans [b, b] (the model's dtype)
                and clip_ratio fp32 [1]: the layer reads X' = left_transᵀ·X·right_trans of each token's [a, b]
                view (x·(L ⊗ R)), quantized per token with s = clip_ratio·absmax(X')/7 (vllm-ascend's
                npu_kronecker_quant; passes/rotation/flatquant.py learns them, a = K's split of kronecker_factors)
  W8A8S         W8A8 of a 2:4-sparse weight (every 4 consecutive inputs of a row hold ≤ 2 non-zero codes)
  W16A16S       a float 2:4-sparse weight (the model's dtype), `weight` only
  C8 (KV cache)  <attn>.k_proj.kv_cache_scale, <attn>.k_proj.kv_cache_offset fp32 [H_kv·D] (one value per channel
                of the cache; per-tensor / per-head scales repeated), same under v_proj; the cache stores
                q = round(x / s) + offset in int8 (offset = signed zero point); global kv_quant_type = "C8"
  FAQuant       quantized attention (a DiT's w8a8c8: Q, K and V int8 into the FA3 kernel): <attn>.fa_q.scale,
                <attn>.fa_q.offset [H_q, D], fa_k / fa_v [H_kv, D] in the model's dtype (fp32 for an fp32 model),
                type "FAQuant", global fa_quant_type = "FAQuant" (MindIE's attention-quantization layout); the
                kernel reads q = round(x / s) + offset as C8 does
A float bias is written as `bias` (type FLOAT) in every type. Norms, embeddings, head and float layers: FLOAT.
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
from qcompiler.kernels.ascend.npu_ops import npu_trans_quant_param
from qcompiler.kernels.packing import pack_int4_pairs
from qcompiler.schemes import QuantScheme, int_gemm_reason

DESCRIPTION = "quant_model_description.json"
VERSION = "1.0.0"
# model_quant_type of a mixed model: the lowest-bit type present (msModelSlim's priority, lowest first).
# W4A8_DYNAMIC is left out on purpose, as msModelSlim 26.1 does: a W4A8_DYNAMIC model is described as FLOAT
# globally and by its per-tensor types (what its consumers are tested with).
PRIORITY = ("FLOAT", "W16A16S", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "W8A8S", "W4A16", "W4A4_DYNAMIC",
            "W4A4_FLATQUANT_DYNAMIC")


def layer_type(bits: int | None, act: str | None, act_bits: int = 8, sparse: bool = False,
               transform: bool = False) -> str:
    if transform:
        if (bits, act, act_bits) != (4, "dynamic", 4):
            raise ExportError("a learned input transform (FlatQuant) is written as W4A4_FLATQUANT_DYNAMIC only: "
                              "int4 weights with dynamic int4 activations")
        return "W4A4_FLATQUANT_DYNAMIC"
    if bits is None:
        return "W16A16S" if sparse else "FLOAT"
    if act == "static":
        return "W8A8S" if sparse else "W8A8"
    if act == "dynamic":
        return f"W{bits}A{act_bits}_DYNAMIC"
    return f"W{bits}A16"


def written_type(layer: WrittenLayer) -> str:
    return layer_type(layer.bits, layer.act, layer.act_bits, layer.sparse, layer.transform)


# Row-parallel linears (their input dimension is split across tensor-parallel ranks)
ROW_PARALLEL = ("o_proj", "down_proj", "w2")
W4A8_TP_CHUNKS = 16  # msModelSlim computes W4A8_DYNAMIC's scale_bias for up to 16 ranks


def w4a8_scale_bias(name: str, w_hat: torch.Tensor) -> torch.Tensor:
    """W4A8_DYNAMIC `scale_bias`: 8·Σ_k ŵ[n, k] per output channel [N, 1]; for row-parallel layers per chunk
    of K/16 inputs [N, 16] (so each tensor-parallel rank holds its part). The NPU kernel reads int4 codes
    offset by 8; this is the term that offset adds, precomputed in fp32."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ROW_PARALLEL:
        n, k = w_hat.shape
        if k % W4A8_TP_CHUNKS:
            raise ExportError(f"W4A8_DYNAMIC splits the {k} inputs of a row-parallel layer into 16 equal parts")
        return 8 * w_hat.reshape(n, W4A8_TP_CHUNKS, k // W4A8_TP_CHUNKS).sum(dim=2)
    return 8 * w_hat.sum(dim=1, keepdim=True)


def msmodelslim_tensors(layer: ExportLayer, bf16_model: bool, model_dtype: torch.dtype | None = None
                        ) -> tuple[str, dict[str, torch.Tensor]]:
    """(type, tensor suffix -> tensor) of one quantized layer in the ascend v1 layout (model_dtype: the model's
    float dtype, bf16 or fp32 by default)."""
    if layer.bits is None:  # W16A16S: the sparse float weight as it is
        assert layer.weight is not None
        out = {"weight": layer.weight}
        if layer.bias is not None:
            out["bias"] = layer.bias.float()
        return "W16A16S", out
    assert layer.codes is not None and layer.scale is not None
    if layer.type != "int":
        raise ExportError("fp8 layers have no ascend v1 type written here (WFP8AFP8_DYNAMIC is not implemented)")
    kind = layer_type(layer.bits, layer.act, layer.act_bits, layer.sparse, layer.left_trans is not None)
    out = {}
    if kind in ("W8A8", "W8A8S"):
        assert layer.input_scale is not None
        w = layer.codes.to(torch.int8)
        x_zero = layer.input_zero if layer.input_zero is not None else torch.zeros(())
        deq = (layer.input_scale * layer.scale.reshape(-1)).float()
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        quant_bias = torch.round(bias.double() / deq.double() - w.double().sum(dim=1) * x_zero.double())
        out.update(weight=w, quant_bias=quant_bias.to(torch.int32), input_scale=layer.input_scale.reshape(1).float(),
                   input_offset=x_zero.reshape(1).float(), deq_scale=deq if bf16_model else npu_trans_quant_param(deq))
    elif kind in ("W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC"):
        grouped = kind == "W4A8_DYNAMIC" and layer.group_size is not None
        if not layer.symmetric or (layer.group_size is not None and not grouped):
            raise ExportError(f"{kind} needs symmetric per-channel weights" + (" (or int4 group scales)" if
                                                                               kind == "W4A8_DYNAMIC" else ""))
        n = layer.out_features
        channel_scale = layer.scale.float().amax(dim=1, keepdim=True) if grouped else layer.scale.reshape(-1, 1).float()
        weight = (pack_int4_pairs(layer.codes, dim=0) if kind == "W4A8_DYNAMIC" else layer.codes.to(torch.int8))
        out.update(weight=weight, weight_scale=channel_scale, weight_offset=torch.zeros(n, 1))
        if grouped:
            out["weight_scale_second"] = (layer.scale.float() / channel_scale).contiguous()
            out["weight_offset_second"] = torch.zeros_like(layer.scale, dtype=torch.float32)
        if kind == "W4A8_DYNAMIC":
            out["scale_bias"] = w4a8_scale_bias(layer.name, layer.dequantized())
        if kind == "W4A4_FLATQUANT_DYNAMIC":
            assert layer.left_trans is not None and layer.right_trans is not None and layer.clip_ratio is not None
            dtype = model_dtype or (torch.bfloat16 if bf16_model else torch.float32)  # (the loader's params_dtype)
            out.update(left_trans=layer.left_trans.to(dtype).contiguous(),
                       right_trans=layer.right_trans.to(dtype).contiguous(),
                       clip_ratio=torch.tensor([layer.clip_ratio], dtype=torch.float32))
    else:
        zero = layer.zero if layer.zero is not None else torch.zeros_like(layer.scale)
        if layer.bits == 4:
            weight = pack_int4_pairs(layer.codes, dim=0 if layer.group_size else 1)
        else:
            weight = layer.codes.to(torch.int8)
        out.update(weight=weight, weight_scale=layer.scale.float(), weight_offset=zero.float())
    if layer.bias is not None:
        out["bias"] = layer.bias.float()
    return kind, out


class MsModelSlimFormat:
    name = "msmodelslim"
    folder = "msmodelslim"
    shard_prefix = "quant_model_weights"
    consumers = "vllm-ascend, MindIE"
    unstacked_experts: bool | frozenset[str] = True
    learned_transforms = True  # (W4A4_FLATQUANT_DYNAMIC: left_trans, right_trans, clip_ratio per layer)
    expert_leaves: Mapping[str, Mapping[str, str]] = {}  # (per-expert linears keep our names)

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        kv = scheme.kv_cache
        if kv is not None and (kv.bits != 8 or kv.dynamic):
            return "the ascend v1 KV cache (C8) is int8 with calibrated scales (--kv-cache int8[-tensor|-head][-asym])"
        for s in scheme.all_schemes():
            w = s.weights
            if w is None:
                continue
            if w.granularity == "tensor":
                return "ascend v1 has no per-tensor weight scales"
            reason = int_gemm_reason(s)
            if reason is not None:
                return f"W8A8 / W8A8_DYNAMIC / W4A8_DYNAMIC / W4A4_DYNAMIC: {reason}"
            if s.sparsity and not (w.bits == 8 and s.activations is not None and not s.activations.dynamic):
                return "2:4 sparse layers are W8A8S (int8 static activations) or W16A16S (float)"
        return None

    def layer_tensors(self, layer: ExportLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return msmodelslim_tensors(layer, dtype == torch.bfloat16, dtype)[1]

    def kv_cache_tensors(self, records: Sequence[KVRecord], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if any(rec.kind == "q" for rec in records):
            return fa_quant_tensors(records, tensors, dtype)
        for rec in records:
            if rec.kind not in ("k", "v"):
                raise ExportError("C8 scales sit on k_proj / v_proj; multi-head latent attention caches a latent "
                                  "(no C8 layout for it): quantize its KV cache for the reference or cuda targets")
            if rec.args["dynamic"] or rec.args["bits"] != 8 or rec.tensors is None:
                raise ExportError("C8 is int8 with calibrated scales")
            scale, zero = rec.per_channel(tensors)
            base = rec.tensors["scale"].removesuffix(f"{rec.kind}_cache_scale") + f"{rec.kind}_proj."
            out[base + "kv_cache_scale"] = scale.contiguous()
            out[base + "kv_cache_offset"] = rec.signed_zero(zero).contiguous()
        return out

    def finish(self, folder: Path, config: dict[str, Any], layers: Sequence[WrittenLayer],
               float_tensors: Sequence[str], float_linears: Sequence[str], kv_tensors: Sequence[str],
               kv_args: dict[str, Any] | None) -> None:
        fa_tensors = [n for n in kv_tensors if n.rsplit(".", 2)[-2] in FA_MODULES]
        description: dict[str, Any] = {n: "FAQuant" if n in fa_tensors else "C8" for n in kv_tensors}
        groups = set()
        for layer in layers:
            kind = written_type(layer)
            for name in layer.tensors:
                description[name] = "FLOAT" if name.endswith(".bias") else kind
            if layer.bits is not None and (layer.act is None or layer.bits == 4) and layer.group_size:
                groups.add(layer.group_size)
        for name in float_tensors:
            description[name] = "FLOAT"
        kinds = {layer.name: written_type(layer) for layer in layers}
        kinds.update(dict.fromkeys(float_linears, "FLOAT"))
        check_fused_groups(kinds)
        types = {written_type(layer) for layer in layers} & set(PRIORITY) or {"FLOAT"}
        if len(groups) > 1:
            raise ExportError(f"ascend v1 has one global group_size; layers use {sorted(groups)}")
        description.update({
            "model_quant_type": max(types, key=PRIORITY.index), "version": VERSION, "metadata": {},
            "group_size": groups.pop() if groups else 0, "optional": {},
        })
        if len(fa_tensors) < len(kv_tensors):
            description.update({"kv_quant_type": "C8", "kv_cache_type": "C8"})
        if fa_tensors:
            description["fa_quant_type"] = "FAQuant"
        (folder / DESCRIPTION).write_text(json.dumps(description, indent=2))
        (folder / "config.json").write_text(json.dumps(config, indent=2))


FA_MODULES = ("fa_q", "fa_k", "fa_v")  # quantized attention's scale holders under the attention module


def fa_quant_tensors(records: Sequence[KVRecord], tensors: dict[str, torch.Tensor], dtype: torch.dtype
                     ) -> dict[str, torch.Tensor]:
    """FAQuant (module docstring) of one block: each attention's Q, K and V grids as [heads, head_dim] scale and
    signed offset in `dtype`."""
    out: dict[str, torch.Tensor] = {}
    kinds: dict[str, set[str]] = {}
    for rec in records:
        if rec.kind not in ("q", "k", "v"):
            raise ExportError(f"quantized attention holds Q, K and V grids, not '{rec.kind}'")
        if rec.args["dynamic"] or rec.args["bits"] != 8 or rec.tensors is None:
            raise ExportError("FAQuant is int8 with calibrated scales")
        scale, zero = rec.per_channel(tensors)
        base = rec.tensors["scale"].removesuffix(f"{rec.kind}_cache_scale")
        kinds.setdefault(base, set()).add(rec.kind)
        out[f"{base}fa_{rec.kind}.scale"] = scale.reshape(rec.heads, rec.head_dim).to(dtype).contiguous()
        out[f"{base}fa_{rec.kind}.offset"] = rec.signed_zero(zero).reshape(rec.heads, rec.head_dim).to(dtype).contiguous()
    for base, found in kinds.items():
        if found != {"q", "k", "v"}:
            raise ExportError(f"attention '{base.rstrip('.')}' has grids for {sorted(found)}; FAQuant needs Q, K and V")
    return out


# Linears the serving engines fuse into one kernel (one quantization type per group).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_fused_groups(kinds: dict[str, str]) -> None:
    """`kinds`: linear name -> description type. Members of one fused group must share the type."""
    seen: dict[str, str] = {}
    for name, kind in sorted(kinds.items()):
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                key = f"{parent}.{'/'.join(group)}"
                if seen.setdefault(key, kind) != kind:
                    raise ExportError(f"fused group {key} mixes {seen[key]} and {kind} ({name}); vllm-ascend "
                                      "and MindIE load a fused group with one type: give its members one scheme")
