"""compressed-tensors checkpoints (read by vLLM, SGLang, vllm-ascend partly, and transformers on the CPU).

Per quantized linear, by format:
  pack-quantized  (weight-only int4/int8, and w4a8's int4 weights)  weight_packed int32 [N, ceil(K·b/32)]: codes offset by +2^(b−1)
                  into [0, 2^b) and packed densely, element j at bits b·j of the row's bit string (low bits
                  first); weight_scale [N, G]; weight_shape int64 [2] = (N, K); asymmetric adds
                  weight_zero_point int32 [ceil(N·b/32), G] (signed zero points, same offset, packed along N)
  int-quantized   (w8a8)  weight int8 [N, K]; weight_scale [N, 1]; static activations add input_scale [1]
                  (and input_zero_point int8 [1] when asymmetric)
  float-quantized (fp8)   weight float8_e4m3fn [N, K]; weight_scale [N, 1] (channel) or [1] (tensor);
                  static activations add input_scale [1]
2:4 sparse layers keep their (quantized or float) tensors dense and are named in `sparsity_config` (format
"dense", sparsity_structure "2:4": the compressed 2:4 formats are legacy in compressed-tensors and vLLM dropped its
2:4 kernels); float sparse layers (w16a16s) write `weight` in the model's dtype.
KV cache (static int8/int4, per tensor or per head): <attn>.k_scale / v_scale [1] or [H_kv, 1, 1] in the model's
dtype (+ k_zero_point / v_zero_point when asymmetric) and `kv_cache_scheme` (strategy tensor | attn_head).
config.json gets `quantization_config` with one config group per distinct layer scheme (targets "Linear"
when one scheme covers every quantized layer, else the layers' names) and the float layers in `ignore`.
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

KV_STRATEGY = {"tensor": "tensor", "head": "attn_head"}  # our KV granularity -> compressed-tensors strategy
FORMAT_VERSION = "0.12.0"  # the oldest compressed-tensors release whose loader reads what we write


def _args(layer: WrittenLayer) -> dict[str, Any]:
    strategy = "group" if layer.group_size else "tensor" if layer.per_tensor else "channel"
    return {
        "num_bits": layer.bits, "type": layer.type, "symmetric": layer.symmetric,
        "group_size": layer.group_size, "strategy": strategy,
        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
    }


def _format(layer: WrittenLayer) -> str:
    if layer.type == "float":
        return "float-quantized"
    return "pack-quantized" if layer.act is None or layer.bits == 4 else "int-quantized"


def _input_args(layer: WrittenLayer) -> dict[str, Any] | None:
    if layer.act is None:
        return None
    if layer.act == "dynamic":
        return {"num_bits": layer.act_bits, "type": layer.type, "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True, "actorder": None, "observer": None, "observer_kwargs": {}}
    return {"num_bits": 8, "type": layer.type, "symmetric": not layer.static_zero, "group_size": None,
            "strategy": "tensor", "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


class CompressedTensorsFormat:
    name = "compressed-tensors"
    folder = "compressed-tensors"
    shard_prefix = "model"
    consumers = "vLLM, SGLang, transformers (CPU)"
    # Experts a checkpoint stores stacked are written one linear each, `<experts>.<e>.gate_proj / up_proj / down_proj`
    # (llm-compressor's linearized layout), for the families whose vLLM loaders map those per-expert names onto their
    # fused-MoE parameters besides the stacked ones (llama4.py, qwen3_vl_moe.py, gpt_oss.py: expert_params_mapping);
    # and GraniteMoE's (granitemoe.py: its stacked input_linear / output_linear are split into experts.<e>.w1 / w3 /
    # w2, and per-expert tensors under those names pass to the same fused-MoE mapping, so they are written so named).
    # transformers reads these families' experts stacked, so it is no client of such a folder.
    unstacked_experts: bool | frozenset[str] = frozenset({"llama4", "llama4_text", "gpt_oss", "qwen3_vl_moe",
                                                          "granitemoe"})
    learned_transforms = False
    expert_leaves: Mapping[str, Mapping[str, str]] = {
        "granitemoe": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        kv = scheme.kv_cache
        if kv is not None and kv.granularity not in KV_STRATEGY:
            return (f"compressed-tensors' kv_cache_scheme holds calibrated per-tensor or per-head scales "
                    f"(--kv-cache int8-tensor or int8-head), not per {kv.granularity}")
        w = scheme.weights
        if w is not None and w.granularity == "tensor":
            return "per-tensor integer weight scales are not a compressed-tensors integer strategy we write"
        return None

    def kv_cache_tensors(self, records: Sequence[KVRecord], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for rec in records:
            if rec.kind not in ("k", "v"):
                raise ExportError("k_scale / v_scale describe K and V caches; multi-head latent attention caches "
                                  "a latent, which kv_cache_scheme does not describe")
            args = rec.args
            if args["granularity"] not in KV_STRATEGY or rec.tensors is None:
                raise ExportError(f"kv_cache_scheme holds per-tensor or per-head scales, not per {args['granularity']}")
            scale = tensors[rec.tensors["scale"]].float()
            zero = rec.signed_zero(tensors[rec.tensors["zero"]].float())
            shape = [1] if args["granularity"] == "tensor" else [rec.heads, 1, 1]
            base = rec.tensors["scale"].removesuffix("_cache_scale")  # <attn>.k / <attn>.v
            out[base + "_scale"] = scale.reshape(shape).contiguous()
            if not args["symmetric"]:
                out[base + "_zero_point"] = zero.reshape(shape).round().to(torch.int8).contiguous()
        return out

    def layer_tensors(self, layer: ExportLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Scales and biases in the model's dtype (as llm-compressor writes them)."""
        out: dict[str, torch.Tensor] = {}
        if layer.bits is None:  # a float 2:4-sparse layer (w16a16s)
            assert layer.weight is not None
            out["weight"] = layer.weight.to(dtype)
            if layer.bias is not None:
                out["bias"] = layer.bias.to(dtype)
            return out
        assert layer.codes is not None and layer.scale is not None
        if layer.type == "float":
            out["weight"] = layer.codes.to(torch.float8_e4m3fn)
            out["weight_scale"] = (layer.scale[:1, :1].reshape(1) if layer.per_tensor else layer.scale.reshape(-1, 1)
                                   ).to(dtype)
            if layer.act == "static":
                assert layer.input_scale is not None
                out["input_scale"] = layer.input_scale.reshape(1).to(dtype)
        elif layer.act is None or layer.bits == 4:  # weight-only, or w4a8 (packed int4 + dynamic int8 inputs)
            offset = 2 ** (layer.bits - 1)
            out["weight_packed"] = pack_int32(layer.codes + offset, layer.bits)
            out["weight_scale"] = layer.scale.to(dtype)
            out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
            if layer.zero is not None:
                zp = torch.round(layer.zero).to(torch.int64) + offset
                out["weight_zero_point"] = pack_int32(zp.t().contiguous(), layer.bits).t().contiguous()
        else:
            if layer.bits != 8 or layer.group_size is not None or not layer.symmetric:
                raise ExportError("int-quantized needs symmetric per-channel int8 weights")
            out["weight"] = layer.codes.to(torch.int8)
            out["weight_scale"] = layer.scale.reshape(-1, 1).to(dtype)
            if layer.act == "static":
                assert layer.input_scale is not None
                out["input_scale"] = layer.input_scale.reshape(1).to(dtype)
                if layer.input_zero is not None:
                    out["input_zero_point"] = layer.input_zero.reshape(1).round().to(torch.int8)
        if layer.bias is not None:
            out["bias"] = layer.bias.to(dtype)
        return out

    def quantization_config(self, layers: Sequence[WrittenLayer], ignore: list[str],
                            kv_args: dict[str, Any] | None = None) -> dict[str, Any]:
        groups: dict[tuple[Any, ...], list[WrittenLayer]] = {}
        sparse = [layer.name for layer in layers if layer.sparse]
        quantized = [layer for layer in layers if layer.bits is not None]
        ignore = sorted(set(ignore) | {layer.name for layer in layers if layer.bits is None})
        for layer in quantized:
            groups.setdefault(layer.scheme_key, []).append(layer)
        formats = {_format(members[0]) for members in groups.values()}
        config_groups = {}
        for i, members in enumerate(groups.values()):
            first = members[0]
            config_groups[f"group_{i}"] = {
                "targets": ["Linear"] if len(groups) == 1 else [m.name for m in members],
                "weights": _args(first),
                "input_activations": _input_args(first),
                "output_activations": None,
                "format": _format(first),
            }
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision" if formats else "dense",
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "ignore": sorted(ignore),
            "kv_cache_scheme": None if kv_args is None else {
                "num_bits": kv_args["bits"], "type": "int", "symmetric": kv_args["symmetric"], "group_size": None,
                "strategy": KV_STRATEGY[kv_args["granularity"]], "dynamic": False, "actorder": None,
                "observer": "minmax", "observer_kwargs": {},
            },
            "global_compression_ratio": None,
            "sparsity_config": {} if not sparse else {
                "format": "dense", "targets": sorted(sparse), "ignore": [], "global_sparsity": 0.5,
                "sparsity_structure": "2:4", "registry_requires_subclass": False,
            },
            "transform_config": {},
            "version": FORMAT_VERSION,
        }

    def finish(self, folder: Path, config: dict[str, Any], layers: Sequence[WrittenLayer],
               float_tensors: Sequence[str], float_linears: Sequence[str], kv_tensors: Sequence[str],
               kv_args: dict[str, Any] | None) -> None:
        ignore = sorted(float_linears)
        config["quantization_config"] = self.quantization_config(layers, ignore, kv_args)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
