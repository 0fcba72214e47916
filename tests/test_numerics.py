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
    # the short last group has its own scale from its own 6 columns
    assert torch.allclose(s[:, 2], w[:, 64:].abs().amax(dim=1) / 7)
    w_hat = nm.fake_quant_weight(w, args)
    step = nm.expand_groups(s, 32, 70)
    assert torch.all((w - w_hat).abs() <= step / 2 + 1e-6)


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
