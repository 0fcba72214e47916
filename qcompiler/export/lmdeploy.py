"""LMDeploy checkpoints (`--target cuda --target-option format=lmdeploy`, folder OUT/lmdeploy/).

PyTorch engine, W8A8 (the layout `lmdeploy lite smooth_quant` writes; quantization_config
{"quant_method": "smooth_quant", "quant_dtype": "int8" | "float8_e4m3fn"}), per linear of the decoder blocks:
  weight  int8 [N, K] symmetric codes (fp8: float8_e4m3fn values)
  scale   fp32 [N, 1]                       ŵ = weight · scale
  bias    the model's dtype
Activations are quantized per token at run time (LMDeploy's QRMSNorm fuses it into the norm, its linears do it
for o_proj / down_proj inputs): s_t = max|x_t| / 127 (fp8: / 448). Norms keep their (smoothed) weights; the head
and embeddings stay float; linears we leave float (MoE routers) are listed in `modules_to_not_convert`. That is
exactly our w8a8_dynamic (and fp8) scheme: SmoothQuant folded into the norms, symmetric per-channel weights,
dynamic per-token activations. LMDeploy's own tool writes torch pickles in older releases; we write safetensors.

TurboMind, W4A16: the AutoAWQ gemm layout (export/autoawq.py: int4, zero points, fp16 scales) with
quant_method "awq", version "gemm", and the group sizes TurboMind's int4 kernels take (64, 128). LMDeploy reads
InternLM2's packed wqkv and Baichuan's W_pack itself; our artefact of those families is the native Llama they
convert to (frontends/conversions.py), and so is this folder.

KV cache: LMDeploy quantizes the cache online (`--quant-policy 8` int8, `4` int4, per head and token, no stored
parameters), so a scheme with --kv-cache is refused for this format: quantize the weights here, choose the cache
at serving time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import ExportError
from qcompiler.export.autoawq import AwqFormat
from qcompiler.export.layers import ExportLayer, WrittenLayer
from qcompiler.ir.records import KVRecord
from qcompiler.schemes import QuantScheme

TURBOMIND_GROUPS = (64, 128)


def _kind(s: QuantScheme) -> str | None:
    """"w8a8" / "fp8" (PyTorch engine), "w4a16" (TurboMind), or None: a scheme LMDeploy has no layout for."""
    w, a = s.weights, s.activations
    if w is None or s.sparsity is not None:
        return None
    if a is None:
        return "w4a16" if w.bits == 4 and w.symmetric in (True, False) and w.granularity == "group" \
            and w.group_size in TURBOMIND_GROUPS else None
    per_token = a.granularity == "token" and a.dynamic and a.symmetric and a.bits == 8
    per_channel = w.granularity == "channel" and w.symmetric and w.bits == 8
    if per_token and per_channel and w.type == a.type:
        return "fp8" if w.type == "float" else "w8a8"
    return None


class LmdeployFormat:
    name = "lmdeploy"
    folder = "lmdeploy"
    shard_prefix = "model"
    consumers = "LMDeploy PyTorch engine (w8a8_dynamic, fp8), TurboMind (w4a16 g64/g128)"
    unstacked_experts: bool | frozenset[str] = False  # (its clients read a stacked checkpoint's experts stacked)
    learned_transforms = False
    expert_leaves: Mapping[str, Mapping[str, str]] = {}  # (per-expert linears keep our names)

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        if scheme.kv_cache is not None:
            return ("LMDeploy quantizes its KV cache online (--quant-policy 4 or 8) and reads no stored scales; "
                    "quantize without --kv-cache and choose the cache when serving")
        kinds = {_kind(s) for s in scheme.all_schemes()}
        if None in kinds:
            return ("LMDeploy loads w8a8_dynamic / fp8 (symmetric per-channel weights, per-token activations: its "
                    "PyTorch engine's smooth_quant) and w4a16 with groups of 64 or 128 (TurboMind's AWQ)")
        if len(kinds) > 1:
            return f"LMDeploy's config holds one quantization method, not {sorted(kinds)}"  # type: ignore[type-var]
        return None

    def layer_tensors(self, layer: ExportLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if layer.bits == 4 and layer.act is None:
            if layer.group_size not in TURBOMIND_GROUPS:
                raise ExportError(f"TurboMind's int4 kernels take groups of {TURBOMIND_GROUPS}, not {layer.group_size}")
            return AwqFormat().layer_tensors(layer, dtype)
        if not (layer.bits == 8 and layer.act == "dynamic" and layer.act_bits == 8 and layer.symmetric
                and layer.group_size is None and not layer.per_tensor):
            raise ExportError("LMDeploy's smooth_quant layout holds symmetric per-channel 8-bit weights with per-token "
                              "activations only")
        assert layer.codes is not None and layer.scale is not None
        weight = layer.codes.to(torch.float8_e4m3fn if layer.type == "float" else torch.int8)
        out = {"weight": weight, "scale": layer.scale.float().reshape(-1, 1).contiguous()}
        if layer.bias is not None:
            out["bias"] = layer.bias.to(dtype)
        return out

    def kv_cache_tensors(self, records: Sequence[KVRecord], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise ExportError("LMDeploy reads no KV-cache scales (it quantizes the cache online: --quant-policy 4/8)")

    def finish(self, folder: Path, config: dict[str, Any], layers: Sequence[WrittenLayer],
               float_tensors: Sequence[str], float_linears: Sequence[str], kv_tensors: Sequence[str],
               kv_args: dict[str, Any] | None) -> None:
        if any(layer.bits == 4 for layer in layers):
            AwqFormat().finish(folder, config, layers, float_tensors, float_linears, kv_tensors, kv_args)
            return
        fp8 = any(layer.type == "float" for layer in layers)
        # (linears outside the blocks — the head — are not LMDeploy's to convert; those inside that we left float are)
        in_blocks = sorted(n for n in float_linears if ".layers." in n)
        config["quantization_config"] = {"quant_method": "smooth_quant",
                                         "quant_dtype": "float8_e4m3fn" if fp8 else "int8",
                                         **({"modules_to_not_convert": in_blocks} if in_blocks else {})}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
