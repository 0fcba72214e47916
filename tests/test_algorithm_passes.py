"""gptq, awq, rtn{clip=awq} and act_quant observers on a real traced block; mixed precision, the statistics
cache, fallback search, calibration data options and the CLI."""

import json

import pytest
import torch
from blocks import context, rel_err, run, traced_block

import qcompiler.kernels  # noqa: F401
from qcompiler.calib.data import chat_conversations, read_texts, token_stream
from qcompiler.calib.stats import StatsCache
from qcompiler.cli import main
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import CalibrationError, PipelineError, SchemeError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, get_tensor, is_call, set_tensor, tensor_attrs
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline, read_recipe
from qcompiler.schemes import get_scheme, parse_override

W4G32 = get_scheme("w4a16", group_size=32)


def apply(gm, ctx, text):
    return PassManager(parse_pipeline(text)).run(gm, ctx)


def block_error(model, pipeline, scheme=W4G32):
    gm, inputs = traced_block(model, seq=48, n_batches=3)
    ref = run(gm, inputs)
    ctx = context(inputs, scheme)
    gm = apply(gm, ctx, pipeline)
    return rel_err(run(gm, inputs), ref), gm, ctx


# ------------------------------------------------------------------------------------------ gptq


@pytest.mark.slow
def test_gptq_pass_structure_numerics_and_sequential_stages(tiny_llama):
    err_rtn, _, _ = block_error(tiny_llama, "rtn")
    err, gm, ctx = block_error(tiny_llama, "gptq")
    assert err < 0.75 * err_rtn
    linears = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    assert len(linears) == 7 and all(qmeta.WQ in n.meta for n in linears)
    rep = ctx.report["gptq"]
    assert rep["stages"] == 4 and rep["quantized"] == 7  # q/k/v | o | gate/up | down
    assert all(v["output_error_vs_rtn"] < 1.0 for v in rep["layers"].values())
    # lowering turns the GPTQ grid into integer kernels that compute exactly the fake-quantized block
    gm2, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ctx2 = context(inputs, W4G32)
    fq = apply(gm2, ctx2, "gptq")
    expect = run(fq, inputs)
    lowered = apply(fq, ctx2, "lower")
    assert rel_err(run(lowered, inputs), expect) < 1e-5
    assert not any(is_call(n, LINEAR) for n in lowered.graph.nodes)


def test_gptq_hands_the_driver_its_final_outputs_and_a_later_pass_withdraws_them(tiny_llama):
    """GPTQ's staged runs, finished after the last stage, are the block's outputs for the quantized graph: equal bit
    for bit to running the block again (what the driver would otherwise do). A pass after it may change the graph,
    so the manager clears them before every pass."""
    gm, inputs = traced_block(tiny_llama, seq=24, n_batches=2)
    ctx = context(inputs, W4G32)
    gm = apply(gm, ctx, "gptq")
    assert ctx.block_outputs is not None and len(ctx.block_outputs) == len(inputs)
    with torch.no_grad():
        for y, args in zip(ctx.block_outputs, inputs, strict=True):
            assert torch.equal(y, gm(*args))
    gm = apply(gm, ctx, "rtn")
    assert ctx.block_outputs is None
    _, _, one_stage = block_error(tiny_llama, "gptq{true_sequential=false}")
    assert one_stage.block_outputs is None  # (one stage: no staged runs to finish)


def test_int8_per_token_activations_before_gptq_give_the_final_outputs_without_another_forward(tiny_llama):
    """w8a8_dynamic with --algo gptq puts act_quant before GPTQ (it needs no statistics): every linear reads a
    fake-quantized input and is weight-quantized; GPTQ fits each weight on its input before the activation rounding
    (the first stage, which no earlier rounding reaches, gets the very weights of act_quant after GPTQ), its staged
    runs carry the rounding to the later stages, and their finished runs are the final block's outputs bit for bit.
    Static and 4-bit activations keep act_quant after the weights (refusal reason: the plan's condition)."""
    from qcompiler.driver.plan import complete_pipeline, default_pipeline
    from qcompiler.targets import get_target

    def names(scheme: str, algo: str) -> list[str]:
        return [p.name for p in default_pipeline(get_scheme(scheme), get_target("reference"), algo)]

    assert names("w8a8_dynamic", "gptq")[-3:] == ["act_quant", "sq_gptq", "lower"]  # (SmoothQuant inside its stages)
    assert names("w4a8", "gptq")[-3:] == ["act_quant", "gptq", "lower"]  # (int4 weights: no smoothing)
    assert names("w4a8", "awq+gptq")[-3:] == ["act_quant", "gptq", "lower"]
    for scheme, algo in (("w8a8", "gptq"), ("w4a4", "gptq"), ("w8a8_dynamic", "awq")):
        assert names(scheme, algo)[-2:] == ["act_quant", "lower"], (scheme, algo)
    # a user pipeline without act_quant gets it in the same place
    user = parse_pipeline("smoothquant,fuse_linears,gptq")
    assert [p.name for p in complete_pipeline(user, get_scheme("w8a8_dynamic"))][-3:] == ["act_quant", "gptq", "lower"]
    assert [p.name for p in complete_pipeline(user, get_scheme("w8a8"))][-3:] == ["gptq", "act_quant", "lower"]

    scheme = get_scheme("w8a8_dynamic")
    gm, inputs = traced_block(tiny_llama, seq=24, n_batches=2)
    ctx = context(inputs, scheme)
    gm = apply(gm, ctx, "fuse_linears,act_quant,gptq")
    linears = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    assert linears and all(qmeta.WQ in n.meta and qmeta.ACT_FQ in n.args[0].meta for n in linears)
    assert ctx.report["gptq"]["stages"] == 4
    assert ctx.block_outputs is not None
    with torch.no_grad():
        for y, args in zip(ctx.block_outputs, inputs, strict=True):
            assert torch.equal(y, gm(*args))
    after, _ = traced_block(tiny_llama, seq=24, n_batches=2)
    after = apply(after, context(inputs, scheme), "fuse_linears,gptq,act_quant")
    first = [n for n in linears if n.args[0].args[0] is linears[0].args[0].args[0]]  # (the q/k/v stage)
    same = [torch.equal(get_tensor(gm, n.args[1].target), get_tensor(after, n.args[1].target)) for n in linears]
    assert all(same[: len(first)]) and not all(same)  # first stage identical; later stages see the rounding


