"""The `reference` target: the CPU, through the qc:: ops (torch's int8 GEMM / int4 CPU kernels).

It runs every preset: integer weights with int8 activations (symmetric per-channel int8 weights in the int8
GEMM epilogue, int4 ones — per channel or with group scales — under dynamic per-token activations: w4a8),
int4 × int4 per-token (w4a4), fp8 (e4m3 weights and activations, computed by the oracle in float32: numerics,
not speed), 2:4-sparse weights (stored dense), a quantized KV cache and QuaRot's online Hadamard transform. It
fuses linears that share an input (one GEMM for q/k/v and one for gate/up).
"""

from __future__ import annotations

from qcompiler.targets.base import Target, register_target


@register_target("reference")
class ReferenceTarget(Target):
    description = ("pure CPU (torch): qc::linear_woq (int4/int8 weight-only), qc::linear_w8a8 (int8 GEMM), "
                   "qc::linear_int_dynamic (w4a8 groups, w4a4), qc::linear_fp8, KV-cache and Hadamard ops")
    fuse_shared_input_linears = True
    consumer = "qcompiler runtime (torch CPU)"
    # static w8a8 on the demo, one run (docs/benchmarks.md): SmoothQuant with α searched and o_proj / down_proj
    # smoothed through their producers +3.1 %, rotated (online Hadamards, MSE observer) +8.3 %, the paper's
    # SmoothQuant +93 %: no residual rotation by default (nor its online Hadamards and untied head)
    rotates_static_activations = False
    learned_transforms = True  # (flatquant: qc::kronecker_transform and clipped per-token grids run here)

    # refuses nothing: every feature runs (fp8 in qc::linear_fp8, emulated in float32 on the CPU)
