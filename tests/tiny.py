"""Tiny real-architecture models built from configs in code (random weights), with a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from qcompiler.synthetic import byte_tokenizer  # noqa: F401  (re-exported for the tests)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")

# Per-family settings of the tiny MoE models: 4 routed experts, top-2; Qwen2-MoE and DeepSeek with shared
# experts; DeepSeek with MLA attention (low-rank q / kv), grouped top-k routing and a dense first layer.
_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96, use_sliding_window=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=24, n_group=2, topk_group=1, topk_method="group_limited_greedy",
                        num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                        first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=24, n_group=2, topk_group=1, num_key_value_heads=4),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    common = dict(
        vocab_size=259, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if family == "qwen2":
        common["use_sliding_window"] = False
    if family == "gemma":
        common["hidden_activation"] = "gelu_pytorch_tanh"
    if family in _MOE:
        common.update(_MOE[family])
        if family.startswith("deepseek"):
            common.pop("head_dim")
    common.update(overrides)
    return AutoConfig.for_model(family, **common)


def make_tiny_model(path: Path, family: str = "llama", seed: int = 0, outliers: bool = True, **overrides) -> Path:
    """Save a random tiny model of `family` to `path`. With `outliers`, some hidden channels get large
    norm weights, reproducing the activation outliers that make SmoothQuant matter in real LLMs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            elif "norm" in name:
                p.normal_(0 if family == "gemma" else 1.0, 0.1)
                if outliers:
                    p[:3] = p[:3] * 8.0 + (8.0 if family == "gemma" else 0.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    byte_tokenizer().save_pretrained(str(path))
    return path


TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "Quantization maps real numbers onto a small grid of integers; calibration picks the grid. " * 3
    + "Every block of a decoder is traced, transformed by passes and lowered to kernels. " * 3
) * 8
