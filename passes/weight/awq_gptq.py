"""awq_gptq: AWQ's scales and GPTQ's weights, stage by stage through the block in one paused run per batch.

The stages, statistics, scale search and fold, the division of the paused input by s and the block outputs are
awq_rtn's (passes/weight/awq_rtn.py); only the weights of a stage differ: GPTQ (inverse-Hessian error feedback,
algorithms/gptq.py) on H' = S⁻¹HS⁻¹ of the stage's input, with GPTQ's defaults (act_order, activation-aware grids).
`awq,fuse_linears,gptq` runs the float block once for AWQ's statistics and once more through GPTQ's stages; here one
run serves both, and every group is searched on inputs that carry the earlier stages' error, like GPTQ's own
true-sequential Hessians.

A producer quantized before its group's scales (v, up) takes them on its rows, as in awq_rtn: GPTQ treats rows
independently and is equivariant to a positive row scaling (the row's errors, updates and grid all scale by it), so
diag(s)⁻¹·GPTQ(W) is the quantization of diag(s)⁻¹·W, stored as the same codes with the row's scales divided by s.
A layer with one weight scale per tensor, or fp8 weights, which GPTQ does not fit here, is quantized by RTN with the
activation-aware clip instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.ir.graph import get_tensor
from qcompiler.passes.weight.awq_rtn import AWQRTN
from qcompiler.passes.weight.gptq import check_gptq_options, store_result
from qcompiler.schemes import QuantArgs


@dataclass(frozen=True)
class AWQGPTQ(AWQRTN):
    name = "awq_gptq"
    summary = "AWQ scales and GPTQ weights, stage by stage in one paused run (true-sequential)"
    act_order: bool = True
    damp: float = 0.01
    clip: Literal["minmax", "mse", "awq"] = "awq"
    block_size: int = 128

    def __post_init__(self) -> None:
        check_gptq_options(self.damp, self.block_size)

    def quantize_layer(self, gm: fx.GraphModule, node: fx.Node, weight: str, args: QuantArgs,
                       hessian: tuple[torch.Tensor, int]) -> None:
        if args.granularity == "tensor" or args.is_float:
            super().quantize_layer(gm, node, weight, args, hessian)
            return
        w = get_tensor(gm, weight)
        h, tokens = hessian
        r = gptq_quantize(w, h, args, tokens=tokens, block_size=self.block_size, damp=self.damp,
                          act_order=self.act_order, clip=self.clip)
        store_result(gm, node, weight, w, args, r)
