"""Which kernel runs a `qc::` linear on CUDA, by op and shape: the dispatch table of the cuda target.

Each op has kernels that can take a call (the libraries' own limits decide) and one kernel per M bucket
(M = 1, ≤ 16, ≤ 128, larger): the one measured fastest on a GPU over the benchmark's Llama-3-8B / Qwen2.5-7B layer
shapes (kernels/cuda/measured_table.json, written by `benchmarks/cuda_kernels.py --write-table`), or before any
measurement the prior below. A call goes to its bucket's kernel when that kernel can take it, else to the op's
fallback, which takes every call:

    op                     prior per bucket (1, 16, 128, more)              fallback     limits
    linear_woq_tinygemm    tinygemm tinygemm dequant_mm dequant_mm          dequant_mm   tinygemm: bf16 x
    linear_woq             dequant_mm ×4                                    dequant_mm
    linear_w8a8            triton triton int_mm int_mm                      triton       int_mm: M > 16, K, N % 8
    linear_fp8             triton triton scaled_mm scaled_mm                triton       scaled_mm: K, N % 16, half x
    linear_int_dynamic     triton ×4                                        triton

tinygemm is torch's int4 GEMV-shaped kernel (`torch._weight_int4pack_mm`; runtime/cuda_prepack.py gives int4
layers its tiled layout at load time); dequant_mm dequantizes into the activations' dtype and calls cuBLAS;
int_mm / scaled_mm are torch's cuBLASLt int8 / fp8 GEMMs (kernels/library_gemm.py) with the activations quantized
by one Triton launch; triton is ours (kernels/cuda/triton_linear.py, autotuned). Every path computes the oracle's
numbers (kernels/reference.py): int8 exactly, fp8 up to float32 summation order, weight-only in float32 exactly
and in half precision up to one rounding of ŵ (tests/test_kernels.py, tests/test_triton_kernels.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MEASURED = Path(__file__).with_name("measured_table.json")
KERNELS = {
    "linear_woq_tinygemm": ("tinygemm", "triton", "dequant_mm"),
    "linear_woq": ("triton", "dequant_mm"),
    "linear_w8a8": ("int_mm", "triton"),
    "linear_fp8": ("scaled_mm", "triton"),
    "linear_int_dynamic": ("triton",),
}
PRIOR = {
    "linear_woq_tinygemm": ("tinygemm", "tinygemm", "dequant_mm", "dequant_mm"),
    "linear_woq": ("dequant_mm",) * 4,
    "linear_w8a8": ("triton", "triton", "int_mm", "int_mm"),
    "linear_fp8": ("triton", "triton", "scaled_mm", "scaled_mm"),
    "linear_int_dynamic": ("triton",) * 4,
}
FALLBACK = {"linear_woq_tinygemm": "dequant_mm", "linear_woq": "dequant_mm", "linear_w8a8": "triton",
            "linear_fp8": "triton", "linear_int_dynamic": "triton"}
M_BUCKETS = (1, 16, 128)  # upper bounds; a fourth bucket holds every larger M


@dataclass(frozen=True)
class Choice:
    kernel: str  # "triton" | "int_mm" | "scaled_mm" | "tinygemm" | "dequant_mm"
    reason: str


def refusal(kernel: str, m: int, k: int, n: int, dtype: torch.dtype) -> str | None:
    """Why `kernel` cannot take an [M, K] × [N, K]ᵀ call in `dtype`, or None when it can."""
    half = dtype in (torch.bfloat16, torch.float16)
    if kernel == "int_mm":
        if m <= 16:
            return f"M = {m}: cuBLASLt's int8 GEMM takes M > 16"
        if k % 8 or n % 8:
            return f"K = {k}, N = {n}: cuBLASLt's int8 GEMM takes multiples of 8"
    if kernel == "scaled_mm":
        if k % 16 or n % 16:
            return f"K = {k}, N = {n}: cuBLASLt's fp8 GEMM takes multiples of 16"
        if not half:
            return f"{dtype} activations: the scaled fp8 GEMM writes bf16 or fp16"
    if kernel == "tinygemm" and dtype != torch.bfloat16:
        return f"{dtype} activations: tinygemm takes bf16"
    if kernel == "triton" and not (half or dtype == torch.float32):
        return f"{dtype} activations"
    return None


def bucket(m: int) -> int:
    """The index of M's bucket: 0 for M = 1, 1 for M ≤ 16, 2 for M ≤ 128, 3 above."""
    return next((i for i, top in enumerate(M_BUCKETS) if m <= top), len(M_BUCKETS))


@functools.cache
def measured() -> dict[str, Any]:
    """The measured table ({} when none was written): {"device", "torch", "source", "ops": {op: [kernel per
    bucket]}}."""
    if not MEASURED.is_file():
        return {}
    data = json.loads(MEASURED.read_text())
    ops = data.get("ops", {})
    for op, kernels in ops.items():
        if op not in KERNELS or len(kernels) != len(M_BUCKETS) + 1 or any(k not in KERNELS[op] for k in kernels):
            raise ValueError(f"{MEASURED}: the entry for '{op}' is not a kernel of it per M bucket; rerun "
                             "benchmarks/cuda_kernels.py --write-table")
    return data


def choose(op: str, m: int, k: int, n: int, dtype: torch.dtype) -> Choice:
    """The kernel for one call of `op` on an [M, K] input and N outputs in `dtype`."""
    table = measured()
    by_bucket = table.get("ops", {}).get(op)
    where = f"measured fastest in M's bucket on {table.get('device')}" if by_bucket else "the unmeasured prior"
    kernel = (by_bucket or PRIOR[op])[bucket(m)]
    why = refusal(kernel, m, k, n, dtype)
    if why is None:
        return Choice(kernel, where)
    return Choice(FALLBACK[op], f"{kernel} ({where}) cannot: {why}")
