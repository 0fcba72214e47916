"""The tiny model of every family in the support matrix: the structural fields of a published config (attention
pattern, biases, norms, soft-capping, rope scaling, routing, tied head), sizes shrunk to a hidden size of 64.

Each entry names the config it copies (`real`) and the row group of the matrix (`row`: the seeds' order, DeepSeek,
Qwen, GLM, HunYuan, InternLM, Llama, Mistral, Gemma, Phi, Baichuan, gpt-oss, then the rest). Sizes every family
shares are in SIZES; an entry's fields override them. Windows are 24 tokens so that checks on 40 tokens cross them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vlm_configs import VLMS, image_inputs

SIZES: dict[str, Any] = dict(
    vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
WINDOW = 24
_ROUTED = dict(num_experts_per_tok=2, moe_intermediate_size=64)


@dataclass(frozen=True)
class Family:
    model_type: str
    row: str  # the matrix's row group
    real: str  # the published config whose structural fields this tiny config keeps
    fields: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()  # SIZES fields the family's config does not have
    multimodal: bool = False  # a vision-language model: `fields` is its whole config (tests/vlm_configs.py)
    # a family that ships its own modeling code: the transformers model_type its tiny model is built as, then written
    # in the family's layout (tests/remote_layouts.py) — what qcompiler reads as that native model, no code run
    native: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("deepseek_v2", "DeepSeek", "deepseek-ai/DeepSeek-V2-Lite", dict(
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1, topk_method="greedy",
        num_key_value_heads=4, routed_scaling_factor=1.0, **_ROUTED), drop=("head_dim",)),
    Family("deepseek_v3", "DeepSeek", "deepseek-ai/DeepSeek-V3", dict(
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, num_key_value_heads=4, **_ROUTED), drop=("head_dim",)),
    Family("deepseek_v32", "DeepSeek", "deepseek-ai/DeepSeek-V3.2-Exp (sparse attention: an indexer keeps index_topk "
           "2048 keys, here 64)", dict(
        n_routed_experts=4, n_shared_experts=1, mlp_layer_types=["dense", "sparse"], q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=4, index_n_heads=2, index_head_dim=32,
        index_topk=64, layer_types=["indexed_attention", "indexed_attention"], **_ROUTED)),
    Family("qwen2", "Qwen", "Qwen/Qwen2.5-7B-Instruct (q/k/v bias)", dict(use_sliding_window=False,
                                                                          rope_theta=1000000.0)),
    Family("qwen2_moe", "Qwen", "Qwen/Qwen1.5-MoE-A2.7B", dict(
        num_experts=4, shared_expert_intermediate_size=96, use_sliding_window=False, **_ROUTED)),
    Family("qwen", "Qwen", "Qwen/Qwen-7B (own code: q/k/v in c_attn, w1·silu(w2); read as Qwen2)", dict(
        num_key_value_heads=4, use_sliding_window=False), native="qwen2"),
    Family("qwen3", "Qwen", "Qwen/Qwen3-0.6B (q/k norms, tied head)", dict(tie_word_embeddings=True)),
    Family("qwen3_moe", "Qwen", "Qwen/Qwen3-30B-A3B", dict(num_experts=4, norm_topk_prob=True, **_ROUTED)),
    Family("qwen3_next", "Qwen", "Qwen/Qwen3-Next-80B-A3B-Instruct (3 linear-attention : 1 full, here 1 : 1)", dict(
        num_experts=4, shared_expert_intermediate_size=64, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        partial_rotary_factor=0.25, **_ROUTED)),
    Family("glm", "GLM", "THUDM/glm-4-9b-chat-hf (partial rotary, q/k/v bias)", dict(partial_rotary_factor=0.5,
                                                                                      head_dim=32)),
    Family("chatglm", "GLM", "THUDM/chatglm3-6b (own code: query_key_value, dense_h_to_4h; read as GLM)", dict(
        partial_rotary_factor=0.5, head_dim=32), native="glm"),
    Family("glm4", "GLM", "THUDM/GLM-4-9B-0414 (sandwich norms)", dict(partial_rotary_factor=0.5, head_dim=32)),
    Family("glm4_moe", "GLM", "zai-org/GLM-4.5-Air (dense first layer, shared expert, q/k/v bias)", dict(
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        norm_topk_prob=True, partial_rotary_factor=0.5, routed_scaling_factor=1.0, **_ROUTED)),
    Family("glm4_moe_lite", "GLM", "zai-org/GLM-4.7-Flash (multi-head latent attention, interleaved rotary, dense first "
           "layer, 64 experts, here 4)", dict(
        n_routed_experts=4, n_shared_experts=1, mlp_layer_types=["dense", "sparse"], q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_key_value_heads=4, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.8, **_ROUTED), drop=("head_dim",)),
    Family("glm_moe_dsa", "GLM", "zai-org/GLM-5 (multi-head latent attention with a DSA indexer keeping index_topk 2048 "
           "keys, here 64; dense first layers)", dict(
        n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, qk_head_dim=32, head_dim=16, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=4, index_n_heads=2, index_head_dim=32,
        index_topk=64, **_ROUTED)),
    Family("hunyuan_v1_dense", "HunYuan", "tencent/Hunyuan-7B-Instruct (q/k norms)", dict()),
    Family("hunyuan_v1_moe", "HunYuan", "tencent/Hunyuan-A13B-Instruct", dict(
        num_experts=4, moe_topk=2, moe_intermediate_size=64, num_shared_expert=1)),
    Family("hy_v3", "HunYuan", "tencent/Hy3 (192 experts with sigmoid routing and expert bias, here 4; q/k norms, dense "
           "first layer)", dict(num_experts=4, num_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                                router_scaling_factor=2.826, **_ROUTED)),
    Family("hy_v4", "HunYuan", "transformers' HY v4 defaults (latent attention with a sparse-attention indexer, 4 "
           "hyper-connection streams, clamped SwiGLU experts: 256, here 4)", dict(
        num_key_value_heads=4, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, index_topk=64,
        index_head_dim=16, index_n_heads=2)),
    Family("internlm2", "InternLM", "internlm/internlm2_5-7b-chat (own code: q/k/v packed per kv group in wqkv; read "
           "as Llama)", dict(), native="llama"),
    Family("internlm3", "InternLM", "internlm/internlm3-8b-instruct (dynamic rope scaling ×6, no biases)", dict(
        rope_parameters=dict(rope_type="dynamic", factor=6.0, rope_theta=50000000.0))),
    Family("llama", "Llama", "meta-llama/Llama-3.1-8B (llama3 rope scaling)", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64))),
    Family("llama4_text", "Llama", "meta-llama/Llama-4-Scout-17B-16E (MoE, chunked / no-rope layers)", dict(
        num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128, attention_chunk_size=24,
        no_rope_layers=[1, 0], interleave_moe_layer_step=1)),
    Family("mistral", "Mistral", "mistralai/Mistral-7B-v0.1 (sliding window)", dict(sliding_window=WINDOW)),
    Family("mixtral", "Mistral", "mistralai/Mixtral-8x7B-v0.1", dict(num_local_experts=4, num_experts_per_tok=2)),
    Family("ministral3", "Mistral", "transformers' Ministral 3 defaults", dict()),
    Family("gemma", "Gemma", "google/gemma-2b (embedding scale, tied head, 1 kv head)", dict(
        hidden_activation="gelu_pytorch_tanh", num_key_value_heads=1, tie_word_embeddings=True)),
    Family("gemma2", "Gemma", "google/gemma-2-2b (soft-capping, sliding / full)", dict(
        hidden_activation="gelu_pytorch_tanh", sliding_window=WINDOW, query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"])),
    Family("gemma3_text", "Gemma", "google/gemma-3-1b-pt (5 sliding : 1 full, here 1 : 1)", dict(
        hidden_activation="gelu_pytorch_tanh", sliding_window=WINDOW, query_pre_attn_scalar=16,
        tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"])),
    Family("gemma4_text", "Gemma", "transformers' Gemma 4 text defaults (sliding / full layers, per-layer input "
           "embeddings, tied head)", dict(
        hidden_activation="gelu_pytorch_tanh", sliding_window=WINDOW, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=32,
        vocab_size_per_layer_input=259)),
    Family("phi3", "Phi", "microsoft/Phi-3-mini-4k-instruct (fused qkv / gate_up)", dict()),
    Family("phimoe", "Phi", "microsoft/Phi-3.5-MoE-instruct", dict(num_local_experts=4, num_experts_per_tok=2),
           drop=("head_dim",)),
    Family("phi", "Phi", "microsoft/phi-2 (parallel attention and MLP, partial rotary 0.4, biases, LayerNorm, biased "
           "head)", dict(partial_rotary_factor=0.4, num_key_value_heads=4), drop=("head_dim",)),
    Family("baichuan", "Baichuan", "baichuan-inc/Baichuan2-7B-Base (own code: W_pack, NormHead; read as Llama)", dict(
        num_key_value_heads=4), native="llama"),
    Family("gpt_oss", "gpt-oss", "openai/gpt-oss-20b (attention sinks, sliding / full, biased experts)", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"])),
    Family("granite", "Granite", "ibm-granite/granite-3.3-2b-instruct (multipliers)", dict(
        embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.0625,
        tie_word_embeddings=True)),
    Family("ernie4_5", "ERNIE", "baidu/ERNIE-4.5-0.3B-PT", dict(tie_word_embeddings=True)),
    Family("granitemoe", "Granite", "ibm-granite/granite-3.1-1b-a400m-instruct", dict(
        num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0, logits_scaling=6.0,
        residual_multiplier=0.22, attention_multiplier=0.0625, tie_word_embeddings=True), drop=("head_dim",)),
    Family("ernie4_5_moe", "ERNIE", "baidu/ERNIE-4.5-21B-A3B-PT (dense first layer, shared experts)", dict(
        moe_num_experts=4, moe_k=2, moe_intermediate_size=64, moe_layer_start_index=1, moe_num_shared_experts=1),
           drop=("head_dim",)),
    Family("minimax", "MiniMax", "MiniMaxAI/MiniMax-Text-01 (lightning attention : full, here 1 : 1)", dict(
        num_local_experts=4, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"])),
    Family("minimax_m2", "MiniMax", "MiniMaxAI/MiniMax-M2 (full attention, q/k norms over all heads, 256 experts, here 4)",
           dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    Family("exaone4", "EXAONE", "LGAI-EXAONE/EXAONE-4.0-1.2B (3 sliding : 1 full, here 1 : 1)", dict(
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    Family("olmo2", "OLMo", "allenai/OLMo-2-1124-7B (post-norms, q/k norms)", dict()),
    Family("olmo3", "OLMo", "transformers' OLMo 3 defaults (sliding / full layers, post-norms, q/k norms)", dict(
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    Family("cohere", "Cohere", "CohereForAI/c4ai-command-r-v01 (parallel block, logit scale)", dict(
        logit_scale=0.0625, tie_word_embeddings=True), drop=("head_dim",)),
    Family("cohere2", "Cohere", "CohereLabs/c4ai-command-r7b-12-2024 (sliding layers with rope : full layers without, "
           "here 1 : 1)", dict(logit_scale=0.25, sliding_window=WINDOW, tie_word_embeddings=True,
                               layer_types=["sliding_attention", "full_attention"])),
    Family("starcoder2", "StarCoder2", "bigcode/starcoder2-3b (biases, gelu MLP)", dict(sliding_window=WINDOW),
           drop=("head_dim",)),
    Family("falcon", "Falcon", "tiiuae/falcon-7b (parallel attention, multi-query)", dict(
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, num_kv_heads=1),
           drop=("intermediate_size", "num_key_value_heads", "head_dim")),
    Family("gpt_neox", "GPT-NeoX", "EleutherAI/pythia-160m (parallel residual, partial rotary, fused qkv)", dict(
        rotary_pct=0.25, use_parallel_residual=True), drop=("num_key_value_heads", "head_dim")),
    Family("smollm3", "SmolLM3", "HuggingFaceTB/SmolLM3-3B (no rope every 4th layer, here the 2nd)", dict(
        no_rope_layer_interval=2, tie_word_embeddings=True)),
    Family("minicpm3", "MiniCPM", "openbmb/MiniCPM3-4B (multi-head latent attention, scaled embeddings, residuals and "
           "logits, tied head)", dict(
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, num_key_value_heads=4,
        scale_emb=12, scale_depth=1.4, dim_model_base=32, tie_word_embeddings=True)),
)
# Vision-language models (issue 16): the language model's blocks quantized, vision tower and projector float; checked
# on prompts holding an image (tests/vlm_configs.py builds the pixels and placeholder tokens as the processors do).
FAMILIES += tuple(Family(v.model_type, f"VLM: {v.name}", v.copies, v.config, multimodal=True) for v in VLMS)
BY_TYPE = {f.model_type: f for f in FAMILIES}


def family_config(family: Family) -> Any:
    from transformers import AutoConfig

    if family.multimodal:
        return AutoConfig.for_model(family.model_type, **family.fields)
    fields = {k: v for k, v in SIZES.items() if k not in family.drop}
    fields.setdefault("tie_word_embeddings", False)
    fields.update(family.fields)
    return AutoConfig.for_model(family.native or family.model_type, **fields)


def native_reference(family: Family, model: Path) -> Path:
    """The transformers model `family`'s tiny checkpoint at `model` is read as: itself, or for a family with its own
    modeling code the native model it was written from (beside it)."""
    return model.with_name(model.name + "-native") if family.native else model


def make_family_model(path: Path, family: Family, seed: int = 0) -> Path:
    """Save `family`'s tiny model with random weights (σ 0.05; norm weights around their neutral value) and the
    byte tokenizer to `path` (a family with its own modeling code: the native model beside it, in its own layout
    at `path`)."""
    from qcompiler.frontends.multimodal import auto_model_class
    from qcompiler.synthetic import byte_tokenizer

    if family.native:
        from remote_layouts import WRITERS

        native = native_reference(family, path)
        make_family_model(native, dataclasses.replace(family, model_type=family.native, native=None), seed)
        return WRITERS[family.model_type](native, path)

    torch.manual_seed(seed)
    config = family_config(family)
    model = auto_model_class(config).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            elif "norm" in name:  # (Gemma-style norms scale by 1 + w: keep their zero-centred init)
                p.add_(torch.randn_like(p) * 0.1)
            elif "bias" in name:
                p.normal_(0, 0.02)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    byte_tokenizer().save_pretrained(str(path))
    return path


def family_inputs(family: Family, model: Path, seq: int = 40) -> dict[str, torch.Tensor]:
    """The model's keyword inputs the matrix checks: 2 × `seq` token ids, or for a VLM 2 prompts holding an image."""
    if family.multimodal:
        from transformers import AutoConfig

        return image_inputs(BY_VLM[family.model_type], AutoConfig.from_pretrained(str(model)))
    return {"input_ids": torch.randint(3, 250, (2, seq), generator=torch.Generator().manual_seed(0))}


BY_VLM = {v.model_type: v for v in VLMS}
