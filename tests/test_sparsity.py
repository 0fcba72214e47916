"""2:4 sparsity: the mask maths, magnitude / Wanda / SparseGPT passes (SparseGPT jointly with quantization and
GPTQ keeping a mask), w8a8s / w16a16s end to end and their exports (msModelSlim W8A8S / W16A16S,
compressed-tensors sparsity_config read by transformers)."""

import json

import pytest
import torch
from blocks import context, rel_err, run, traced_block

import qcompiler.kernels  # noqa: F401
from qcompiler.algorithms.gptq import gptq_quantize, proxy_loss
from qcompiler.algorithms.sparsity import is_2_4, magnitude_scores, mask_2_4, sparsegpt, wanda_scores
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import SchemeError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, get_tensor, is_call
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import QuantArgs, QuantScheme, get_scheme


def _quantize(model, out, scheme, text, target="reference", passes=None, **kw):
    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, target=target, calib_texts=[text], num_samples=4,
                         seq_len=48, batch_size=2, progress=False, passes=parse_pipeline(passes) if passes else None,
                         **kw)
    return quantize(cfg, log=lambda s: None)


def test_mask_keeps_the_two_largest_of_every_four_and_a_ragged_tail():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 9.0, 0.0, 8.0, 7.0, 5.0, 6.0, 1.0]])
    m = mask_2_4(s)
    assert m.tolist() == [[False, True, True, False, True, False, True, False, True, True, False]]
    w = torch.randn(16, 70)
    pruned = w * mask_2_4(magnitude_scores(w))
    assert is_2_4(pruned) and not is_2_4(w)
    assert int((pruned != 0).sum()) == 16 * (17 * 2 + 2)  # 17 full groups of 4 and a tail of 2 kept whole


def test_wanda_weighs_magnitudes_by_input_norms():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert mask_2_4(magnitude_scores(w)).tolist() == [[False, False, True, True]]
    norms_sq = torch.tensor([100.0, 100.0, 1.0, 1.0])  # the small weights see 10× larger inputs
    assert mask_2_4(wanda_scores(w, norms_sq)).tolist() == [[True, True, False, False]]


