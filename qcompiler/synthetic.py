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


LLAVA_CHAT_TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                       "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}ASSISTANT:")


def write_random_llava(path: Path, *, text: dict[str, Any], vision: dict[str, Any], outlier_gain: float = 1.0,
                       seed: int = 0, **fields: Any) -> Path:
    """A LLaVA-1.5-architecture folder with random weights (σ 0.05) and the processor the published folders have
    (CLIP image processor, the byte tokenizer with an `<image>` token, a chat template): what `--calib-images`
    needs. `text` / `vision` are the language and CLIP vision configs; the projector's first output channel is
    scaled by `outlier_gain` (image tokens then carry one outlier channel, which RMSNorm keeps)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    config = AutoConfig.for_model("llava", text_config=text, vision_config={"model_type": "clip_vision_model", **vision},
                                  image_token_index=image_id, projector_hidden_act="gelu",
                                  vision_feature_select_strategy="default", vision_feature_layer=-2, **fields)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            elif "bias" in name:
                p.normal_(0, 0.02)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        projector = model.model.multi_modal_projector.linear_2
        projector.weight[0] *= outlier_gain
        projector.bias[0] *= outlier_gain
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    size = config.vision_config.image_size
    LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                         crop_size={"height": size, "width": size}),
                   tokenizer=tok, patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1,
                   chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(str(path))
    return path


def write_random_images(folder: Path, count: int, *, size: tuple[int, int] = (40, 52), seed: int = 0,
                        prompts: list[str] | None = None) -> list[Path]:
    """`count` PNG images of seeded noise in `folder` (and `prompts.jsonl` pairing them with `prompts`)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"image-{seed}-{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    if prompts is not None:
        (folder / "prompts.jsonl").write_text("".join(json.dumps({"image": p.name, "prompt": prompts[i % len(prompts)]})
                                                      + "\n" for i, p in enumerate(paths)))
    return paths
