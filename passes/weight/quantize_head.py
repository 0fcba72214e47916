"""quantize_head: round-to-nearest of the output projection (lm_head), which lives outside the decoder blocks.

The head W [V, H] gets a symmetric grid in groups of `group_size` along H — s = max|W_g| · r / (2^(b−1) − 1) per
group, with the range ratio r MSE-searched for 4 bits (as rtn{clip=mse}) and 1 for 8 — and is replaced in the
model by ŵ = round(W / s) · s. A tied embedding is the same matrix, so it reads ŵ too (as the ONNX decoder's
GatherBlockQuantized reads the head's integer table). The codes and scales stay on the head module
(`HEAD_GRID`) for formats that store the head quantized (the ONNX decoder's MatMulNBits); every other format
stores ŵ, the same numbers in float, and our runtime computes exactly what the quantized head computes.

The head is a fifth of a small model's weights and most of its decode time; int8 blocks of 32 cost ~0.1 %
perplexity on the demo model. The onnxruntime target adds this pass by default (`lm_head_bits`, 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompiler.calib.stats import Stats
from qcompiler.errors import PassError
from qcompiler.ir.records import HEAD_GRID, HeadGrid
from qcompiler.numerics import dequantize_weight, mse_clip_search, quantize_weight, weight_qparams
from qcompiler.pm.base import Pass, PassContext, PassResult
from qcompiler.schemes import QuantArgs


def quantize_head_weight(w: torch.Tensor, args: QuantArgs) -> tuple[HeadGrid, torch.Tensor]:
    """(grid, ŵ) of a head weight [V, H] on a symmetric group grid (4-bit ranges MSE-clipped)."""
    w = w.detach().float()
    scale, _ = weight_qparams(w, args, mse_clip_search(w, args) if args.bits == 4 else 1.0)
    codes = quantize_weight(w, scale, None, args)
    return HeadGrid(args, codes, scale), dequantize_weight(codes, scale, None, args.group_size or w.shape[1])


@dataclass(frozen=True)
class QuantizeHead(Pass):
    name = "quantize_head"
    summary = "RTN of the output projection (lm_head) on symmetric groups; a tied embedding reads the same ŵ"
    quantizes_weights = True
    bits: int = 8
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.group_size <= 0:
            raise ValueError(f"quantize_head takes bits 4 or 8 and a positive group size, got {self.bits}, "
                             f"{self.group_size}")

    def uses_calibration(self) -> bool:
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        return PassResult(gm, False)  # (the head is outside the blocks: transform_outer)

    def transform_outer(self, model: torch.nn.Module) -> dict[str, Any]:
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise PassError("quantize_head: the model needs an output projection without bias")
        args = QuantArgs(bits=self.bits, symmetric=True, granularity="group", group_size=self.group_size)
        grid, w_hat = quantize_head_weight(head.weight, args)
        with torch.no_grad():  # (in place: a tied embedding is the same parameter and reads ŵ too)
            head.weight.copy_(w_hat.to(head.weight.dtype))
        setattr(head, HEAD_GRID, grid)
        return {"bits": self.bits, "group_size": self.group_size}