def _layer_problem(n=24, k=64, tokens=2048, seed=0):
    """Correlated inputs with uneven scales (what real layer inputs look like): error compensation has
    something to work with, and magnitude alone picks the wrong weights."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 2.0 * torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(tokens, k, generator=g) @ mix) * torch.exp(0.5 * torch.randn(k, generator=g))
    return torch.randn(n, k, generator=g), x.t() @ x, tokens


@pytest.mark.parametrize("args", [None, QuantArgs(bits=8), QuantArgs(bits=4, granularity="group", group_size=16)])
def test_sparsegpt_is_2_4_and_beats_magnitude_on_the_output_error(args):
    w, h, tokens = _layer_problem()
    r = sparsegpt(w, h, args, tokens=tokens)
    assert is_2_4(r.w_hat) and is_2_4(r.mask.float()) and not r.w_hat[~r.mask].any()
    assert r.proxy_loss < 0.8 * r.magnitude_proxy_loss
    if args is None:  # error compensation beats the best data-aware mask without it
        wanda = w * mask_2_4(wanda_scores(w, torch.diag(h)))
        assert r.proxy_loss < 0.8 * proxy_loss(w, wanda, h, tokens)
    else:  # kept weights sit on the grid: (w / s) are integers within the grid's range
        s = r.scale.repeat_interleave(r.group_size, dim=1)[:, : w.shape[1]]
        codes = r.w_hat / s
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 2 ** (args.bits - 1)


def test_gptq_with_a_mask_keeps_the_zeros_and_compensates():
    w, h, tokens = _layer_problem()
    mask = mask_2_4(wanda_scores(w, torch.diag(h)))
    args = QuantArgs(bits=8)
    masked = gptq_quantize(w * mask, h, args, tokens=tokens, mask=mask, act_order=True)
    assert is_2_4(masked.w_hat) and not masked.w_hat[~mask].any()
    plain = gptq_quantize(w * mask, h, args, tokens=tokens, act_order=True)
    assert not is_2_4(plain.w_hat)  # without the mask the error feedback fills the pruned weights in


@pytest.mark.parametrize("method", ["prune_magnitude", "prune_wanda", "sparsegpt"])
def test_sparsity_passes_prune_every_linear_of_a_2_4_scheme(tiny_llama, method):
    gm, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ref = run(gm, inputs)
    ctx = context(inputs, "w16a16s")
    gm = PassManager(parse_pipeline(method)).run(gm, ctx)
    linears = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    assert len(linears) == 7
    for n in linears:
        assert n.meta[qmeta.SPARSE] == {"pattern": "2:4", "method": method, "sparsity": 0.5}
        assert is_2_4(get_tensor(gm, str(n.args[1].target)))
        assert qmeta.WQ not in n.meta  # w16a16s keeps float weights
    assert len(ctx.report[method]["layers"]) == 7
    err = rel_err(run(gm, inputs), ref)
    assert 0 < err < 1.0


@pytest.mark.slow
def test_activation_aware_pruning_beats_magnitude_on_the_block_output(tiny_llama):
    errors = {}
    for method in ("prune_magnitude", "prune_wanda", "sparsegpt"):
        gm, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
        ref = run(gm, inputs)
        gm = PassManager(parse_pipeline(method)).run(gm, context(inputs, "w16a16s"))
        errors[method] = rel_err(run(gm, inputs), ref)
    assert errors["sparsegpt"] < errors["prune_wanda"] < errors["prune_magnitude"], errors


def test_sparsegpt_quantizes_jointly_and_lowering_computes_the_same(tiny_llama):
    gm, inputs = traced_block(tiny_llama, seq=48, n_batches=3)
    ctx = context(inputs, "w8a8s")
    gm = PassManager(parse_pipeline("smoothquant,sparsegpt,rtn,act_quant")).run(gm, ctx)
    assert ctx.report["rtn"]["quantized"] == 0  # sparsegpt already quantized every layer
    linears = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    assert all(qmeta.WQ in n.meta and qmeta.SPARSE in n.meta for n in linears)
    expect = run(gm, inputs)
    lowered = PassManager(parse_pipeline("lower")).run(gm, ctx)
    records = [n.meta[qmeta.RECORD] for n in lowered.graph.nodes if qmeta.RECORD in n.meta]
    assert len(records) == 7 and all(r.sparsity == "2:4" and r.op == "linear_w8a8" for r in records)
    for r in records:
        assert is_2_4(get_tensor(lowered, r.tensors["qweight"]).float())
    assert rel_err(run(lowered, inputs), expect) < 1e-5


def test_dense_schemes_and_quantized_layers_are_not_pruned(tiny_llama):
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w8a16")
    PassManager(parse_pipeline("prune_wanda")).run(gm, ctx)
    assert not ctx.report["prune_wanda"]["layers"]
    assert set(ctx.report["prune_wanda"]["skipped"].values()) == {"its scheme is dense"}
    gm, inputs = traced_block(tiny_llama)
    ctx = context(inputs, "w8a8s")
    PassManager(parse_pipeline("rtn,prune_magnitude")).run(gm, ctx)
    assert all("already quantized" in why for why in ctx.report["prune_magnitude"]["skipped"].values())
    with pytest.raises(SchemeError, match="sparsity"):
        QuantScheme("x", QuantArgs(), sparsity="1:4")


def test_w8a8s_exports_w8a8s_and_reloads(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "asc"
    desc = _quantize(tiny_llama, out, get_scheme("w8a8s"), calib_text, target="ascend")
    assert "prune_wanda" in desc["pipeline"]
    types = json.loads((out / "msmodelslim" / "quant_model_description.json").read_text())
    assert types["model_quant_type"] == "W8A8S"
    assert types["model.layers.0.mlp.down_proj.weight"] == "W8A8S"
    assert types["model.layers.0.mlp.down_proj.deq_scale"] == "W8A8S"
    from safetensors.torch import load_file

    weights = {}
    for f in (out / "msmodelslim").glob("*.safetensors"):
        weights.update(load_file(f))
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert w.dtype == torch.int8 and is_2_4(w.float())
    ids = torch.randint(3, 250, (1, 24))
    ours = load_quantized(out)(ids).logits
    # the ascend v1 loader (W8A8S = W8A8's kernels on a sparse weight) runs the folder as vllm-ascend would
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    assert rel_err(load_msmodelslim(out / "msmodelslim")(ids).logits.detach(), ours.detach()) < 1e-4


@pytest.mark.slow
def test_w16a16s_compressed_tensors_sparsity_config_loads_in_transformers(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "ct"
    _quantize(tiny_llama, out, get_scheme("w16a16s"), calib_text, target="cuda")
    qc = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "dense" and qc["sparsity_config"]["sparsity_structure"] == "2:4"
    assert "model.layers.0.self_attn.q_proj" in qc["sparsity_config"]["targets"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors", dtype=torch.float32)
    assert is_2_4(loaded.model.layers[0].self_attn.q_proj.weight.detach())
    ids = torch.randint(3, 250, (1, 24))
    ours = load_quantized(out)(ids).logits
    assert rel_err(loaded(ids).logits.detach(), ours.detach()) < 1e-5
    ascend = tmp_path / "asc"
    _quantize(tiny_llama, ascend, get_scheme("w16a16s"), calib_text, target="ascend")
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    assert rel_err(load_msmodelslim(ascend / "msmodelslim")(ids).logits.detach(), ours.detach()) < 1e-5


def test_onnx_export_of_a_2_4_model_computes_the_reference(tmp_path_factory, calib_text):
    """onnxruntime has no sparse CPU kernel: the 2:4 weights go in dense (zeros kept) and compute what our runtime
    does."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from tiny import make_tiny_model

    from qcompiler.runtime.onnxruntime import OrtCausalLM

    model = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", head_dim=32)
    out = tmp_path_factory.mktemp("o") / "s"
    _quantize(model, out, get_scheme("w16a16s"), calib_text, target="onnxruntime",
              target_options={"lm_head_bits": "float", "accuracy_level": "0"})
    proto = onnx.load(str(out / "model.onnx"))
    # (copies: numpy_helper's arrays can be read-only views of the protobuf's bytes, which torch warns about)
    weights = [np.array(numpy_helper.to_array(t)) for t in proto.graph.initializer if "down_proj" in t.name]
    assert weights and all(is_2_4(torch.from_numpy(np.ascontiguousarray(w)).reshape(-1, w.shape[-1]).t())
                           or is_2_4(torch.from_numpy(np.ascontiguousarray(w)).reshape(w.shape[0], -1))
                           for w in weights)
    ids = torch.randint(3, 250, (1, 24))
    logits, _ = OrtCausalLM(out).run(ids.numpy())
    assert np.abs(logits - load_quantized(out)(ids).logits.detach().numpy()).max() < 1e-4
