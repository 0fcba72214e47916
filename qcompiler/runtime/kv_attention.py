"""A transformers model whose attention reads its KV cache back from int8 / int4 codes, as a quantized-cache
serving engine does: what the cache stores is quantized once, attention sees the dequantized values.

Attention receives K after the rotary embedding (and any per-head norm) and V, both [B, H_kv, S, D] before GQA
repeats the KV heads: exactly the tensors the cache holds. Each is replaced by

    x̂ = (clamp(round(x / s) + z, qmin, qmax) − z) · s        s, z: [1, H_kv, 1, D] (per tensor / head / channel)

by wrapping the model's attention implementation (transformers' attention interface, which every modern decoder
calls with (module, query, key, value, mask, ...); an attention that calls torch's SDPA itself, as Falcon's does,
has that call's K and V quantized instead). Multi-head latent attention caches its latent instead: the
kv_b_proj input [B, S, r] gets the latent's grid (a forward pre-hook) and the key's last d_rope channels, the
rotary key shared by all heads, get k_rope's.

Used by the msModelSlim loader (C8 folders) and by the tests' transformers twin; our own artefact quantizes the
cache inside its lowered graphs (qc::fake_quant_kv), independently of this.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qcompiler.errors import ArtifactError


@dataclass(frozen=True)
class KvGrid:
    scale: torch.Tensor  # broadcastable over the cached tensor: [1, H, 1, D] (or [D] for MLA's latent / rotary key)
    zero: torch.Tensor
    qmin: int
    qmax: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x.float() / self.scale) + self.zero, self.qmin, self.qmax)
        return ((q - self.zero) * self.scale).to(x.dtype)


GRIDS = "_qcompiler_kv_grids"  # attribute of an attention module: {"k" | "v" | "kv_latent" | "k_rope": KvGrid}


def _wrapped(base_name: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  *args: Any, **kwargs: Any) -> Any:
        grids: dict[str, KvGrid] | None = getattr(module, GRIDS, None)
        if grids:
            if "k" in grids:
                key = grids["k"](key)
            if "v" in grids:
                value = grids["v"](value)
            if "k_rope" in grids:
                d = grids["k_rope"].scale.numel()
                key = torch.cat([key[..., :-d], grids["k_rope"](key[..., -d:])], dim=-1)
            module._qcompiler_kv_calls = getattr(module, "_qcompiler_kv_calls", 0) + 1
        if base_name == "eager":  # (each model family's own eager attention: soft-capping, sinks, ...)
            base = sys.modules[type(module).__module__].eager_attention_forward
        else:
            base = ALL_ATTENTION_FUNCTIONS[base_name]
        return base(module, query, key, value, *args, **kwargs)
    return attention


def install_kv_cache_grids(model: Any, grids: dict[str, dict[str, KvGrid]], where: str) -> None:
    """Quantize the cache of each attention module named in `grids` (module path -> its cache grids)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    base = decoder.config._attn_implementation or "eager"
    name = f"qcompiler_kv_{base}"
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _wrapped(base))
        # (the mask is built for the implementation's name: the base's own mask, or none at all would be built)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    for path, grid in grids.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ArtifactError(f"{where}: KV-cache scales name attention '{path}', which the model does not "
                                "have") from None
        setattr(module, GRIDS, grid)
        if "kv_latent" in grid:
            latent = grid["kv_latent"]
            module.kv_b_proj.register_forward_pre_hook(lambda _m, args, g=latent: (g(args[0]), *args[1:]),
                                                       prepend=True)
    if decoder._can_set_attn_implementation():
        decoder.set_attn_implementation(name)
        return
    if base != "sdpa" or any(set(g) - {"k", "v"} for g in grids.values()):
        raise ArtifactError(f"{where}: {type(decoder).__name__} does not route its attention through transformers' "
                            "attention interface, so its KV cache cannot be quantized here (with sdpa attention, "
                            "its calls of torch's scaled_dot_product_attention are)")
    for path, grid in grids.items():  # (Falcon: its attention calls torch's SDPA itself)
        scope = f"{where}: attention '{path}'"
        quantize_sdpa_operands(model.get_submodule(path), _cache_operands(grid, scope), scope,
                               "its KV cache cannot be quantized here")


def quantize_sdpa_operands(module: torch.nn.Module,
                           operands: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                              tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                           where: str, consequence: str) -> None:
    """Run `module`'s call of torch's scaled_dot_product_attention on `operands(q, k, v)` (torch's SDPA swapped for
    the length of the module's call): for attention that calls SDPA itself rather than through transformers'
    attention interface (Falcon's; diffusers' attention processors). A call that bypassed SDPA, or called it more
    than once, is refused: it would run unquantized, silently."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = [0]

    def quantized_sdpa(query, key, value, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return sdpa(*operands(query, key, value), *args, **kwargs)

    def enter(*_: object) -> None:
        calls[0] = 0
        torch.nn.functional.scaled_dot_product_attention = quantized_sdpa

    def leave(_module: object, _args: object, output: object) -> None:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        if output is not None and calls[0] != 1:  # (None: the call raised, and that error propagates)
            raise ArtifactError(f"{where} called torch's scaled_dot_product_attention {calls[0]} times, not once: "
                                f"{consequence}")

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def _cache_operands(grids: dict[str, KvGrid], where: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """(q, k, v) -> (q, k̂, v̂) with K and V on their cache grids, checked to enter attention unrepeated."""
    def operands(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for which, x in (("k", key), ("v", value)):
            if x.dim() != 4 or x.shape[1] != grids[which].scale.shape[1]:
                raise ArtifactError(f"{where}: its {which} enters attention as {list(x.shape)}, not with the "
                                    f"{grids[which].scale.shape[1]} heads its cache grid has")
        return query, grids["k"](key), grids["v"](value)
    return operands
