import pytest
import torch

from qcompiler import numerics as nm
from qcompiler.errors import SchemeError
from qcompiler.schemes import QuantArgs, get_scheme


def test_symmetric_per_channel_error_is_within_half_a_step():
    w = torch.randn(16, 64)
    args = QuantArgs(bits=8)
    s, z = nm.weight_qparams(w, args)
    assert z is None and s.shape == (16, 1)
    q = nm.quantize_weight(w, s, z, args)
    assert int(q.min()) >= -128 and int(q.max()) <= 127
    w_hat = nm.dequantize_weight(q, s, z, 64)
    assert torch.all((w - w_hat).abs() <= s / 2 + 1e-7)


def test_ragged_last_group_is_handled():
    w = torch.randn(8, 70)  # 70 = 2 × 32 + 6
    args = QuantArgs(bits=4, granularity="group", group_size=32)
    s, z = nm.weight_qparams(w, args)
    assert s.shape == (8, 3)
    # the short last group has its own scale from its own 6 columns (|s| = its largest magnitude / 8)
    assert torch.allclose(s[:, 2].abs(), w[:, 64:].abs().amax(dim=1) / 8)
    w_hat = nm.fake_quant_weight(w, args)
    step = nm.expand_groups(s, 32, 70).abs()
    # half a step everywhere but at code +7, the clamp of the far end on the peak's other side (at most a step)
    codes = nm.quantize_weight(w, s, z, args)
    bound = torch.where(codes == 7, step, step / 2)
    assert torch.all((w - w_hat).abs() <= bound + 1e-6)


