"""Families that ship their own modeling code, read as a native architecture without running it (issue 18, item 2).

Each test writes a tiny native model's weights in the family's own layout (InternLM2's per-group packed wqkv,
Baichuan's W_pack and Baichuan2's NormHead as Llama; ChatGLM3's query_key_value and dense_h_to_4h as GLM), with an
`auto_map` whose Python would leave a marker file if it ever ran, then quantizes that folder without
--trust-remote-code: the result must equal transformers' native model with the artefact's weights (tests/twin.py) up
to float32 summation order, be written as that native model, and stay close to the native float model (a wrong split or
swap moves the logits by O(1), int8 weights by a few %).
"""

from __future__ import annotations

import json

import pytest
import torch
from remote_layouts import remote_code_folder, write_baichuan2, write_chatglm3, write_internlm2, write_qwen_v1
from safetensors.torch import load_file, save_file
from tiny import TEXT, make_tiny_model
from transformers import AutoModelForCausalLM
from twin import transformers_twin

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ModelLoadError
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme


def _llama(tmp_path, family: str = "llama", **overrides):
    src = make_tiny_model(tmp_path / family, family, **overrides)
    return src, json.loads((src / "config.json").read_text()), load_file(str(src / "model.safetensors"))


def _quantize_and_compare(tmp_path, folder, reference, native: str = "llama") -> None:
    out = tmp_path / "q"
    quantize(QuantizeConfig(model=folder, scheme=get_scheme("w8a16"), out=out, calib_texts=[TEXT], num_samples=2,
                            seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    assert not (folder / "RAN").exists()  # the folder's Python never ran
    assert json.loads((out / "config.json").read_text())["model_type"] == native
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expect = load_quantized(out)(ids).logits, transformers_twin(reference, out)(ids).logits
        native = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32)(ids).logits
    assert float((got - expect).norm() / expect.norm()) < 1e-5
    # and the conversion is the native model: int8 per-channel RTN moves each weight by ≤ max|w_row| / 254, about 1 %
    # of the rows' spread, and these logits by a few %; a split, swap or misplaced tensor moves them by O(1)
    assert float((got - native).norm() / native.norm()) < 0.1


def test_internlm2_packed_wqkv_is_read_as_llama(tmp_path):
    """InternLM2 packs q/k/v per KV group: [H_kv, H/H_kv + 2, d, hidden] (the group's query heads, its key, its
    value); a wrong split would mix heads and move every logit."""
    src = make_tiny_model(tmp_path / "llama", "llama")
    _quantize_and_compare(tmp_path, write_internlm2(src, tmp_path / "internlm2"), src)


def test_baichuan2_w_pack_and_norm_head_are_read_as_llama(tmp_path):
    """Baichuan2 stores q/k/v as one W_pack and normalises its head's rows at inference (NormHead): the stored rows
    are scaled by arbitrary positive factors here, which the converted head must divide out again."""
    src = make_tiny_model(tmp_path / "llama", "llama", num_key_value_heads=4)  # (Baichuan has no grouped-query attention)
    _quantize_and_compare(tmp_path, write_baichuan2(src, tmp_path / "baichuan2"), src)


def test_qwen_v1_c_attn_and_swapped_mlp_are_read_as_qwen2(tmp_path):
    """Qwen (v1) packs q/k/v with their biases in c_attn and computes its MLP as w1(x)·silu(w2(x)): w2 is the gate.
    A swapped gate/up or a misplaced bias moves every logit; the reference is transformers' Qwen2 with the same
    (random, non-zero) biases."""
    src, cfg, t = _llama(tmp_path, "qwen2", num_key_value_heads=4)  # (Qwen v1 has no grouped-query attention)
    gen = torch.Generator().manual_seed(2)
    for name in t:
        if name.endswith("_proj.bias"):
            t[name] = torch.randn(t[name].shape, generator=gen) * 0.1
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    write_qwen_v1(src, tmp_path / "qwen")
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    _quantize_and_compare(tmp_path, tmp_path / "qwen", src, native="qwen2")
    config["rotary_pct"] = 0.5
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="only Qwen2's layout is converted"):
        quantize(QuantizeConfig(model=tmp_path / "qwen", scheme=get_scheme("w8a16"), out=tmp_path / "q2",
                                calib_texts=[TEXT], num_samples=2, seq_len=32, progress=False), log=lambda _: None)
    assert not (tmp_path / "q2").exists()


