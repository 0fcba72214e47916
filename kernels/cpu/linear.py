"""CPU implementations of the qc:: linear ops, on the fast paths measured on this 2-core x86 CPU.

- w8a8: activations are quantized to int8 and multiplied with `torch._int_mm` (int8 × int8 → int32,
  exact; kernels/library_gemm.py, shared with CUDA); the epilogue applies s_x · s_w in float32 exactly as the
  oracle does, so results are bit-equal to reference.linear_w8a8.
- weight-only: `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm` are only fast with bf16 activations
  (30–60× slower in fp32), so they are used through prepacked ops that the CPU target's prepack lowering
  inserts when a model runs in bf16. With fp32 activations qc::linear_woq keeps the oracle's exact
  semantics (dequantize once per call, fp32 GEMM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompiler.kernels import library_gemm
from qcompiler.kernels.packing import int4pack_operands


@torch.library.register_kernel("qc::linear_w8a8", "cpu")
def linear_w8a8_cpu(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    x_scale: Tensor | None,
    x_zero: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    return library_gemm.linear_w8a8_int_mm(x, qweight, w_scale, x_scale, x_zero, bias)


# ------------------------------------------------------------------ prepacked weight-only (bf16)


def prepack_int4(
    qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, k: int
) -> tuple[Tensor, Tensor, int, int]:
    """Canonical int4 storage -> (packed, scales_and_zeros [K'/g', N, 2] bf16, g', K') for
    `_weight_int4pack_mm_for_cpu` (packing.int4pack_operands has the maths)."""
    u, scales_and_zeros, kernel_group, k_pad = int4pack_operands(qweight, scale, zero, group_size, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
    return packed, scales_and_zeros, kernel_group, k_pad


@torch.library.custom_op("qc::linear_int4pack_cpu", mutates_args=())
def linear_int4pack_cpu(
    x: Tensor, packed: Tensor, scales_and_zeros: Tensor, bias: Tensor | None, kernel_group: int, k_pad: int
) -> Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    if k_pad != shape[-1]:
        x2 = torch.nn.functional.pad(x2, (0, k_pad - shape[-1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, kernel_group, scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


@linear_int4pack_cpu.register_fake
def _linear_int4pack_cpu_fake(x, packed, scales_and_zeros, bias, kernel_group, k_pad):
    return x.new_empty((*x.shape[:-1], scales_and_zeros.shape[1]))


@torch.library.custom_op("qc::linear_int8pack_cpu", mutates_args=())
def linear_int8pack_cpu(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Symmetric per-channel int8 weights [N, K] with scale [N]; bf16 activations."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scale.to(torch.bfloat16))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


@linear_int8pack_cpu.register_fake
def _linear_int8pack_cpu_fake(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