def test_symmetric_int4_uses_the_full_signed_grid():
    """The 16 levels −8…7 (as onnxruntime, GPTQ/AWQ, compressed-tensors and msModelSlim store them), not −7…7: the
    largest-magnitude weight of each group lands exactly on −8 (scale = peak / −8, negative for a positive peak), so
    every other weight sees steps 8/7 finer than absmax/7 gives."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    args = QuantArgs(bits=4, granularity="group", group_size=32)
    s, z = nm.weight_qparams(w, args)
    q = nm.quantize_weight(w, s, z, args)
    groups = nm.to_groups(w, 32)
    peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(s, peak / -8) and (s < 0).any() and (s > 0).any()
    assert int(q.min()) == -8 and int(q.max()) <= 7
    assert torch.all(nm.to_groups(q.float(), 32).amin(-1) == -8)  # every group's peak is on −8
    # finer steps: the mean squared error drops by about (8/7)² against the 15-level grid
    old = torch.clamp(torch.round(groups / (groups.abs().amax(-1, keepdim=True) / 7)), -7, 7)
    old_err = (groups - old * groups.abs().amax(-1, keepdim=True) / 7).pow(2).mean()
    new_err = (w - nm.fake_quant_weight(w, args)).pow(2).mean()
    assert new_err < old_err / 1.15


def test_asymmetric_represents_zero_exactly_and_uses_unsigned_codes():
    w = torch.rand(4, 32) + 0.5  # all positive: the range is widened to include 0
    w[:, 0] = 0.0
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16)
    s, z = nm.weight_qparams(w, args)
    q = nm.quantize_weight(w, s, z, args)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert torch.all(nm.dequantize_weight(q, s, z, 16)[:, 0] == 0)


def test_mse_clipping_never_worse_than_minmax():
    w = torch.randn(32, 128)
    w[0, 0] = 12.0  # an outlier that min-max would let stretch the whole grid
    args = QuantArgs(bits=4, granularity="group", group_size=64)
    ratio = nm.mse_clip_search(w, args)
    assert ratio.shape == (32, 2) and float(ratio.min()) >= 0.5 and float(ratio.max()) <= 1.0
    err_mse = (w - nm.fake_quant_weight(w, args, ratio)).pow(2).sum()
    err_minmax = (w - nm.fake_quant_weight(w, args)).pow(2).sum()
    assert err_mse < err_minmax


def test_smooth_scales_formula_and_alpha_extremes():
    a = torch.tensor([4.0, 1.0, 0.25])
    wmax = torch.tensor([1.0, 2.0, 4.0])
    s = nm.smooth_scales(a, wmax, 0.5)
    assert torch.allclose(s, (a.sqrt() / wmax.sqrt()))
    assert torch.allclose(nm.smooth_scales(a, wmax, 1.0), a)
    assert torch.allclose(nm.smooth_scales(a, wmax, 0.0), 1 / wmax)


def test_act_qparams_static_symmetric_and_asymmetric():
    args = QuantArgs(bits=8, granularity="tensor")
    s, z = nm.act_qparams_from_range(torch.tensor(-2.0), torch.tensor(1.0), args)
    assert torch.isclose(s, torch.tensor(2.0 / 127)) and z == 0
    a_args = QuantArgs(bits=8, granularity="tensor", symmetric=False)
    s, z = nm.act_qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), a_args)
    assert torch.isclose(s, torch.tensor(4.0 / 255))
    x = torch.tensor([-1.0, 0.0, 3.0])
    x_hat = nm.fake_quant_act_per_tensor(x, s, z, 0, 255)
    assert torch.allclose(x_hat, x, atol=float(s) / 2) and x_hat[1] == 0


def test_sqnr():
    x = torch.randn(1000)
    assert nm.sqnr_db(x, x) == float("inf")
    # noise = 0.1·x -> 20 dB; x·1.1 in fp32 is off by ≤ 2^-24 relative, i.e. ≤ 1e-5 dB here
    assert abs(nm.sqnr_db(x, x * 1.1) - 20.0) < 1e-4


def test_scheme_validation_and_presets():
    assert get_scheme("w4a16").weights.group_size == 128
    assert get_scheme("w4a16", group_size=0).weights.granularity == "channel"
    with pytest.raises(SchemeError, match="unknown scheme"):
        get_scheme("w3a7")
    assert get_scheme("w4a4").activations.bits == 4 and get_scheme("w8a8c8").kv_cache.bits == 8
    assert get_scheme("w16a16s").weights is None and get_scheme("w8a8s").sparsity == "2:4"
    with pytest.raises(SchemeError, match="group_size"):
        QuantArgs(bits=4, granularity="group")
    with pytest.raises(SchemeError, match="bits"):
        QuantArgs(bits=3)


@pytest.mark.parametrize(("tokens", "k", "blocks"), [(64, 576, 4), (33, 130, 4), (20, 7, 3), (10, 5, 8), (8, 96, 1)])
def test_gram_computes_the_upper_blocks_and_mirrors_them(tokens, k, blocks):
    """gram(x) = xᵀx, every block (computed or mirrored) against float64 within float32 rounding of a T-term sum
    (each entry's error ≤ T·ε·Σ_t |x_ti||x_tj|)."""
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(k))
    h = nm.gram(x, blocks)
    exact = x.double().t() @ x.double()
    bound = tokens * torch.finfo(torch.float32).eps * (x.abs().double().t() @ x.abs().double())
    assert h.shape == (k, k) and bool(((h.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("native", [False, True])
def test_int8_matmul_is_exact_with_and_without_int8_dot_products(monkeypatch, native):
    """numerics.int8_matmul: torch._int_mm where the CPU has VNNI / AMX, else float32 GEMMs over slices of K ≤ 1024
    (each partial sum an integer ≤ 2²⁴, exact in float32). Both must give the int64 product exactly, including the
    worst case (every code −128, K = 3000: a sum of 4.9·10⁷, past float32's exact integers if taken in one GEMM)."""
    import qcompiler.numerics as numerics

    monkeypatch.setattr(numerics, "native_int8", lambda: native)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (37, 3000), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (3000, 24), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = -128, -128
    expect = a.long() @ b.long()
    got = numerics.int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), expect)
    assert int(got[0, 0]) == 3000 * 128 * 128
