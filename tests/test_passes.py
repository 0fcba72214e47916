"""Each pass three ways: graph structure after it, numerics against the reference, and a negative case."""

import pytest
import torch
from blocks import context, rel_err, run, traced_block

import qcompiler.kernels  # noqa: F401
from qcompiler.calib.stats import collect_stats
from qcompiler.errors import PassError
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import analyze_block
from qcompiler.ir.graph import LINEAR, get_tensor, is_call, linear_nodes
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.schemes import get_scheme

qc = torch.ops.qc


def apply(gm, ctx, text):
    return PassManager(parse_pipeline(text)).run(gm, ctx)


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if is_call(n, target))


# ------------------------------------------------------------------------------------------ fuse_linears


def test_fuse_linears_structure_numerics_and_refusals(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    before = run(gm, inputs)
    ctx = context(inputs)
    gm = apply(gm, ctx, "fuse_linears")
    assert len(linear_nodes(gm)) == 4  # qkv, o, gate_up, down
    assert count(gm, torch.ops.aten.split_with_sizes.default) == 2
    assert ctx.report["fuse_linears"]["fused"] == ["self_attn.qkv_proj", "mlp.gate_up_proj"]
    roles = sorted(li.role for li in analyze_block(gm).linears.values())
    assert roles == ["down", "gate_up", "o", "qkv"]
    torch.testing.assert_close(run(gm, inputs), before, rtol=1e-5, atol=1e-5)

    # members quantized on one grid fuse (their scales stacked: tests/test_algorithm_passes.py); members quantized on
    # different grids are refused with the reason
    from qcompiler.schemes import get_scheme, parse_override

    gm2, inputs2 = traced_block(tiny_llama)
    ctx2 = context(inputs2, get_scheme("w4a16", group_size=32).with_overrides([parse_override("q=w8a16")]))
    gm2 = apply(gm2, ctx2, "rtn,fuse_linears{force=true}")
    rejected = ctx2.report["fuse_linears"]["rejected"]
    assert len(linear_nodes(gm2)) == 6 and ctx2.report["fuse_linears"]["fused"] == ["mlp.gate_up_proj"]
    assert len(rejected) == 1 and all("quantized on different grids" in r for r in rejected.values()), rejected


def test_fuse_linears_skipped_when_the_target_does_not_fuse(tiny_llama):
    from qcompiler.targets.reference import ReferenceTarget

    class NoFuse(ReferenceTarget):
        fuse_shared_input_linears = False

    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs)
    ctx.target = NoFuse()
    gm = apply(gm, ctx, "fuse_linears")
    assert len(linear_nodes(gm)) == 7
    assert "does not fuse" in ctx.report["fuse_linears"]["skipped"]


# ------------------------------------------------------------------------------------------ smoothing / folding


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_smoothquant_leaves_the_float_block_unchanged(tiny_models, family):
    gm, inputs = traced_block(tiny_models[family])
    before = run(gm, inputs)
    norms_before = {g.weight: get_tensor(gm, g.weight).clone() for g in analyze_block(gm).norm_groups}
    ctx = context(inputs, "w8a8")
    gm = apply(gm, ctx, "smoothquant{alpha=0.5,producers=false}")
    assert sorted(ctx.report["smoothquant"]["smoothed"]) == sorted(norms_before)
    assert all(not torch.equal(get_tensor(gm, k), v) for k, v in norms_before.items())
    assert len(linear_nodes(gm)) == 7  # weights change, the structure does not
    # X·diag(s)⁻¹ · (W·diag(s))ᵀ = X·Wᵀ: equal up to fp32 rounding of the rescaling (a few ulp per product)
    assert rel_err(run(gm, inputs), before) < 1e-5


