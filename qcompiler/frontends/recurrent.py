"""Linear-attention recurrences traced as one `qc::` op each.

A hybrid model's linear-attention layers (Qwen3-Next's Gated DeltaNet, MiniMax's lightning attention) run a
recurrence whose implementation chunks the sequence (pad to a multiple of 64, loop over the chunks): torch.export
cannot keep that symbolic in the sequence length. The recurrence holds no weights, so nothing is lost by keeping it
opaque: while a block is traced, the function transformers calls for it (Qwen3-Next) or the attention module's
forward, where the recurrence is written inline (MiniMax), is swapped for one that calls the op, and the graph gets a
single `qc.gated_delta_rule` / `qc.lightning_attention` node between the projections (ordinary linears, quantized
like any other). The ops' semantics are kernels/reference.py's functions of the same names.

Only the prefill form (no cache state in, none out) is traced: blocks are compiled for whole sequences.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch


def _gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                      beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                      output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                      **_: Any) -> tuple[torch.Tensor, None]:
    # (the chunk size changes how the sum is grouped, not its value)
    if initial_state is not None or output_final_state:
        raise NotImplementedError("qc.gated_delta_rule: a recurrent state is passed in or out; blocks are traced "
                                  "without a cache")
    return torch.ops.qc.gated_delta_rule(query, key, value, g, beta, bool(use_qk_l2norm_in_kernel)), None


def _lightning_attention_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Any = None,
                                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
                                 ) -> tuple[torch.Tensor, None]:
    """MiniMaxLightningAttention.forward (transformers 5) for a whole sequence from a zero state, its block loop the
    qc.lightning_attention op; the projections, activation, padding mask, norm and output gate as transformers'."""
    if any(a is not None for a in (*args, kwargs.get("cache"), kwargs.get("past_key_values"))):
        raise NotImplementedError("qc.lightning_attention: a cache is passed in; blocks are traced without one")
    modeling = sys.modules[type(self).__module__]
    batch, seq, _ = hidden_states.shape
    heads, dim = self.num_attention_heads, self.head_dim
    qkv = modeling.apply_mask_to_padding_states(self.act_fn(self.qkv_proj(hidden_states)), attention_mask)
    query, key, value = torch.split(qkv.reshape(batch, seq, heads, 3 * dim), dim, dim=3)
    out = torch.ops.qc.lightning_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                           self.slope_rate.reshape(-1))
    out = self.norm(out.transpose(1, 2).reshape(batch, seq, heads * dim))
    return self.out_proj(torch.sigmoid(self.output_gate(hidden_states)) * out), None


# the module-level function a modeling file calls → what the trace calls instead
RECURRENCES: dict[str, Callable[..., Any]] = {
    "torch_chunk_gated_delta_rule": _gated_delta_rule,
}
# the attention class whose forward writes its recurrence inline → the forward the trace runs instead
RECURRENT_FORWARDS: dict[str, Callable[..., Any]] = {
    "MiniMaxLightningAttention": _lightning_attention_forward,
}


def _recurrences_defined(module: torch.nn.Module) -> list[tuple[ModuleType, str]]:
    """(modeling file, function name) of each of RECURRENCES that the files defining `module`'s modules define."""
    files = {sys.modules.get(type(m).__module__) for m in module.modules()}
    return [(f, name) for f in files if f is not None for name in RECURRENCES if hasattr(f, name)]


def _recurrent_classes(module: torch.nn.Module) -> list[type]:
    """The classes among `module`'s modules whose forward RECURRENT_FORWARDS replaces."""
    return list({type(m) for m in module.modules() if type(m).__name__ in RECURRENT_FORWARDS})


def recurrence_functions(model_or_block: torch.nn.Module) -> list[str]:
    """The names of RECURRENCES and RECURRENT_FORWARDS classes that `model_or_block`'s modules use."""
    return sorted({name for _, name in _recurrences_defined(model_or_block)}
                  | {c.__name__ for c in _recurrent_classes(model_or_block)})


@contextmanager
def recurrences_as_ops(block: torch.nn.Module) -> Iterator[None]:
    """While tracing `block`, its modeling files' recurrence functions call the `qc::` ops (restored after)."""
    saved: list[tuple[Any, str, Any]] = []
    for mod, name in _recurrences_defined(block):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, RECURRENCES[name])
    for cls in _recurrent_classes(block):
        saved.append((cls, "forward", cls.__dict__["forward"]))
        cls.forward = RECURRENT_FORWARDS[cls.__name__]  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
