"""Mixture-of-experts decoders for onnxruntime: each MoE block's experts become one com.microsoft::QMoE
(qcompiler/export/onnx/moe.py), its routing and gated activation read off the graph numerically.

The tiny models are the support matrix's (tests/family_configs.py: Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Phi-3.5-MoE,
gpt-oss-20b shrunk). Tolerance: onnxruntime and our runtime compute the same dequantized weights (accuracy_level 0) in float32 in
another order, |Δ| / |y| ≤ 1e-4; quantization itself moves these logits by more than 1e-3, so a wrong weight layout,
routing or activation cannot pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from family_configs import BY_TYPE, family_inputs, make_family_model
from onnx import TensorProto
from tiny import TEXT

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ExportError
from qcompiler.export.onnx.builder import OnnxBuilder
from qcompiler.export.onnx.moe import _sparse_mixer_weights, sparse_mixer_top2
from qcompiler.runtime import load_quantized
from qcompiler.runtime.onnxruntime import OrtCausalLM
from qcompiler.schemes import get_scheme

EXACT = {"accuracy_level": "0", "lm_head_bits": "float"}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {t: make_family_model(root / t, BY_TYPE[t]) for t in ("mixtral", "qwen2_moe", "phimoe", "gpt_oss")}


def _export(model: Path, out: Path, scheme: str, group_size: int | None = None) -> None:
    quantize(QuantizeConfig(model=model, scheme=get_scheme(scheme, group_size=group_size), out=out, target="onnxruntime",
                            calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2, progress=False,
                            target_options=EXACT), log=lambda _: None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("family", "routing"), [("mixtral", "normalized"), ("qwen2_moe", "softmax"),
                                                 ("phimoe", "sparse_mixer"), ("gpt_oss", "normalized")])
def test_moe_decoder_runs_its_experts_as_qmoe_and_equals_our_artefact(moe_models, tmp_path, family, routing):
    model, out = moe_models[family], tmp_path / "q"
    _export(model, out, "w4a16", group_size=32)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    from transformers import AutoConfig

    assert len(qmoe) == AutoConfig.from_pretrained(str(model)).num_hidden_layers
    for node in qmoe:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["k"], attrs["expert_weight_bits"], attrs["block_size"], attrs["swiglu_fusion"]) == (2, 4, 32, 1)
        assert attrs["normalize_routing_weights"] == (routing == "normalized")
        # Qwen1.5-MoE does not renormalize over the top 2 and Phi-3.5-MoE's sparse mixer weighs them its own way:
        # both hand QMoE the aggregation weights (router_weights, input 14); Mixtral's softmax → top-2 → renormalize
        # is QMoE's own routing
        has_weights = len(node.input) > 14 and node.input[14] != ""
        assert has_weights == (routing != "normalized")
        # gpt-oss: (clamp(up, ±l) + 1) · g·σ(1.702·g), g = min(gate, l), with biased experts; the others silu(g)·u
        clamped = family == "gpt_oss"
        assert (attrs.get("swiglu_limit"), attrs["activation_beta"]) == ((7.0, 1.0) if clamped else (None, 0.0))
        assert (node.input[4] != "") == clamped  # fc1 bias
    # gpt-oss's attention sinks are GroupQueryAttention's head_sink (input 11), one logit per head
    sinks = [n for n in graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 11 and n.input[11]]
    assert len(sinks) == (len(qmoe) if family == "gpt_oss" else 0)
    assert not [n for n in graph.node if n.op_type == "MatMulNBits" and ".experts." in n.name]

    ids = family_inputs(BY_TYPE[family], model)["input_ids"]
    with torch.no_grad():
        ours = load_quantized(out)(ids).logits
    session = OrtCausalLM(out)
    assert _rel(session(ids).logits, ours) < 1e-4
    _, past = session.run(ids[:, :16].numpy())  # then one token through the KV cache
    step, _ = session.run(ids[:, 16:17].numpy(), past)
    assert _rel(torch.from_numpy(step)[:, 0], ours[:, 16]) < 1e-4


def test_sparse_mixer_equals_transformers_phimoe_routing_and_its_onnx_form(tmp_path):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    scores = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 2.0
    scores[:20, 1] = scores[:20, 0] * 0.995  # some rows with a second score within 2ε of the first
    expect_w, expect_i = sparsemixer(scores, jitter_eps=0.01, training=False)
    w, i = sparse_mixer_top2(scores, 0.01)
    assert torch.equal(i, expect_i) and torch.allclose(w, expect_w, atol=1e-7)
    # the same weights, dense [T, E], computed in ONNX ops by onnxruntime
    b = OnnxBuilder(tmp_path / "m.onnx")
    x = b.add_input("scores", TensorProto.FLOAT, ["t", 8])
    b.node("Identity", [_sparse_mixer_weights(b, x, 0.01, "/t")], "/out", outputs=["weights"])
    b.add_output("weights", TensorProto.FLOAT, ["t", 8])
    b.finish("sparse_mixer")
    got = ort.InferenceSession(str(tmp_path / "m.onnx"))
    dense = got.run(None, {"scores": scores.numpy()})[0]
    np.testing.assert_allclose(dense, torch.zeros(200, 8).scatter(-1, i, w).numpy(), atol=1e-6)


def test_moe_schemes_and_routings_qmoe_cannot_express_are_refused(moe_models, tmp_path, monkeypatch):

    out = tmp_path / "q"
    # quantized activations in the experts: refused before any work, nothing written
    with pytest.raises(ExportError, match="QMoE runs weight-only int4 / int8 experts, not the experts of scheme 'w8a8_dynamic'"):
        _export(moe_models["mixtral"], out, "w8a8_dynamic")
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))
    # GLM-4.5's routing limited to the best of 2 expert groups (DeepSeek V3's n_group > 1): read off the graph, matched
    # with no routing this export can give QMoE, refused by name
    family = BY_TYPE["glm4_moe"]
    grouped = dataclasses.replace(family, fields={**family.fields, "n_group": 2, "topk_group": 1})
    glm = make_family_model(tmp_path / "glm", grouped)
    with pytest.raises(ExportError, match="group-limited routing is not expressible"):
        _export(glm, out, "w8a16")
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_bias_corrected_routing_equals_transformers_and_its_onnx_form(tmp_path, score):
    """GLM-4.5's (sigmoid, scaled) and ERNIE 4.5's (softmax) routings as SelectedRouting equal transformers' own
    routers on the same logits, and the ONNX ops computing its dense weights equal SelectedRouting.dense."""
    from types import SimpleNamespace

    from qcompiler.export.onnx.moe import SelectedRouting, _selected_weights

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 8, generator=g) * 2.0
    bias = torch.randn(8, generator=g) * 0.3
    if score == "sigmoid":
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

        router = Glm4MoeTopkRouter(SimpleNamespace(num_experts_per_tok=2, num_local_experts=8, hidden_size=8,
                                                   routed_scaling_factor=2.5, n_group=1, topk_group=1,
                                                   norm_topk_prob=True))
        with torch.no_grad():
            router.weight.copy_(torch.eye(8))  # (the router's linear passes the logits through)
            router.e_score_correction_bias.copy_(bias)
        _, w, idx = router(logits)
        routing = SelectedRouting("sigmoid", bias, True, 2.5)
    else:
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

        router = Ernie4_5_MoeTopKRouter(SimpleNamespace(num_experts=8, hidden_size=8, num_experts_per_tok=2,
                                                        moe_norm_min=1e-12))
        with torch.no_grad():
            router.weight.copy_(torch.eye(8))
            router.moe_statics.e_score_correction_bias.copy_(bias[None])
        _, w, idx = router(logits)
        routing = SelectedRouting("softmax", bias, True, 1.0)
    expect = torch.zeros(300, 8).scatter(-1, idx, w.float())
    got = routing.dense(logits, 2)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)
    b = OnnxBuilder(tmp_path / "m.onnx")
    x = b.add_input("logits", TensorProto.FLOAT, ["t", 8])
    b.node("Identity", [_selected_weights(b, x, routing, 2, "/t")], "/out", outputs=["weights"])
    b.add_output("weights", TensorProto.FLOAT, ["t", 8])
    b.finish("selected")
    dense = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"logits": logits.numpy()})[0]
    np.testing.assert_allclose(dense, got.numpy(), atol=1e-6)
