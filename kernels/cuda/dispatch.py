"""Registers the Triton kernels as the CUDA implementations of the `qc::` linear ops.

Triton is imported on the first call with a CUDA tensor, so importing qcompiler never needs Triton (it is the
optional `cuda` extra) and a CPU-only machine never pays for it.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.register_kernel("qc::linear_woq", "cuda")
def _linear_woq_cuda(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                     bits: int, group_size: int, in_features: int) -> Tensor:
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_woq(x, qweight, scale, zero, bias, bits, group_size, in_features)


@torch.library.register_kernel("qc::linear_w8a8", "cuda")
def _linear_w8a8_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None,
                      x_zero: Tensor | None, bias: Tensor | None) -> Tensor:
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_w8a8(x, qweight, w_scale, x_scale, x_zero, bias)


@torch.library.register_kernel("qc::linear_fp8", "cuda")
def _linear_fp8_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None,
                     bias: Tensor | None) -> Tensor:
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_fp8(x, qweight, w_scale, x_scale, bias)


@torch.library.register_kernel("qc::linear_int_dynamic", "cuda")
def _linear_int_dynamic_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int,
                             group_size: int) -> Tensor:
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_int_dynamic(x, qweight, w_scale, bias, act_bits, group_size)
