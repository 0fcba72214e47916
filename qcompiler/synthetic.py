"""Synthetic checkpoints for tests and benchmarks, built without any download.

`byte_tokenizer` is a byte-level BPE tokenizer with no merges (259 tokens: 3 specials + 256 bytes), enough
to tokenize any text. `write_random_llama` writes a Llama-architecture checkpoint of any size with random
weights straight to sharded safetensors, one block at a time: generating a 30 GB model needs one block of
memory, never the whole model (which is the point of a streaming benchmark).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama_block_shapes(hidden: int, inter: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    return {
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def write_random_llama(path: Path, *, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                       vocab: int = 259, dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 1 << 30,
                       seed: int = 0) -> int:
    """Write a random Llama checkpoint (config, sharded safetensors + index, byte tokenizer) to `path`;
    returns the bytes of weights written. Linear weights ~ N(0, 0.02²) with a few large input channels
    (the outliers real LLMs have), norms 1."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_sizes: list[int] = []
    names: list[list[str]] = []

    def flush() -> None:
        if shard:
            name = f"model-{len(shard_sizes) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            shard_sizes.append(sum(t.numel() * t.element_size() for t in shard.values()))
            names.append(list(shard))
            for k in shard:
                weight_map[k] = name
            shard.clear()

    def add(name: str, shape: tuple[int, ...]) -> None:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            t[:, :4] *= 8.0
        size = t.numel() * t.element_size()
        if shard and sum(x.numel() * x.element_size() for x in shard.values()) + size > shard_bytes:
            flush()
        shard[name] = t

    add("model.embed_tokens.weight", (vocab, hidden))
    for i in range(layers):
        for local, shape in llama_block_shapes(hidden, inter, heads, kv_heads).items():
            add(f"model.layers.{i}.{local}", shape)
    add("model.norm.weight", (hidden,))
    add("lm_head.weight", (vocab, hidden))
    flush()
    total = sum(shard_sizes)
    # final names: model-0000k-of-0000n.safetensors (the Hugging Face convention)
    n = len(shard_sizes)
    for k in range(n):
        old = path / f"model-{k + 1:05d}.safetensors"
        new = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        old.rename(path / new)
        for t in names[k]:
            weight_map[t] = new
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch."), "rope_theta": 10000.0,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    byte_tokenizer().save_pretrained(str(path))
    return total
