"""qc::linear_int_dynamic: W4A8 with group scales and W4A4 — the oracle's maths, the lowering, and the layouts
(msModelSlim two-level W4A8_DYNAMIC and W4A4_DYNAMIC, compressed-tensors W4A8)."""

import json

import pytest
import torch
from blocks import context, rel_err, run, traced_block
from safetensors.torch import load_file

import qcompiler.kernels  # noqa: F401
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import SchemeError
from qcompiler.ir.graph import LINEAR, is_call
from qcompiler.kernels import reference
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.schemes import QuantArgs, QuantScheme, get_scheme

OP = torch.ops.qc.linear_int_dynamic.default


def _quantize(model, out, scheme, text, target="reference"):
    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, target=target, calib_texts=[text], num_samples=4,
                         seq_len=48, batch_size=2, progress=False)
    return quantize(cfg, log=lambda s: None)


@pytest.mark.parametrize(("act_bits", "group"), [(8, 16), (8, 0), (4, 0), (8, 20)])
def test_oracle_is_the_sum_of_per_group_integer_products(act_bits, group):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 70, generator=g)
    q = torch.randint(-8, 8, (12, 70), generator=g, dtype=torch.int8)
    n_groups = -(-70 // group) if group else 1
    s = torch.rand(12, n_groups, generator=g) + 0.1
    y = reference.linear_int_dynamic(x, q, s, None, act_bits, group)
    qmax = 2 ** (act_bits - 1) - 1
    sx = x.abs().amax(dim=1, keepdim=True) / qmax
    qx = torch.clamp(torch.round(x / sx), -qmax - 1, qmax)
    w = q.double() * s.double().repeat_interleave(group or 70, dim=1)[:, :70]  # ragged last group (70 = 3·20 + 10)
    assert torch.allclose(y.double(), (qx.double() * sx.double()) @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", [get_scheme("w4a8", group_size=32), get_scheme("w4a4")])
def test_lowering_takes_group_w4a8_and_w4a4_into_the_dynamic_integer_gemm(tiny_llama, scheme):
    gm, inputs = traced_block(tiny_llama, seq=48, n_batches=2)
    ctx = context(inputs, scheme)
    gm = PassManager(parse_pipeline("fuse_linears,rtn,act_quant")).run(gm, ctx)
    expect = run(gm, inputs)
    lowered = PassManager(parse_pipeline("lower")).run(gm, ctx)
    ops = [n for n in lowered.graph.nodes if n.target == OP]
    assert len(ops) == 4 and not any(is_call(n, LINEAR) for n in lowered.graph.nodes)  # qkv, o, gate/up, down
    assert {n.args[4] for n in ops} == {scheme.activations.bits}
    # the kernel sums exact per-group integer products scaled in float32; the fake-quantized graph multiplies
    # float32 dequantized values: the same numbers up to float32 accumulation order over K (≈ 1e-7 · √K per term)
    assert rel_err(run(lowered, inputs), expect) < 2e-4
    assert ctx.report["lower"]["lowered"] == {"linear_int_dynamic": 4}


def test_channel_w4a8_stays_on_the_int8_gemm_and_bad_combinations_are_refused(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w4a8")
    lowered = PassManager(parse_pipeline("fuse_linears,rtn,act_quant,lower")).run(gm, ctx)
    assert ctx.report["lower"]["lowered"] == {"linear_w8a8": 4}
    with pytest.raises(SchemeError, match="w4a4"):
        QuantScheme("x", QuantArgs(bits=8), QuantArgs(bits=4, granularity="token", dynamic=True))
    assert lowered is not None
    from qcompiler.targets import get_target

    for target in ("cuda", "onnxruntime"):
        with pytest.raises(SchemeError, match="int4 × int4"):
            get_target(target).validate(get_scheme("w4a4"))


def test_msmodelslim_two_level_w4a8_group_scales_and_w4a4(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "g"
    desc = _quantize(tiny_llama, out, get_scheme("w4a8", group_size=32), calib_text, target="ascend")
    types = json.loads((out / "msmodelslim" / "quant_model_description.json").read_text())
    assert types["group_size"] == 32 and types["model.layers.0.mlp.down_proj.weight"] == "W4A8_DYNAMIC"
    tensors = {}
    for f in (out / "msmodelslim").glob("*.safetensors"):
        tensors.update(load_file(f))
    name = "model.layers.0.mlp.down_proj"
    ours = load_file(out / "block-00000.safetensors")
    rec = desc["layers"][name]
    group_scale = ours[rec["tensors"]["weight_scale"]]  # [N, G]
    two_level = tensors[name + ".weight_scale"] * tensors[name + ".weight_scale_second"]
    assert torch.allclose(two_level, group_scale, rtol=1e-6)
    assert tensors[name + ".weight"].shape == (group_scale.shape[0] // 2, 160)  # int4 pairs along N
    assert not tensors[name + ".weight_offset_second"].any()
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    with pytest.raises(ValueError, match="weight_scale_second"):  # (refused, never read as per-channel scales)
        load_msmodelslim(out / "msmodelslim")

    out4 = tmp_path / "a4"
    _quantize(tiny_llama, out4, get_scheme("w4a4"), calib_text, target="ascend")
    types = json.loads((out4 / "msmodelslim" / "quant_model_description.json").read_text())
    assert types["model_quant_type"] == "W4A4_DYNAMIC"
    tensors = {}
    for f in (out4 / "msmodelslim").glob("*.safetensors"):
        tensors.update(load_file(f))
    w = tensors[name + ".weight"]
    assert w.dtype == torch.int8 and w.shape == (96, 160) and w.min() >= -8 and w.max() <= 7


def test_compressed_tensors_w4a8_group(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "ct"
    _quantize(tiny_llama, out, get_scheme("w4a8", group_size=32), calib_text, target="cuda")
    qc = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    group = next(iter(qc["config_groups"].values()))
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32
    assert group["input_activations"]["num_bits"] == 8 and group["input_activations"]["dynamic"] is True
    assert group["format"] == "pack-quantized"
