"""Returning freed memory to the operating system between blocks.

glibc's allocator keeps memory freed by one block's tensors (hundreds of MB of activations and weights
in fragments) for reuse instead of returning it, so RSS grows to a high-water mark well above what is live.
After each block the driver drops the block graphs' tensors (ir.graph.drop_tensors: graph modules live in
reference cycles) and collects the young garbage generations; in `--low-memory` mode it also asks glibc to trim
its heaps (by default it does not: the next block faults the same pages in again — demo w4a16 GPTQ 43.6 s
without, 48–50 s with, peak RSS 1.21 GB against 1.19 GB; random 2048/5632 Llama, 8 blocks: 102.4 s / 3.00 GB
without, 104.0 s / 2.85 GB with; 2026-12-03, paired runs). On other C libraries there is no trim.

Measured on the demo model (w4a16 g64 rtn, 30 blocks, this 2-core machine): without any of this peak RSS
is 2.0-2.2 GB; with a full gc.collect() per block 1.15 GB at ~0.16 s per block (it walks every live Python
object); with drop_tensors + gc.collect(1) 1.14 GB at a few ms per block.

Within a block, glibc's *dynamic* mmap threshold decides between speed and memory: once a large (mmapped)
chunk is freed the threshold rises to its size (up to 32 MB), and later buffers of that size are carved from the
heap, where freed space is kept and reused without page faults. `large_allocations_returned` pins the
threshold at 4 MB instead, so every weight-sized tensor is its own mapping and returns to the system when freed
(the 2 MB row chunks of the weight maths, numerics.ROW_CHUNK_BYTES, stay on the heap: a 1 MB threshold ran 2.5x
slower), at the price of fresh zeroed pages for every such buffer. It is the `--low-memory` mode
(QuantizeConfig.low_memory); the default keeps glibc's own policy. Measured 2026-12-03 on this 2-core machine,
w4a16 GPTQ (the default for 4-bit): random 2048/5632 Llama, 8 blocks, 16 × 256 tokens: glibc's policy 102 s /
peak 2.86 GB, pinned 4 MB 142 s / 2.41 GB (a 64 MB threshold 101 s / 3.00 GB); the demo model, 32 × 512
tokens: 48.8 s / 1.18 GB against 64.7 s / 1.02 GB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterator


@functools.cache
def _malloc_trim():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


def release_free_memory(trim: bool = True) -> None:
    """Collect the young garbage generations and, with `trim`, return glibc's free heap pages to the system."""
    gc.collect(1)
    malloc_trim = _malloc_trim() if trim else None
    if malloc_trim is not None:
        malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's dynamic threshold stops rising (64-bit)


def _mallopt():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return None


@contextlib.contextmanager
def large_allocations_returned(threshold: int = 4 << 20) -> Iterator[bool]:
    """Inside this block every allocation ≥ `threshold` bytes is its own mmap, returned to the OS when freed,
    instead of heap space glibc keeps for reuse. Yields False where the C library has no mallopt (not glibc).
    Afterwards the threshold is glibc's 32 MB ceiling: a pinned threshold cannot be made dynamic again, and the
    ceiling is where the dynamic one settles in these runs (measured: the same speed as the dynamic policy)."""
    mallopt = _mallopt()
    pinned = mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    try:
        yield pinned
    finally:
        if pinned:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)


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
