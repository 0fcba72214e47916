"""Which kernel runs a `qc::` linear on CUDA, by op and shape: the dispatch table of the cuda target.

    op            M ≤ 16 (decode)         M > 16 (prefill, batches)
    linear_w8a8   Triton (ours)           torch._int_mm (cuBLASLt int8) + float32 scale epilogue
    linear_fp8    Triton (ours)           torch._scaled_mm (cuBLASLt fp8, per-tensor or row-wise scales), bf16/fp16
    linear_woq    Triton (ours)           Triton (ours)
    linear_int_dynamic  Triton (ours)     Triton (ours)

Why these buckets: cuBLASLt's int8 GEMM takes M > 16 and K, N multiples of 8 (torch._int_mm's own check), its fp8
GEMM K, N multiples of 16; at decode sizes a GEMM library pads M to a tile and the op is memory-bound, where a
GEMV-shaped kernel reads the weights once. Row-wise fp8 scaling writes bf16 or fp16 only, so float32 activations
stay on Triton. The table has not been timed on a GPU yet (none was available): the thresholds are the libraries'
documented limits, and benchmarks on a GPU are to move them. Every path computes the oracle's numbers
(kernels/reference.py): w8a8 bit-equal, fp8 up to float32 summation order (tests/test_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SMALL_M = 16  # at most this many rows: the decode bucket


@dataclass(frozen=True)
class Choice:
    kernel: str  # "triton" | "int_mm" | "scaled_mm"
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
    return Choice("triton", "no library kernel for this op")
