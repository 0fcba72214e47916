"""Returning freed memory to the operating system between blocks.

glibc's allocator keeps memory freed by one block's tensors (hundreds of MB of activations and weights
in fragments) for reuse instead of returning it, so RSS grows to a high-water mark well above what is live.
After each block the driver drops the block graphs' tensors (ir.graph.drop_tensors: graph modules live in
reference cycles), collects the young garbage generations and asks glibc to trim its heaps; on other C
libraries there is no trim.

Measured on the demo model (w4a16 g64 rtn, 30 blocks, this 2-core machine): without any of this peak RSS
is 2.0-2.2 GB; with a full gc.collect() per block 1.15 GB at ~0.16 s per block (it walks every live Python
object); with drop_tensors + gc.collect(1) 1.14 GB at a few ms per block.

Within a block, glibc's *dynamic* mmap threshold is the larger problem: once a large (mmapped) chunk is freed
the threshold rises to its size, and every later weight-sized temporary is carved from the heap, where
freed space is kept. `use_mmap_for_large_allocations` pins the threshold at 4 MB, so every weight-sized
tensor is its own mapping and returns to the system when freed, while the 2 MB row chunks the weight maths
works in (numerics.ROW_CHUNK_BYTES) stay on the reused heap (mmapping those costs page faults: a 1 MB
threshold ran 2.5x slower). Random 2048/5632 Llama, 8 blocks, w4a16: no threshold 50 s / peak 1.41 GB;
1 MB 126 s / 1.27 GB; 4 MB with 2 MB chunks 43 s / 1.33 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def release_free_memory() -> None:
    gc.collect(1)
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def use_mmap_for_large_allocations(threshold: int = 4 << 20) -> bool:
    """Serve every allocation ≥ `threshold` bytes from its own mmap (returned to the OS on free) instead of
    the heap. Once per process; False where the C library has no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def rss_bytes(field: str = "VmRSS") -> int | None:
    """This process's resident set size (field VmRSS) or its high-water mark (VmHWM), from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
