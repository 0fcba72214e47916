"""Quantization facts attached to FX nodes between passes (node.meta keys), and their records on disk.

After a weight-quantization pass a linear's weight attribute holds the *fake-quantized* float weight
ŵ = (q - z)·s, so the graph stays runnable and later passes see what the kernel will compute; the integer
grid (scale, zero point, args) lives in node.meta[WQ]. Lowering turns that into kernel ops and a RECORD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.schemes import QuantArgs

WQ = "qc.wq"  # WeightQuant on a linear node
ROLE = "qc.role"  # role override (fused linears)
PATH = "qc.path"  # module path override (fused linears)
FUSED_FROM = "qc.fused_from"  # list of {"path", "out_features", "role"}
RECORD = "qc.record"  # dict describing a lowered linear (written to the artefact description)
ACT_FQ = "qc.act_fq"  # on a fake-quant node: {"dynamic": bool, "scale": attr, "zero": attr, ...}
ROTATION = "qc.rotation"  # "hadamard" on a linear whose input passes qc::hadamard_transform; "kronecker" (or
# "hadamard+kronecker") where qc::kronecker_transform follows (FlatQuant)
TRANSFORM = "qc.transform"  # on a linear after flatquant: {"left": attr, "right": attr, "clip_ratio": float}
SPARSE = "qc.sparse"  # on a pruned linear: {"pattern": "2:4", "method": ..., "sparsity": fraction of zeros}
KV_FQ = "qc.kv_fq"  # on a KV-cache fake-quant node: {"kind", "attention", "module", "args", "scale", "zero", ...}


@dataclass
class WeightQuant:
    args: QuantArgs
    scale: torch.Tensor  # [N, G] fp32
    zero: torch.Tensor | None  # [N, G] (asymmetric) or None
    group_size: int  # effective group length along K (K for per-channel)
    weight_sqnr_db: float | None = None  # 10·log10(‖W‖² / ‖W − ŵ‖²) of the weight the pass quantized
