"""The torch_npu calls of a graph lowered for Ascend, as ops (namespace `qc_npu`) with the torch_npu signatures.

Default implementation: the emulation in npu_ops.py (CPU, tests). On a machine with torch_npu installed, the NPU
implementation of each op calls the real torch_npu kernel (registered when torch_npu is importable; it
registers the "npu" device itself on import).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from qcompiler.kernels.ascend import npu_ops


@torch.library.custom_op("qc_npu::npu_quantize", mutates_args=())
def npu_quantize(x: Tensor, scales: Tensor, zero_points: Tensor | None, div_mode: bool) -> Tensor:
    return npu_ops.npu_quantize(x, scales, zero_points, div_mode)


@npu_quantize.register_fake
def _(x, scales, zero_points, div_mode):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qc_npu::npu_dynamic_quant", mutates_args=())
def npu_dynamic_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    return npu_ops.npu_dynamic_quant(x)


@npu_dynamic_quant.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("qc_npu::npu_dynamic_quant_int4", mutates_args=())
def npu_dynamic_quant_int4(x: Tensor) -> tuple[Tensor, Tensor]:
    return npu_ops.npu_dynamic_quant_int4(x)


@npu_dynamic_quant_int4.register_fake
def _(x):
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 8), dtype=torch.int32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("qc_npu::npu_kronecker_quant", mutates_args=())
def npu_kronecker_quant(x: Tensor, left: Tensor, right: Tensor, clip_ratio: float) -> tuple[Tensor, Tensor]:
    return npu_ops.npu_kronecker_quant(x, left, right, clip_ratio)


@npu_kronecker_quant.register_fake
def _(x, left, right, clip_ratio):
    return (x.new_empty((x.shape[0], x.shape[1] * x.shape[2] // 8), dtype=torch.int32),
            x.new_empty(x.shape[0], dtype=torch.float32))


@torch.library.custom_op("qc_npu::npu_quant_matmul", mutates_args=())
def npu_quant_matmul(x1: Tensor, x2: Tensor, scale: Tensor, pertoken_scale: Tensor | None, bias: Tensor | None,
                     output_dtype: torch.dtype) -> Tensor:
    return npu_ops.npu_quant_matmul(x1, x2, scale, None, pertoken_scale, bias, output_dtype)


@npu_quant_matmul.register_fake
def _(x1, x2, scale, pertoken_scale, bias, output_dtype):
    return x1.new_empty((*x1.shape[:-1], x2.shape[-1]), dtype=output_dtype)


@torch.library.custom_op("qc_npu::npu_weight_quant_batchmatmul", mutates_args=())
def npu_weight_quant_batchmatmul(x: Tensor, weight: Tensor, antiquant_scale: Tensor,
                                 antiquant_offset: Tensor | None, bias: Tensor | None,
                                 antiquant_group_size: int) -> Tensor:
    return npu_ops.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, bias,
                                                antiquant_group_size)


@npu_weight_quant_batchmatmul.register_fake
def _(x, weight, antiquant_scale, antiquant_offset, bias, antiquant_group_size):
    return x.new_empty((*x.shape[:-1], antiquant_scale.shape[-1]))


def _register_torch_npu() -> None:
    """On an Ascend machine: the real kernels for NPU tensors (the shapes and conventions are the same)."""
    import torch_npu  # noqa: F401  (registers the "npu" device)

    @torch.library.register_kernel("qc_npu::npu_quantize", "npu")
    def _quantize(x, scales, zero_points, div_mode):
        return torch_npu.npu_quantize(x, scales, zero_points, torch.qint8, -1, div_mode)

    @torch.library.register_kernel("qc_npu::npu_dynamic_quant", "npu")
    def _dynamic_quant(x):
        return torch_npu.npu_dynamic_quant(x)

    @torch.library.register_kernel("qc_npu::npu_dynamic_quant_int4", "npu")
    def _dynamic_quant_int4(x):
        return torch_npu.npu_dynamic_quant(x, dst_type=torch.quint4x2)

    @torch.library.register_kernel("qc_npu::npu_kronecker_quant", "npu")
    def _kronecker_quant(x, left, right, clip_ratio):
        q, s = torch_npu.npu_kronecker_quant(x, left, right, clip_ratio=clip_ratio, dst_dtype=torch.int32)
        return q.view(x.shape[0], -1), s.view(-1).float()

    @torch.library.register_kernel("qc_npu::npu_quant_matmul", "npu")
    def _quant_matmul(x1, x2, scale, pertoken_scale, bias, output_dtype):
        return torch_npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=pertoken_scale, bias=bias,
                                          output_dtype=output_dtype)

    @torch.library.register_kernel("qc_npu::npu_weight_quant_batchmatmul", "npu")
    def _wqbmm(x, weight, antiquant_scale, antiquant_offset, bias, antiquant_group_size):
        return torch_npu.npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset, bias=bias,
                                                      antiquant_group_size=antiquant_group_size)


if importlib.util.find_spec("torch_npu") is not None:  # pragma: no cover - Ascend machines only
    _register_torch_npu()
