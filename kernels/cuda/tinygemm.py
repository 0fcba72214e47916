"""w4a16 on torch's tinygemm kernel (`torch._weight_int4pack_mm`: CUDA, bf16 activations, groups of 32–256).

    qc::linear_woq(x, int4 codes, s, z, g)  →  qc::linear_woq_tinygemm(x, tinygemm(u), [s | (8 − z)·s], g', …)

The kernel reads weights in its own tiled layout ([N/8, K'/(16·t), 32, t/2] int32 for t inner K tiles), made
once at load time by `torch._convert_weight_to_int4pack` from uint8 [N, K'/2] with column 2i in the high nibble
(packing.tinygemm_nibbles), and computes ŵ = (u − 8)·s + m per group of g' columns from a bf16 table
[K'/g', N, 2] (packing.int4pack_operands: m = (8 − z)·s reproduces our ŵ = (u − z)·s). `reference_tinygemm` is
that arithmetic in pure torch; torch's CPU int4pack kernel reads the same table, so the CPU tests check the table
and the nibble order against a real torch kernel, and the tiled layout's shapes through torch's meta kernels.

The op keeps the portable storage beside the tiled one: calls the table (kernels/cuda/table.py) does not send to
tinygemm — prefill sizes, fp16 activations — run our Triton GEMM or the dequantizing path on it. That holds the int4
weight twice (one byte per weight in all, half of bf16's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qcompiler.kernels import reference
from qcompiler.kernels.cuda.dispatch import kernel_for, linear_woq_cuda
from qcompiler.kernels.packing import int4pack_group, int4pack_operands, tinygemm_nibbles

INNER_K_TILES = (8, 4, 2)  # the kernel's choices, largest first (K' must be a multiple of 16·t)


@dataclass(frozen=True)
class TinygemmWeight:
    packed: Tensor  # int32 [N/8, K'/(16·t), 32, t/2]
    scales_and_zeros: Tensor  # bf16 [K'/g', N, 2]
    kernel_group: int  # g'
    k_pad: int  # K'


def tinygemm_refusal(n: int, group_size: int, k: int) -> str | None:
    """Why an int4 layer [N, K] with groups of `group_size` has no tinygemm layout, or None when it has one."""
    if int4pack_group(group_size) is None:
        return f"group size {group_size} is not a multiple of 32"
    if n % 8:
        return f"N = {n} is not a multiple of 8"
    k_pad = -(-k // group_size) * group_size
    if not any(k_pad % (16 * t) == 0 for t in INNER_K_TILES):
        return f"K = {k} (padded to {k_pad}) is not a multiple of 32"
    return None


def tinygemm_weight(qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, k: int) -> TinygemmWeight:
    """The tiled layout of one int4 layer, made on the storage's device (a CUDA device; meta in tests)."""
    reason = tinygemm_refusal(qweight.shape[0], group_size, k)
    if reason is not None:
        raise ValueError(f"no tinygemm layout: {reason}")
    u, scales_and_zeros, kernel_group, k_pad = int4pack_operands(qweight, scale, zero, group_size, k)
    tiles = next(t for t in INNER_K_TILES if k_pad % (16 * t) == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack(tinygemm_nibbles(u), tiles)
    return TinygemmWeight(packed, scales_and_zeros, kernel_group, k_pad)


def reference_tinygemm(x: Tensor, u: Tensor, scales_and_zeros: Tensor, kernel_group: int) -> Tensor:
    """What tinygemm computes, in pure torch: y = x·ŵᵀ with ŵ[n, j] = (u[n, j] − 8)·s[j // g', n] + m[j // g', n]
    from the bf16 table, x [M, K'] (already padded), accumulated in float32, returned in bf16."""
    s = scales_and_zeros[..., 0].float().t().repeat_interleave(kernel_group, dim=1)  # [N, K']
    m = scales_and_zeros[..., 1].float().t().repeat_interleave(kernel_group, dim=1)
    w = (u.float() - 8.0) * s + m
    return (x.to(torch.bfloat16).float() @ w.t()).to(torch.bfloat16)


def run_tinygemm(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, bias: Tensor | None, kernel_group: int,
                 k_pad: int) -> Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    if k_pad != shape[-1]:
        x2 = torch.nn.functional.pad(x2, (0, k_pad - shape[-1]))
    y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, kernel_group, scales_and_zeros)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


@torch.library.custom_op("qc::linear_woq_tinygemm", mutates_args=())
def linear_woq_tinygemm(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, qweight: Tensor, scale: Tensor,
                        zero: Tensor | None, bias: Tensor | None, group_size: int, in_features: int,
                        kernel_group: int, k_pad: int) -> Tensor:
    """Anywhere but CUDA: the oracle's numbers from the portable storage (the tiled copy unused)."""
    return reference.linear_woq(x, qweight, scale, zero, bias, 4, group_size, in_features)


@torch.library.register_kernel("qc::linear_woq_tinygemm", "cuda")
def _linear_woq_tinygemm_cuda(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, qweight: Tensor, scale: Tensor,
                              zero: Tensor | None, bias: Tensor | None, group_size: int, in_features: int,
                              kernel_group: int, k_pad: int) -> Tensor:
    kernel = kernel_for("linear_woq_tinygemm", x, qweight, in_features)
    if kernel == "tinygemm":
        return run_tinygemm(x, packed, scales_and_zeros, bias, kernel_group, k_pad)
    return linear_woq_cuda(x, qweight, scale, zero, bias, 4, group_size, in_features, kernel)


@linear_woq_tinygemm.register_fake
def _linear_woq_tinygemm_fake(x, packed, scales_and_zeros, qweight, scale, zero, bias, group_size, in_features,
                              kernel_group, k_pad):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