def test_smoothquant_flattens_activation_outliers(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    groups = analyze_block(gm).norm_groups
    from qcompiler.calib.stats import StatRequest

    reqs = [StatRequest(g.mul_node, "absmax_channel") for g in groups]
    before = collect_stats(gm, reqs, inputs)
    gm = apply(gm, context(inputs, "w8a8"), "smoothquant{alpha=0.8}")
    after = collect_stats(gm, reqs, inputs)
    for r in reqs:  # max/median channel ratio (how hard per-tensor quantization is) must shrink
        ratio = lambda v: float(v.max() / v.median())  # noqa: E731
        assert ratio(after[r]) < ratio(before[r])


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # (grouped-query attention; qwen2: v has a bias)
def test_smoothquant_producers_fold_into_up_and_v_rows_exactly(tiny_models, family):
    """By default smoothquant also smooths down_proj's input through up's rows and o_proj's input through v's rows, tied
    over the query heads of a kv group; the float block is unchanged and o_proj's input channel maxima flatten."""
    from qcompiler.calib.stats import StatRequest
    from qcompiler.driver.probe import compare_layers
    from qcompiler.ir.producers import row_producers

    gm, inputs = traced_block(tiny_models[family])
    before = run(gm, inputs)
    infos = analyze_block(gm).linears
    found = {infos[rp.consumer].role: rp for rp in row_producers(gm).values()}
    assert set(found) == {"o", "down"}
    assert infos[found["o"].producer].role == "v" and infos[found["down"].producer].role == "up"
    o = found["o"]
    assert o.index is not None and o.rows == infos[o.producer].out_features < infos[o.consumer].in_features
    reqs = [StatRequest(rp.input, "absmax_channel") for rp in found.values()]
    ratio_before = {r.node: float(v.max() / v.median()) for r, v in collect_stats(gm, reqs, inputs).values.items()}
    v_before = get_tensor(gm, infos[o.producer].weight).clone()

    ctx = context(inputs, "w8a8_dynamic")
    float_gm, _ = traced_block(tiny_models[family])
    gm = apply(gm, ctx, "smoothquant{alpha=0.5}")
    report = ctx.report["smoothquant"]
    assert {"self_attn.o_proj", "mlp.down_proj"} <= set(report["smoothed"])
    assert rel_err(run(gm, inputs), before) < 1e-5  # exact folds (fp32 rounding only)
    # the error report compares up and v in the float block's basis: the divisors are recorded and multiplied back
    assert set(ctx.output_divisors) == {infos[o.producer].path, infos[found["down"].producer].path}
    _, _, sqnr = compare_layers(float_gm, gm, inputs[0], ctx.output_divisors)
    _, _, sqnr_unaligned = compare_layers(float_gm, gm, inputs[0])
    assert min(sqnr.values()) > 80  # float against float (fp32 rounding: ~130 dB)
    assert sqnr_unaligned[infos[found["down"].producer].path] < 40
    # v's row r is divided by s_v[r] (its columns also scaled by the norm's s: a common factor s_n[0] in column 0)
    # and o_proj's column c multiplied by s_v[index[c]]: the query heads of a group share their kv channel's divisor
    v_ratio = v_before[:, 0] / get_tensor(gm, infos[o.producer].weight)[:, 0]  # s_v / s_n[0]
    o_ratio = get_tensor(gm, infos[o.consumer].weight)[0] / apply_none(tiny_models[family], o.consumer)[0]  # s_v[idx]
    common = o_ratio / v_ratio[o.index]  # = s_n[0] for every channel
    torch.testing.assert_close(common, common[:1].expand_as(common), rtol=1e-4, atol=0)
    assert float(o_ratio.max() / o_ratio.min()) > 1.01  # (a real per-channel scaling, not a constant)
    after = collect_stats(gm, reqs, inputs)
    for r, v in after.values.items():  # max/median channel ratio (per-token quantization's difficulty) shrinks
        assert float(v.max() / v.median()) < ratio_before[r.node]


def apply_none(model_dir, node):
    """The untouched weight of `node` in a fresh trace of the same block."""
    gm, _ = traced_block(model_dir)
    return get_tensor(gm, analyze_block(gm).linears[node].weight)


def test_smoothquant_alpha_search_minimises_the_quantized_output_error(tiny_llama):
    """Unset α (the default): each input's α is the argmin of E(α) over the coarse-to-fine grid, E computed on the token
    sample with the scheme's grids; α = 0.5 is among the points tried, so the chosen α is never worse than it."""
    from qcompiler.algorithms.smoothquant import search_alpha, smoothing_error
    from qcompiler.calib.stats import StatRequest
    from qcompiler.numerics import smooth_scales

    gm, inputs = traced_block(tiny_llama)
    before = run(gm, inputs)
    group = analyze_block(gm).norm_groups[0]
    infos = analyze_block(gm).linears
    w = torch.cat([get_tensor(gm, infos[lin].weight).float() for lin in group.linears])
    st = collect_stats(gm, [StatRequest(group.mul_node, "absmax_channel"),
                            StatRequest(group.mul_node, "token_sample")], inputs)
    x, amax = st[StatRequest(group.mul_node, "token_sample")], st[StatRequest(group.mul_node, "absmax_channel")]
    tokens = sum(a[0].shape[0] * a[0].shape[1] for a in inputs)
    assert x.shape[1] == w.shape[1] and 8 <= x.shape[0] <= tokens
    scheme = get_scheme("w8a8_dynamic")
    alpha, s, tried = search_alpha(x, w, amax, scheme.weights, scheme.activations)
    assert {0.0, 0.25, 0.5, 0.75, 1.0} <= set(tried) and len(tried) <= 9
    assert tried[alpha] == min(tried.values()) <= tried[0.5]
    ref = x.float() @ w.t()
    by_hand = smoothing_error(x.float(), w, smooth_scales(amax, w.abs().amax(dim=0), alpha), ref,
                              scheme.weights, scheme.activations, amax)
    assert by_hand == pytest.approx(tried[alpha], rel=1e-6)
    torch.testing.assert_close(s, smooth_scales(amax, w.abs().amax(dim=0), alpha))

    unsmoothed = smoothing_error(x.float(), w, torch.ones(w.shape[1]), ref, scheme.weights, scheme.activations, amax)
    assert alpha is not None and tried[alpha] < unsmoothed  # (smoothing this norm's outliers pays)
    # ±1 activations and weights are exact on both int8 grids: nothing to gain, so the input is left alone (α None,
    # unit scales) rather than rescaled
    signs = [torch.sign(torch.randn(*shape, generator=torch.Generator().manual_seed(i)))
             for i, shape in enumerate([(64, 16), (8, 16)])]
    none_alpha, ones, tried_flat = search_alpha(signs[0], signs[1], signs[0].abs().amax(dim=0), scheme.weights,
                                                scheme.activations)
    assert none_alpha is None and torch.equal(ones, torch.ones(16)) and min(tried_flat.values()) == 0.0

    ctx = context(inputs, "w8a8_dynamic")
    gm = apply(gm, ctx, "smoothquant")
    alphas = ctx.report["smoothquant"]["alpha"]
    assert set(alphas) >= {"self_attn.o_proj", "mlp.down_proj"} and alphas[
        "+".join(infos[lin].path for lin in group.linears)] == alpha
    assert rel_err(run(gm, inputs), before) < 1e-5


def test_smoothquant_producers_leave_v_alone_when_the_kv_cache_is_quantized(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, get_scheme("w8a8_dynamic", kv_cache="int8-tensor"))
    apply(gm, ctx, "smoothquant")
    report = ctx.report["smoothquant"]
    assert "KV cache is quantized" in report["producers_skipped"]
    assert "self_attn.o_proj" not in report["smoothed"] and "mlp.down_proj" in report["smoothed"]


def test_statistics_run_can_keep_the_block_outputs(tiny_llama):
    """collect_stats(outputs=True) runs every batch through the whole graph (past the last requested node) and
    returns what the graph returns: --propagate float takes the next block's inputs from the first pass's run."""
    from qcompiler.calib.stats import StatRequest

    gm, inputs = traced_block(tiny_llama)
    reqs = [StatRequest(analyze_block(gm).norm_groups[0].mul_node, "absmax_channel")]  # (an early node)
    stats = collect_stats(gm, reqs, inputs, outputs=True)
    with torch.no_grad():
        expect = [gm(*batch) for batch in inputs]
    assert stats.outputs is not None and len(stats.outputs) == len(inputs)
    for got, want in zip(stats.outputs, expect, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(stats[reqs[0]], collect_stats(gm, reqs, inputs)[reqs[0]])
    assert collect_stats(gm, reqs, inputs).outputs is None


def test_fold_norm_is_exact_and_sets_norm_to_identity(tiny_models):
    for family, identity in (("llama", 1.0), ("gemma", 0.0)):
        gm, inputs = traced_block(tiny_models[family])
        before = run(gm, inputs)
        ctx = context(inputs)
        gm = apply(gm, ctx, "fold_norm")
        for g in analyze_block(gm).norm_groups:
            assert torch.allclose(get_tensor(gm, g.weight), torch.full_like(get_tensor(gm, g.weight), identity))
        assert rel_err(run(gm, inputs), before) < 1e-5


class NormFeedsResidual(torch.nn.Module):
    """A norm whose output also reaches a non-linear consumer: rescaling it would change the model."""

    def __init__(self):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gamma
        return self.proj(h) + h


def test_smoothing_and_folding_refuse_a_norm_with_other_consumers():
    from qcompiler.pm.base import PassContext
    from qcompiler.targets import get_target

    ep = torch.export.export(NormFeedsResidual(), (torch.randn(2, 5, 16),), strict=False)
    gm = ep.module()
    inputs = [(torch.randn(2, 5, 16),)]
    before = run(gm, inputs)
    for text in ("smoothquant", "fold_norm"):
        ctx = PassContext(block="toy", scheme=get_scheme("w8a8"), target=get_target("reference"), calib=inputs)
        gm = apply(gm, ctx, text)
        reasons = list(ctx.report[text]["rejected"].values())
        assert reasons and "also feeds" in reasons[0]
        assert torch.equal(run(gm, inputs), before)


def test_smoothquant_alpha_is_validated():
    from qcompiler.errors import PipelineError

    with pytest.raises(PipelineError, match="alpha"):
        parse_pipeline("smoothquant{alpha=1.5}")


# ------------------------------------------------------------------------------------------ rtn


def test_rtn_puts_every_weight_on_its_grid(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    originals = {li.node: get_tensor(gm, li.weight).clone() for li in analyze_block(gm).linears.values()}
    ctx = context(inputs, get_scheme("w4a16", group_size=32))
    gm = apply(gm, ctx, "rtn")
    nodes = {n.name: n for n in gm.graph.nodes}
    assert ctx.report["rtn"]["quantized"] == 7
    for name, w in originals.items():
        wq = nodes[name].meta[qmeta.WQ]
        w_hat = get_tensor(gm, str(nodes[name].args[1].target))
        step = wq.scale.repeat_interleave(32, dim=1)[:, : w.shape[1]]  # (negative where a group's peak is > 0)
        codes = torch.round(w_hat / step)
        assert torch.allclose(codes * step, w_hat, atol=1e-6) and codes.min() >= -8 and codes.max() <= 7
        # round to nearest: at most half a step, but a step at code 7 (the far end of the peak's other side)
        bound = torch.where(codes == 7, step.abs(), step.abs() / 2)
        assert torch.all((w - w_hat).abs() <= bound + 1e-6)


def test_rtn_respects_the_ignore_list(tiny_llama):
    import dataclasses

    gm, inputs = traced_block(tiny_llama)
    scheme = dataclasses.replace(get_scheme("w8a16"), ignore=("down", "self_attn.o_proj"))
    ctx = context(inputs, scheme)
    gm = apply(gm, ctx, "rtn")
    assert ctx.report["rtn"]["quantized"] == 5
    assert set(ctx.report["rtn"]["skipped"]) == {"mlp.down_proj", "self_attn.o_proj"}


# ------------------------------------------------------------------------------------------ act_quant


def test_act_quant_static_uses_the_observed_range(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w8a8")
    gm = apply(gm, ctx, "fuse_linears,rtn")
    from qcompiler.calib.stats import StatRequest

    x_nodes = {n.name: n.args[0].name for n in linear_nodes(gm)}
    ranges = collect_stats(gm, [StatRequest(x, "minmax") for x in x_nodes.values()], inputs)
    gm = apply(gm, ctx, "act_quant")
    fq = [n for n in gm.graph.nodes if is_call(n, qc.fake_quant_act.default)]
    assert len(fq) == 4 and ctx.report["act_quant"]["inserted"] == 4
    for n in fq:
        lo, hi = ranges[StatRequest(n.args[0].name, "minmax")]
        scale = get_tensor(gm, n.args[1].target)
        torch.testing.assert_close(scale, torch.maximum(-lo, hi) / 127)


def test_act_quant_dynamic_and_weight_only(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w8a8_dynamic")
    gm = apply(gm, ctx, "rtn,act_quant")
    assert count(gm, qc.fake_quant_act_per_token.default) == 7
    gm2, inputs2 = traced_block(tiny_llama)
    ctx2 = context(inputs2, "w8a16")
    gm2 = apply(gm2, ctx2, "rtn,act_quant")
    assert count(gm2, qc.fake_quant_act_per_token.default) + count(gm2, qc.fake_quant_act.default) == 0
    assert "no layer of this block quantizes activations" in ctx2.report["act_quant"]["skipped"]


# ------------------------------------------------------------------------------------------ lower


@pytest.mark.parametrize(
    "scheme,pipeline,op,tol",
    [
        (get_scheme("w4a16", group_size=32), "fuse_linears,rtn", qc.linear_woq.default, 1e-5),
        (get_scheme("w8a16", symmetric=False), "rtn", qc.linear_woq.default, 1e-5),
        (get_scheme("w8a8"), "smoothquant,fuse_linears,rtn,act_quant", qc.linear_w8a8.default, None),
        (get_scheme("w8a8_dynamic"), "fuse_linears,rtn,act_quant", qc.linear_w8a8.default, None),
    ],
)
def test_lowered_block_matches_the_fake_quantized_block(tiny_llama, scheme, pipeline, op, tol):
    gm, inputs = traced_block(tiny_llama)
    exact = run(gm, inputs)
    ctx = context(inputs, scheme)
    gm = apply(gm, ctx, pipeline)
    fake = run(gm, inputs)
    n_linears = len(linear_nodes(gm))
    gm = apply(gm, ctx, "lower")
    assert count(gm, op) == n_linears and not linear_nodes(gm)
    assert count(gm, qc.fake_quant_act.default) + count(gm, qc.fake_quant_act_per_token.default) == 0
    float_weights = [k for k, _ in gm.named_buffers() if k.endswith(".weight") and "norm" not in k]
    assert float_weights == []  # replaced float weights are freed
    lowered = run(gm, inputs)
    if tol is not None:
        # Same integer weights, same scales: only the fp32 summation order differs.
        assert rel_err(lowered, fake) < tol
    else:
        # Activation rounding: fp32-order differences upstream can move an x/s across a rounding boundary
        # (one int8 step). Such flips are rare, so the lowered block must sit far closer to the
        # fake-quantized block than the fake-quantized block sits to float.
        assert rel_err(lowered, fake) < 0.1 * rel_err(fake, exact)


@pytest.mark.parametrize("dynamic", [False, True])
def test_w8a8_kernel_equals_fake_quant_linear_on_the_same_input(dynamic):
    from qcompiler import numerics as nm
    from qcompiler.schemes import QuantArgs

    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(5, 64)
    s, _ = nm.weight_qparams(w, QuantArgs(bits=8))
    q = nm.quantize_weight(w, s, None, QuantArgs(bits=8))
    w_hat = q.float() * s
    if dynamic:
        fake = qc.fake_quant_act_per_token(x, 8) @ w_hat.t()
        y = qc.linear_w8a8(x, q.to(torch.int8), s.reshape(-1), None, None, None)
    else:
        xs = x.abs().max() / 127
        fake = qc.fake_quant_act(x, xs, torch.tensor(0.0), -128, 127) @ w_hat.t()
        y = qc.linear_w8a8(x, q.to(torch.int8), s.reshape(-1), xs, None, None)
    torch.testing.assert_close(y, fake, rtol=1e-5, atol=1e-5)


def test_lower_refuses_asymmetric_int4_weights_with_int8_activations(tiny_llama):
    """(Symmetric int4 groups × int8 per token is w4a8 with group scales: qc::linear_int_dynamic takes it.)"""
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w8a8_dynamic")
    gm = apply(gm, ctx, "rtn{bits=4,group_size=32,symmetric=false},act_quant")
    with pytest.raises(PassError, match="needs symmetric"):
        apply(gm, ctx, "lower")
    assert any(is_call(n, LINEAR) for n in gm.graph.nodes)


def test_pass_manager_dumps_ir_before_and_after(tiny_llama, tmp_path):
    gm, inputs = traced_block(tiny_llama)
    PassManager(parse_pipeline("rtn,lower"), dump_dir=tmp_path).run(gm, context(inputs))
    files = sorted(p.name for p in (tmp_path / "model.layers.0").iterdir())
    assert files == ["00-rtn-after.txt", "00-rtn-before.txt", "01-lower-after.txt", "01-lower-before.txt"]
    assert "qc.linear_woq" in (tmp_path / "model.layers.0" / "01-lower-after.txt").read_text()


def test_act_quant_percentile_observer_clips_below_the_full_range(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w8a8")
    gm_minmax = apply(gm, ctx, "rtn,act_quant")
    full = {n.args[0].name: get_tensor(gm_minmax, n.args[1].target).clone()
            for n in gm_minmax.graph.nodes if is_call(n, qc.fake_quant_act.default)}
    gm2, inputs2 = traced_block(tiny_llama)
    ctx2 = context(inputs2, "w8a8")
    gm2 = apply(gm2, ctx2, "rtn,act_quant{observer=percentile,percentile=99.0}")
    clipped = {n.args[0].name: get_tensor(gm2, n.args[1].target)
               for n in gm2.graph.nodes if is_call(n, qc.fake_quant_act.default)}
    assert set(clipped) == set(full) and len(full) == 4  # distinct linear inputs: qkv, o, gate+up, down
    # the 99th percentile of |x| is below max |x| for every observed input
    assert all(float(clipped[k]) < float(full[k]) for k in full)


@pytest.mark.slow
def test_cpu_prepack_takes_int4_and_symmetric_int8_and_keeps_what_it_cannot_run(tiny_llama):
    from qcompiler.runtime.cpu_prepack import prepack_for_cpu

    cases = [
        (get_scheme("w4a16", group_size=32), {"int4pack": 7, "int8pack": 0, "kept": 0}),
        (get_scheme("w8a16"), {"int4pack": 0, "int8pack": 7, "kept": 0}),
        # negative cases: no CPU kernel for asymmetric int8 or a group that is not a multiple of 32
        (get_scheme("w8a16", symmetric=False), {"int4pack": 0, "int8pack": 0, "kept": 7}),
        (get_scheme("w4a16", group_size=48), {"int4pack": 0, "int8pack": 0, "kept": 7}),
    ]
    for scheme, expected in cases:
        gm, inputs = traced_block(tiny_llama)
        gm = apply(gm, context(inputs, scheme), "rtn,lower")
        exact = run(gm, inputs)
        assert prepack_for_cpu(gm) == expected, scheme.describe()
        assert count(gm, qc.linear_woq.default) == expected["kept"]
        # kept layers stay exact; prepacked ones round activations to bf16 (a few 2^-8 relative)
        assert rel_err(run(gm, inputs), exact) < (1e-6 if expected["kept"] else 3e-2)


def test_quantize_head_structure_numerics_and_refusals(tmp_path):
    """quantize_head: the onnxruntime target adds it (lm_head_bits, default 8); the artefact's head is RTN's ŵ of the
    original, a tied embedding reads the same ŵ, and the ONNX decoder writes the same codes as MatMulNBits."""
    from safetensors.torch import load_file
    from tiny import TEXT, make_tiny_model

    from qcompiler.driver import QuantizeConfig, plan_run, quantize
    from qcompiler.errors import PipelineError
    from qcompiler.ir.records import HEAD_GRID
    from qcompiler.passes.weight.quantize_head import quantize_head_weight
    from qcompiler.runtime import load_quantized
    from qcompiler.schemes import QuantArgs

    model = make_tiny_model(tmp_path / "tied", "llama", head_dim=32, tie_word_embeddings=True)

    def cfg(target: str, **options: str) -> QuantizeConfig:
        return QuantizeConfig(model=model, scheme=get_scheme("w8a16"), out=tmp_path / target, target=target,
                              target_options=options, calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2,
                              progress=False)

    # structure: who adds it
    assert plan_run(cfg("onnxruntime")).pipeline == "fuse_linears,rtn,quantize_head,lower"
    assert plan_run(cfg("onnxruntime", lm_head_bits="4")).pipeline == "fuse_linears,rtn,quantize_head{bits=4},lower"
    assert "quantize_head" not in plan_run(cfg("onnxruntime", lm_head_bits="float")).pipeline
    assert "quantize_head" not in plan_run(cfg("reference")).pipeline
    # numerics: the written head is ŵ of the original head, and the tied embedding is the same matrix
    d = quantize(cfg("onnxruntime"), log=lambda _: None)
    assert d["outer_weights"]["quantize_head"] == {"bits": 8, "group_size": 32}
    original = load_file(str(model / "model.safetensors"))["model.embed_tokens.weight"]
    grid, w_hat = quantize_head_weight(original, QuantArgs(bits=8, granularity="group", group_size=32))
    rest = load_file(str(tmp_path / "onnxruntime" / "rest.safetensors"))
    assert torch.equal(rest["model.embed_tokens.weight"], w_hat) and not torch.equal(w_hat, original)
    assert grid.codes.abs().max() == 127 and torch.equal(grid.codes.float() * grid.scale.repeat_interleave(32, 1), w_hat)
    loaded = load_quantized(tmp_path / "onnxruntime")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and not hasattr(loaded.lm_head, HEAD_GRID)
    # refusals
    with pytest.raises(PipelineError, match="bits 4 or 8"):
        parse_pipeline("quantize_head{bits=3}")
