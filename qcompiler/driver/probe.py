"""Measuring a block: every weight layer's output before and after the pipeline, on a few calibration windows."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from qcompiler.ir import qmeta
from qcompiler.ir.graph import CONV, LINEAR, is_call, module_path
from qcompiler.ir.records import LayerRecord, Member
from qcompiler.numerics import sqnr_db


def layer_outputs(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run a block, keeping every weight layer's output by module path (fused outputs split), before or after
    lowering."""
    outputs: dict[str, torch.Tensor] = {}

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            rec: LayerRecord | None = n.meta.get(qmeta.RECORD)
            parts = ([Member(m["path"], m["out_features"], m["role"]) for m in n.meta[qmeta.FUSED_FROM]]
                     if rec is None and is_call(n, LINEAR) and qmeta.FUSED_FROM in n.meta
                     else list(rec.members) if rec is not None else None)
            if parts:
                for part, piece in zip(parts, out.split([p.out_features for p in parts], dim=-1), strict=True):
                    outputs[part.path] = piece
            elif is_call(n, {LINEAR, CONV}):
                outputs[n.meta.get(qmeta.PATH) or module_path(n)] = out
            return out

    with torch.no_grad():
        y = Probe(gm).run(*args)
    return y, outputs


def compare_layers(float_gm: fx.GraphModule, gm: fx.GraphModule, args: tuple[torch.Tensor, ...],
                   output_divisors: dict[str, torch.Tensor] | None = None) -> tuple[Any, Any, dict[str, float]]:
    """Run the float and the transformed graph on `args`: (float output, transformed output, SQNR in dB of
    each weight layer's output, by module path). `output_divisors` (PassContext.output_divisors): layers whose
    output channels a pass divided, multiplied back before the comparison."""
    y_float, float_outs = layer_outputs(float_gm, args)
    y_quant, quant_outs = layer_outputs(gm, args)
    divisors = output_divisors or {}
    return y_float, y_quant, {p: sqnr_db(float_outs[p], quant_outs[p] * divisors[p] if p in divisors else quant_outs[p])
                              for p in float_outs.keys() & quant_outs.keys()}


def first_windows(args: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """The first n samples of a block's inputs: every input batched like the hidden states is sliced
    (per-sample masks included); shared inputs (rotary tables with batch 1) are kept."""
    batch = args[0].shape[0]
    return tuple(t[:n] if t.dim() and t.shape[0] == batch else t for t in args)
