"""The maths of GPTQ, AWQ, activation-aware clipping and the histogram observers, as pure functions."""

import pytest
import torch

from qcompiler.algorithms.awq import (
    activation_aware_clip,
    awq_candidate_scales,
    awq_search_scales,
    output_error,
)
from qcompiler.algorithms.gptq import _quant_column, _quant_column_into, fit_to_quantized_input, gptq_quantize
from qcompiler.calib.observers import hist_kl, hist_minmax, hist_mse, hist_percentile, threshold
from qcompiler.calib.stats import Hist
from qcompiler.errors import CalibrationError
from qcompiler.numerics import (
    dequantize_weight,
    fake_quant_act_per_token,
    fake_quant_weight,
    mse_clip_search,
    quantize_weight,
    weight_qparams,
)
from qcompiler.schemes import QuantArgs

G32 = QuantArgs(bits=4, granularity="group", group_size=32)
ARGS = [
    G32,
    QuantArgs(bits=4, symmetric=False, granularity="group", group_size=32),
    QuantArgs(bits=4, granularity="channel"),
    QuantArgs(bits=8, granularity="channel"),
]


def correlated_inputs(t: int = 2048, k: int = 96, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Low-rank plus noise, with a few salient channels: what LLM activations look like to GPTQ/AWQ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(t, k, generator=g)
    x[:, :3] *= 8.0
    return x


def weight(n: int = 40, k: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def on_grid(w_hat, scale, zero, args, k):
    q = quantize_weight(w_hat, scale, zero, args)
    gs = args.group_size if args.granularity == "group" else k
    assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    return torch.equal(dequantize_weight(q, scale, zero, gs), w_hat)


# ------------------------------------------------------------------------------------------ GPTQ


def test_the_weight_fitted_to_quantized_inputs_turns_their_error_into_gptqs_objective():
    """W* = W·Cᵀ·H̃⁻¹ is the least-squares map from quantized inputs to the float outputs, and for any Ŵ
    ‖XWᵀ − X̃Ŵᵀ‖² = tr((W* − Ŵ)H̃(W* − Ŵ)ᵀ) + ‖XWᵀ − X̃W*ᵀ‖²: the identity GPTQ relies on (exact without damping,
    checked in float64 to its rounding)."""
    x = correlated_inputs().double()
    xq = fake_quant_act_per_token(x, 4)
    w = weight().double()
    h, cross = xq.t() @ xq, xq.t() @ x
    w_star = fit_to_quantized_input(w, h, cross, damp=0.0)
    assert torch.allclose(w_star, torch.linalg.lstsq(xq, x @ w.t()).solution.t(), rtol=1e-6, atol=1e-9)
    floor = float(((x @ w.t() - xq @ w_star.t()) ** 2).sum())
    for seed in range(3):
        w_hat = w + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        d = w_star - w_hat
        total = float(((x @ w.t() - xq @ w_hat.t()) ** 2).sum())
        assert total == pytest.approx(float((d @ h * d).sum()) + floor, rel=1e-9)
    # int4 per-token inputs: the fitted weight maps them closer to the float outputs than W itself
    assert floor < 0.9 * float(((x @ w.t() - xq @ w.t()) ** 2).sum())
    # GPTQ on W* under H̃ beats GPTQ on W under H, measured on what the layer computes: Ŵ·x̃ against W·x
    fitted = gptq_quantize(w_star.float(), h.float(), ARGS[2], tokens=x.shape[0], act_order=True).w_hat.double()
    plain = gptq_quantize(w.float(), (x.t() @ x).float(), ARGS[2], tokens=x.shape[0], act_order=True).w_hat.double()
    err = lambda wq: float(((x @ w.t() - xq @ wq.t()) ** 2).sum())  # noqa: E731
    assert err(fitted) < 0.9 * err(plain)


def test_the_fit_to_quantized_inputs_damps_a_singular_gram():
    x = correlated_inputs(t=64, k=96)  # fewer tokens than channels: H̃ is singular
    xq = fake_quant_act_per_token(x, 8)
    w_star = fit_to_quantized_input(weight(), xq.t() @ xq, xq.t() @ x, damp=0.0)
    assert torch.isfinite(w_star).all() and w_star.shape == weight().shape


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip", ["minmax", "mse", "awq"])
def test_gptq_beats_rtn_on_the_output_error_and_stays_on_its_grid(args, act_order, clip):
    x = correlated_inputs()
    w = weight()
    h = x.T.double() @ x.double()
    r = gptq_quantize(w, h, args, tokens=x.shape[0], act_order=act_order, clip=clip)
    assert r.proxy_loss < 0.5 * r.rtn_proxy_loss  # correlated inputs: GPTQ's error feedback pays off
    # The stored grid reproduces ŵ exactly: the kernels compute what the pass measured (no g_idx needed,
    # even with act_order, because groups stay contiguous in the original column order).
    assert on_grid(r.w_hat, r.scale, r.zero, args, w.shape[1])
    # and the reported loss (from the sweep's errors, ‖E‖² − λ‖Δ‖²) is the real output error on the calibration tokens
    direct = float(((x @ (w - r.w_hat).T) ** 2).sum() / x.shape[0])
    assert r.proxy_loss == pytest.approx(direct, rel=1e-3)


def textbook_gptq(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, damp: float = 0.01) -> torch.Tensor:
    """GPTQ's recurrence column by column, every update applied at once to every later column, in float64, with
    each group's grid fitted (min-max) on the updated columns when the sweep reaches it: no blocks."""
    W = w.double().clone()
    H = h.double().clone()
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    k = W.shape[1]
    gs = args.group_size if args.granularity == "group" else k
    Q = torch.zeros_like(W)
    for j in range(k):
        if j % gs == 0:
            scale, zero = weight_qparams(W[:, j:j + gs].float(), QuantArgs(bits=args.bits, symmetric=args.symmetric,
                                                                            granularity="channel"))
        q = torch.round(W[:, j].float() / scale[:, 0])
        q = torch.clamp(q if zero is None else q + zero[:, 0], args.qmin, args.qmax)
        Q[:, j] = ((q if zero is None else q - zero[:, 0]) * scale[:, 0]).double()
        e = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
    return Q.float()


@pytest.mark.parametrize("args", [*ARGS, QuantArgs(bits=4, granularity="group", group_size=24)],
                         ids=lambda a: a.describe())
@pytest.mark.parametrize("block_size", [32, 128])
def test_gptq_blocked_sweep_is_the_textbook_recurrence(args, block_size):
    """The lazy block updates and the float32 arithmetic reorder the same updates: ŵ is the
    column-by-column recurrence's, up to the few weights whose w/s lands within float32 rounding of a tie (whose
    flip then moves the error feedback a little). (Groups of 24: blocks of 128 become 120, a whole number of groups,
    so each group's grid is fitted on columns that have taken every earlier update.)"""
    x = correlated_inputs()
    w = weight()
    h = x.T.double() @ x.double()
    r = gptq_quantize(w, h, args, tokens=x.shape[0], block_size=block_size)
    ref = textbook_gptq(w, h / x.shape[0], args)
    differ = (~torch.isclose(r.w_hat, ref, rtol=1e-5, atol=1e-7)).float().mean()
    assert differ <= 0.01
    direct = float(((x @ (w - ref).T) ** 2).sum() / x.shape[0])
    assert r.proxy_loss == pytest.approx(direct, rel=0.01)


def test_gptq_with_an_isotropic_hessian_is_round_to_nearest():
    """H = c·I: no correlations to exploit, so every error update is zero and GPTQ reduces to RTN."""
    w = weight()
    for args in (G32, QuantArgs(bits=4, granularity="channel")):
        r = gptq_quantize(w, 5.0 * torch.eye(96, dtype=torch.float64), args, tokens=1, damp=0.0)
        assert torch.equal(r.w_hat, fake_quant_weight(w, args))


def test_gptq_ragged_groups_dead_inputs_and_damping():
    x = correlated_inputs(k=70)
    x[:, 5] = 0.0  # a channel that never fires
    w = weight(k=70)
    h = x.T.double() @ x.double()
    r = gptq_quantize(w, h, G32, tokens=x.shape[0])
    assert r.scale.shape == (40, 3)  # 32 + 32 + 6
    assert torch.all(r.w_hat[:, 5] == 0)
    assert on_grid(r.w_hat, r.scale, r.zero, G32, 70)
    v = torch.randn(70, 1, dtype=torch.float64)
    r2 = gptq_quantize(w, v @ v.T, G32, tokens=1, damp=0.0)  # rank 1: undamped Cholesky fails
    assert r2.damp_used > 0 and torch.isfinite(r2.w_hat).all()
    with pytest.raises(CalibrationError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(70, dtype=torch.float64), G32)


def test_gptq_static_groups_fit_the_original_weights():
    x = correlated_inputs()
    w = weight()
    h = x.T.double() @ x.double()
    r = gptq_quantize(w, h, G32, tokens=x.shape[0], static_groups=True)
    scale, _ = weight_qparams(w, G32)
    torch.testing.assert_close(r.scale, scale)
    lazy = gptq_quantize(w, h, G32, tokens=x.shape[0])
    assert not torch.equal(lazy.scale, scale)  # default: grids fitted on the updated columns


def test_gptq_refuses_bad_input():
    w = weight()
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, torch.eye(95), G32)
    with pytest.raises(ValueError, match="per-tensor"):
        gptq_quantize(w, torch.eye(96), QuantArgs(bits=8, granularity="tensor"))


# ------------------------------------------------------------------------------------------ AWQ


@pytest.mark.parametrize("bf16", [False, True], ids=["float32-scores", "bf16-scores"])
def test_awq_scales_reduce_the_exact_output_error(bf16):
    x = correlated_inputs()
    ws = [weight(seed=2), weight(n=24, seed=3)]
    h = (x.T @ x) / x.shape[0]
    r = awq_search_scales(ws, x.abs().mean(0), h, G32, bf16=bf16)
    assert r.alpha is not None and r.loss < 0.9 * r.loss_unscaled
    # the loss is the real output error of the scaled-and-quantized weights on the calibration tokens; a bf16 score
    # is off by at most 3u·⟨|H|, |Δ|ᵀ|Δ|⟩ (u = 2⁻⁸: Δ and the Gram rounded once each, float32 sums)
    deltas = [w - fake_quant_weight(w * r.scales, G32) / r.scales for w in ws]
    direct = sum(float(((x @ d.T) ** 2).sum()) / x.shape[0] for d in deltas)
    bound = 3 * 2**-8 * sum(float((d.abs().T @ d.abs() * h.abs()).sum()) for d in deltas) if bf16 else 0.0
    assert abs(r.loss - direct) <= 1e-3 * direct + bound


def _awq_error_and_bound(ws: list[torch.Tensor], h: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    """The exact Σ tr(ΔHΔᵀ) at scales s (float64), and the bf16 scores' rounding bound 3u·Σ⟨|H|, |Δ|ᵀ|Δ|⟩ there."""
    ds = [(w - fake_quant_weight(w * s, G32) / s).double() for w in ws]
    hd = h.double()
    return (sum(float((d @ hd * d).sum()) for d in ds),
            3 * 2**-8 * sum(float((d.abs().T @ d.abs() * hd.abs()).sum()) for d in ds))


def test_awq_bf16_scores_pick_scales_within_their_rounding_of_the_float32_search():
    """Scored in bf16, the chosen scales' exact error is within twice the scores' rounding bound of the float32
    search's choice (a swap can only happen between candidates that close); on these seeded inputs the same α."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(512, 128, generator=g) * (1 + 10 * (torch.rand(128, generator=g) > 0.95))
        ws, h = [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)], x.T @ x / 512
        exact, low = (awq_search_scales(ws, x.abs().mean(0), h, G32, bf16=b) for b in (False, True))
        (e32, b32), (e16, b16) = (_awq_error_and_bound(ws, h, r.scales) for r in (exact, low))
        assert e16 <= e32 + b32 + b16
        assert low.alpha == exact.alpha


def test_awq_coarse_to_fine_search_finds_the_exhaustive_grids_choice():
    """Every 4th α, then the points around the best: on inputs with outlier channels (seeded) the same α and loss as
    trying all 20 — in at most 5 + 6 = 11 products; a grid without a coarse point's neighbours (coarse_step = 1) is
    the exhaustive search."""
    from unittest import mock

    import qcompiler.algorithms.awq as awq

    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(512, 128, generator=g) * (1 + 10 * (torch.rand(128, generator=g) > 0.95))
        ws, h = [torch.randn(64, 128, generator=g)], x.T @ x / 512
        with mock.patch.object(awq, "output_error", wraps=awq.output_error) as counted:
            fast = awq_search_scales(ws, x.abs().mean(0), h, G32, coarse_step=4)
            calls = counted.call_count
        full = awq_search_scales(ws, x.abs().mean(0), h, G32, coarse_step=1)
        assert (fast.alpha, fast.loss) == (full.alpha, full.loss) and calls <= 1 + 11


def test_awq_keeps_unit_scales_when_no_candidate_helps():
    w = torch.zeros(8, 64)
    w[:, ::2] = 0.5  # already on every grid: any scaling can only add error
    r = awq_search_scales([w], torch.ones(64), torch.eye(64), G32)
    assert r.alpha is None and torch.equal(r.scales, torch.ones(64))


def test_awq_candidate_scales_are_normalised():
    s = awq_candidate_scales(torch.rand(50) + 0.1, torch.rand(50) + 0.1, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5) and bool((s > 0).all())


def test_activation_aware_clip_minimises_each_groups_output_error():
    x = correlated_inputs(k=70)
    w = weight(k=70)
    h = (x.T @ x) / x.shape[0]
    ratio = activation_aware_clip(w, h, G32)
    assert ratio.shape == (40, 3) and bool(((ratio >= 0.5) & (ratio <= 1.0)).all())
    clipped = fake_quant_weight(w, G32, ratio)
    assert output_error(w, clipped, h) < output_error(w, fake_quant_weight(w, G32), h)
    # with H = I the criterion is the weight MSE: the same choice as the MSE search
    assert torch.equal(activation_aware_clip(w, torch.eye(70), G32), mse_clip_search(w, G32))


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, symmetric=True, granularity="group", group_size=64),
    QuantArgs(bits=4, symmetric=False, granularity="group", group_size=96),
    QuantArgs(bits=8, symmetric=True, granularity="channel"),
], ids=["int4-sym-g64", "int4-asym-g96", "int8-channel"])
def test_activation_aware_clip_searched_in_row_chunks_equals_the_search_on_the_whole_weight(args):
    """The search runs a few hundred rows at a time in the grouped layout; each group's choice is the ratio of
    least δ H_JJ δᵀ over the same grid as fake-quantizing the whole [N, K] weight at each ratio (K = 1000: the
    last group is short; N = 1200 spans three chunks)."""
    from qcompiler.algorithms.awq import bf16_scores
    from qcompiler.numerics import rows_per_chunk, to_groups

    g = torch.Generator().manual_seed(3)
    n, k = 1200, 1000
    w = torch.randn(n, k, generator=g) * (torch.rand(k, generator=g) + 0.2)
    x = torch.randn(400, k, generator=g) * (torch.rand(k, generator=g) * 3)
    h = x.T @ x / 400
    assert rows_per_chunk(w) < n / 2
    ratio = activation_aware_clip(w, h, args)
    gs = args.group_size or k
    groups = -(-k // gs)
    hp = torch.nn.functional.pad(h, (0, groups * gs - k, 0, groups * gs - k))
    errs, bounds = [], []
    for i in range(21):
        r = 1.0 - 0.5 * i / 20
        d = to_groups(w - fake_quant_weight(w, args, r), gs)  # [N, G, g]
        blocks = [hp[j * gs:(j + 1) * gs, j * gs:(j + 1) * gs] for j in range(groups)]
        errs.append(torch.stack([(d[:, j] @ blocks[j] * d[:, j]).sum(-1) for j in range(groups)], 1))
        bounds.append(torch.stack([(d[:, j].abs() @ blocks[j].abs() * d[:, j].abs()).sum(-1)
                                   for j in range(groups)], 1))
    err = torch.stack(errs)  # [21, N, G]
    chosen = torch.round((1.0 - ratio) / 0.5 * 20).long()  # the grid index of each chosen ratio
    picked = err.gather(0, chosen[None])[0]
    # the chosen ratio's error is the least, to the scores' rounding: float32 sums in another order, or (groups of
    # ≥ 256 on a bf16 CPU) δ, H and δH rounded to bf16, each score off by at most 3u·|δ||H||δ|ᵀ (u = 2⁻⁸), so the
    # pick is within twice that of the least (a loose bound, still well inside the candidates' spread)
    slack = 6 * 2**-8 * torch.stack(bounds).amax(0) if bf16_scores(gs) else 1e-5 * err.min(0).values
    assert bool((picked <= err.min(0).values + slack + 1e-9).all())


# ------------------------------------------------------------------------------------------ SmoothQuant


INT8_TOKEN = QuantArgs(bits=8, granularity="token", dynamic=True)


@pytest.mark.parametrize("weight_args,act_args,int8", [
    (QuantArgs(bits=8), INT8_TOKEN, True),
    (QuantArgs(bits=8, granularity="tensor"), QuantArgs(bits=8, granularity="tensor"), True),
    (QuantArgs(bits=4), INT8_TOKEN, True),
    (QuantArgs(bits=8), QuantArgs(bits=8, granularity="tensor", symmetric=False), False),
    (QuantArgs(bits=4, granularity="group", group_size=32), INT8_TOKEN, False),
], ids=["w8-channel-a8-token", "w8-tensor-a8-static", "w4-channel-a8-token", "a8-asymmetric", "w4-g32"])
def test_smoothquant_product_of_integer_codes_is_the_fake_quantized_product(weight_args, act_args, int8):
    """SmoothQuant's search multiplies Q_a(x)·Q_w(w)ᵀ as σ ⊙ (a·bᵀ) ⊙ ωᵀ over the integer codes (an exact int32 GEMM,
    then two float32 roundings) where both grids allow it; otherwise the fake-quantized operands in float32 (then
    bit-equal to that). Against float64 over the fake-quantized float32 operands, which are themselves rounded
    once: |y − y₆₄| ≤ 2⁻²⁴·(3|y₆₄| + 2·Σ_k|Q_a||Q_w|) elementwise."""
    from unittest import mock

    from qcompiler.algorithms.smoothquant import fake_quant_activations, quantized_product

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 200, generator=g) * (1 + 5 * (torch.rand(200, generator=g) > 0.9).float())
    w = torch.randn(96, 200, generator=g)
    peak = x.abs().amax()
    from qcompiler.numerics import int8_matmul

    with mock.patch("qcompiler.algorithms.smoothquant.int8_matmul", wraps=int8_matmul) as int_mm:
        y = quantized_product(x, w, weight_args, act_args, peak)
    assert int_mm.called == int8
    qa, qw = fake_quant_activations(x, act_args, peak), fake_quant_weight(w, weight_args)
    if not int8:
        assert torch.equal(y, qa @ qw.t())
        return
    y64 = qa.double() @ qw.double().t()
    bound = 2**-24 * (3 * y64.abs() + 2 * qa.double().abs() @ qw.double().abs().t())
    assert bool(((y.double() - y64).abs() <= bound).all())


# ------------------------------------------------------------------------------------------ observers


def heavy_tailed(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:20] *= 40.0
    return x.abs()


def test_histogram_range_growth_merges_bins_without_rebinning():
    x = heavy_tailed()
    h = Hist(torch.zeros(2048, dtype=torch.float64), 0.0)
    small, big = x[20:], x[:20]
    h.add(small)
    h.add(big)  # forces the range to grow by a power of two: old bins merge exactly
    assert float(h.counts.sum()) == x.numel()
    direct = torch.histc(x.double(), bins=2048, min=0.0, max=h.upper)
    moved = float((h.counts - direct).abs().sum())
    assert moved <= 1e-4 * x.numel()  # only values within rounding of a bin edge may differ


def test_observer_thresholds_order_and_bounds():
    x = heavy_tailed()
    h = Hist(torch.zeros(2048, dtype=torch.float64), 0.0)
    h.add(x)
    top = hist_minmax(h)
    assert top >= float(x.max()) and top - float(x.max()) <= h.upper / 2048
    p = hist_percentile(h, 99.9)
    assert p == pytest.approx(float(torch.quantile(x[:100_000], 0.999)), rel=0.1)
    for t in (hist_mse(h, 8), hist_kl(h, 8)):
        assert 0 < t < top  # rare outliers are clipped
    assert hist_kl(h, 8) < hist_mse(h, 8)  # KL clips harder than 8-bit MSE on this tail
    # MSE is what it says: no other threshold on a fine grid has lower expected error
    c = (torch.arange(2048, dtype=torch.float64) + 0.5) * h.upper / 2048

    def err(t):
        return float((h.counts * torch.where(c > t, (c - t) ** 2, (t / 127) ** 2 / 12)).sum())

    best = hist_mse(h, 8)
    # (within 1e-5: hist_mse searches 256 candidates, this grid has 200 others; the error is smooth in t)
    assert all(err(best) <= err(t) * (1 + 1e-5) for t in torch.linspace(top / 200, top, 200).tolist())
    with pytest.raises(ValueError, match="unknown observer"):
        threshold(h, "entropy")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_calibration_refuses_a_non_finite_activation_and_accepts_a_huge_finite_one(bad):
    """One NaN/Inf anywhere in a calibrated value is refused naming its node; values whose sum overflows float32 but
    that are all finite are statistics like any other (the fast check is a sum, the exact one decides)."""
    from torch import fx

    from qcompiler.calib.stats import StatRequest, collect_stats

    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Identity()))
    node = next(n.name for n in gm.graph.nodes if n.op == "call_module")
    requests = [StatRequest(node, "absmax_channel")]
    x = torch.ones(4, 3)
    x[2, 1] = bad
    with pytest.raises(CalibrationError, match=f"node '{node}' produced NaN/Inf"):
        collect_stats(gm, requests, [(x,)])
    huge = torch.full((4, 3), 3e38)
    assert not torch.isfinite(huge.sum())
    assert torch.equal(collect_stats(gm, requests, [(huge,)]).values[requests[0]], torch.full((3,), 3e38))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gptq_sweep_quantizes_each_column_in_place_to_the_same_bits(symmetric):
    """The sweep writes each quantized column into its preallocated row (_quant_column_into): the same operations
    in the same order as the project's fake-quantization (numerics.grouped_fake_quant, one group per row), so the
    same bits; _quant_column (sparsity's sweep) gives them too."""
    from qcompiler.numerics import grouped_fake_quant

    g = torch.Generator().manual_seed(5)
    args = QuantArgs(bits=4, symmetric=symmetric, granularity="channel")
    w = torch.randn(300, generator=g)
    s = torch.rand(300, generator=g) * 0.1 + 0.01
    z = None if symmetric else torch.randint(0, 16, (300,), generator=g).float()
    expect = grouped_fake_quant(w[:, None, None], s[:, None], None if z is None else z[:, None], args).reshape(300)
    out = torch.empty(300)
    assert _quant_column_into(out, w, s, z, args) is out
    assert torch.equal(out, expect)
    assert torch.equal(_quant_column(w, s, z, args), expect)


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
@pytest.mark.parametrize("clip", ["minmax", "awq"])
def test_a_grid_with_a_scale_per_row_is_homogeneous_so_a_quantized_producer_can_take_awqs_scales(args, clip):
    """What awq_rtn relies on: quantizing diag(s)⁻¹·W gives diag(s)⁻¹·Q(W), the same integer codes (and zero points)
    with every row's scales divided by s_i, for min-max and the activation-aware clip (its per-row errors all scale
    by 1/s_i²). Exact for powers of two; for any s > 0 up to float rounding, which may move an element lying within
    an ulp of a rounding boundary (a handful of a 3840-element matrix at most)."""
    from qcompiler.passes.weight.rtn import quantize_rows

    w, x = weight(), correlated_inputs()
    h = (x.T @ x / x.shape[0]).float()
    g = torch.Generator().manual_seed(3)
    scale, zero, w_hat, _ = quantize_rows(w, args, clip, h)
    codes = quantize_weight(w_hat, scale, zero, args)
    for s, exact in ((2.0 ** torch.randint(-3, 4, (w.shape[0],), generator=g).float(), True),
                     (torch.rand(w.shape[0], generator=g) * 4 + 0.25, False)):
        scale_s, zero_s, w_hat_s, _ = quantize_rows(w / s[:, None], args, clip, h)
        codes_s = quantize_weight(w_hat_s, scale_s, zero_s, args)
        if exact:
            assert torch.equal(codes_s, codes) and torch.equal(scale_s, scale / s[:, None])
            assert torch.equal(w_hat_s, w_hat / s[:, None]) and (zero is None or torch.equal(zero_s, zero))
        else:
            assert int((codes_s != codes).sum()) <= 4
            assert torch.allclose(scale_s, scale / s[:, None], rtol=1e-6)
            q = quantize_weight(w_hat / s[:, None], scale / s[:, None], zero, args)
            assert torch.equal(q, codes)  # the divided ŵ is still exactly its codes on the divided grid
