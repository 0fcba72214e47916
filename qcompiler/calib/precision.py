"""The precision of calibration forwards: the runs of calibration data through a block that fill statistics and
propagate to the next block.

"float32": every op in float32 (the oracle's precision).
"bfloat16": the block's GEMMs and attention run in bfloat16 under `torch.autocast` (linear, matmul, sdpa: their inputs
rounded to bfloat16, products accumulated in float32), every other op stays as the graph computes it. The residual
stream stays float32 (a float32 residual plus a bfloat16 branch output is float32), so what is rounded is each
branch's increment, by at most 2⁻⁹ relative: the precision GPU quantizers calibrate in (bfloat16 checkpoints, TF32
Hessians), some 30 dB below a 4-bit weight grid's own error (≈ 25–45 dB block SQNR). On a CPU with bfloat16
hardware (AVX512-BF16, AMX) the block forwards run ≈ 1.8× faster (measured on the demo's blocks).

Statistics are still accumulated in float32 / float64 (`Accumulator.update` casts every value; a Hessian's
per-batch product xᵀx is a bfloat16 GEMM, of x rounded as the layer's own GEMM reads it, its sum rounded to
bfloat16: 4e-4 to 1.2e-3 relative on the demo, well inside the 5e-2 to 0.6 two halves of the calibration set
differ by), a pass's own
arithmetic (GPTQ's solve, AWQ's and SmoothQuant's searches, FlatQuant's training, the per-layer error report)
runs outside these forwards in float32, and the fake-quantization ops compute their grids in float32 whatever
their input's dtype (kernels/ops.py), so only the activations a forward produces carry the rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

CalibPrecision = Literal["float32", "bfloat16"]
CALIB_PRECISIONS: tuple[CalibPrecision, ...] = ("float32", "bfloat16")


@contextlib.contextmanager
def calibration_forward(precision: CalibPrecision) -> Iterator[None]:
    """Run the calibration forwards inside this block at `precision` (see the module docstring)."""
    if precision == "float32":
        yield
    elif precision == "bfloat16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        raise ValueError(f"calibration precision {precision!r}: use one of {', '.join(CALIB_PRECISIONS)}")