def test_sq_gptq_smooths_inside_gptqs_stages(tiny_llama):
    """sq_gptq (--algo gptq under int8 per-token activations on int8 weights): SmoothQuant's groups, searched and
    folded at their inputs inside GPTQ's paused runs. The first group sees the float block, so its α is smoothquant's;
    every weight (the producers v and up too, divided after GPTQ quantized them) lies on its stored grid; the finished
    runs are the block's outputs — to float32 rounding without activation quantization, and within a few int8 steps
    with it (the paused value x/s and the graph's act(gate)·(up/s) differ by one rounding, which can move a per-token
    code by one); the block beats SmoothQuant + RTN. sq_rtn, the same with RTN weights, stays in SmoothQuant + RTN's
    class. Refused: true_sequential=false and quantized_input=true."""
    from qcompiler.driver.plan import complete_pipeline

    scheme = get_scheme("w8a8_dynamic")
    err_sq_rtn, _, _ = block_error(tiny_llama, "smoothquant,fuse_linears{force=true},act_quant,rtn", scheme)
    _, _, ctx_sq = block_error(tiny_llama, "smoothquant,act_quant,gptq", scheme)
    _, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    for pipeline, fused, outputs_tol in (("act_quant,sq_gptq", False, 1e-3),
                                         ("fuse_linears{force=true},act_quant,sq_gptq", True, 1e-3),
                                         ("fuse_linears{force=true},sq_gptq", True, 1e-5)):
        err, gm, ctx = block_error(tiny_llama, pipeline, scheme)
        rep = ctx.report["sq_gptq"]
        assert len(rep["smoothquant"]["smoothed"]) == 4 and rep["restarts"] == 0, pipeline  # q/k/v, o, gate/up, down
        if not fused:
            first = "self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"
            assert rep["smoothquant"]["alpha"][first] == ctx_sq.report["smoothquant"]["alpha"][first]
        assert_every_linear_on_its_stored_grid(gm, count=4 if fused else 7)
        if "act_quant" in pipeline:
            assert err < err_sq_rtn, pipeline
        with torch.no_grad():
            for y, args in zip(ctx.block_outputs, inputs, strict=True):
                assert rel_err(y, gm(*args)) < outputs_tol, pipeline
    # sq_rtn (the default --algo rtn there): the same stages with RTN weights, one run, SmoothQuant + RTN's class
    err_sq_rtn_staged, gm, ctx = block_error(tiny_llama, "fuse_linears{force=true},act_quant,sq_rtn", scheme)
    rep = ctx.report["sq_rtn"]
    assert len(rep["smoothquant"]["smoothed"]) == 4 and rep["restarts"] == 0
    assert rep["smoothquant"]["alpha"]["self_attn.qkv_proj"] == ctx_sq.report["smoothquant"]["alpha"][
        "self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"]
    assert_every_linear_on_its_stored_grid(gm, count=4)
    assert err_sq_rtn_staged < 1.25 * err_sq_rtn
    with torch.no_grad():
        for y, args in zip(ctx.block_outputs, inputs, strict=True):
            assert rel_err(y, gm(*args)) < 1e-3
    from qcompiler.driver.plan import default_pipeline
    from qcompiler.targets import get_target

    def names(algo: str, scheme_name: str = "w8a8_dynamic") -> list[str]:
        return [p.name for p in default_pipeline(get_scheme(scheme_name), get_target("reference"), algo)]

    assert names("rtn") == ["fuse_linears", "act_quant", "sq_rtn", "lower"]
    assert names("gptq") == ["fuse_linears", "act_quant", "sq_gptq", "lower"]
    assert names("rtn", "w8a8")[:3] == ["smoothquant", "fuse_linears", "rtn"]  # (static grids: calibrated after)
    user = parse_pipeline("fuse_linears,sq_gptq")  # (a user pipeline gets act_quant before it)
    assert [p.name for p in complete_pipeline(user, scheme)] == ["fuse_linears", "act_quant", "sq_gptq", "lower"]
    for bad, reason in (("sq_gptq{true_sequential=false}", "true_sequential must stay true"),
                        ("sq_gptq{quantized_input=true}", "does not commute"), ("sq_gptq{alpha=2}", "alpha must be"),
                        ("sq_rtn{alpha=-1}", "alpha must be")):
        with pytest.raises(PipelineError, match=reason):
            parse_pipeline(bad)


@pytest.mark.slow
def test_gptq_act_order_and_one_shot_variants(tiny_llama):
    err_rtn, _, _ = block_error(tiny_llama, "rtn")
    for pipeline in ("gptq{act_order=true}", "gptq{true_sequential=false}", "fuse_linears{force=true},gptq",
                     "gptq{clip=mse,damp=0.05}"):
        err, _, ctx = block_error(tiny_llama, pipeline)
        assert err < 0.8 * err_rtn, pipeline
    _, _, ctx = block_error(tiny_llama, "gptq{true_sequential=false}")
    assert ctx.report["gptq"]["stages"] == 1


