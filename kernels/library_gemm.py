"""The `qc::` int8 and fp8 linears on torch's own library GEMMs, for any device that has them.

- w8a8: int8 activations (static per tensor with a zero point, or dynamic per token) × int8 weights through
  `torch._int_mm` (int8 × int8 → int32, exact: cuBLASLt on CUDA, oneDNN on the CPU), then the epilogue
  y = acc · s_x · s_w + b in float32 exactly as the oracle (kernels/reference.py) applies it, so the result is
  bit-equal to `reference.linear_w8a8`. An activation zero point z enters as (q_x − z)·q_wᵀ = q_x·q_wᵀ − z·Σ_k q_w.
- fp8: e4m3 activations (static per tensor, or dynamic per token, s = max|x| / 448) × e4m3 weights through
  `torch._scaled_mm` with the scales applied inside the GEMM — both per tensor, or row-wise (s_x [M, 1] and
  s_w [1, N], what Hopper's cuBLASLt takes); e4m3 × e4m3 products are exact in float32, so only the summation
  order differs from the oracle.

Where each is worth calling (shape limits, M buckets) is kernels/cuda/table.py's business. `quantize` is the
activation prologue: the oracle's torch ops by default, the one-launch Triton quantizer on CUDA (bit-equal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qcompiler.kernels import reference
from qcompiler.numerics import int8_matmul


def linear_w8a8_int_mm(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, x_zero: Tensor | None,
                       bias: Tensor | None,
                       quantize: Callable[..., tuple[Tensor, Tensor]] = reference.quantize_act_w8a8) -> Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, sx = quantize(x2, x_scale, x_zero)
    acc = int8_matmul(qx, qweight.t())
    if x_zero is not None and x_scale is not None:
        acc = acc - x_zero.to(torch.int32) * qweight.to(torch.int32).sum(dim=1)
    y = acc.float() * sx.float() * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def linear_fp8_scaled_mm(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, bias: Tensor | None,
                         out_dtype: torch.dtype = torch.float32,
                         quantize: Callable[..., tuple[Tensor, Tensor]] = reference.quantize_act_fp8) -> Tensor:
    """`out_dtype`: what the GEMM writes (Hopper's row-wise scaled GEMM writes bf16; float32 on the CPU)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x8, sx = quantize(x2, x_scale)
    m, n = x8.shape[0], qweight.shape[0]
    sx, sw = sx.float(), w_scale.float()
    if sx.numel() == 1 and sw.numel() == 1:  # both per tensor
        scale_a, scale_b = sx.reshape(()), sw.reshape(())
    else:  # row-wise: every row of x and every output channel its own scale
        scale_a = sx.reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = sw.reshape(1, -1).expand(1, n).contiguous()
    y = torch._scaled_mm(x8, qweight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def linear_woq_dequant_mm(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                          bits: int, group_size: int, in_features: int,
                          dequantize: Callable[..., Tensor] | None = None) -> Tensor:
    """Weight-only linear as the oracle's dequantized weight, rounded once to the activations' dtype, into the
    library GEMM of that dtype (cuBLAS for bf16 / fp16 on CUDA). In float32 it is the oracle itself; in half
    precision ŵ is rounded to it (one rounding, as a half-precision model's own weights are) and the GEMM
    accumulates in float32. The dequantization reads N·K/2 (int4) or N·K (int8) bytes and writes N·K halves:
    at prefill sizes negligible beside the GEMM, at decode about 2.25× the weight bytes of a plain half GEMM.
    `dequantize(qweight, scale, zero, bits, group, K, dtype)`: ŵ in x's dtype (one Triton launch on CUDA); by
    default the oracle's torch ops."""
    if x.dtype == torch.float32:
        return reference.linear_woq(x, qweight, scale, zero, bias, bits, group_size, in_features)
    if dequantize is not None:
        w = dequantize(qweight, scale, zero, bits, group_size, in_features, x.dtype)
    else:
        w = reference.dequantize(qweight, scale, zero, bits, group_size, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
