"""Linear-attention recurrences traced as one `qc::` op each.

A hybrid model's linear-attention layers (Qwen3-Next's Gated DeltaNet) run a recurrence whose implementation
chunks the sequence (pad to a multiple of 64, loop over the chunks): torch.export cannot keep that symbolic in
the sequence length. The recurrence holds no weights, so nothing is lost by keeping it opaque: while a block is
traced, the function transformers calls for it is swapped for one that calls the op, and the graph gets a single
`qc.gated_delta_rule` node between the projections (ordinary linears, quantized like any other). The op's
semantics are kernels/reference.py's `gated_delta_rule`.

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


# the module-level function a modeling file calls → what the trace calls instead
RECURRENCES: dict[str, Callable[..., Any]] = {
    "torch_chunk_gated_delta_rule": _gated_delta_rule,
}


def _recurrences_defined(module: torch.nn.Module) -> list[tuple[ModuleType, str]]:
    """(modeling file, function name) of each of RECURRENCES that the files defining `module`'s modules define."""
    files = {sys.modules.get(type(m).__module__) for m in module.modules()}
    return [(f, name) for f in files if f is not None for name in RECURRENCES if hasattr(f, name)]


def recurrence_functions(model_or_block: torch.nn.Module) -> list[str]:
    """The names of RECURRENCES that the modeling files of `model_or_block`'s modules define."""
    return sorted({name for _, name in _recurrences_defined(model_or_block)})


@contextmanager
def recurrences_as_ops(block: torch.nn.Module) -> Iterator[None]:
    """While tracing `block`, its modeling files' recurrence functions call the `qc::` ops (restored after)."""
    saved = []
    for mod, name in _recurrences_defined(block):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, RECURRENCES[name])
    try:
        yield
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)
