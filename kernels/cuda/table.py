"""Which kernel runs a `qc::` linear on CUDA, by op and shape: the dispatch table of the cuda target.

    op                     M ≤ 16 (decode)            M > 16 (prefill, batches)
    linear_woq_tinygemm    tinygemm (bf16)            dequantize + cuBLAS
    linear_woq             dequantize + cuBLAS        dequantize + cuBLAS
    linear_w8a8            Triton (ours)              torch._int_mm (cuBLASLt int8) + float32 scale epilogue
    linear_fp8             Triton (ours)              torch._scaled_mm (cuBLASLt fp8, per-tensor or row-wise), bf16/fp16
    linear_int_dynamic     Triton (ours)              Triton (ours)

Why these buckets: tinygemm (`torch._weight_int4pack_mm`, int4 weights read once, bf16 activations) is a
GEMV-shaped kernel for decode sizes; the cuda runtime lowering (runtime/cuda_prepack.py) gives int4 layers its
tiled layout at load time. Weight-only layers without it (int8 weights, groups tinygemm cannot take, fp16
activations) and every prefill-sized call dequantize to the activations' dtype and call cuBLAS: our Triton
weight-only GEMM measured 2.9–281× slower than a half GEMM on an H100 (benchmarks/results/triton-gpu-h100.txt),
while dequantize + GEMM costs the GEMM plus N·K element work. cuBLASLt's int8 GEMM takes M > 16 and K, N multiples
of 8 (torch._int_mm's own check), its fp8 GEMM K, N multiples of 16; at decode sizes a GEMM library pads M to a
tile and the op is memory-bound. Row-wise fp8 scaling writes bf16 or fp16 only, so float32 activations stay on
Triton. The table has not been timed on a GPU yet (none was available since these paths were written): the
thresholds are the libraries' documented limits, and benchmarks/cuda_kernels.py on a GPU is to move them. Every
path computes the oracle's numbers (kernels/reference.py): w8a8 bit-equal, fp8 up to float32 summation order,
weight-only in float32 exactly and in half precision up to one rounding of ŵ (tests/test_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SMALL_M = 16  # at most this many rows: the decode bucket


@dataclass(frozen=True)
class Choice:
    kernel: str  # "triton" | "int_mm" | "scaled_mm" | "tinygemm" | "dequant_mm"
    reason: str


def choose(op: str, m: int, k: int, n: int, dtype: torch.dtype) -> Choice:
    """The kernel for one call of `op` on an [M, K] input and N outputs in `dtype`."""
    if op == "linear_w8a8":
        if m <= SMALL_M:
            return Choice("triton", f"M = {m} ≤ {SMALL_M}: cuBLASLt's int8 GEMM takes M > 16")
        if k % 8 or n % 8:
            return Choice("triton", f"K = {k}, N = {n}: cuBLASLt's int8 GEMM takes multiples of 8")
        return Choice("int_mm", "M > 16, K and N multiples of 8")
    if op == "linear_fp8":
        if m <= SMALL_M:
            return Choice("triton", f"M = {m} ≤ {SMALL_M}: decode sizes")
        if k % 16 or n % 16:
            return Choice("triton", f"K = {k}, N = {n}: cuBLASLt's fp8 GEMM takes multiples of 16")
        if dtype not in (torch.bfloat16, torch.float16):
            return Choice("triton", f"{dtype} activations: the scaled fp8 GEMM writes bf16 or fp16")
        return Choice("scaled_mm", "M > 16, K and N multiples of 16, half-precision output")
    if op == "linear_woq_tinygemm":
        if m <= SMALL_M and dtype == torch.bfloat16:
            return Choice("tinygemm", f"M = {m} ≤ {SMALL_M}, bf16 activations")
        return Choice("dequant_mm", f"M = {m} > {SMALL_M}: a GEMM's sizes" if m > SMALL_M else
                      f"{dtype} activations: tinygemm takes bf16")
    if op == "linear_woq":
        return Choice("dequant_mm", "no tiled layout (int8, or a group tinygemm cannot take): dequantize + GEMM")
    return Choice("triton", "no library kernel for this op")
