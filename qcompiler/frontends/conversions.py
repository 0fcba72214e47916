"""Checkpoints of families that ship their own modeling code, read as the native architecture with the same maths,
so that no code from the model folder runs (LMDeploy and transformers' own conversion scripts do the same).

A conversion turns the folder's config.json into a native config (Llama, or GLM for ChatGLM) and names every
native tensor by the checkpoint tensors it is computed from (a split of a packed matrix, a rename, a row
normalisation); `Checkpoint` then serves the native names, reading and converting tensors lazily, one block at a
time.

InternLM2 / InternLM2.5 (`model_type: internlm2`): Llama with renamed modules and one packed `attention.wqkv`
[(H + 2·H_kv)·d, hidden], laid out per KV group: for each of the H_kv key/value heads, its H/H_kv query heads,
then its key head, then its value head (d rows each). Viewed as [H_kv, H/H_kv + 2, d, hidden], the first H/H_kv
slots of every group are q_proj's rows (in head order), the next k_proj's, the last v_proj's.

Baichuan / Baichuan2 7B (`model_type: baichuan` with rotary positions): Llama with `self_attn.W_pack` = [q; k; v]
rows. Baichuan2 (its config has `z_loss_weight`) computes its head as NormHead: logits = x · (W / ‖W_row‖)ᵀ, so the
converted lm_head holds the normalised rows. The 13B models use ALiBi instead of rotary positions (their config has
no `max_position_embeddings`): not Llama, refused by name.

Qwen (v1: Qwen-7B / 14B / 72B and their chat models, `model_type: qwen`): Qwen2 (q/k/v biases, none on the
output projection, no grouped-query attention) with `attn.c_attn` = [q; k; v] rows (with bias), the MLP's
`w2` as the gate and `w1` as the up projection (Qwen's MLP computes w1(x) · silu(w2(x)), each of
intermediate_size / 2 rows), RMSNorms `ln_1` / `ln_2` / `ln_f`, rotary on whole heads with base rotary_emb_base.
Its dynamic-NTK and log-n attention scaling (use_dynamic_ntk, use_logn_attn) act only beyond seq_length tokens,
so the converted model is the same function up to seq_length, which becomes its max_position_embeddings; a
rotary_pct below 1 or kv_channels other than hidden_size / heads is another architecture, refused by name.

ChatGLM2 / ChatGLM3 / GLM-4 (`model_type: chatglm`, THUDM's original folders): transformers' GLM (the class of
THUDM/glm-4-9b-chat-hf). `query_key_value` = [q (H·d); k (H_kv·d); v (H_kv·d)] rows with biases, `dense_h_to_4h`
= [gate; up] (GLM's gate_up_proj as is), rotary on the first half of each head in interleaved pairs with base
10000·rope_ratio (GLM's partial_rotary_factor 0.5 and interleaved rotate_half). ChatGLM-6B (v1, 2-D positions,
GELU, post-norm residuals) is another architecture: refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qcompiler.errors import ModelLoadError

Convert = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Conversion:
    family: str  # what the folder holds, in words
    config: dict[str, Any]  # the native config.json (Llama, GLM)
    tensors: dict[str, tuple[tuple[str, ...], Convert]]  # Llama name -> (checkpoint names, function of them)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _llama_config(src: dict[str, Any], **fields: Any) -> dict[str, Any]:
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
            "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "tie_word_embeddings", "torch_dtype", "rope_theta")
    cfg = {k: src[k] for k in keep if k in src}
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act=src.get("hidden_act", "silu"),
               attention_bias=False, mlp_bias=False, **fields)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    return cfg


def _rope_scaling(src: dict[str, Any], where: str) -> dict[str, Any] | None:
    scaling = src.get("rope_scaling")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "dynamic"):
        raise ModelLoadError(f"{where}: rope_scaling type '{kind}' has no Llama equivalent here")
    return {"rope_type": kind, "factor": float(scaling["factor"])}


def _internlm2(src: dict[str, Any], names: set[str], where: str) -> Conversion:
    if src.get("bias"):
        raise ModelLoadError(f"{where}: InternLM2 with attention biases (bias: true) is not converted yet")
    h, kv = int(src["num_attention_heads"]), int(src.get("num_key_value_heads") or src["num_attention_heads"])
    d = int(src["hidden_size"]) // h
    per = h // kv

    def part(which: int | slice) -> Convert:
        def f(wqkv: torch.Tensor) -> torch.Tensor:
            grouped = wqkv.reshape(kv, per + 2, d, wqkv.shape[-1])
            return grouped[:, which].reshape(-1, wqkv.shape[-1]).contiguous()
        return f

    tensors: dict[str, tuple[tuple[str, ...], Convert]] = {
        "model.embed_tokens.weight": (("model.tok_embeddings.weight",), _same),
        "model.norm.weight": (("model.norm.weight",), _same),
    }
    if "output.weight" in names:
        tensors["lm_head.weight"] = (("output.weight",), _same)
    for i in range(int(src["num_hidden_layers"])):
        p = f"model.layers.{i}."
        qkv = (f"{p}attention.wqkv.weight",)
        tensors.update({
            f"{p}self_attn.q_proj.weight": (qkv, part(slice(0, per))),
            f"{p}self_attn.k_proj.weight": (qkv, part(per)),
            f"{p}self_attn.v_proj.weight": (qkv, part(per + 1)),
            f"{p}self_attn.o_proj.weight": ((f"{p}attention.wo.weight",), _same),
            f"{p}mlp.gate_proj.weight": ((f"{p}feed_forward.w1.weight",), _same),
            f"{p}mlp.up_proj.weight": ((f"{p}feed_forward.w3.weight",), _same),
            f"{p}mlp.down_proj.weight": ((f"{p}feed_forward.w2.weight",), _same),
            f"{p}input_layernorm.weight": ((f"{p}attention_norm.weight",), _same),
            f"{p}post_attention_layernorm.weight": ((f"{p}ffn_norm.weight",), _same),
        })
    config = _llama_config(src, num_key_value_heads=kv, rope_scaling=_rope_scaling(src, where))
    return Conversion("InternLM2", config, tensors)


def _baichuan(src: dict[str, Any], names: set[str], where: str) -> Conversion:
    if "max_position_embeddings" not in src:
        raise ModelLoadError(f"{where}: this Baichuan model (13B) uses ALiBi positions, which have no Llama "
                             "equivalent; only the rotary 7B models are converted")
    hidden = int(src["hidden_size"])
    norm_head = "z_loss_weight" in src  # Baichuan2

    def part(i: int) -> Convert:
        return lambda w: w[i * hidden:(i + 1) * hidden].contiguous()

    def head(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(w.float(), dim=-1).to(w.dtype) if norm_head else w

    tensors: dict[str, tuple[tuple[str, ...], Convert]] = {
        "model.embed_tokens.weight": (("model.embed_tokens.weight",), _same),
        "model.norm.weight": (("model.norm.weight",), _same),
        "lm_head.weight": (("lm_head.weight",), head),
    }
    for i in range(int(src["num_hidden_layers"])):
        p = f"model.layers.{i}."
        pack = (f"{p}self_attn.W_pack.weight",)
        tensors.update({f"{p}self_attn.{n}_proj.weight": (pack, part(j)) for j, n in enumerate("qkv")})
        for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                  "post_attention_layernorm"):
            tensors[f"{p}{n}.weight"] = ((f"{p}{n}.weight",), _same)
    return Conversion("Baichuan2" if norm_head else "Baichuan", _llama_config(src, tie_word_embeddings=False),
                      tensors)


def _qwen(src: dict[str, Any], names: set[str], where: str) -> Conversion:
    h, hidden = int(src["num_attention_heads"]), int(src["hidden_size"])
    d = int(src.get("kv_channels") or hidden // h)
    if float(src.get("rotary_pct", 1.0)) != 1.0 or d * h != hidden:
        raise ModelLoadError(f"{where}: this Qwen model rotates {src.get('rotary_pct')} of each head or has "
                             f"kv_channels {d} ≠ hidden_size / heads; only Qwen2's layout is converted")

    def part(i: int) -> Convert:
        return lambda w: w[i * hidden:(i + 1) * hidden].contiguous()

    tensors: dict[str, tuple[tuple[str, ...], Convert]] = {
        "model.embed_tokens.weight": (("transformer.wte.weight",), _same),
        "model.norm.weight": (("transformer.ln_f.weight",), _same),
        "lm_head.weight": (("lm_head.weight",), _same),
    }
    for i in range(int(src["num_hidden_layers"])):
        p, c = f"model.layers.{i}.", f"transformer.h.{i}."
        for j, n in enumerate("qkv"):
            for kind in ("weight", "bias"):
                tensors[f"{p}self_attn.{n}_proj.{kind}"] = ((f"{c}attn.c_attn.{kind}",), part(j))
        tensors.update({
            f"{p}self_attn.o_proj.weight": ((f"{c}attn.c_proj.weight",), _same),
            f"{p}mlp.gate_proj.weight": ((f"{c}mlp.w2.weight",), _same),
            f"{p}mlp.up_proj.weight": ((f"{c}mlp.w1.weight",), _same),
            f"{p}mlp.down_proj.weight": ((f"{c}mlp.c_proj.weight",), _same),
            f"{p}input_layernorm.weight": ((f"{c}ln_1.weight",), _same),
            f"{p}post_attention_layernorm.weight": ((f"{c}ln_2.weight",), _same),
        })
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
              "hidden_size": hidden, "intermediate_size": int(src["intermediate_size"]) // 2,
              "num_hidden_layers": src["num_hidden_layers"], "num_attention_heads": h, "num_key_value_heads": h,
              "max_position_embeddings": src.get("seq_length", src.get("max_position_embeddings", 8192)),
              "rms_norm_eps": src.get("layer_norm_epsilon", 1e-6), "vocab_size": src["vocab_size"],
              "rope_theta": float(src.get("rotary_emb_base", 10000)), "tie_word_embeddings": False,
              "use_sliding_window": False}
    config.update({k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype") if k in src})
    return Conversion("Qwen", config, tensors)


def _chatglm(src: dict[str, Any], names: set[str], where: str) -> Conversion:
    # the fields of ChatGLM2/3 and GLM-4 that make it transformers' GLM; any other value is another architecture
    required = {"rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
                "add_bias_linear": False, "original_rope": True}
    wrong = {k: src.get(k) for k, v in required.items() if src.get(k, v) != v}
    if "position_encoding_2d" in src or "num_layers" not in src or wrong:
        raise ModelLoadError(f"{where}: this ChatGLM variant ({wrong or 'ChatGLM-6B v1: 2-D positions, GELU'}) is "
                             "not transformers' GLM; only ChatGLM2/ChatGLM3/GLM-4 folders are converted")
    h = int(src["num_attention_heads"])
    kv = int(src["multi_query_group_num"]) if src.get("multi_query_attention") else h
    d = int(src.get("kv_channels") or int(src["hidden_size"]) // h)
    bias = bool(src.get("add_qkv_bias"))
    rows = {"q": (0, h * d), "k": (h * d, (h + kv) * d), "v": ((h + kv) * d, (h + 2 * kv) * d)}

    def part(which: str) -> Convert:
        lo, hi = rows[which]
        return lambda w: w[lo:hi].contiguous()

    tensors: dict[str, tuple[tuple[str, ...], Convert]] = {
        "model.embed_tokens.weight": (("transformer.embedding.word_embeddings.weight",), _same),
        "model.norm.weight": (("transformer.encoder.final_layernorm.weight",), _same),
        "lm_head.weight": (("transformer.output_layer.weight",), _same),
    }
    for i in range(int(src["num_layers"])):
        p, c = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for n in "qkv":
            for kind in ("weight", "bias") if bias else ("weight",):
                tensors[f"{p}self_attn.{n}_proj.{kind}"] = ((f"{c}self_attention.query_key_value.{kind}",), part(n))
        tensors.update({
            f"{p}self_attn.o_proj.weight": ((f"{c}self_attention.dense.weight",), _same),
            f"{p}mlp.gate_up_proj.weight": ((f"{c}mlp.dense_h_to_4h.weight",), _same),
            f"{p}mlp.down_proj.weight": ((f"{c}mlp.dense_4h_to_h.weight",), _same),
            f"{p}input_layernorm.weight": ((f"{c}input_layernorm.weight",), _same),
            f"{p}post_attention_layernorm.weight": ((f"{c}post_attention_layernorm.weight",), _same),
        })
    config = {"model_type": "glm", "architectures": ["GlmForCausalLM"], "hidden_act": "silu",
              "hidden_size": src["hidden_size"], "intermediate_size": src["ffn_hidden_size"],
              "num_hidden_layers": src["num_layers"], "num_attention_heads": h, "num_key_value_heads": kv,
              "head_dim": d, "max_position_embeddings": src.get("seq_length", 8192),
              "rms_norm_eps": src.get("layernorm_epsilon", 1e-5), "vocab_size": src["padded_vocab_size"],
              "rope_theta": 10000.0 * float(src.get("rope_ratio", 1)), "partial_rotary_factor": 0.5,
              "attention_bias": bias, "tie_word_embeddings": False}
    config.update({k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype") if k in src})
    return Conversion("ChatGLM", config, tensors)


_CONVERSIONS: dict[str, Callable[[dict[str, Any], set[str], str], Conversion]] = {
    "internlm2": _internlm2,
    "baichuan": _baichuan,
    "chatglm": _chatglm,
    "qwen": _qwen,
}
CONVERTED = frozenset(_CONVERSIONS)


def find_conversion(config: dict[str, Any], names: set[str], where: str) -> Conversion | None:
    """The conversion of a checkpoint whose config.json has `model_type` in _CONVERSIONS (None otherwise); every
    checkpoint tensor a conversion names must exist, and every checkpoint tensor must be used."""
    make = _CONVERSIONS.get(str(config.get("model_type")))
    if make is None:
        return None
    try:
        conversion = make(config, names, where)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: config.json lacks or misstates a field the "
                             f"{config.get('model_type')} conversion needs ({e})") from None
    used = {s for sources, _ in conversion.tensors.values() for s in sources}
    missing, unused = sorted(used - names), sorted(n for n in names - used if not n.endswith("inv_freq"))
    if missing or unused:
        raise ModelLoadError(f"{where}: not a {conversion.family} checkpoint in the expected layout (missing "
                             f"{missing[:3]}, unused {unused[:3]})")
    return conversion


def converted_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The native config.json written for a converted checkpoint (what loads our outputs), None if not converted."""
    make = _CONVERSIONS.get(str(config.get("model_type")))
    return None if make is None else make(config, set(), "config.json").config
