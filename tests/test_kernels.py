from pathlib import Path

import pytest
import torch

import qcompiler.kernels  # noqa: F401
from qcompiler import numerics as nm
from qcompiler.kernels import reference
from qcompiler.kernels.cpu.linear import prepack_int4
from qcompiler.kernels.packing import pack_int4, store_weight_codes, unpack_int4
from qcompiler.schemes import QuantArgs

ROOT = Path(__file__).parent.parent

qc = torch.ops.qc


def _quantized(n, k, args, seed=None):
    w = torch.randn(n, k, generator=None if seed is None else torch.Generator().manual_seed(seed))
    s, z = nm.weight_qparams(w, args)
    q = nm.quantize_weight(w, s, z, args)
    gs = nm.group_size_of(args, k)
    return w, q, s, z, gs


def test_int4_pack_roundtrip_odd_k():
    u = torch.randint(0, 16, (5, 33))
    packed = pack_int4(u)
    assert packed.shape == (5, 17) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 33).long(), u)
    assert int(packed[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)  # low nibble first


def test_linear_woq_int4_ragged_matches_dequantized_matmul():
    args = QuantArgs(bits=4, granularity="group", group_size=32)
    w, q, s, z, gs = _quantized(48, 70, args)
    x = torch.randn(3, 5, 70)
    y = qc.linear_woq(x, store_weight_codes(q, 4, True), s, None, None, 4, gs, 70)
    w_hat = nm.dequantize_weight(q, s, z, gs)
    assert y.shape == (3, 5, 48)
    torch.testing.assert_close(y, x @ w_hat.t(), rtol=1e-5, atol=1e-5)


def test_linear_woq_int8_asymmetric_with_bias():
    args = QuantArgs(bits=8, symmetric=False)
    w, q, s, z, gs = _quantized(20, 40, args)
    x, b = torch.randn(7, 40), torch.randn(20)
    y = qc.linear_woq(x, store_weight_codes(q, 8, False), s, z.to(torch.uint8), b, 8, gs, 40)
    torch.testing.assert_close(y, x @ nm.dequantize_weight(q, s, z, gs).t() + b, rtol=1e-5, atol=1e-5)


def test_linear_w8a8_cpu_is_bit_equal_to_reference():
    args = QuantArgs(bits=8)
    _, q, s, _, _ = _quantized(64, 96, args)
    qw, ws = q.to(torch.int8), s.reshape(-1)
    x = torch.randn(2, 9, 96) * 3
    for x_scale, x_zero in [(None, None), (torch.tensor(0.05), None), (torch.tensor(0.05), torch.tensor(-7.0))]:
        fast = qc.linear_w8a8(x, qw, ws, x_scale, x_zero, None)  # CPU kernel (torch._int_mm)
        ref = reference.linear_w8a8(x, qw, ws, x_scale, x_zero, None)
        assert torch.equal(fast, ref)


def test_linear_w8a8_error_bound_against_float():
    torch.manual_seed(0)
    args = QuantArgs(bits=8)
    w, q, s, _, _ = _quantized(64, 256, args)
    x = torch.randn(16, 256)
    y = qc.linear_w8a8(x, q.to(torch.int8), s.reshape(-1), None, None, None)
    # two int8 roundings (≈ 2^-8 relative each) over a random-sign sum: well under 2 %
    assert float((y - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.02


def test_int4pack_cpu_kernel_matches_reference_within_bf16():
    for sym, group, k in [(True, 64, 128), (False, 32, 70), (True, 128, 576)]:
        args = QuantArgs(bits=4, symmetric=sym, granularity="group", group_size=group)
        _, q, s, z, gs = _quantized(64, k, args)
        stored = store_weight_codes(q, 4, sym)
        zero = None if z is None else z.to(torch.uint8)
        packed, sz, kg, kpad = prepack_int4(stored, s, zero, gs, k)
        x = torch.randn(4, k)
        y = qc.linear_int4pack_cpu(x, packed, sz, None, kg, kpad)
        ref = reference.linear_woq(x.bfloat16().float(), stored, s, zero, None, 4, gs, k)
        # bf16 activations/scales: relative error of a few 2^-8
        assert float((y - ref).norm() / ref.norm()) < 2e-2


def test_int8pack_cpu_kernel():
    args = QuantArgs(bits=8)
    _, q, s, _, _ = _quantized(32, 64, args)
    x = torch.randn(3, 64)
    y = qc.linear_int8pack_cpu(x, q.to(torch.int8), s.reshape(-1), None)
    ref = reference.linear_woq(x, q.to(torch.int8), s, None, None, 8, 64, 64)
    assert float((y - ref).norm() / ref.norm()) < 2e-2


def test_lightning_attention_op_equals_the_token_loop_and_minimax_own_attention():
    """qc.lightning_attention (blocks of 64) computes reference.lightning_attention's token loop: 150 tokens span two
    blocks and a short tail, three heads decay at rates 0.5 … 0.01. Then MiniMax's attention module with its forward
    swapped for the op's (frontends/recurrent.py) equals its own block loop (block_size 16 here, so the two group
    the sum differently). Float32 in another order: relative error ~1e-6; a wrong decay or block carry is O(1)."""
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    from qcompiler.frontends.recurrent import recurrences_as_ops

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 150, 8, generator=g) for _ in range(3))
    slope = torch.tensor([0.5, 0.1, 0.01])
    got, expect = torch.ops.qc.lightning_attention(q, k, v, slope), reference.lightning_attention(q, k, v, slope)
    assert float((got - expect).norm() / expect.norm()) < 1e-5
    cfg = MiniMaxConfig(hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=2, block_size=16,
                        layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    attn = MiniMaxLightningAttention(cfg, layer_idx=0).eval()
    x = torch.randn(2, 70, 32, generator=g)
    with torch.no_grad():
        own, _ = attn(x, None, None)
        with recurrences_as_ops(attn):
            swapped, _ = attn(x, None, None)
    assert float((swapped - own).norm() / own.norm()) < 1e-5
    assert "qc" not in type(attn).forward.__qualname__  # (restored)


def test_gated_delta_rule_op_equals_the_token_by_token_recurrence():
    """The op (transformers' chunk-parallel form, 64 tokens a chunk) computes reference.gated_delta_rule's token
    loop: 70 tokens span two chunks and a padded tail; 2 key heads serve 4 value heads. Both sum the same
    float32 terms in another order: relative error ~1e-6, where a dropped decay or a wrong head mapping is O(1)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 70, 2, 16, generator=g), torch.randn(2, 70, 2, 16, generator=g)
    v = torch.randn(2, 70, 4, 8, generator=g)
    log_decay, beta = -torch.rand(2, 70, 4, generator=g), torch.rand(2, 70, 4, generator=g)
    for l2norm in (True, False):
        got = torch.ops.qc.gated_delta_rule(q, k, v, log_decay, beta, l2norm)
        expect = reference.gated_delta_rule(q, k, v, log_decay, beta, l2norm)
        assert got.shape == v.shape
        assert float((got - expect).norm() / expect.norm()) < 1e-5, l2norm


def test_cuda_dispatch_table_sends_each_shape_to_a_kernel_that_takes_it(monkeypatch):
    """kernels/cuda/table.py: a call goes to its M bucket's kernel (the prior, or the measured table) when that
    kernel can take it — cuBLASLt's int8 GEMM only for M > 16 and K, N multiples of 8, its fp8 GEMM for K, N
    multiples of 16 and half-precision output, tinygemm for bf16 — else to the op's fallback, which takes all."""
    from qcompiler.kernels.cuda import table

    bf16 = torch.bfloat16
    monkeypatch.setattr(table, "measured", lambda: {})  # the prior
    choose = table.choose
    assert choose("linear_w8a8", 1, 4096, 4096, bf16).kernel == "triton"
    assert choose("linear_w8a8", 16, 4096, 4096, bf16).kernel == "triton"
    assert choose("linear_w8a8", 17, 4096, 14336, bf16).kernel == "int_mm"
    assert choose("linear_w8a8", 2048, 4100, 4096, bf16).kernel == "triton"  # (K not a multiple of 8)
    assert choose("linear_fp8", 2048, 4096, 4096, bf16).kernel == "scaled_mm"
    assert choose("linear_fp8", 2048, 4096, 4096, torch.float32).kernel == "triton"
    assert choose("linear_fp8", 2048, 4104, 4096, bf16).kernel == "triton"  # (K not a multiple of 16)
    assert choose("linear_woq", 2048, 4096, 4096, bf16).kernel == "dequant_mm"
    assert choose("linear_woq_tinygemm", 16, 4096, 14336, bf16).kernel == "tinygemm"
    assert choose("linear_woq_tinygemm", 17, 4096, 4096, bf16).kernel == "dequant_mm"
    assert choose("linear_woq_tinygemm", 1, 4096, 4096, torch.float16).kernel == "dequant_mm"
    measured = {"device": "a test GPU", "ops": {
        "linear_w8a8": ["int_mm", "triton", "triton", "int_mm"],
        "linear_woq_tinygemm": ["tinygemm", "triton", "triton", "dequant_mm"]}}
    monkeypatch.setattr(table, "measured", lambda: measured)
    assert choose("linear_w8a8", 1, 4096, 4096, bf16).kernel == "triton"  # (int_mm measured, but M ≤ 16)
    assert choose("linear_w8a8", 100, 4096, 4096, bf16).kernel == "triton"
    assert choose("linear_w8a8", 2048, 4096, 4096, bf16).kernel == "int_mm"
    assert "a test GPU" in choose("linear_w8a8", 2048, 4096, 4096, bf16).reason
    assert choose("linear_woq_tinygemm", 8, 4096, 4096, bf16).kernel == "triton"
    assert choose("linear_woq_tinygemm", 1, 4096, 4096, torch.float16).kernel == "dequant_mm"
    assert choose("linear_fp8", 1, 4096, 4096, bf16).kernel == "triton"  # (not measured: the prior)
    assert [table.bucket(m) for m in (1, 2, 16, 17, 128, 129, 4096)] == [0, 1, 1, 2, 2, 3, 3]


def test_measured_table_file_names_only_kernels_of_each_op(tmp_path, monkeypatch):
    """The committed table (when there is one) is well formed, and a damaged one is refused by name."""
    import json

    from qcompiler.kernels.cuda import table

    table.measured.cache_clear()
    data = table.measured()
    for op, kernels in data.get("ops", {}).items():
        assert len(kernels) == 4 and set(kernels) <= set(table.KERNELS[op])
    bad = tmp_path / "measured_table.json"
    bad.write_text(json.dumps({"ops": {"linear_w8a8": ["triton"] * 3}}))  # (three buckets: one missing)
    monkeypatch.setattr(table, "MEASURED", bad)
    table.measured.cache_clear()
    with pytest.raises(ValueError, match="linear_w8a8"):
        table.measured()
    bad.write_text(json.dumps({"ops": {"linear_w8a8": ["tinygemm"] * 4}}))
    monkeypatch.setattr(table, "MEASURED", bad)
    table.measured.cache_clear()
    with pytest.raises(ValueError, match="linear_w8a8"):
        table.measured()
    table.measured.cache_clear()


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cuda_kernels_bench", ROOT / "benchmarks" / "cuda_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_benchmarks_static_cache_decode_loop_rewinds_and_decodes_what_generate_does():
    """benchmarks/cuda_kernels.py's decode loop (a CUDA graph on a GPU; the same steps eagerly here): three timed
    loops over transformers' static cache — whose layers count their own length, so each loop rewinds it (the H200
    run indexed past the cache without) — each giving generate's greedy tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=100)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    tokens_per_s, tokens = _bench_module().static_cache_decode(model, ids, 12, graph=False, loops=3)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=13, min_new_tokens=13, do_sample=False)[0, 9:].tolist()
    assert tokens == want[:12] and tokens_per_s > 0


def test_measured_table_and_readme_figures_are_derived_from_the_committed_gpu_rows():
    """kernels/cuda/measured_table.json is what `benchmarks/cuda_kernels.py --table-from` derives from the GPU rows
    it names (fastest correct kernel per op and M bucket), and the README's CUDA table is that script's summary of
    the same rows: neither is edited by hand."""
    import json

    from qcompiler.kernels.cuda import table

    table.measured.cache_clear()
    data = table.measured()
    if not data:
        pytest.skip("no measured table committed")
    bench = _bench_module()
    rows = [json.loads(line) for line in (ROOT / data["source"]).read_text().splitlines() if line.strip()]
    assert bench.table_from([r for r in rows if "case" in r])["ops"] == data["ops"]
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- cuda-kernels:begin -->")[1].split("<!-- cuda-kernels:end -->")[0]
    assert block.strip() == bench.summary(rows).strip()


def test_library_int8_gemm_is_bit_equal_to_the_oracle_static_and_dynamic():
    from qcompiler.kernels.library_gemm import linear_w8a8_int_mm

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 24, 64, generator=g)
    qweight = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    w_scale = torch.rand(48, generator=g) * 0.01 + 1e-3
    bias = torch.randn(48, generator=g)
    for x_scale, x_zero in [(None, None), (torch.tensor(0.03), torch.tensor(5.0))]:
        got = linear_w8a8_int_mm(x, qweight, w_scale, x_scale, x_zero, bias)
        assert torch.equal(got, reference.linear_w8a8(x, qweight, w_scale, x_scale, x_zero, bias))


def test_library_fp8_gemm_equals_the_oracle_up_to_summation_order():
    """torch._scaled_mm with the scales inside the GEMM (row-wise for per-token activations and per-channel weights,
    per tensor for static ones) computes the oracle's y = s_x·s_w ⊙ (x8·w8ᵀ) + b: e4m3 products are exact in
    float32, so only the order of the K-term float32 sums differs — relative error ~K·2⁻²⁴, bounded here by 1e-5."""
    from qcompiler.kernels.library_gemm import linear_fp8_scaled_mm

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 20, 128, generator=g)
    qweight = (torch.randn(64, 128, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    bias = torch.randn(64, generator=g)
    for w_scale, x_scale in [(torch.rand(64, generator=g) * 0.01 + 1e-3, None),  # row-wise
                             (torch.tensor(0.004), torch.tensor(0.02)),  # per tensor
                             (torch.rand(64, generator=g) * 0.01 + 1e-3, torch.tensor(0.02))]:  # mixed: row-wise
        got = linear_fp8_scaled_mm(x, qweight, w_scale, x_scale, bias)
        expect = reference.linear_fp8(x, qweight, w_scale, x_scale, bias)
        assert float((got - expect).norm() / expect.norm()) < 1e-5
        assert float((got - expect).norm() / expect.norm()) < float(
            (reference.linear_fp8(x, qweight, w_scale * 1.01, x_scale, bias) - expect).norm() / expect.norm())


def test_cuda_registrations_route_prefill_shapes_to_the_library_gemms(monkeypatch):
    """The functions registered for CUDA, called on the CPU (where the library GEMMs also run): a prefill-sized call
    goes to torch._int_mm / torch._scaled_mm and returns the oracle's numbers (a decode-sized one would go to
    Triton, which needs a GPU or TRITON_INTERPRET: tests/test_triton_kernels.py). The prior table: the measured one
    sends M = 40 int8 calls to Triton."""
    from qcompiler.kernels.cuda import dispatch, table

    monkeypatch.setattr(table, "measured", lambda: {})

    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 64, generator=g)
    qweight = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    w_scale = torch.rand(32, generator=g) * 0.01 + 1e-3
    got = dispatch._linear_w8a8_cuda(x, qweight, w_scale, None, None, None)
    assert torch.equal(got, reference.linear_w8a8(x, qweight, w_scale, None, None, None))
    w8 = (torch.randn(32, 64, generator=g) * 50).to(torch.float8_e4m3fn)
    xb = x.to(torch.bfloat16)
    got = dispatch._linear_fp8_cuda(xb, w8, w_scale, None, None)
    expect = reference.linear_fp8(xb, w8, w_scale, None, None)
    # (both written in bf16: a value rounded the other way at a tie differs by one bf16 step, 2⁻⁸ relative)
    assert got.dtype == torch.bfloat16 and float((got.float() - expect.float()).norm() / expect.float().norm()) < 1e-2


def test_fast_fp32_matmul_keeps_float32_accuracy_and_restores_the_setting():
    """oneDNN's bf16 path for float32 GEMMs (on CPUs with bf16 hardware) must stay float32-class: on operands
    1 + 1e-3·noise, which a plain bf16 GEMM cannot resolve (its error is ~K·2⁻⁹ ≈ 0.5 here), the error against
    float64 stays within a few times float32's own. Elsewhere the block changes nothing."""
    from qcompiler.kernels.cpu import fast_fp32_matmul, fp32_matmul_precision

    g = torch.Generator().manual_seed(0)
    x = 1.0 + 1e-3 * torch.randn(256, 256, generator=g)
    w = 1.0 + 1e-3 * torch.randn(64, 256, generator=g)
    exact = torch.nn.functional.linear(x.double(), w.double())
    fp32_err = float((torch.nn.functional.linear(x, w).double() - exact).abs().max())
    bf16_err = float((torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).double() - exact).abs().max())
    before = fp32_matmul_precision()
    with fast_fp32_matmul() as precision:
        fast = torch.nn.functional.linear(x, w)
        assert precision in ("bf16", "ieee") and fp32_matmul_precision() == precision
    assert fp32_matmul_precision() == before
    assert fast.dtype == torch.float32
    err = float((fast.double() - exact).abs().max())
    assert err <= 4 * fp32_err + 1e-6 and err < bf16_err / 100


