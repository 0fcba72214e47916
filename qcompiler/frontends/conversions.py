"""Checkpoints of families that ship their own modeling code, read as the native architecture with the same maths,
so that no code from the model folder runs (LMDeploy converts these families the same way).

A conversion turns the folder's config.json into a Llama config and names every Llama tensor by the checkpoint
tensors it is computed from (a split of a packed matrix, a rename, a row normalisation); `Checkpoint` then serves
the Llama names, reading and converting tensors lazily, one block at a time.

InternLM2 / InternLM2.5 (`model_type: internlm2`): Llama with renamed modules and one packed `attention.wqkv`
[(H + 2·H_kv)·d, hidden], laid out per KV group: for each of the H_kv key/value heads, its H/H_kv query heads,
then its key head, then its value head (d rows each). Viewed as [H_kv, H/H_kv + 2, d, hidden], the first H/H_kv
slots of every group are q_proj's rows (in head order), the next k_proj's, the last v_proj's.

Baichuan / Baichuan2 7B (`model_type: baichuan` with rotary positions): Llama with `self_attn.W_pack` = [q; k; v]
rows. Baichuan2 (its config has `z_loss_weight`) computes its head as NormHead: logits = x · (W / ‖W_row‖)ᵀ, so the
converted lm_head holds the normalised rows. The 13B models use ALiBi instead of rotary positions (their config has
no `max_position_embeddings`): not Llama, refused by name.
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
    config: dict[str, Any]  # a Llama config.json
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


_CONVERSIONS: dict[str, Callable[[dict[str, Any], set[str], str], Conversion]] = {
    "internlm2": _internlm2,
    "baichuan": _baichuan,
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
    """The Llama config.json written for a converted checkpoint (what loads our outputs), None if not converted."""
    make = _CONVERSIONS.get(str(config.get("model_type")))
    return None if make is None else make(config, set(), "config.json").config
