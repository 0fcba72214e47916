"""The `reference` target: the CPU, through the qc:: ops (torch's int8 GEMM / int4 CPU kernels).

It runs every preset scheme whose weights are int4/int8 and whose activations, when quantized, are int8
with symmetric per-channel int8 weights (what the int8 GEMM epilogue supports) or int4 ones with dynamic
activations (w4a8: int4 codes held in int8), and fp8 (e4m3 weights and
activations, computed by the oracle in float32: numerics, not speed). It fuses linears that share
an input (one GEMM for q/k/v and one for gate/up).
"""

from __future__ import annotations

from collections.abc import Sequence

from qcompiler.passes.lowering.linear_rules import linear_rules
from qcompiler.pm.rewrite import RewriteRule
from qcompiler.schemes import QuantScheme, int_gemm_reason
from qcompiler.targets.base import Target, register_target


@register_target("reference")
class ReferenceTarget(Target):
    description = "pure CPU (torch): qc::linear_woq (int4/int8 weight-only), qc::linear_w8a8 (int8 GEMM)"
    fuse_shared_input_linears = True
    consumer = "qcompiler runtime (torch CPU)"

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        return int_gemm_reason(scheme)  # (fp8 runs in qc::linear_fp8, emulated in float32 on the CPU)

    def lowering_rules(self) -> Sequence[RewriteRule]:
        return linear_rules()