def _int4_layer(n, k, group, symmetric, seed):
    args = QuantArgs(bits=4, symmetric=symmetric, granularity="group", group_size=group)
    _, q, s, z, _ = _quantized(n, k, args, seed)
    return store_weight_codes(q, 4, symmetric), s, None if z is None else z.to(torch.uint8)


def test_tinygemm_table_and_nibble_order_reproduce_the_oracle():
    """CUDA tinygemm's operands made on the CPU: the [K'/g', N, 2] bf16 table (ŵ = (u − 8)·s + m) and the uint8
    codes with column 2i in the high nibble. Its arithmetic in pure torch (reference_tinygemm) against the oracle:
    x, s and m rounded to bf16 (2⁻⁹ relative each) and the output too — random-sign errors, so the relative error
    of y stays near 2·2⁻⁹; bound 2⁻⁷. torch's CPU int4pack kernel reads the same table: fed the codes back out of
    the nibbles it must agree with reference_tinygemm up to float32 summation order and one bf16 rounding of y
    (bound 2⁻⁸)."""
    from qcompiler.kernels.cuda.tinygemm import reference_tinygemm
    from qcompiler.kernels.packing import int4pack_operands, tinygemm_codes, tinygemm_nibbles

    for n, k, group, symmetric in [(64, 128, 64, True), (48, 96, 32, False), (32, 512, 256, True), (48, 200, 128, False)]:
        qweight, s, z = _int4_layer(n, k, group, symmetric, seed=k)
        u, table, kernel_group, k_pad = int4pack_operands(qweight, s, z, group, k)
        assert table.shape == (k_pad // kernel_group, n, 2) and table.dtype == torch.bfloat16
        nibbles = tinygemm_nibbles(u)
        assert nibbles.shape == (n, k_pad // 2) and int(nibbles[1, 0]) == (int(u[1, 0]) << 4) | int(u[1, 1])
        assert torch.equal(tinygemm_codes(nibbles), u)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
        xp = torch.nn.functional.pad(x, (0, k_pad - k))
        got = reference_tinygemm(xp, u, table, kernel_group).float()
        want = reference.linear_woq(x, qweight, s, z, None, 4, group, k)
        assert float((got - want).norm() / want.norm()) < 2**-7, (n, k, group)
        cpu_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(tinygemm_codes(nibbles), 2)
        cpu = torch.ops.aten._weight_int4pack_mm_for_cpu(xp.bfloat16(), cpu_packed, kernel_group, table).float()
        assert float((cpu - got).norm() / got.norm()) < 2**-8, (n, k, group)


def test_tinygemm_layout_shapes_on_meta_tensors_and_refusals():
    """The tiled layout through torch's meta kernels (what CUDA returns, without a GPU): [N/8, K'/(16·t), 32, t/2]
    int32 for the largest t of 8, 4, 2 with 16·t dividing K'; layers tinygemm cannot take are named."""
    from qcompiler.kernels.cuda.tinygemm import tinygemm_refusal, tinygemm_weight

    for n, k, group, tiles in [(64, 256, 128, 8), (32, 96, 32, 2), (16, 160, 64, 4)]:
        qweight, s, z = _int4_layer(n, k, group, True, seed=n)
        t = tinygemm_weight(qweight.to("meta"), s.to("meta"), None, group, k)
        k_pad = -(-k // group) * group
        assert t.packed.shape == (n // 8, k_pad // (16 * tiles), 32, tiles // 2) and t.packed.dtype == torch.int32
        assert t.k_pad == k_pad and t.scales_and_zeros.shape == (k_pad // t.kernel_group, n, 2)
    assert "multiple of 32" in tinygemm_refusal(64, 48, 96)
    assert "multiple of 8" in tinygemm_refusal(12, 64, 128)
    assert tinygemm_refusal(64, 64, 128) is None


def test_cuda_prepack_rewrites_int4_layers_and_keeps_the_rest():
    """runtime/cuda_prepack.py on a graph whose tensors are on the meta device (a CUDA device's stand-in): the int4
    g64 layer becomes qc::linear_woq_tinygemm with the tiled copy beside its storage, the int8 one stays; the
    rewritten op computes the oracle's numbers anywhere but CUDA."""
    from torch import fx

    from qcompiler.runtime.cuda_prepack import prepack_for_cuda

    q4, s4, _ = _int4_layer(64, 128, 64, True, seed=3)
    g = torch.Generator().manual_seed(4)
    q8 = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    s8 = torch.rand(32, 1, generator=g) * 0.01

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in {"q4": q4, "s4": s4, "q8": q8, "s8": s8}.items():
                self.register_buffer(name, t)

        def forward(self, x):
            h = qc.linear_woq.default(x, self.q4, self.s4, None, None, 4, 64, 128)  # (as lowered graphs call it)
            return qc.linear_woq.default(h, self.q8, self.s8, None, None, 8, 64, 64)

    gm = fx.symbolic_trace(TwoLayers()).to("meta")
    assert prepack_for_cuda(gm) == {"tinygemm": 1, "kept": 1}
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == [qc.linear_woq_tinygemm.default, qc.linear_woq.default]
    assert gm.get_buffer("q4").shape == (64, 64)  # (the portable storage stays for the prefill path)
    assert gm(torch.empty(3, 128, device="meta")).shape == (3, 32)
    x = torch.randn(3, 128, generator=g)
    table = torch.zeros(2, 64, 2, dtype=torch.bfloat16)
    got = qc.linear_woq_tinygemm(x, torch.zeros(8, 1, 32, 4, dtype=torch.int32), table, q4, s4, None, None, 64, 128,
                                 64, 128)
    assert torch.equal(got, reference.linear_woq(x, q4, s4, None, None, 4, 64, 128))


def test_cuda_weight_only_prefill_path_is_the_oracle_in_float32(monkeypatch):
    """The CUDA registrations' dequantize + GEMM path (weight-only calls the table sends to cuBLAS), called on the
    CPU: in float32 it is the oracle exactly; in bf16 ŵ is rounded once, the error of a bf16 model's own weights
    (bound 2⁻⁷ relative with bf16 activations and output)."""
    from qcompiler.kernels.cuda import dispatch, table, tinygemm

    monkeypatch.setattr(table, "measured", lambda: {})  # (the prior: dequantize + GEMM at M = 40 for both ops)

    qweight, s, z = _int4_layer(64, 128, 64, False, seed=9)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    want = reference.linear_woq(x, qweight, s, z, None, 4, 64, 128)
    assert torch.equal(dispatch._linear_woq_cuda(x, qweight, s, z, None, 4, 64, 128), want)
    unused = torch.zeros(8, 1, 32, 4, dtype=torch.int32)
    table = torch.zeros(2, 64, 2, dtype=torch.bfloat16)
    assert torch.equal(tinygemm._linear_woq_tinygemm_cuda(x, unused, table, qweight, s, z, None, 64, 128, 64, 128), want)
    half = dispatch._linear_woq_cuda(x.bfloat16(), qweight, s, z, None, 4, 64, 128).float()
    assert float((half - want).norm() / want.norm()) < 2**-7