def test_baichuan_13b_alibi_and_a_foreign_layout_are_refused_by_name(tmp_path):
    _, cfg, t = _llama(tmp_path, num_key_value_heads=4)
    config = {"model_type": "baichuan", "hidden_size": cfg["hidden_size"], "num_attention_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": cfg["intermediate_size"], "vocab_size": cfg["vocab_size"],
              "model_max_length": 4096}  # (13B: ALiBi, no max_position_embeddings)
    remote_code_folder(tmp_path / "b13", dict(config), t, "modeling_baichuan")
    cfg_ok = {**config, "max_position_embeddings": 256}
    remote_code_folder(tmp_path / "llama_named", cfg_ok, t, "modeling_baichuan")  # Llama tensor names
    for folder, message in ((tmp_path / "b13", "ALiBi"), (tmp_path / "llama_named", "not a Baichuan checkpoint")):
        with pytest.raises(ModelLoadError, match=message):
            quantize(QuantizeConfig(model=folder, scheme=get_scheme("w8a16"), out=tmp_path / "q", calib_texts=[TEXT],
                                    num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda _: None)
        assert not (tmp_path / "q").exists() and not (folder / "RAN").exists()


def _chatglm_folder(tmp_path, **fields):
    """A tiny GLM (partial interleaved rotary, q/k/v biases, GQA) written in THUDM/chatglm3-6b's layout."""
    src = make_tiny_model(tmp_path / "glm", "glm", partial_rotary_factor=0.5)
    return src, write_chatglm3(src, tmp_path / "chatglm", **fields)


def test_chatglm3_query_key_value_is_read_as_glm(tmp_path):
    """ChatGLM2/3 and GLM-4's THUDM folders: q/k/v stacked in one query_key_value with biases, gate and up in one
    dense_h_to_4h; read as transformers' GLM (interleaved rotary on half of each head, base 10000·rope_ratio)."""
    src, folder = _chatglm_folder(tmp_path, rope_ratio=50.0)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 500000.0  # the reference carries the folder's base, 10000 · 50
    (src / "config.json").write_text(json.dumps(cfg))
    _quantize_and_compare(tmp_path, folder, src, native="glm")


def test_chatglm_v1_and_post_norm_variants_are_refused_by_name(tmp_path):
    _, folder = _chatglm_folder(tmp_path, apply_residual_connection_post_layernorm=True)
    with pytest.raises(ModelLoadError, match="apply_residual_connection_post_layernorm"):
        quantize(QuantizeConfig(model=folder, scheme=get_scheme("w8a16"), out=tmp_path / "q", calib_texts=[TEXT],
                                num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    assert not (tmp_path / "q").exists() and not (folder / "RAN").exists()


def test_a_tokenizer_that_is_the_folders_own_python_is_refused_by_name(tmp_path):
    """ChatGLM's and InternLM2's tokenizers are Python in the folder: without --trust-remote-code the run says so
    (instead of 'no usable tokenizer files') and leaves nothing behind."""
    _, folder = _chatglm_folder(tmp_path)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    with pytest.raises(ModelLoadError, match="tokenizer is the folder's own Python"):
        quantize(QuantizeConfig(model=folder, scheme=get_scheme("w8a16"), out=tmp_path / "q", calib_texts=[TEXT],
                                num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    assert not (tmp_path / "q").exists() and not (folder / "RAN").exists()
