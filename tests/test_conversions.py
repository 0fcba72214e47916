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
from safetensors.torch import load_file, save_file
from tiny import TEXT, make_tiny_model
from transformers import AutoModelForCausalLM
from twin import transformers_twin

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ModelLoadError
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme
from qcompiler.synthetic import byte_tokenizer

PAYLOAD = "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


def _remote_code_folder(path, config: dict, tensors: dict[str, torch.Tensor], modeling: str) -> None:
    path.mkdir()
    (path / f"{modeling}.py").write_text(PAYLOAD)
    config["auto_map"] = {"AutoModelForCausalLM": f"{modeling}.Model", "AutoConfig": f"{modeling}.Config"}
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    byte_tokenizer().save_pretrained(str(path))


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
    src, cfg, t = _llama(tmp_path)
    h, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    hidden = cfg["hidden_size"]
    tensors = {"model.tok_embeddings.weight": t["model.embed_tokens.weight"], "model.norm.weight": t["model.norm.weight"],
               "output.weight": t["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = t[f"{p}self_attn.q_proj.weight"].reshape(kv, h // kv, d, hidden)
        k = t[f"{p}self_attn.k_proj.weight"].reshape(kv, 1, d, hidden)
        v = t[f"{p}self_attn.v_proj.weight"].reshape(kv, 1, d, hidden)
        tensors.update({
            f"{p}attention.wqkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, hidden),
            f"{p}attention.wo.weight": t[f"{p}self_attn.o_proj.weight"],
            f"{p}feed_forward.w1.weight": t[f"{p}mlp.gate_proj.weight"],
            f"{p}feed_forward.w3.weight": t[f"{p}mlp.up_proj.weight"],
            f"{p}feed_forward.w2.weight": t[f"{p}mlp.down_proj.weight"],
            f"{p}attention_norm.weight": t[f"{p}input_layernorm.weight"],
            f"{p}ffn_norm.weight": t[f"{p}post_attention_layernorm.weight"],
        })
    # internlm/internlm2_5-7b-chat's config fields (sizes from the tiny Llama)
    config = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "bias": False,
              "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": cfg["intermediate_size"],
              "num_attention_heads": h, "num_key_value_heads": kv, "num_hidden_layers": cfg["num_hidden_layers"],
              "max_position_embeddings": cfg["max_position_embeddings"], "rms_norm_eps": cfg["rms_norm_eps"],
              "rope_theta": cfg.get("rope_theta", 10000.0), "rope_scaling": None, "vocab_size": cfg["vocab_size"],
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    _remote_code_folder(tmp_path / "internlm2", config, tensors, "modeling_internlm2")
    _quantize_and_compare(tmp_path, tmp_path / "internlm2", src)


def test_baichuan2_w_pack_and_norm_head_are_read_as_llama(tmp_path):
    """Baichuan2 stores q/k/v as one W_pack and normalises its head's rows at inference (NormHead): the stored rows
    are scaled by arbitrary positive factors here, which the converted head must divide out again."""
    src, cfg, t = _llama(tmp_path, num_key_value_heads=4)  # (Baichuan has no grouped-query attention)
    head = torch.nn.functional.normalize(t["lm_head.weight"], dim=-1)  # the Llama reference: a unit-row head
    t["lm_head.weight"] = head
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    scales = torch.rand(head.shape[0], 1, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    tensors = {"model.embed_tokens.weight": t["model.embed_tokens.weight"], "model.norm.weight": t["model.norm.weight"],
               "lm_head.weight": head * scales}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[f"{p}self_attn.W_pack.weight"] = torch.cat([t[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"])
        for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                  "post_attention_layernorm"):
            tensors[f"{p}{n}.weight"] = t[f"{p}{n}.weight"]
    # baichuan-inc/Baichuan2-7B-Base's config fields (sizes from the tiny Llama; no GQA in Baichuan)
    config = {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_act": "silu",
              "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
              "num_attention_heads": cfg["num_attention_heads"], "num_hidden_layers": cfg["num_hidden_layers"],
              "max_position_embeddings": cfg["max_position_embeddings"], "model_max_length": 4096,
              "rms_norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"], "tie_word_embeddings": False,
              "z_loss_weight": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    _remote_code_folder(tmp_path / "baichuan2", config, tensors, "modeling_baichuan")
    _quantize_and_compare(tmp_path, tmp_path / "baichuan2", src)


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
    tensors = {"transformer.wte.weight": t["model.embed_tokens.weight"], "transformer.ln_f.weight": t["model.norm.weight"],
               "lm_head.weight": t["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, c = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            tensors[f"{c}attn.c_attn.{kind}"] = torch.cat([t[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"])
        tensors.update({
            f"{c}attn.c_proj.weight": t[f"{p}self_attn.o_proj.weight"],
            f"{c}mlp.w1.weight": t[f"{p}mlp.up_proj.weight"],
            f"{c}mlp.w2.weight": t[f"{p}mlp.gate_proj.weight"],
            f"{c}mlp.c_proj.weight": t[f"{p}mlp.down_proj.weight"],
            f"{c}ln_1.weight": t[f"{p}input_layernorm.weight"],
            f"{c}ln_2.weight": t[f"{p}post_attention_layernorm.weight"],
        })
    # Qwen/Qwen-7B's config fields (sizes from the tiny Qwen2; its intermediate_size counts w1 and w2 together)
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": cfg["hidden_size"],
              "intermediate_size": 2 * cfg["intermediate_size"], "num_attention_heads": cfg["num_attention_heads"],
              "num_hidden_layers": cfg["num_hidden_layers"], "kv_channels": cfg["hidden_size"] // cfg["num_attention_heads"],
              "layer_norm_epsilon": cfg["rms_norm_eps"], "max_position_embeddings": 8192, "seq_length": 8192,
              "rotary_emb_base": cfg.get("rope_theta", 10000.0), "rotary_pct": 1.0, "scale_attn_weights": True,
              "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "vocab_size": cfg["vocab_size"],
              "tie_word_embeddings": False, "bf16": False, "fp16": False, "fp32": False, "use_flash_attn": "auto"}
    _remote_code_folder(tmp_path / "qwen", config, tensors, "modeling_qwen")
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
    _remote_code_folder(tmp_path / "b13", dict(config), t, "modeling_baichuan")
    cfg_ok = {**config, "max_position_embeddings": 256}
    _remote_code_folder(tmp_path / "llama_named", cfg_ok, t, "modeling_baichuan")  # Llama tensor names
    for folder, message in ((tmp_path / "b13", "ALiBi"), (tmp_path / "llama_named", "not a Baichuan checkpoint")):
        with pytest.raises(ModelLoadError, match=message):
            quantize(QuantizeConfig(model=folder, scheme=get_scheme("w8a16"), out=tmp_path / "q", calib_texts=[TEXT],
                                    num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda _: None)
        assert not (tmp_path / "q").exists() and not (folder / "RAN").exists()


def _chatglm_folder(tmp_path, **fields):
    """A tiny GLM (partial interleaved rotary, q/k/v biases, GQA) written in THUDM/chatglm3-6b's layout."""
    src, cfg, t = _llama(tmp_path, family="glm", partial_rotary_factor=0.5)
    tensors = {"transformer.embedding.word_embeddings.weight": t["model.embed_tokens.weight"],
               "transformer.encoder.final_layernorm.weight": t["model.norm.weight"],
               "transformer.output_layer.weight": t["lm_head.weight"],
               "transformer.rotary_pos_emb.inv_freq": torch.ones(6)}  # (a buffer the conversion ignores)
    for i in range(cfg["num_hidden_layers"]):
        p, c = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            tensors[f"{c}self_attention.query_key_value.{kind}"] = torch.cat(
                [t[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"])
        tensors.update({
            f"{c}self_attention.dense.weight": t[f"{p}self_attn.o_proj.weight"],
            f"{c}mlp.dense_h_to_4h.weight": t[f"{p}mlp.gate_up_proj.weight"],
            f"{c}mlp.dense_4h_to_h.weight": t[f"{p}mlp.down_proj.weight"],
            f"{c}input_layernorm.weight": t[f"{p}input_layernorm.weight"],
            f"{c}post_attention_layernorm.weight": t[f"{p}post_attention_layernorm.weight"],
        })
    rope_theta = cfg["rope_parameters"]["rope_theta"]
    # THUDM/chatglm3-6b-32k's config fields (rope_ratio 50 there; sizes and the ratio from the tiny GLM)
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
              "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
              "apply_residual_connection_post_layernorm": False, "attention_softmax_in_fp32": True,
              "ffn_hidden_size": cfg["intermediate_size"], "hidden_size": cfg["hidden_size"],
              "kv_channels": cfg["head_dim"], "layernorm_epsilon": cfg["rms_norm_eps"], "multi_query_attention": True,
              "multi_query_group_num": cfg["num_key_value_heads"], "num_attention_heads": cfg["num_attention_heads"],
              "num_layers": cfg["num_hidden_layers"], "original_rope": True, "padded_vocab_size": cfg["vocab_size"],
              "post_layer_norm": True, "rmsnorm": True, "rope_ratio": rope_theta / 10000.0,
              "seq_length": cfg["max_position_embeddings"], "tie_word_embeddings": False, "eos_token_id": 2,
              "pad_token_id": 2, **fields}
    _remote_code_folder(tmp_path / "chatglm", config, tensors, "modeling_chatglm")
    return src, tmp_path / "chatglm"


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
