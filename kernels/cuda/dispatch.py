"""Registers the CUDA implementations of the `qc::` linear ops: each call goes to the kernel the dispatch table
(kernels/cuda/table.py) picks for its shape — torch's cuBLAS / cuBLASLt GEMMs (kernels/library_gemm.py, their
activations quantized by one Triton launch), tinygemm (kernels/cuda/tinygemm.py, its own op) or our Triton kernels.

Triton is imported on the first call that runs it, so importing qcompiler never needs Triton (it is the optional
`cuda` extra) and a CPU-only machine never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from qcompiler.kernels import library_gemm, reference
from qcompiler.kernels.cuda.table import choose


def kernel_for(op: str, x: Tensor, qweight: Tensor, in_features: int | None = None) -> str:
    """The table's kernel for this call of `op` (x [..., K], qweight [N, ...])."""
    k = in_features if in_features is not None else x.shape[-1]
    return choose(op, x.numel() // max(x.shape[-1], 1), k, qweight.shape[0], x.dtype).kernel


def _triton() -> ModuleType:
    from qcompiler.kernels.cuda import triton_linear

    return triton_linear


def prologue(name: str) -> Callable[..., Any]:
    """The prologue of a library GEMM — activation quantizer or weight dequantizer — as one Triton launch on CUDA,
    the oracle's torch ops elsewhere (the tests call these registrations on the CPU)."""
    if not torch.cuda.is_available():
        from qcompiler.kernels import reference

        return getattr(reference, name)
    return getattr(_triton(), name)


def linear_woq_cuda(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                    bits: int, group_size: int, in_features: int, kernel: str) -> Tensor:
    """A weight-only linear on `kernel` ("triton" or "dequant_mm")."""
    if kernel == "triton":
        return _triton().linear_woq(x, qweight, scale, zero, bias, bits, group_size, in_features)
    return library_gemm.linear_woq_dequant_mm(x, qweight, scale, zero, bias, bits, group_size, in_features,
                                              dequantize=prologue("dequantize") if x.is_cuda else None)


@torch.library.register_kernel("qc::linear_woq", "cuda")
def _linear_woq_cuda(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, bias: Tensor | None,
                     bits: int, group_size: int, in_features: int) -> Tensor:
    # (int4 layers the cuda prepack gave a tinygemm layout call qc::linear_woq_tinygemm, kernels/cuda/tinygemm.py)
    kernel = kernel_for("linear_woq", x, qweight, in_features)
    return linear_woq_cuda(x, qweight, scale, zero, bias, bits, group_size, in_features, kernel)


@torch.library.register_kernel("qc::linear_w8a8", "cuda")
def _linear_w8a8_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None,
                      x_zero: Tensor | None, bias: Tensor | None) -> Tensor:
    if kernel_for("linear_w8a8", x, qweight) == "int_mm":
        return library_gemm.linear_w8a8_int_mm(x, qweight, w_scale, x_scale, x_zero, bias,
                                               quantize=prologue("quantize_act_w8a8"))
    return _triton().linear_w8a8(x, qweight, w_scale, x_scale, x_zero, bias)


@torch.library.register_kernel("qc::linear_fp8", "cuda")
def _linear_fp8_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None,
                     bias: Tensor | None) -> Tensor:
    if kernel_for("linear_fp8", x, qweight) == "scaled_mm":
        return library_gemm.linear_fp8_scaled_mm(x, qweight, w_scale, x_scale, bias, out_dtype=x.dtype,
                                                 quantize=prologue("quantize_act_fp8"))
    return _triton().linear_fp8(x, qweight, w_scale, x_scale, bias)


@torch.library.register_kernel("qc::linear_int_dynamic", "cuda")
def _linear_int_dynamic_cuda(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int,
                             group_size: int, clip_ratio: float = 1.0) -> Tensor:
    if clip_ratio != 1.0:  # (the Triton prologue quantizes with the full range: a clipped grid runs the oracle)
        return reference.linear_int_dynamic(x, qweight, w_scale, bias, act_bits, group_size, clip_ratio)
    return _triton().linear_int_dynamic(x, qweight, w_scale, bias, act_bits, group_size)
