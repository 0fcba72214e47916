"""Tiny checkpoints in the layouts of families that ship their own modeling code (InternLM2, Baichuan2, Qwen v1,
ChatGLM3), written from a native transformers model of the same maths: what qcompiler reads as that native model
without running the folder's Python (qcompiler/frontends/conversions.py). Each folder carries an `auto_map` whose
Python would leave a file named RAN beside it if it ever ran.

Each writer takes the native model's folder and writes the remote-layout folder; the native folder stays the
reference (Baichuan2's writer first gives the native head unit rows, which NormHead's inference computes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qcompiler.synthetic import byte_tokenizer

PAYLOAD = "import pathlib; pathlib.Path(__file__).with_name('RAN').write_text('remote code ran')\n"


def remote_code_folder(path: Path, config: dict, tensors: dict[str, torch.Tensor], modeling: str) -> Path:
    path.mkdir(parents=True)
    (path / f"{modeling}.py").write_text(PAYLOAD)
    config["auto_map"] = {"AutoModelForCausalLM": f"{modeling}.Model", "AutoConfig": f"{modeling}.Config"}
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    byte_tokenizer().save_pretrained(str(path))
    return path


def _native(native: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((native / "config.json").read_text()), load_file(str(native / "model.safetensors"))


def _rope_theta(cfg: dict) -> float:
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _renamed(t: dict[str, torch.Tensor], native: str, remote: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """One layer's tensors under the remote layout's names: {remote + name + ".weight": t[native + ours + ".weight"]}
    for each (ours -> name) of `names`."""
    return {f"{remote}{theirs}.weight": t[f"{native}{ours}.weight"] for ours, theirs in names.items()}


def write_internlm2(native: Path, dest: Path) -> Path:
    """InternLM2 packs q/k/v per KV group: [H_kv, H/H_kv + 2, d, hidden] (the group's query heads, its key, its
    value); internlm/internlm2_5-7b-chat's config fields, sizes from the native Llama."""
    cfg, t = _native(native)
    h, kv, d, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["hidden_size"]
    tensors = {"model.tok_embeddings.weight": t["model.embed_tokens.weight"], "model.norm.weight": t["model.norm.weight"],
               "output.weight": t["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = t[f"{p}self_attn.q_proj.weight"].reshape(kv, h // kv, d, hidden)
        k = t[f"{p}self_attn.k_proj.weight"].reshape(kv, 1, d, hidden)
        v = t[f"{p}self_attn.v_proj.weight"].reshape(kv, 1, d, hidden)
        tensors[f"{p}attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        tensors.update(_renamed(t, p, p, {
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
            "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}))
    config = {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"], "bias": False,
              "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": cfg["intermediate_size"],
              "num_attention_heads": h, "num_key_value_heads": kv, "num_hidden_layers": cfg["num_hidden_layers"],
              "max_position_embeddings": cfg["max_position_embeddings"], "rms_norm_eps": cfg["rms_norm_eps"],
              "rope_theta": _rope_theta(cfg), "rope_scaling": None, "vocab_size": cfg["vocab_size"],
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    return remote_code_folder(dest, config, tensors, "modeling_internlm2")


def write_baichuan2(native: Path, dest: Path) -> Path:
    """Baichuan2 stores q/k/v as one W_pack and normalises its head's rows at inference (NormHead): the native head
    is given unit rows (rewritten in `native`), the stored rows are scaled by arbitrary positive factors, which the
    conversion must divide out again. baichuan-inc/Baichuan2-7B-Base's config fields (no grouped-query attention)."""
    cfg, t = _native(native)
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        raise ValueError("Baichuan has no grouped-query attention: write the native model with as many kv heads")
    head = torch.nn.functional.normalize(t["lm_head.weight"], dim=-1)
    t["lm_head.weight"] = head
    save_file(t, str(native / "model.safetensors"), metadata={"format": "pt"})
    scales = torch.rand(head.shape[0], 1, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    tensors = {"model.embed_tokens.weight": t["model.embed_tokens.weight"], "model.norm.weight": t["model.norm.weight"],
               "lm_head.weight": head * scales}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[f"{p}self_attn.W_pack.weight"] = torch.cat([t[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"])
        tensors.update(_renamed(t, p, p, {n: n for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj", "input_layernorm",
                                                         "post_attention_layernorm")}))
    config = {"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_act": "silu",
              "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
              "num_attention_heads": cfg["num_attention_heads"], "num_hidden_layers": cfg["num_hidden_layers"],
              "max_position_embeddings": cfg["max_position_embeddings"], "model_max_length": 4096,
              "rms_norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"], "tie_word_embeddings": False,
              "z_loss_weight": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return remote_code_folder(dest, config, tensors, "modeling_baichuan")


def write_qwen_v1(native: Path, dest: Path) -> Path:
    """Qwen (v1) packs q/k/v with their biases in c_attn and computes its MLP as w1(x)·silu(w2(x)): w2 is the gate.
    Qwen/Qwen-7B's config fields (no grouped-query attention; intermediate_size counts w1 and w2 together)."""
    cfg, t = _native(native)
    if cfg["num_key_value_heads"] != cfg["num_attention_heads"]:
        raise ValueError("Qwen v1 has no grouped-query attention: write the native Qwen2 with as many kv heads")
    tensors = {"transformer.wte.weight": t["model.embed_tokens.weight"], "transformer.ln_f.weight": t["model.norm.weight"],
               "lm_head.weight": t["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, c = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            tensors[f"{c}attn.c_attn.{kind}"] = torch.cat([t[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"])
        tensors.update(_renamed(t, p, c, {
            "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.w1", "mlp.gate_proj": "mlp.w2",
            "mlp.down_proj": "mlp.c_proj", "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}))
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": cfg["hidden_size"],
              "intermediate_size": 2 * cfg["intermediate_size"], "num_attention_heads": cfg["num_attention_heads"],
              "num_hidden_layers": cfg["num_hidden_layers"], "kv_channels": cfg["hidden_size"] // cfg["num_attention_heads"],
              "layer_norm_epsilon": cfg["rms_norm_eps"], "max_position_embeddings": 8192, "seq_length": 8192,
              "rotary_emb_base": _rope_theta(cfg), "rotary_pct": 1.0, "scale_attn_weights": True,
              "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "vocab_size": cfg["vocab_size"],
              "tie_word_embeddings": False, "bf16": False, "fp16": False, "fp32": False, "use_flash_attn": "auto"}
    return remote_code_folder(dest, config, tensors, "modeling_qwen")


def write_chatglm3(native: Path, dest: Path, **fields) -> Path:
    """THUDM/chatglm3-6b-32k's layout (q/k/v stacked in query_key_value with biases, gate and up in dense_h_to_4h)
    from a native GLM (partial interleaved rotary); its rope base is written as rope_ratio = θ / 10000."""
    cfg, t = _native(native)
    tensors = {"transformer.embedding.word_embeddings.weight": t["model.embed_tokens.weight"],
               "transformer.encoder.final_layernorm.weight": t["model.norm.weight"],
               "transformer.output_layer.weight": t["lm_head.weight"],
               "transformer.rotary_pos_emb.inv_freq": torch.ones(6)}  # (a buffer the conversion ignores)
    for i in range(cfg["num_hidden_layers"]):
        p, c = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            tensors[f"{c}self_attention.query_key_value.{kind}"] = torch.cat(
                [t[f"{p}self_attn.{n}_proj.{kind}"] for n in "qkv"])
        tensors.update(_renamed(t, p, c, {
            "self_attn.o_proj": "self_attention.dense", "mlp.gate_up_proj": "mlp.dense_h_to_4h",
            "mlp.down_proj": "mlp.dense_4h_to_h", "input_layernorm": "input_layernorm",
            "post_attention_layernorm": "post_attention_layernorm"}))
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False,
              "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
              "apply_residual_connection_post_layernorm": False, "attention_softmax_in_fp32": True,
              "ffn_hidden_size": cfg["intermediate_size"], "hidden_size": cfg["hidden_size"],
              "kv_channels": cfg["head_dim"], "layernorm_epsilon": cfg["rms_norm_eps"], "multi_query_attention": True,
              "multi_query_group_num": cfg["num_key_value_heads"], "num_attention_heads": cfg["num_attention_heads"],
              "num_layers": cfg["num_hidden_layers"], "original_rope": True, "padded_vocab_size": cfg["vocab_size"],
              "post_layer_norm": True, "rmsnorm": True, "rope_ratio": _rope_theta(cfg) / 10000.0,
              "seq_length": cfg["max_position_embeddings"], "tie_word_embeddings": False, "eos_token_id": 2,
              "pad_token_id": 2, **fields}
    return remote_code_folder(dest, config, tensors, "modeling_chatglm")


WRITERS = {"internlm2": write_internlm2, "baichuan": write_baichuan2, "qwen": write_qwen_v1, "chatglm": write_chatglm3}
