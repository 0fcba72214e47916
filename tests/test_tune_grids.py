"""tune_grids: per-output-channel scale gains and learned activation clips fitted on the block's output after the
weight quantizer — the codes unchanged, the block's error lower, the grids the lowering writes, the refusals."""

import copy

import pytest
import torch
from blocks import context, rel_err, run, traced_block

from qcompiler.algorithms.tune_grids import TunedLayer, tune_block_grids
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, get_tensor, is_call
from qcompiler.numerics import quantize_weight
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline


def _apply(gm, ctx, text):
    return PassManager(parse_pipeline(text)).run(gm, ctx)


def _codes(gm):
    out = {}
    for n in gm.graph.nodes:
        if is_call(n, LINEAR) and qmeta.WQ in n.meta:
            wq = n.meta[qmeta.WQ]
            out[n.name] = quantize_weight(get_tensor(gm, str(n.args[1].target)), wq.scale, wq.zero, wq.args)
    return out


@pytest.mark.parametrize("scheme", ["w4a4", "w4a16"])
def test_tune_grids_lowers_the_blocks_error_and_keeps_every_code(tiny_llama, scheme):
    gm, inputs = traced_block(tiny_llama, seq=32, n_batches=2)
    front = "rotate,fuse_linears,flatquant{steps=10}," if scheme == "w4a4" else "fuse_linears,"
    ctx = context(inputs, scheme)
    gm = _apply(gm, ctx, front.rstrip(","))
    ref = run(gm, inputs)  # (the float block, in the basis the float-exact passes left)
    plain_ctx, tuned_ctx = context(inputs, scheme), context(inputs, scheme)
    plain = _apply(copy.deepcopy(gm), plain_ctx, "rtn,act_quant")
    tuned = _apply(copy.deepcopy(gm), tuned_ctx, "rtn,tune_grids{steps=40},act_quant")
    rep = tuned_ctx.report["tune_grids"]
    assert rep["block_mse"]["loss_end"] < rep["block_mse"]["loss_start"]
    assert rel_err(run(tuned, inputs), ref) < rel_err(run(plain, inputs), ref)
    # the integer codes are the quantizer's; only the scales moved (by the reported gains)
    before, after = _codes(plain), _codes(tuned)
    assert before.keys() == after.keys() and len(before) == 4
    assert all(torch.equal(before[k], after[k]) for k in before)
    lo, hi = rep["gain_range"]
    assert lo < 1.0 < hi
    if scheme == "w4a4":  # FlatQuant's clips re-fitted and written where act_quant reads them
        clips = [n.args[2] for n in tuned.graph.nodes if n.target == torch.ops.qc.fake_quant_act_per_token.default]
        assert sorted(round(c, 4) for c in clips) == sorted(rep["clips"].values()) and len(clips) == 4
    else:
        assert "clips" not in rep
    # the lowered block computes what the fake-quantized one measured
    lowered = _apply(tuned, tuned_ctx, "lower")
    assert rel_err(run(lowered, inputs), run(tuned, inputs)) < 1e-5


def test_tune_grids_refusals(tiny_llama):
    gm, inputs = traced_block(tiny_llama, seq=16, n_batches=1)
    with pytest.raises(PassError, match="must follow a weight quantizer"):
        _apply(gm, context(inputs, "w4a16"), "tune_grids{steps=2}")
    with pytest.raises(Exception, match="steps"):
        parse_pipeline("tune_grids{steps=-1}")


def test_a_fit_that_does_not_help_is_not_applied():
    """With the targets equal to what the untouched grids already compute, any step can only add error: the
    function hands back unit gains and the starting clips."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)

    class Block(torch.nn.Module):
        def forward(self, x, weight):
            return torch.nn.functional.linear(x, weight)

    gm = torch.fx.symbolic_trace(Block())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    x = torch.randn(4, 16, generator=g)
    targets = [torch.nn.functional.linear(x, w)]
    out = tune_block_grids(gm, [TunedLayer(node.name, w)], [(x, w)], targets, steps=5, lr=0.5)
    assert torch.equal(out.gains[node.name], torch.ones(8)) and out.loss_end == out.loss_start < 1e-10
