"""Registers the CUDA implementations of the `qc::` linear ops: each call goes to the kernel the dispatch table
(kernels/cuda/table.py) picks for its shape — torch's cuBLAS / cuBLASLt GEMMs (kernels/library_gemm.py), tinygemm
(kernels/cuda/tinygemm.py, its own op) or our Triton kernels.

Triton is imported on the first call that runs it, so importing qcompiler never needs Triton (it is the optional
`cuda` extra) and a CPU-only machine never pays for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompiler.kernels import library_gemm
from qcompiler.kernels.cuda.table import Choice, choose


def _rows_cols(x: Tensor, qweight: Tensor, op: str) -> Choice:
    return choose(op, x.numel() // max(x.shape[-1], 1), x.shape[-1], qweight.shape[0], x.dtype)


@torch.library.register_kernel("qc::linear_woq", "cuda")
def _linear_woq_cuda(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                     bits: int, group_size: int, in_features: int) -> Tensor:
    # (the table has one kernel for this op: int4 layers the cuda prepack gave a tinygemm layout call
    # qc::linear_woq_tinygemm instead, kernels/cuda/tinygemm.py)
    return library_gemm.linear_woq_dequant_mm(x, qweight, scale, zero, bias, bits, group_size, in_features)


@torch.library.register_kernel("qc::linear_w8a8", "cuda")
def _linear_w8a8_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None,
                      x_zero: Tensor | None, bias: Tensor | None) -> Tensor:
    if _rows_cols(x, qweight, "linear_w8a8").kernel == "int_mm":
        return library_gemm.linear_w8a8_int_mm(x, qweight, w_scale, x_scale, x_zero, bias)
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_w8a8(x, qweight, w_scale, x_scale, x_zero, bias)


@torch.library.register_kernel("qc::linear_fp8", "cuda")
def _linear_fp8_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None,
                     bias: Tensor | None) -> Tensor:
    if _rows_cols(x, qweight, "linear_fp8").kernel == "scaled_mm":
        return library_gemm.linear_fp8_scaled_mm(x, qweight, w_scale, x_scale, bias, out_dtype=x.dtype)
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_fp8(x, qweight, w_scale, x_scale, bias)


@torch.library.register_kernel("qc::linear_int_dynamic", "cuda")
def _linear_int_dynamic_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int,
                             group_size: int) -> Tensor:
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear.linear_int_dynamic(x, qweight, w_scale, bias, act_bits, group_size)