def test_gptq_negative_cases(tiny_llama):
    with pytest.raises(PipelineError, match="damp"):
        parse_pipeline("gptq{damp=1.5}")
    # already-quantized layers are left alone: gptq after rtn changes nothing
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, W4G32)
    gm = apply(gm, ctx, "rtn")
    before = {n: get_tensor(gm, n).clone() for n, _ in gm.named_buffers()} | {
        n: p.detach().clone() for n, p in gm.named_parameters()}
    gm = apply(gm, ctx, "gptq")
    assert ctx.report["gptq"]["quantized"] == 0
    after = dict(gm.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_gptq_fits_layers_with_per_token_activations_to_their_quantized_inputs(tiny_llama):
    """w4a4: each layer reads x̃ = Q(x) at run time; GPTQ quantizes the weight fitted to x̃ (least squares to the
    float outputs) under H̃ = Σx̃ᵀx̃. Measured on the block as it runs (activations quantized): closer to the float
    block than GPTQ on H alone. Static activations (calibrated after GPTQ) keep H."""
    gm0, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ref = run(gm0, inputs)
    errs = {}
    for fit in (True, False):
        gm, _ = traced_block(tiny_llama, seq=48, n_batches=3)
        ctx = context(inputs, "w4a4")
        gm = apply(gm, ctx, f"gptq{{quantized_input={str(fit).lower()}}},act_quant")
        layers = ctx.report["gptq"]["layers"]
        assert len(layers) == 7 and all(v["quantized_input"] is fit for v in layers.values())
        errs[fit] = rel_err(run(gm, inputs), ref)
    assert errs[True] < 0.85 * errs[False]
    gm, _ = traced_block(tiny_llama, seq=48, n_batches=3)
    ctx = context(inputs, "w8a8")
    apply(gm, ctx, "gptq,act_quant")
    assert not any(v["quantized_input"] for v in ctx.report["gptq"]["layers"].values())


def test_quantized_input_statistics_match_their_definition_and_survive_the_cache(tiny_llama, tmp_path):
    from qcompiler.calib.stats import StatRequest, collect_stats
    from qcompiler.numerics import fake_quant_act_per_token

    gm, inputs = traced_block(tiny_llama, seq=24, n_batches=2)
    node = next(n for n in gm.graph.nodes if is_call(n, LINEAR)).args[0]
    req = StatRequest(node.name, "hessian_quantized", bits=4)
    clipped = StatRequest(node.name, "hessian_quantized", bits=4, clip_ratio=0.7)  # (flatquant's learned clip)
    cache = StatsCache(tmp_path)
    stats = collect_stats(gm, [req, clipped], inputs, cache=cache, calib_digest="d")
    h, cross, tokens = stats[req]
    class Recorder(torch.fx.Interpreter):  # (the node's values, as a plain run computes them)
        value = None

        def run_node(self, n):
            v = super().run_node(n)
            if n is node:
                self.value = v
            return v

    xs = []
    for args in inputs:
        rec = Recorder(gm)
        with torch.no_grad():
            rec.run(*args)
        xs.append(rec.value.reshape(-1, rec.value.shape[-1]).float())
    x = torch.cat(xs)
    xq = fake_quant_act_per_token(x, 4)
    assert tokens == x.shape[0]
    assert torch.allclose(h, (xq.t() @ xq).double(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(cross, (xq.t() @ x).double(), rtol=1e-5, atol=1e-4)
    xc = fake_quant_act_per_token(x, 4, 0.7)
    hc, crossc, _ = stats[clipped]
    assert torch.allclose(hc, (xc.t() @ xc).double(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(crossc, (xc.t() @ x).double(), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(hc, h, rtol=1e-3)  # (the clipped grid is a different statistic)
    stats2 = collect_stats(gm, [req, clipped], inputs, cache=cache, calib_digest="d")
    h2, cross2, tokens2 = stats2[req]
    assert cache.hits == 1 and torch.equal(h2, h) and torch.equal(cross2, cross) and tokens2 == tokens
    assert torch.equal(stats2[clipped][0], hc)


# ------------------------------------------------------------------------------------------ awq


def test_awq_preserves_the_float_block_and_reports_its_groups(tiny_llama):
    gm, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ref = run(gm, inputs)
    ctx = context(inputs, W4G32)
    gm = apply(gm, ctx, "awq")
    assert rel_err(run(gm, inputs), ref) < 1e-5  # a float identity: only quantization will differ
    rep = ctx.report["awq"]
    assert set(rep["groups"]) == {
        "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj", "mlp.gate_proj,mlp.up_proj", "mlp.up_proj->mlp.down_proj"}
    assert all(g["output_error_vs_unscaled"] <= 1.0 for g in rep["groups"].values())
    # tiny llama has GQA (4 heads, 2 kv heads): v -> o cannot trade scales, and says why
    assert "GQA" in rep["skipped"]["self_attn.v_proj->self_attn.o_proj"]


def test_awq_publishes_the_hessians_of_the_graph_it_leaves_and_the_next_pass_reads_them(tiny_llama, monkeypatch):
    """After awq, every quantized linear's input Hessian is known as the rewritten graph computes it (S⁻¹HS⁻¹ for a
    scaled group's input): equal to measuring the rewritten block again, so rtn{clip=awq} runs no calibration
    forward; a pass that changes values (rtn) drops them."""
    from qcompiler.calib import stats as stats_module
    from qcompiler.calib.stats import StatRequest, collect_stats

    gm, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ctx = context(inputs, W4G32)
    gm = apply(gm, ctx, "awq,fuse_linears")
    assert any(g["alpha"] is not None for g in ctx.report["awq"]["groups"].values())  # something was scaled
    known = ctx.known_hessians
    assert len(known) == 4  # q/k/v, o, gate/up and down inputs
    fresh = collect_stats(gm, [StatRequest(n, "hessian") for n in known], inputs)
    for node, (h, tokens) in known.items():
        h2, tokens2 = fresh[StatRequest(node, "hessian")]
        assert tokens == tokens2 and rel_err(h, h2) < 1e-5, node  # (float32 products summed in float64)
    runs = []
    monkeypatch.setattr(stats_module, "collect_stats", lambda *a, **k: runs.append(a[1]) or collect_stats(*a, **k))
    monkeypatch.setattr("qcompiler.pm.base.collect_stats", stats_module.collect_stats)
    apply(gm, ctx, "rtn{clip=awq}")
    assert runs == [[]] and ctx.known_hessians == {}  # nothing left to measure; rtn moved the values


@pytest.mark.slow
def test_awq_with_clipping_and_with_gptq_beats_rtn(tiny_llama):
    err_rtn, _, _ = block_error(tiny_llama, "rtn")
    err_clip, _, _ = block_error(tiny_llama, "rtn{clip=awq}")
    err_awq, _, _ = block_error(tiny_llama, "awq,rtn{clip=awq}")
    err_both, _, _ = block_error(tiny_llama, "awq,gptq")
    # (AWQ's scales then the clip against the clip alone is not ordered on a random tiny block; both beat RTN)
    assert err_clip < err_rtn and err_awq < err_rtn and err_both < err_rtn * 0.75


def test_awq_v_to_o_without_gqa(tiny_models):
    """qwen2's tiny config has as many kv heads as heads... if not, the group is reported as skipped."""
    gm, inputs = traced_block(tiny_models["gemma"], seq=32)
    ref = run(gm, inputs)
    ctx = context(inputs, W4G32)
    gm = apply(gm, ctx, "awq")
    rep = ctx.report["awq"]
    vo = [k for k in list(rep["groups"]) + list(rep["skipped"]) if "->" in k and "o_proj" in k]
    assert vo, rep  # considered either way
    assert rel_err(run(gm, inputs), ref) < 1e-4


def test_awq_skips_float_and_quantized_layers(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, W4G32.with_overrides([parse_override("down=float")]))
    gm = apply(gm, ctx, "awq")
    assert "mlp.up_proj->mlp.down_proj" in ctx.report["awq"]["skipped"]
    gm2, inputs2 = traced_block(tiny_llama)
    ctx2 = context(inputs2, W4G32)
    gm2 = apply(gm2, ctx2, "rtn,awq")
    assert not ctx2.report["awq"]["groups"]


def assert_every_linear_on_its_stored_grid(gm, count: int) -> None:
    """`count` linears, each quantized, whose ŵ is exactly its codes on its stored grid (what the exports write)."""
    from qcompiler.numerics import dequantize_weight, quantize_weight

    linears = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    assert len(linears) == count and all(qmeta.WQ in n.meta for n in linears)
    for n in linears:
        wq, w_hat = n.meta[qmeta.WQ], get_tensor(gm, str(n.args[1].target))
        on_grid = dequantize_weight(quantize_weight(w_hat, wq.scale, wq.zero, wq.args), wq.scale, wq.zero, wq.group_size)
        assert rel_err(on_grid, w_hat) < 1e-6, n.name


def test_awq_rtn_quantizes_stage_by_stage_and_hands_the_driver_its_outputs(tiny_llama):
    """awq_rtn (the default --algo awq on dense weights): every linear quantized; the first group searched on the float
    block exactly as awq's (its stage sees no quantized layer yet), the later ones on the block with the earlier
    layers quantized; the paused runs, their scaled input divided by s, finish as the quantized block's outputs (what
    the driver would run the block again for: equal up to float32 rounding of that division); the producer of a later
    group (up, quantized before its scales were known) still lies exactly on its stored grid, and the block beats
    plain RTN."""
    err_rtn, _, _ = block_error(tiny_llama, "rtn")
    err, gm, ctx = block_error(tiny_llama, "awq_rtn")
    _, _, ctx_awq = block_error(tiny_llama, "awq,rtn{clip=awq}")
    assert err < err_rtn
    rep, rep_awq = ctx.report["awq_rtn"], ctx_awq.report["awq"]
    assert set(rep["groups"]) == set(rep_awq["groups"]) and rep["skipped"] == rep_awq["skipped"]
    first = "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"
    assert rep["groups"][first] == rep_awq["groups"][first]
    assert rep["groups"]["mlp.up_proj->mlp.down_proj"]["alpha"] is not None  # (up's rows were divided after RTN)
    assert rep["quantized"] == 7 and rep["restarts"] == 0
    assert_every_linear_on_its_stored_grid(gm, count=7)
    _, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    assert ctx.block_outputs is not None and len(ctx.block_outputs) == len(inputs)
    with torch.no_grad():
        for y, args in zip(ctx.block_outputs, inputs, strict=True):
            assert rel_err(y, gm(*args)) < 1e-5
    # fusion keeps them (equal values); the plan: dense --algo awq is awq_rtn, 2:4 weights are pruned before RTN
    gm = apply(gm, ctx, "fuse_linears{force=true}")
    assert ctx.block_outputs is not None and ctx.report["fuse_linears"]["fused"]
    from qcompiler.driver.plan import default_pipeline
    from qcompiler.targets import get_target

    def names(scheme: str) -> list[str]:
        return [p.name for p in default_pipeline(get_scheme(scheme), get_target("reference"), "awq")]

    assert names("w4a16") == ["awq_rtn", "fuse_linears", "lower"]
    assert names("w8a8s")[1:5] == ["awq", "fuse_linears", "prune_wanda", "rtn"]


def test_awq_gptq_runs_awqs_stages_with_gptqs_weights(tiny_llama):
    """awq_gptq (--algo awq+gptq on dense weight-only schemes): awq_rtn's stages with GPTQ's weights. The first group is
    searched on the float block exactly as awq's; the block error is GPTQ's class (under 0.75× RTN's, as
    awq,gptq), every weight lies on its stored grid, and the finished runs are the block's outputs. Dynamic int8
    activations keep awq, ..., act_quant, gptq (act_quant goes before GPTQ; refusal reason: the plan's condition)."""
    from qcompiler.driver.plan import default_pipeline
    from qcompiler.targets import get_target

    err_rtn, _, _ = block_error(tiny_llama, "rtn")
    err, gm, ctx = block_error(tiny_llama, "awq_gptq")
    _, _, ctx_awq = block_error(tiny_llama, "awq,gptq")
    assert err < 0.75 * err_rtn
    first = "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"
    assert ctx.report["awq_gptq"]["groups"][first] == ctx_awq.report["awq"]["groups"][first]
    assert_every_linear_on_its_stored_grid(gm, count=7)
    _, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    with torch.no_grad():
        for y, args in zip(ctx.block_outputs, inputs, strict=True):
            assert rel_err(y, gm(*args)) < 1e-5

    def names(scheme: str) -> list[str]:
        return [p.name for p in default_pipeline(get_scheme(scheme), get_target("reference"), "awq+gptq")]

    assert names("w4a16") == ["awq_gptq", "fuse_linears", "lower"]
    assert names("w4a8") == ["awq", "fuse_linears", "act_quant", "gptq", "lower"]
    # GPTQ's options are checked as gptq checks them
    for bad in ("awq_gptq{damp=1.5}", "awq_gptq{block_size=0}"):
        with pytest.raises(PipelineError, match="damp must be in|block_size must be positive"):
            parse_pipeline(bad)


def test_awq_rtn_restarts_its_runs_when_a_held_value_moved(tiny_llama):
    """StagedCollector.divide_value divides a paused value only when no run holds another value the rewrite moved
    (else it changes nothing and says so: the pass restarts the runs on the rewritten graph)."""
    from qcompiler.calib.stats import StagedCollector, StatRequest

    gm, inputs = traced_block(tiny_llama, seq=24, n_batches=2)
    x = next(n for n in gm.graph.nodes if is_call(n, LINEAR)).args[0]
    staged = StagedCollector(gm, inputs)
    staged.collect([StatRequest(x.name, "hessian")])
    held = [dict(run.env) for run in staged.runs]
    width = held[0][x].shape[-1]
    s = torch.linspace(0.5, 2.0, width)
    live = next(n.name for n in held[0] if n is not x and n.op != "get_attr")
    assert not staged.divide_value(x.name, s, {x.name, live})
    assert all(torch.equal(r.env[x], h[x]) for r, h in zip(staged.runs, held, strict=True))
    assert staged.divide_value(x.name, s, {x.name})
    for r, h in zip(staged.runs, held, strict=True):
        assert torch.equal(r.env[x], (h[x].float() / s).to(h[x].dtype))
    staged.restart()
    assert all(not r.env and r.pos == 0 for r in staged.runs)


def test_fuse_linears_joins_members_quantized_on_one_grid_and_refuses_a_mixed_group(tiny_llama):
    """Members quantized on one grid with a scale per group fuse: the fused grid is their scales stacked, and the
    lowered fused block computes the fake-quantized one. A group mixing quantized and float members is refused
    with the reason."""
    from qcompiler.ir.analysis import analyze_block

    gm, inputs = traced_block(tiny_llama, seq=24, n_batches=2)
    ctx = context(inputs, W4G32)
    gm = apply(gm, ctx, "rtn")
    paths = {name: info.path for name, info in analyze_block(gm).linears.items()}
    scales = {paths[n.name]: n.meta[qmeta.WQ].scale for n in gm.graph.nodes if qmeta.WQ in n.meta}
    sqnrs = [n.meta[qmeta.WQ].weight_sqnr_db for n in gm.graph.nodes if paths.get(n.name, "")[-6:] in
             ("q_proj", "k_proj", "v_proj")]
    expect = run(gm, inputs)
    gm = apply(gm, ctx, "fuse_linears{force=true}")
    assert set(ctx.report["fuse_linears"]["fused"]) == {"self_attn.qkv_proj", "mlp.gate_up_proj"}
    qkv = next(n for n in gm.graph.nodes if n.meta.get(qmeta.PATH) == "self_attn.qkv_proj")
    assert torch.equal(qkv.meta[qmeta.WQ].scale, torch.cat([scales[f"self_attn.{p}_proj"] for p in "qkv"]))
    assert len(sqnrs) == 3 and min(sqnrs) <= qkv.meta[qmeta.WQ].weight_sqnr_db <= max(sqnrs)  # (energy-weighted)
    assert rel_err(run(gm, inputs), expect) < 1e-5
    lowered = apply(gm, ctx, "lower")
    assert rel_err(run(lowered, inputs), expect) < 1e-5 and not any(is_call(n, LINEAR) for n in lowered.graph.nodes)
    gm2, inputs2 = traced_block(tiny_llama, seq=24, n_batches=2)
    ctx2 = context(inputs2, W4G32.with_overrides([parse_override("q=float")]))
    apply(gm2, ctx2, "rtn,fuse_linears{force=true}")
    reasons = ctx2.report["fuse_linears"]["rejected"]
    assert any("already quantized and other members are not" in r for r in reasons.values()), reasons


# ------------------------------------------------------------------------------------------ act observers


@pytest.mark.parametrize("observer", ["mse", "kl"])
def test_act_quant_histogram_observers(tiny_llama, observer):
    from qcompiler.calib.observers import threshold
    from qcompiler.calib.stats import StatRequest, collect_stats

    gm, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ctx = context(inputs, get_scheme("w8a8"))
    gm = apply(gm, ctx, "rtn")
    xs = {n.args[0].name for n in gm.graph.nodes if is_call(n, LINEAR)}
    hists = collect_stats(gm, [StatRequest(x, "histogram") for x in xs], inputs)
    gm = apply(gm, ctx, f"act_quant{{observer={observer}}}")
    assert ctx.report["act_quant"]["inserted"] == 7 and ctx.report["act_quant"]["observer"] == observer
    fq = [n for n in gm.graph.nodes if is_call(n, torch.ops.qc.fake_quant_act.default)]
    assert len(fq) == 7
    clipped = 0
    for n in fq:
        h = hists[StatRequest(n.args[0].name, "histogram")]
        t = threshold(h, observer, 8)
        assert float(get_tensor(gm, n.args[1].target)) == pytest.approx(t / 127, rel=1e-6)
        clipped += t < threshold(h, "minmax")
    assert clipped > 0  # these activations have outliers: the search clips some ranges


def test_act_quant_histogram_observer_refuses_asymmetric(tiny_llama):
    from dataclasses import replace

    s = get_scheme("w8a8")
    asym = replace(s, activations=replace(s.activations, symmetric=False))
    gm, inputs = traced_block(tiny_llama)
    with pytest.raises(SchemeError, match="symmetric threshold"):
        apply(gm, context(inputs, asym), "rtn,act_quant{observer=kl}")


# ------------------------------------------------------------------------------------------ mixed precision


def _q(model, out, text, scheme=W4G32, **kw):
    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, calib_texts=[text], num_samples=4, seq_len=48,
                         batch_size=2, progress=False, **kw)
    return quantize(cfg, log=lambda s: None)


def test_per_layer_overrides_by_role_and_name(tiny_llama, tmp_path, calib_text):
    scheme = get_scheme("w8a8").with_overrides(
        [parse_override("down=w4a16"), parse_override("model.layers.1.self_attn.q_proj=float")])
    d = _q(tiny_llama, tmp_path / "o", calib_text, scheme)
    layers = d["layers"]
    for i in (0, 1):
        down = layers[f"model.layers.{i}.mlp.down_proj"]
        assert down["op"] == "linear_woq" and down["weights"]["bits"] == 4 and down["group_size"] == 128
        assert layers[f"model.layers.{i}.mlp.gate_up_proj"]["op"] == "linear_w8a8"
    assert "model.layers.0.self_attn.qkv_proj" in layers  # layer 0 fuses as usual
    assert "model.layers.1.self_attn.q_proj" not in layers  # float, not recorded as quantized
    assert {"model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"} <= set(layers)  # not fused
    rej = d["block_report"]["model.layers.1"]["passes"]["fuse_linears"]["rejected"]
    assert any("different schemes" in r for r in rej.values())
    from qcompiler.runtime import load_quantized

    q = load_quantized(tmp_path / "o")
    assert torch.isfinite(q(torch.randint(3, 250, (1, 20))).logits).all()


def test_override_and_recipe_errors(tmp_path):
    with pytest.raises(SchemeError, match="PATTERN=SCHEME"):
        parse_override("down")
    with pytest.raises(SchemeError, match="unknown scheme"):
        parse_override("down=w3a16")
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - awq\n  - gptq: {act_order: true}\noverrides:\n  down: w8a16\n  'model.layers.0.*': float\n")
    recipe = read_recipe(r)
    assert [p.name for p in recipe.passes] == ["awq", "gptq"] and recipe.passes[1].act_order
    assert [(p, s.name if s else None) for p, s in recipe.overrides] == [("down", "w8a16"), ("model.layers.0.*", None)]
    r.write_text("overrides:\n  down: w9a9\n")
    with pytest.raises(PipelineError, match="override 'down'"):
        read_recipe(r)
    r.write_text("pases: [rtn]\n")
    with pytest.raises(PipelineError, match="unknown keys"):
        read_recipe(r)


# ------------------------------------------------------------------------------------------ statistics cache


@pytest.mark.slow
def test_statistics_cache_skips_recalibration_and_changes_nothing(tiny_llama, tmp_path, calib_text):
    kw = {"passes": parse_pipeline("awq,fuse_linears,gptq"), "stats_cache": tmp_path / "cache", "propagate": "float"}
    d1 = _q(tiny_llama, tmp_path / "a", calib_text, **kw)
    d2 = _q(tiny_llama, tmp_path / "b", calib_text, **kw)
    assert d1["run"]["stats_cache"]["misses"] > 0 and d1["run"]["stats_cache"]["hits"] == 0
    assert d2["run"]["stats_cache"] == {"hits": d1["run"]["stats_cache"]["misses"], "misses": 0}
    for f in ("block-00000.safetensors", "block-00001.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # a different pipeline whose first statistics are the same reuses them, and only them
    d3 = _q(tiny_llama, tmp_path / "c", calib_text, **{**kw, "passes": parse_pipeline("awq,fuse_linears,rtn{clip=awq}")})
    assert d3["run"]["stats_cache"]["hits"] == 2  # awq's, per block
    # (rtn{clip=awq} reads the Hessians awq published for the graph it left: nothing more to measure or cache)
    assert d3["run"]["stats_cache"]["misses"] == 0
    # awq_rtn (--algo awq) caches each stage's statistics: a second run reads every one (its paused runs never
    # start; finishing them computes the block's outputs from its inputs) and writes the same files
    d4 = _q(tiny_llama, tmp_path / "d", calib_text, **{**kw, "passes": None, "algo": "awq"})
    d5 = _q(tiny_llama, tmp_path / "e", calib_text, **{**kw, "passes": None, "algo": "awq"})
    assert d4["pipeline"].startswith("awq_rtn") and d4["run"]["stats_cache"]["misses"] == 8  # 4 stages × 2 blocks
    assert d5["run"]["stats_cache"] == {"hits": 8, "misses": 0}
    for f in ("block-00000.safetensors", "block-00001.safetensors"):
        assert (tmp_path / "d" / f).read_bytes() == (tmp_path / "e" / f).read_bytes()


def test_statistics_cache_key_depends_on_weights_and_inputs(tiny_llama, tmp_path):
    from qcompiler.calib.stats import StatRequest

    gm, inputs = traced_block(tiny_llama)
    cache = StatsCache(tmp_path)
    reqs = [StatRequest(n.name, "absmax_channel") for n in gm.graph.nodes if is_call(n, LINEAR)][:1]
    k1 = cache.key(gm, reqs, "calib-a")
    assert cache.key(gm, reqs, "calib-b") != k1
    name, t = next(iter(tensor_attrs(gm)))
    set_tensor(gm, name, t * 1.01)
    assert cache.key(gm, reqs, "calib-a") != k1


# ------------------------------------------------------------------------------------------ fallback


@pytest.mark.slow
def test_fallback_search_keeps_the_most_sensitive_layers_float(tiny_llama, tmp_path, calib_text):
    from qcompiler.driver.fallback import quantize_with_fallback

    cfg = QuantizeConfig(model=tiny_llama, scheme=get_scheme("w4a16", group_size=0), out=tmp_path / "fb",
                         calib_texts=[calib_text * 3], num_samples=4, seq_len=48, batch_size=2, progress=False)
    d = quantize_with_fallback(cfg, 1e-6, quantize, validation_count=2, max_trials=4, log=lambda s: None)
    fb = d["fallback"]
    trials = {t["float_layers"]: t["increase"] for t in fb["trials"]}
    assert list(trials)[:2] == [0, 1] and trials[0] > 1e-6  # everything quantized misses a 0.0001 % budget
    on_disk = json.loads((tmp_path / "fb" / "qcompiler.json").read_text())
    assert on_disk["fallback"] == fb
    chosen = fb["chosen_float_layers"]
    harm = [s["predicted_nll_increase"] for s in fb["sensitivity"]]
    assert fb["ranking"] == "fisher"
    assert chosen == [s["layer"] for s in fb["sensitivity"]][: len(chosen)] and harm == sorted(harm, reverse=True)
    if fb["met"]:  # the fewest float layers among the trials that met the budget
        assert trials[len(chosen)] <= 1e-6
        assert all(inc > 1e-6 for k, inc in trials.items() if k < len(chosen))
    else:  # an unmet budget is reported, not faked: the search ran out of trials
        assert len(trials) == 4
    assert not set(chosen) & set(on_disk["layers"])  # kept float: not in the quantized layer list
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # trial folders cleaned up
    # a generous budget is met at once with nothing kept float
    d2 = quantize_with_fallback(
        cfg.__class__(**{**cfg.__dict__, "out": tmp_path / "fb2"}), 0.5, quantize, validation_count=2,
        log=lambda s: None)
    assert d2["fallback"]["met"] and d2["fallback"]["chosen_float_layers"] == []


def test_float_fisher_accumulates_each_linears_output_gradient_and_energy(tiny_llama):
    """The hooks' sums equal autograd's on the same window: Σ‖∂NLL/∂y‖² and Σ‖y‖² of a chosen linear, and the
    perplexity equals the no-grad evaluation's."""
    from qcompiler.driver.fallback import float_fisher
    from qcompiler.eval.perplexity import perplexity
    from qcompiler.eval.report import load_float

    model = load_float(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen)
    ppl, stats = float_fisher(model, ids)
    assert ppl == pytest.approx(perplexity(model, ids, "t").perplexity, rel=1e-5)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no weight gradients formed
    name = "model.layers.1.mlp.down_proj"
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, y: captured.append(y))
    grad_sq = out_sq = 0.0
    for window in ids:
        captured.clear()
        logits = model(input_ids=window[None]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum")
        (g,) = torch.autograd.grad(loss, captured[0])
        grad_sq += float(g.square().sum())
        out_sq += float(captured[0].detach().square().sum())
    handle.remove()
    rec = stats[name]
    assert rec.grad_sq == pytest.approx(grad_sq, rel=1e-4) and rec.out_sq == pytest.approx(out_sq, rel=1e-5)
    assert rec.elements == ids.shape[0] * ids.shape[1] * model.config.hidden_size
    assert set(stats) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_layer_sensitivity_ranks_by_predicted_loss_not_sqnr_alone():
    """A 20 dB layer the loss ignores ranks below a 30 dB one it listens to; a layer without statistics gets the
    median weight; an exact layer (SQNR None) never ranks first."""
    from qcompiler.driver.fallback import OutputFisher, layer_sensitivity

    desc = {"layers": {"a": {"output_sqnr_db": {"quiet": 20.0, "loud": 30.0}},
                       "b": {"output_sqnr_db": {"unseen": 35.0, "exact": None}}}}
    fisher = {"quiet": OutputFisher(grad_sq=1.0, out_sq=1.0, elements=1),
              "loud": OutputFisher(grad_sq=10000.0, out_sq=1.0, elements=1),
              "exact": OutputFisher(grad_sq=1e9, out_sq=1.0, elements=1)}
    ranked = layer_sensitivity(desc, fisher)
    assert [r[0] for r in ranked] == ["loud", "unseen", "quiet", "exact"]
    loud = ranked[0][2]
    assert loud == pytest.approx(0.5 * 10000.0 * 1e-3)  # ½ · E[y²] · Σ‖g‖² · 10^(−30/10)
    # the median weight of the measured inexact layers (quiet 0.5, loud 5000 -> 2500.25) times 10^(−3.5)
    assert ranked[1][2] == pytest.approx(2500.25 * 10 ** -3.5)
    assert ranked[3][2] == 0.0
    assert [r[0] for r in layer_sensitivity(desc)][:3] == ["quiet", "loud", "unseen"]  # SQNR order without weights


def test_fallback_refuses_a_bad_budget_and_too_little_text(tiny_llama, tmp_path, calib_text):
    from qcompiler.driver.fallback import quantize_with_fallback

    cfg = QuantizeConfig(model=tiny_llama, scheme=W4G32, out=tmp_path / "x", calib_texts=[calib_text],
                         num_samples=4, seq_len=48, batch_size=2, progress=False)
    with pytest.raises(CalibrationError, match="positive"):
        quantize_with_fallback(cfg, 0.0, quantize)
    with pytest.raises(CalibrationError, match="validation windows"):
        quantize_with_fallback(cfg, 0.01, quantize, validation_count=500)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ calibration data


def test_calibration_jsonl_chat_messages_and_template(tmp_path):
    from tiny import byte_tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = byte_tokenizer()
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                 + "\n" + json.dumps({"text": "plain"}) + "\n")
    samples = read_texts(f)
    assert isinstance(samples[0], list) and samples[1] == "plain"
    assert isinstance(tok, PreTrainedTokenizerFast)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    ids = token_stream(tok, samples)
    assert tok.decode(ids.tolist()).startswith("<user>hi</user><assistant>yo</assistant>")
    convs = chat_conversations("a\n\nb\n\nc\n\nd", chunk_chars=1)
    assert convs == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                     [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]]
    templated = tok.decode(token_stream(tok, ["a\n\nb"], chat_template=True).tolist())
    assert templated.startswith("<user>a\n\nb</user>")  # one chunk: a lone user turn
    tok.chat_template = None
    with pytest.raises(CalibrationError, match="chat template"):
        token_stream(tok, samples)
    f.write_text('{"txt": 1}\n')
    with pytest.raises(CalibrationError, match=r"c.jsonl:1"):
        read_texts(f)


def test_encoding_without_offsets_gives_transformers_ids_and_keeps_stored_truncation():
    """calib.data.encode_texts: the backend's offset-free batch encoder where transformers would call it with nothing
    else set — the same ids as tokenizer(...) — and transformers' own call where tokenizer.json stores a truncation
    (which transformers lifts for an untruncated call and the backend alone would apply)."""
    from tiny import byte_tokenizer

    from qcompiler.calib.data import encode_texts

    tok = byte_tokenizer()
    texts = ["The quick brown fox.", "", "ünïcödé and\nnew lines", "x" * 300]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert encode_texts(tok, texts) == want and tok.backend_tokenizer.truncation is None
    tok.backend_tokenizer.enable_truncation(max_length=8)
    assert encode_texts(tok, texts) == want and len(want[3]) > 8


def test_default_corpus_ids_are_cached_under_the_tokenizers_key_and_checked_when_read(tmp_path, monkeypatch):
    """The default calibration corpus's token ids are kept in the demo's cache folder: read back instead of encoded,
    keyed by the tokenizer's definition (another tokenizer: another entry), and an entry that is not one int32 vector
    of ids below the vocabulary size is encoded again and replaced; an unwritable cache folder is skipped; only with
    cache_ids, which the driver sets for the demo model alone."""
    from unittest import mock

    from tiny import byte_tokenizer

    from qcompiler.calib import data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "default_texts", lambda split: ["The quick brown fox.", "ünïcödé\n\nsecond"])
    tok = byte_tokenizer()
    want = token_stream(tok, data.default_texts("calib"))
    assert torch.equal(data.default_corpus_stream(tok), want)
    (entry,) = (tmp_path / "cache" / "qcompiler" / "calib-tokens").iterdir()
    with mock.patch.object(data, "token_stream", side_effect=AssertionError("encoded again")):
        assert torch.equal(data.default_corpus_stream(tok), want)  # (read from the entry)
    for bad in (b"not a safetensors file", None):
        if bad is None:  # a well-formed file whose ids leave the vocabulary
            from safetensors.torch import save_file
            save_file({"ids": torch.tensor([0, len(tok)], dtype=torch.int32)}, str(entry))
        else:
            entry.write_bytes(bad)
        assert torch.equal(data.default_corpus_stream(tok), want)
        assert torch.equal(data._read_stream(entry, len(tok)).long(), want)  # (replaced)
    other = byte_tokenizer()
    other.backend_tokenizer.enable_truncation(max_length=4)  # (part of the tokenizer's definition)
    data.default_corpus_stream(other)
    assert len(list(entry.parent.iterdir())) == 2
    assert torch.equal(data.calibration_batches(tok, None, 1, 8, 1, cache_ids=True)[0][0], want[:8])
    with mock.patch.object(data, "default_corpus_stream", side_effect=AssertionError("cached")):
        assert torch.equal(data.calibration_batches(tok, None, 1, 8, 1)[0][0], want[:8])  # (without cache_ids)
    # the driver keeps them only for the demo model (its own cache folder): a user's model writes nothing there
    from qcompiler.demo import DEMO_DIRNAME, is_demo_model

    assert is_demo_model(tmp_path / "cache" / "qcompiler" / DEMO_DIRNAME) and not is_demo_model(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(entry))  # (a file: the cache folder cannot be made)
    assert torch.equal(data.default_corpus_stream(tok), want)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_algo_override_and_errors(tiny_llama, tmp_path, calib_text, capsys):
    text = tmp_path / "t.txt"
    text.write_text(calib_text)
    base = ["quant", "--model", str(tiny_llama), "--calib-text", str(text), "--num-samples", "4",
            "--seq-len", "48", "--batch-size", "2", "--no-progress"]
    assert main(base + ["--scheme", "w4a16", "--group-size", "32", "--algo", "awq+gptq", "--override",
                        "down=w8a16", "--out", str(tmp_path / "o")]) == 0
    d = json.loads((tmp_path / "o" / "qcompiler.json").read_text())
    assert d["pipeline"] == "awq_gptq,fuse_linears,lower"  # (AWQ and GPTQ in one staged run)
    assert d["layers"]["model.layers.0.mlp.down_proj"]["weights"]["bits"] == 8
    assert main(base + ["--scheme", "w4a16", "--override", "down", "--out", str(tmp_path / "p")]) == 2
    assert main(base + ["--scheme", "w4a16", "--fallback", "auto", "--max-ppl-increase", "lots",
                        "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "PATTERN=SCHEME" in err and "percentage" in err
    assert not (tmp_path / "p").exists()


def test_staged_collector_equals_fresh_runs_after_weight_changes(tiny_llama):
    """GPTQ's true-sequential stages continue one run per batch; the statistics must equal a fresh run of
    the changed graph, so weights replaced between stages are seen."""
    from qcompiler.calib.stats import StagedCollector, StatRequest, collect_stats

    gm, inputs = traced_block(tiny_llama, n_batches=2)
    lins = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    first = [StatRequest(lins[0].args[0].name, "hessian")]
    last = [StatRequest(lins[-1].args[0].name, "hessian"), StatRequest(lins[-1].args[0].name, "absmax_channel")]
    staged = StagedCollector(gm, inputs)
    a = staged.collect(first)
    torch.testing.assert_close(a[first[0]][0], collect_stats(gm, first, inputs)[first[0]][0])
    for name, t in list(tensor_attrs(gm)):
        if name.endswith("proj.weight"):
            set_tensor(gm, name, t * 0.5)  # every projection changes before the next stage
    b = staged.collect(last)
    fresh = collect_stats(gm, last, inputs)
    torch.testing.assert_close(b[last[0]][0], fresh[last[0]][0])
    torch.testing.assert_close(b[last[1]], fresh[last[1]])
    with pytest.raises(CalibrationError, match="already passed"):
        staged.collect(first)  # stages must come in graph order


def test_override_order_first_match_wins_and_fallback_floats_come_first():
    s = get_scheme("w8a8").with_overrides([parse_override("model.layers.0.*=float"), parse_override("down=w8a16")])
    assert s.for_layer("model.layers.0.mlp.down_proj", "down") is None
    assert s.for_layer("model.layers.1.mlp.down_proj", "down").name == "w8a16"
    assert s.for_layer("model.layers.1.mlp.up_proj", "up") is s
    assert s.for_layer("lm_head", "linear") is None  # the ignore list comes before every override
    fb = s.with_overrides([("model.layers.1.mlp.down_proj", None)], first=True)
    assert fb.for_layer("model.layers.1.mlp.down_proj", "down") is None  # fallback's float beats down=w8a16
