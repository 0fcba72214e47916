"""CPU kernels for the qc:: ops (torch's own int8/int4 CPU GEMMs), and the CPU's float32 GEMM precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from qcompiler.cpu_features import native_bf16

__all__ = ["fast_fp32_matmul", "fp32_matmul_precision", "native_bf16"]


@contextlib.contextmanager
def fast_fp32_matmul(enabled: bool = True) -> Iterator[str]:
    """Inside this block, float32 GEMMs on a CPU with bf16 hardware run through oneDNN's bf16 path for float32
    (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`): float32 in and out at twice the speed, with
    float32-class accuracy (measured on this CPU against float64: 1.4e-7 relative where plain float32 gives 0.9e-7
    and a bf16 GEMM 3e-3; on operands 1 + 1e-3·noise, which a bf16 GEMM cannot resolve, twice float32's error —
    oneDNN compensates the bf16 rounding, tests/test_kernels.py checks it). Only matmuls change (linear, mm, bmm);
    elementwise ops, attention and int8 GEMMs do not. Yields the precision in force, as fp32_matmul_precision names
    it ("ieee" where the CPU has no bf16 hardware or `enabled` is False)."""
    backend = _matmul_backend()
    before = backend.fp32_precision
    use = enabled and native_bf16()
    if use:
        backend.fp32_precision = "bf16"
    try:
        yield fp32_matmul_precision()
    finally:
        backend.fp32_precision = before


def _matmul_backend() -> Any:
    # (an attribute torch sets at import time, which its stubs do not declare)
    return getattr(torch.backends.mkldnn, "matmul")  # noqa: B009


def fp32_matmul_precision() -> str:
    """How float32 GEMMs run now: "bf16" inside fast_fp32_matmul on bf16 hardware, else "ieee"."""
    return "bf16" if _matmul_backend().fp32_precision == "bf16" else "ieee"
