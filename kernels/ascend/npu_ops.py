"""Emulation of the torch_npu kernels that Ascend serving (vllm-ascend, MindIE) calls for quantized linears,
written from their documented semantics so that a graph lowered for the NPU can be checked on the CPU.

  npu_quantize(x, scales, zero_points, div_mode)       q = clamp(round(x / s + z)) (div_mode) or round(x · s + z)
  npu_dynamic_quant(x, smooth_scales)                  per-token symmetric int8: s = absmax(x ⊙ smooth) / 127
  npu_dynamic_quant_int4(x)                            npu_dynamic_quant(x, dst_type=quint4x2): s = absmax(x) / 7,
                                                       codes in [−8, 7] packed 8 per int32 along K [M, K/8]
  npu_kronecker_quant(x [M, a, b], P1, P2, clip_ratio)  X' = P1·X·P2 per token, then per-token int4 with
                                                       s = clip_ratio·absmax(X') / 7, packed as above
                                                       (vllm-ascend passes P1 = left_transᵀ, P2 = right_trans)
  npu_quant_matmul(x1, x2, scale, offset, pertoken_scale, bias, output_dtype)
      acc = x1 (int8 [M, K]) · x2 (int8 [K, N], or int4 packed int32 [K, N/8]) in int32 — or, int4 × int4 (W4A4),
      x1 int32 [M, K/8] · x2 int32 [K/8, N] (the transposed int4pack of [N, K]: both packed along K); an int32 bias is added; then
      y = acc · scale[n] (· pertoken_scale[m]); a float bias is added after scaling. `scale` int64 carries the
      fp32 bit pattern in its low 32 bits (what npu_trans_quant_param makes for fp16 outputs)
  npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, bias, antiquant_group_size)
      y = x · ((w + offset) · scale) + bias with w int8 [K, N] or int4 packed int32 [K, N/8]; scale/offset
      per channel [N] ([1, N]) or per group [K/g, N]. Note the sign: the offset is ADDED (= −zero point)
  npu_convert_weight_to_int4pack(w int32 [K, N] in [−8, 7]) → int32 [K, N/8], value n at bits 4·(n mod 8)
  npu_trans_quant_param(scale) → int64 holding the fp32 bits of scale

Rounding is round-half-to-even here; the NPU's cast rounding mode is not documented, so ties may differ by one
code (tests derive tolerances from that).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompiler.kernels.packing import pack_int32, unpack_int32


def npu_trans_quant_param(scale: Tensor) -> Tensor:
    """fp32 scale -> int64 with the fp32 bit pattern in the low 32 bits (no offset)."""
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64)
    return bits & 0xFFFFFFFF


def decode_scale(scale: Tensor) -> Tensor:
    """The fp32 value of a quant_matmul scale (int64 bit-pattern encoded, or float)."""
    if scale.dtype == torch.int64:
        low = (scale & 0xFFFFFFFF).to(torch.int64)
        low = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)
        return low.view(torch.float32)
    return scale.float()


def npu_quantize(x: Tensor, scales: Tensor, zero_points: Tensor | None, div_mode: bool = True) -> Tensor:
    s = scales.float()
    v = x.float() / s if div_mode else x.float() * s
    if zero_points is not None:
        v = v + zero_points.float()
    return torch.clamp(torch.round(v), -128, 127).to(torch.int8)


def npu_dynamic_quant(x: Tensor, smooth_scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    v = x.float() if smooth_scales is None else x.float() * smooth_scales.float()
    scale = (v.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(v / scale.unsqueeze(-1)), -128, 127).to(torch.int8)
    return q, scale


def npu_dynamic_quant_int4(x: Tensor) -> tuple[Tensor, Tensor]:
    return _quant_int4_per_token(x.float(), 1.0)


def npu_kronecker_quant(x: Tensor, left: Tensor, right: Tensor, clip_ratio: float) -> tuple[Tensor, Tensor]:
    if x.dim() != 3 or x.shape[1] != left.shape[0] or x.shape[2] != right.shape[0]:
        raise ValueError(f"npu_kronecker_quant takes x [M, a, b] with P1 [a, a], P2 [b, b]; got {tuple(x.shape)}, "
                         f"{tuple(left.shape)}, {tuple(right.shape)}")
    transformed = left.float() @ x.float() @ right.float()  # (batched over tokens)
    return _quant_int4_per_token(transformed.reshape(x.shape[0], -1), clip_ratio)


def _quant_int4_per_token(v: Tensor, clip_ratio: float) -> tuple[Tensor, Tensor]:
    """[M, K] float -> (int4 codes packed 8 per int32 along K [M, K/8], fp32 scales [M])."""
    if v.shape[-1] % 8:
        raise ValueError(f"int4 activations pack 8 per int32: K = {v.shape[-1]} is not a multiple of 8")
    scale = (clip_ratio * v.abs().amax(dim=-1) / 7.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(v / scale.unsqueeze(-1)), -8, 7).to(torch.int32)
    return pack_int32(q & 0xF, 4), scale


def npu_quant_matmul(x1: Tensor, x2: Tensor, scale: Tensor, offset: Tensor | None = None,
                     pertoken_scale: Tensor | None = None, bias: Tensor | None = None,
                     output_dtype: torch.dtype | None = None) -> Tensor:
    if x1.dtype == torch.int32:  # int4 × int4: both operands packed along K
        if x2.dtype != torch.int32 or x2.shape[0] != x1.shape[-1]:
            raise TypeError("npu_quant_matmul int4 × int4 takes x1 int32 [M, K/8] and x2 int32 [K/8, N]")
        k = x1.shape[-1] * 8
        x1 = unpack_int4pack(x1, k).to(torch.int8)
        x2 = unpack_int4pack(x2.t().contiguous(), k).t().to(torch.int8)
    elif x2.dtype == torch.int32:  # int4 weights packed by npu_convert_weight_to_int4pack: [K, N/8]
        x2 = unpack_int4pack(x2, x2.shape[-1] * 8).to(torch.int8)
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise TypeError(f"npu_quant_matmul takes int8 × int8 (or int4-packed int32) operands, got {x1.dtype} × {x2.dtype}")
    if offset is not None:
        raise NotImplementedError("npu_quant_matmul offset (int8 requantized output) is not emulated")
    # float64 products of int8 codes are exact integers (|acc| < 2^53), like the NPU's int32 accumulation
    acc = x1.double() @ x2.double()
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.double()
    y = acc * decode_scale(scale).double()
    if pertoken_scale is not None:
        y = y * pertoken_scale.double().reshape(*pertoken_scale.shape, 1)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.double()
    if output_dtype is None:
        output_dtype = torch.bfloat16 if scale.dtype == torch.bfloat16 else torch.float16
    return y.to(output_dtype)


def unpack_int4pack(packed: Tensor, n: int) -> Tensor:
    """int32 [K, N/8] from npu_convert_weight_to_int4pack -> int32 [K, N] in [−8, 7]."""
    nibbles = unpack_int32(packed, 4, n)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int32)


def npu_convert_weight_to_int4pack(weight: Tensor) -> Tensor:
    if weight.dtype != torch.int32 or weight.shape[-1] % 8:
        raise ValueError("npu_convert_weight_to_int4pack takes int32 [K, N] with N a multiple of 8")
    if int(weight.min()) < -8 or int(weight.max()) > 7:
        raise ValueError("npu_convert_weight_to_int4pack takes values in [-8, 7]")
    return pack_int32(weight & 0xF, 4)  # two's-complement nibbles, value n at bits 4·(n mod 8)


def npu_weight_quant_batchmatmul(x: Tensor, weight: Tensor, antiquant_scale: Tensor,
                                 antiquant_offset: Tensor | None = None, bias: Tensor | None = None,
                                 antiquant_group_size: int = 0) -> Tensor:
    if weight.dtype == torch.int32:  # int4 packed along N
        w = unpack_int4pack(weight, antiquant_scale.shape[-1]).float()
    elif weight.dtype == torch.int8:
        w = weight.float()
    else:
        raise TypeError(f"npu_weight_quant_batchmatmul takes int8 or int4-packed int32 weights, got {weight.dtype}")
    k = w.shape[0]
    scale = antiquant_scale.float().reshape(-1, w.shape[1])
    offset = (antiquant_offset.float().reshape(-1, w.shape[1]) if antiquant_offset is not None
              else torch.zeros_like(scale))
    if antiquant_group_size:
        scale = scale.repeat_interleave(antiquant_group_size, dim=0)[:k]
        offset = offset.repeat_interleave(antiquant_group_size, dim=0)[:k]
    w_hat = (w + offset) * scale
    y = x.float() @ w_hat
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
