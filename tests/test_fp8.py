"""fp8 e4m3 schemes (fp8: per-channel weights × per-token activations; fp8_static: × a calibrated per-tensor
scale): the scheme rules, the passes' graphs, the lowered numerics, and the targets that refuse them."""

from __future__ import annotations

import pytest
import torch
from tiny import TEXT

from qcompiler import numerics as nm
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import PassError, SchemeError
from qcompiler.kernels import reference
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import QuantArgs, QuantScheme, get_scheme


def _quantize(model, out, scheme: str, target: str = "reference", passes: str | None = None) -> dict:
    return quantize(QuantizeConfig(model=model, scheme=get_scheme(scheme), out=out, target=target, calib_texts=[TEXT],
                                   num_samples=4, seq_len=32, batch_size=2, progress=False,
                                   passes=parse_pipeline(passes) if passes else None), log=lambda _: None)


def test_scheme_rules():
    with pytest.raises(SchemeError, match="fp8 e4m3"):
        QuantArgs(bits=8, type="float", granularity="group", group_size=32)
    with pytest.raises(SchemeError, match="fp8 × fp8 GEMM"):
        QuantScheme("x", QuantArgs(bits=8, type="float"))
    with pytest.raises(SchemeError, match="fp8 activations need fp8 weights"):
        QuantScheme("x", QuantArgs(bits=8), QuantArgs(bits=8, type="float", granularity="token", dynamic=True))
    assert get_scheme("fp8").describe() == "fp8: weights fp8e4m3-channel, activations fp8e4m3-token-dyn"


def test_weight_codes_are_e4m3_values_with_absmax_on_448():
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    args = QuantArgs(bits=8, type="float")
    scale, zero = nm.weight_qparams(w, args)
    codes = nm.quantize_weight(w, scale, zero, args)
    assert zero is None and torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # on the e4m3 grid
    assert torch.allclose(codes.abs().amax(dim=1), torch.full((16,), 448.0))
    w_hat = nm.dequantize_weight(codes, scale, None, 40)
    assert (w - w_hat).norm() / w.norm() < 2**-4  # 3 mantissa bits: relative step ≤ 2^-3, error ≤ half


@pytest.mark.parametrize("scheme", ["fp8", "fp8_static"])
def test_lowered_graph_structure_and_numerics(tiny_llama, tmp_path, scheme):
    out = tmp_path / "q"
    desc = _quantize(tiny_llama, out, scheme)
    layers = list(desc["layers"].values())
    assert {r["op"] for r in layers} == {"linear_fp8"} and len(layers) == 8  # 2 blocks × (qkv, o, gate_up, down)
    assert all(r["activations"]["type"] == "float" for r in layers)
    model = load_quantized(out)
    for block in model.model.layers:
        targets = [str(n.target) for n in block.gm.graph.nodes if n.op == "call_function"]
        assert targets.count("qc.linear_fp8.default") == 4
        assert not any("fake_quant" in t for t in targets)  # the fake-quant pairs became the fp8 GEMM
        codes = [t for name, t in block.gm.named_buffers() if name.endswith(".qweight")]
        assert len(codes) == 4 and all(t.dtype == torch.float8_e4m3fn for t in codes)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 250, (2, 24))
    float_logits = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)(ids).logits
    got = model(ids).logits
    # e4m3 keeps 3 mantissa bits (≤ 2^-4 relative rounding per element of both operands): on this outlier-heavy
    # 2-block model that is ~10-14 % logit error (int8 per-token: ~3 %); a wrong scale would be ≥ 100 %
    assert (got - float_logits).norm() / float_logits.norm() < 0.2


def test_linear_fp8_is_the_dequantized_linear_on_fp8_inputs():
    torch.manual_seed(0)
    x, w = torch.randn(5, 32), torch.randn(12, 32)
    sw = w.abs().amax(dim=1) / 448
    w8 = (w / sw[:, None]).to(torch.float8_e4m3fn)
    y = torch.ops.qc.linear_fp8(x, w8, sw, None, None)
    x8, sx = reference.quantize_act_fp8(x, None)
    torch.testing.assert_close(y, (x8.float() * sx) @ (w8.float() * sw[:, None]).t(), rtol=1e-5, atol=1e-5)


def test_gptq_refuses_fp8_and_targets_without_fp8_refuse_it(tiny_llama, tmp_path):
    with pytest.raises(PassError, match="fp8 weights.*use rtn"):
        _quantize(tiny_llama, tmp_path / "g", "fp8", passes="fuse_linears,gptq,act_quant")
    for target, why in [("onnxruntime", "no fp8 GEMM"), ("ascend", "WFP8AFP8_DYNAMIC")]:
        with pytest.raises(SchemeError, match=why):
            _quantize(tiny_llama, tmp_path / target, "fp8", target=target)
    assert not any(p.name != "g" and p.exists() for p in tmp_path.iterdir())


def test_act_quant_refuses_histogram_observers_for_fp8(tiny_llama, tmp_path):
    """The KL / MSE observers search thresholds on an integer grid; fp8 activations are refused with the fix."""
    with pytest.raises(SchemeError, match="fp8 activations: use minmax or percentile"):
        _quantize(tiny_llama, tmp_path / "q", "fp8_static", passes="fuse_linears,rtn,act_quant{observer=kl}")
    assert not (tmp_path / "q").exists()
