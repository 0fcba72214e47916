"""The Triton kernels (kernels/cuda/triton_linear.py) against the oracle, run on the CPU by Triton's interpreter.

The interpreter must be chosen before Triton compiles anything, so the variable is set before the kernels
module is imported. Shapes are small and ragged (M, K, N not multiples of the tiles) because the interpreter
is slow and raggedness is where masks go wrong.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="the `cuda` extra (triton) is not installed")

import torch  # noqa: E402

from qcompiler import numerics as nm  # noqa: E402
from qcompiler.kernels import reference  # noqa: E402
from qcompiler.kernels.cuda import triton_linear  # noqa: E402
from qcompiler.kernels.packing import store_weight_codes  # noqa: E402
from qcompiler.schemes import FP8_E4M3_MAX, QuantArgs  # noqa: E402

M, K, N = 33, 70, 130


def _weights(args: QuantArgs, n: int = N, k: int = K):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    s, z = nm.weight_qparams(w, args)
    q = nm.quantize_weight(w, s, z, args)
    zero = z.to(torch.uint8) if z is not None else None
    return store_weight_codes(q, args.bits, args.symmetric), s.float(), zero, nm.group_size_of(args, k)


@pytest.mark.parametrize(("bits", "symmetric", "group"), [(4, True, 32), (4, False, 48), (8, True, None),
                                                         (8, False, 64), (4, True, None)])
def test_woq_gemm_matches_oracle(bits, symmetric, group):
    args = QuantArgs(bits=bits, symmetric=symmetric, granularity="group" if group else "channel", group_size=group)
    qw, s, z, gs = _weights(args)
    x = torch.randn(3, 11, K)
    bias = torch.randn(N)
    got = triton_linear.linear_woq(x, qw, s, z, bias, bits, gs, K)
    want = reference.linear_woq(x, qw, s, z, bias, bits, gs, K)
    assert got.shape == (3, 11, N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_woq_gemm_a_wrong_zero_point_is_caught():
    """Negative control: the comparison above detects a kernel reading the wrong zero points."""
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=32)
    qw, s, z, gs = _weights(args)
    x = torch.randn(M, K)
    got = triton_linear.linear_woq(x, qw, s, torch.zeros_like(z), None, 4, gs, K)
    assert not torch.allclose(got, reference.linear_woq(x, qw, s, z, None, 4, gs, K), atol=1e-2)


@pytest.mark.parametrize("mode", ["dynamic", "static", "static_zero"])
def test_w8a8_gemm_is_exact_against_oracle(mode):
    qw, s, _, _ = _weights(QuantArgs(bits=8))
    qw = qw.to(torch.int8)
    x = torch.randn(M, K) * 2
    x_scale = None if mode == "dynamic" else torch.tensor(0.03)
    x_zero = torch.tensor(-5.0) if mode == "static_zero" else None
    bias = torch.randn(N)
    got = triton_linear.linear_w8a8(x, qw, s.reshape(-1), x_scale, x_zero, bias)
    want = reference.linear_w8a8(x, qw, s.reshape(-1), x_scale, x_zero, bias)
    # The int32 accumulation is exact in both; only the float epilogue's operation order may differ.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("w_per_channel", "dynamic"), [(True, True), (False, False), (True, False)])
def test_fp8_gemm_matches_oracle(w_per_channel, dynamic):
    torch.manual_seed(1)
    w = torch.randn(N, K)
    sw = (w.abs().amax(dim=1) if w_per_channel else w.abs().amax()) / FP8_E4M3_MAX
    w8 = (w / (sw[:, None] if w_per_channel else sw)).to(torch.float8_e4m3fn)
    x = torch.randn(M, K)
    x_scale = None if dynamic else x.abs().amax() / FP8_E4M3_MAX
    got = triton_linear.linear_fp8(x, w8, sw, x_scale, None)
    want = reference.linear_fp8(x, w8, sw, x_scale, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # and the fp8 linear is a close approximation of the float one (e4m3 has a 3-bit mantissa: ~2^-4)
    assert (want - x @ w.t()).norm() / (x @ w.t()).norm() < 0.06


def test_registered_as_the_cuda_implementation():
    """The qc:: ops dispatch CUDA tensors to these kernels (checked on the dispatcher's table; no GPU here)."""
    for op in ("linear_woq", "linear_w8a8", "linear_fp8"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qc::{op}", "CUDA"), op


@pytest.mark.parametrize(("act_bits", "group"), [(8, 32), (8, 16), (4, 0), (8, 0)])
def test_group_scaled_gemm_matches_oracle(act_bits, group):
    """qc::linear_int_dynamic: int4 codes (held in int8) with group scales (ragged last group: K = 70) or per
    channel, × int8 / int4 per-token activations."""
    g = torch.Generator().manual_seed(1)
    qw = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    n_groups = -(-K // group) if group else 1
    s = torch.rand(N, n_groups, generator=g) / 50 + 1e-3
    x = torch.randn(2, 9, K, generator=g)
    bias = torch.randn(N, generator=g)
    got = triton_linear.linear_int_dynamic(x, qw, s, bias, act_bits, group)
    want = reference.linear_int_dynamic(x, qw, s, bias, act_bits, group)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    wrong = s.clone()
    wrong[:, -1] *= 2  # negative control: the last (ragged) group's scale matters
    assert not torch.allclose(triton_linear.linear_int_dynamic(x, qw, wrong, bias, act_bits, group), want, atol=1e-3)


def test_quantize_rows_is_bit_equal_to_the_oracles_quantizers():
    """One Triton launch per activation tensor: int8 dynamic per token, int8 static with a zero point, int4 per
    token and e4m3 dynamic / static give torch's codes and scales exactly — including ties (x / s = k + ½), values
    that round up into the next e4m3 binade (124.3 → 128), saturation (±448, and int8's −128 with a zero point) and
    e4m3's subnormals."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 300, generator=g) * 3
    x[0, :8] = torch.tensor([0.5, 1.5, -2.5, 127.0, -127.0, 0.0, 1e-9, -3.5]) * (x[0].abs().max() / 127)
    edges = torch.tensor([448.0, -448.0, 124.3, 31.4, 2.0**-7, 2.0**-9 * 1.5, 3e-3, 500.0]).repeat(2, 1)
    for xs, xz in [(None, None), (torch.tensor(0.02), torch.tensor(-7.0)), (torch.tensor(0.02), None)]:
        q, s = triton_linear.quantize_act_w8a8(x, xs, xz)
        q_ref, s_ref = reference.quantize_act_w8a8(x, xs, xz)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q, s = triton_linear.quantize_rows(x, 4)
    assert torch.equal(q, nm.quantize_act_per_token(x, 4)[0]) and torch.equal(s, nm.quantize_act_per_token(x, 4)[1])
    for rows in (x, edges):
        for xs in (None, torch.tensor(1.0), torch.tensor(0.013)):
            q8, s8 = triton_linear.quantize_act_fp8(rows, xs)
            q8_ref, s8_ref = reference.quantize_act_fp8(rows, xs)
            assert torch.equal(q8.float(), q8_ref.float()) and torch.equal(s8, s8_ref)


def test_woq_gemm_in_half_precision_rounds_w_hat_once():
    """Half-precision activations: the tensor-core path computes x · round_half(ŵ)ᵀ with float32 accumulation and
    writes fp16 — within one output rounding (2⁻¹¹ relative) of that product in float32 (a wrong scale or nibble
    would be off by far more), while the float32 oracle (ŵ unrounded) differs by ~2⁻¹² (fp16's rounding of ŵ).
    (fp16 here: the interpreter's bfloat16 casts are not faithful.)"""
    args = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=32)
    qw, s, z, gs = _weights(args, n=96, k=128)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4)).half()
    got = triton_linear.linear_woq(x, qw, s, z, None, 4, gs, 128).float()
    w_half = reference.dequantize(qw, s, z, 4, gs, 128).half().float()
    want = x.float() @ w_half.t()
    torch.testing.assert_close(got, want, rtol=2.0**-10, atol=1e-3)
    oracle = reference.linear_woq(x.float(), qw, s, z, None, 4, gs, 128)
    assert 1e-5 < float((want - oracle).norm() / oracle.norm()) < 2e-3


@pytest.mark.parametrize(("bits", "symmetric", "group"), [(4, True, 32), (4, False, 48), (8, True, None)])
def test_dequantize_kernel_is_the_oracles_w_hat_rounded_once(bits, symmetric, group):
    """The dequantize + cuBLAS path's prologue: ŵ in float32 exactly as reference.dequantize, then one rounding."""
    args = QuantArgs(bits=bits, symmetric=symmetric, granularity="group" if group else "channel", group_size=group)
    qw, s, z, gs = _weights(args, n=40, k=300)
    for dtype in (torch.float32, torch.float16):
        got = triton_linear.dequantize(qw, s, z, bits, gs, 300, dtype)
        assert torch.equal(got, reference.dequantize(qw, s, z, bits, gs, 300).to(dtype))


def test_woq_gemv_split_k_adds_the_bias_once():
    """Decode sizes (M ≤ 16) take the split-K GEMV: partial sums over interleaved K tiles added into a float32
    buffer (two splits under the interpreter) — the bias only by the first split."""
    args = QuantArgs(bits=4, symmetric=True, granularity="group", group_size=32)
    qw, s, z, gs = _weights(args)
    x = torch.randn(1, 4, K, generator=torch.Generator().manual_seed(8))
    bias = torch.randn(N, generator=torch.Generator().manual_seed(9))
    got = triton_linear.linear_woq(x, qw, s, z, bias, 4, gs, K)
    torch.testing.assert_close(got, reference.linear_woq(x, qw, s, z, bias, 4, gs, K), rtol=1e-5, atol=1e-4)
