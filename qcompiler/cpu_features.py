"""What this CPU multiplies in hardware, read once from /proc/cpuinfo (kernels and searches pick their paths by it)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
