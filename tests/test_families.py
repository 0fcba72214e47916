"""Families beyond the core five, and the two silent wrong results of issue 18 as regression tests:

- sliding windows: every sliding-window family traces and runs the mask it is given (transformers' "sdpa" skipped
  the mask for a probe shorter than the window, and the block then ran without it on longer sequences). The
  quantized model equals transformers' own model with fake-quantized weights, inside the window and after it.
- layers that are linear in the maths but not `aten.linear` (GPT-2's Conv1D) are refused by name, and a run that
  quantizes no layer is an error, never an unquantized export with exit code 0.

Each tiny config keeps the structural fields of the published config it names (attention pattern, soft-capping,
scalars) with sizes shrunk; the window is 24 tokens so that sequences of 80 cross it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from family_configs import BY_TYPE, make_family_model
from tiny import TEXT, make_tiny_model

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import PipelineError
from qcompiler.frontends.hf import (
    BlockTracer,
    Checkpoint,
    attention_implementation,
    build_skeleton,
    capture_block_inputs,
    find_blocks,
    probe_block_inputs,
)
from qcompiler.ir.graph import aten, get_tensor, is_code_constant
from qcompiler.numerics import fake_quant_weight
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme

WINDOW = 24
SLIDING = {
    # mistralai/Mistral-7B-v0.1: every layer sliding (sliding_window 4096)
    "mistral": dict(sliding_window=WINDOW),
    # Qwen/Qwen2-7B-Instruct with use_sliding_window on (its layers from max_window_layers on slide)
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
                  layer_types=["sliding_attention", "full_attention"]),
    # google/gemma-2-2b: sliding / full alternating, attention logit soft-capping 50, final 30, query scalar 256 —
    # soft-capping is not SDPA: the model's eager attention runs
    "gemma2": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    # google/gemma-3-1b-pt: 5 sliding : 1 full (here 1 : 1), local rope base 10k, query scalar 256, q/k norms
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24),
    # LGAI-EXAONE/EXAONE-4.0-1.2B: 3 sliding : 1 full (here 1 : 1)
    "exaone4": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
}


def _fake_quantized(model_dir: Path, scheme) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    fake = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, mod in fake.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(fake_quant_weight(mod.weight, scheme.weights))
    return fake


@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_models_keep_their_window_beyond_the_calibration_length(tmp_path, family):
    model = make_tiny_model(tmp_path / family, family, **SLIDING[family])
    scheme = get_scheme("w8a16")
    # calibrated on windows of 16 tokens, shorter than the sliding window: the mask must still be traced and used
    quantize(QuantizeConfig(model=model, scheme=scheme, out=tmp_path / "q", calib_texts=[TEXT], num_samples=2,
                            seq_len=16, batch_size=2, progress=False, passes=parse_pipeline("fuse_linears,rtn")),
             log=lambda _: None)
    ids = torch.randint(3, 250, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect, got = _fake_quantized(model, scheme)(ids).logits, load_quantized(tmp_path / "q")(ids).logits
    # the same weights and the same attention: equal up to float32 summation order (1e-5), while a dropped window
    # changes every logit after it by tens of percent
    for part in (slice(0, WINDOW), slice(WINDOW, None)):
        err = (got[:, part] - expect[:, part]).norm() / expect[:, part].norm()
        assert err < 1e-5, (family, part, float(err))


def _refused_before_writing(tmp_path, model_type: str, error: type[Exception], match: str, **fields) -> None:
    """A tiny random `model_type` model (byte tokenizer) is refused with `error` matching `match`, nothing written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qcompiler.synthetic import byte_tokenizer

    cfg = AutoConfig.for_model(model_type, vocab_size=259, bos_token_id=1, eos_token_id=2, **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / model_type)
    byte_tokenizer().save_pretrained(tmp_path / model_type)
    with pytest.raises(error, match=match):
        quantize(QuantizeConfig(model=tmp_path / model_type, scheme=get_scheme("w8a16"), out=tmp_path / "q",
                                calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2, progress=False),
                 log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [model_type]


def test_a_layer_that_is_linear_but_not_aten_linear_is_refused_by_name(tmp_path):
    """GPT-2 computes its projections with Conv1D (addmm, weight [in, out]): refused, never written unquantized."""
    _refused_before_writing(tmp_path, "gpt2", PipelineError, r"attn\.c_attn \(addmm.default\).*not supported yet",
                            n_embd=96, n_layer=2, n_head=4, n_positions=128)


def test_alibi_attention_is_refused_by_name_before_anything_is_written(tmp_path):
    """BLOOM's ALiBi bias is [batch · heads, 1, seq] (two sizes in one dimension): one line naming it, no traceback."""
    from qcompiler.errors import ModelLoadError

    _refused_before_writing(tmp_path, "bloom", ModelLoadError, r"block 'transformer\.h\.0' takes ALiBi position biases",
                            hidden_size=96, n_layer=2, n_head=4)


def test_a_run_that_quantizes_no_layer_is_an_error(tiny_llama, tmp_path):
    scheme = get_scheme("w8a16").with_overrides([("model.layers.*", None)])
    with pytest.raises(PipelineError, match="no layer .* was quantized"):
        quantize(QuantizeConfig(model=tiny_llama, scheme=scheme, out=tmp_path / "q", calib_texts=[TEXT],
                                num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # (nothing to resume: no work folder kept)


@pytest.mark.parametrize("target", ["cuda", "ascend"])
def test_a_group_that_does_not_divide_an_mla_rank_is_refused_before_work(tmp_path, target):
    """DeepSeek-V3's q_b_proj reads the q latent (q_lora_rank 48 here): g32 cannot hold it in whole groups, which the
    serving loaders require (compressed-tensors' client refused the written folder before this check)."""
    from qcompiler.errors import SchemeError

    model = make_tiny_model(tmp_path / "ds3", "deepseek_v3")
    with pytest.raises(SchemeError, match=r"q_lora_rank \(q_b_proj\) = 48"):
        quantize(QuantizeConfig(model=model, scheme=get_scheme("w4a16", group_size=32), out=tmp_path / "q",
                                target=target, calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2,
                                progress=False), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds3"]


def test_falcon_traces_its_code_constants_and_its_matmul_projections_as_linears(tmp_path):
    """Falcon's multi-query split indexes with a Python list (a tensor constant built while the block runs, whose
    value a meta trace loses) and its FalconLinear computes `x @ W.T + b`: the constant keeps its value, the four
    projections are `aten.linear` layers, and the compiled block returns the tuple the model indexes."""
    model_dir = make_family_model(tmp_path / "falcon", BY_TYPE["falcon"])
    model = build_skeleton(Checkpoint(model_dir))
    probe = probe_block_inputs(model)
    _, blocks = find_blocks(model)
    gm = BlockTracer(probe)(0, blocks[0], "transformer.h.0")
    constants = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and is_code_constant(str(n.target))]
    assert constants and all(not get_tensor(gm, t).is_meta for t in constants)
    weights = sorted(str(n.args[1].target) for n in gm.graph.nodes
                     if n.op == "call_function" and n.target is aten.linear.default)
    assert weights == sorted(f"block.{p}.weight" for p in ("self_attention.query_key_value", "self_attention.dense",
                                                           "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    assert probe.calls[0].tuple_output


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_next"])
def test_every_block_is_calibrated_with_the_inputs_the_model_gives_it(tmp_path, family):
    """Hybrid models call their layers differently (Gemma 3: sliding and full masks; Qwen3-Next: no mask for its
    linear-attention layers): each block's captured keyword inputs are the ones transformers passes that layer."""
    from transformers import AutoModelForCausalLM

    model_dir = make_family_model(tmp_path / family, BY_TYPE[family])
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than the window
    captured = capture_block_inputs(build_skeleton(Checkpoint(model_dir)), [ids])
    real = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation=attention_implementation(Checkpoint(model_dir).config()))
    _, layers = find_blocks(real)
    masks: list[object] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
             for layer in layers]
    with torch.no_grad():
        real(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    for i, mask in enumerate(masks):
        call = captured.calls[i]
        assert ("attention_mask" in call.keys) == (mask is not None), i
        if mask is not None:
            got = pytree.tree_unflatten(list(captured.kwargs[i][0]), call.spec)["attention_mask"]
            assert torch.equal(got, mask), i
    # (the point: the layers are given different masks, so block 0's inputs would be wrong for block 1)
    assert (masks[0] is None) != (masks[1] is None) or not torch.equal(masks[0], masks[1])


def test_qwen3_next_linear_attention_traces_as_one_recurrence_op_between_linears(tmp_path):
    """The Gated DeltaNet block: one qc.gated_delta_rule node, its in/out projections aten.linear layers, and the
    model's own function restored after the trace; a recurrent state passed in is refused, never dropped."""
    from qcompiler.frontends.recurrent import RECURRENCES

    model_dir = make_family_model(tmp_path / "q3n", BY_TYPE["qwen3_next"])
    model = build_skeleton(Checkpoint(model_dir))
    _, blocks = find_blocks(model)
    assert model.config.layer_types[0] == "linear_attention"
    gm = BlockTracer(probe_block_inputs(model))(0, blocks[0], "model.layers.0")
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.qc.gated_delta_rule.default]
    assert len(ops) == 1
    weights = {str(n.args[1].target) for n in gm.graph.nodes
               if n.op == "call_function" and n.target is aten.linear.default}
    assert {"block.linear_attn.in_proj_qkvz.weight", "block.linear_attn.in_proj_ba.weight",
            "block.linear_attn.out_proj.weight"} <= weights
    import transformers.models.qwen3_next.modeling_qwen3_next as modeling

    assert modeling.torch_chunk_gated_delta_rule is not RECURRENCES["torch_chunk_gated_delta_rule"]
    x = torch.zeros(1, 3, 2, 4)
    with pytest.raises(NotImplementedError, match="recurrent state"):
        RECURRENCES["torch_chunk_gated_delta_rule"](x, x, x, x[..., 0], x[..., 0], initial_state=torch.zeros(1, 2, 4, 4))


def test_minimax_lightning_attention_traces_as_one_op_between_linears(tmp_path):
    """MiniMax writes its recurrence inline in the attention's forward: the trace swaps that forward (restored after)
    and the block holds one qc.lightning_attention node, its qkv / output-gate / out projections aten.linear layers."""
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    model_dir = make_family_model(tmp_path / "minimax", BY_TYPE["minimax"])
    model = build_skeleton(Checkpoint(model_dir))
    _, blocks = find_blocks(model)
    assert model.config.layer_types[0] == "linear_attention"
    original = MiniMaxLightningAttention.forward
    gm = BlockTracer(probe_block_inputs(model))(0, blocks[0], "model.layers.0")
    assert MiniMaxLightningAttention.forward is original
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.qc.lightning_attention.default]
    assert len(ops) == 1
    weights = {str(n.args[1].target) for n in gm.graph.nodes
               if n.op == "call_function" and n.target is aten.linear.default}
    assert {"block.self_attn.qkv_proj.weight", "block.self_attn.output_gate.weight",
            "block.self_attn.out_proj.weight"} <= weights


def test_a_sparse_attention_indexer_is_traced_for_the_lengths_it_keeps_every_key_and_refuses_longer(tmp_path):
    """DeepSeek V3.2's indexer attends to the top min(index_topk, S) keys: up to index_topk tokens every key (causal
    attention), which is what the block graph computes (equal to transformers there); longer inputs are refused by
    the runtime and longer calibration windows before any work, never computed as the dense regime."""
    from twin import transformers_twin

    from qcompiler.errors import ArtifactError

    src = make_family_model(tmp_path / "ds32", BY_TYPE["deepseek_v32"])  # (index_topk 64)
    out = tmp_path / "q"
    quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a16"), out=out, calib_texts=[TEXT], num_samples=2,
                            seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    ids = torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(0))
    model = load_quantized(out)
    with torch.no_grad():
        got, expect = model(ids[:, :64]).logits, transformers_twin(src, out)(ids[:, :64]).logits
    assert float((got - expect).norm() / expect.norm()) < 1e-5
    with pytest.raises(ArtifactError, match="keeps 64 keys"):
        model(ids)
    with pytest.raises(PipelineError, match="--seq-len 64 or less"):
        quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a16"), out=tmp_path / "q2", calib_texts=[TEXT * 4],
                                num_samples=2, seq_len=80, batch_size=2, progress=False), log=lambda _: None)
    assert not (tmp_path / "q2").exists()
