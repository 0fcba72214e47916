"""Loading a quantized artefact back into a runnable model (the `reference` target's runtime).

The Hugging Face model class provides embeddings, RoPE, masks, final norm and head; each decoder block is
replaced by its lowered FX graph, rebuilt from the artefact description: trace the block skeleton on meta
tensors, re-fuse the recorded groups, emit the recorded kernel op for every quantized layer, then read the
tensors the graph needs from the artefact. The original float weights are never read.

With dtype=torch.bfloat16 the CPU prepack lowering swaps weight-only ops for torch's int4/int8 CPU kernels
(fast only with bf16 activations); in float32 the ops keep the oracle's exact semantics. lower_for="cuda" moves
each block to the GPU and gives its int4 layers tinygemm's layout (runtime/cuda_prepack.py); every other op runs
the kernel kernels/cuda/table.py picks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

from qcompiler.errors import ArtifactError
from qcompiler.export.artifact import read_description
from qcompiler.frontends.hf import (
    BlockCall,
    BlockTracer,
    Checkpoint,
    block_arguments,
    build_skeleton,
    fill_block,
    find_blocks,
    flatten_block_kwargs,
    longest_traced_sequence,
    probe_block_inputs,
)
from qcompiler.frontends.vision import load_vision_tower
from qcompiler.ir.graph import eliminate_dead_attrs
from qcompiler.ir.rebuild import apply_kv_records, local_record, rebuild_block
from qcompiler.ir.records import KVRecord, LayerRecord
from qcompiler.ir.routing import strip_routing_markers


class CompiledBlock(torch.nn.Module):
    """Calls a block's FX graph with the model's keyword arguments (flattened as at trace time)."""

    def __init__(self, gm: fx.GraphModule, call: BlockCall, original: torch.nn.Module):
        super().__init__()
        self.gm = gm
        self._call = call
        self._original = [original]  # (its signature binds positional inputs; a list keeps it out of the modules)
        self._seq_max = longest_traced_sequence(original)
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        if self._seq_max is not None and hidden_states.shape[1] > self._seq_max:
            raise ArtifactError(f"{hidden_states.shape[1]} tokens in one call: this block's sparse-attention indexer "
                                f"keeps {self._seq_max} keys, and the graph holds the function of up to that many "
                                "tokens (every key kept); run longer sequences in the serving engine")
        _, named = block_arguments(self._original[0], (hidden_states, *args), kwargs)
        out = self.gm(hidden_states, *flatten_block_kwargs(self._call, named, hidden_states))
        return (out, *[None] * self._call.trailing_nones) if self._call.tuple_output else out


def load_quantized(out: str | Path, dtype: torch.dtype = torch.float32, lower_for: str | None = None,
                   trust_remote_code: bool = False, dequantize_weights: bool = False) -> torch.nn.Module:
    """The quantized causal LM in `out`, ready to call like any transformers model (`model(ids).logits`).

    lower_for="npu": every quantized linear runs as the torch_npu calls Ascend uses (emulated off an NPU);
    lower_for="cuda": the model on the first CUDA device, int4 layers on tinygemm (bf16 activations for it).
    dequantize_weights (float32 only): weight-only layers dequantized once at load (bit-equal outputs, float32
    weights in memory) — how `qcompile eval` measures perplexity."""
    if lower_for not in (None, "npu", "cuda"):
        raise ArtifactError(f"unknown runtime lowering '{lower_for}'; use None, 'npu' or 'cuda'")
    if lower_for == "cuda" and not torch.cuda.is_available():
        raise ArtifactError("lower_for='cuda' needs a CUDA device, and torch sees none here; load without it")
    desc = read_description(out)
    if desc.get("frontend") == "diffusers":  # (a diffusion transformer: diffusers' class, not transformers')
        from qcompiler.runtime.diffusers import load_quantized_dit

        return load_quantized_dit(Path(out), desc, dtype)
    ckpt = Checkpoint(out, trust_remote_code)
    vision = desc.get("vision")
    where = f"'{Path(out) / 'qcompiler.json'}'"

    def vision_tower(model: torch.nn.Module) -> None:  # (--vision-scheme: its linears are quantized too)
        if vision is None:
            return
        if not isinstance(vision, dict) or not isinstance(vision.get("layers"), dict):
            raise ArtifactError(f"{where}: the 'vision' section is damaged; quantize again")
        records = {p: LayerRecord.from_dict(d, where) for p, d in vision["layers"].items()}
        load_vision_tower(model, records, ckpt.tensor)

    model = build_skeleton(ckpt, dtype=dtype, check=False, before_weights=vision_tower)
    prefix, blocks = find_blocks(model)
    if len(blocks) != desc["blocks"]["count"] or prefix != desc["blocks"]["prefix"]:
        raise ArtifactError(f"'{out}': config.json describes {len(blocks)} blocks, the description {desc['blocks']}")
    probe = probe_block_inputs(model)
    by_block: dict[str, list[LayerRecord]] = {}
    for path, data in desc["layers"].items():
        rest = path[len(prefix) + 1:]
        if not path.startswith(prefix + ".") or "." not in rest:
            raise ArtifactError(f"{where}: layer '{path}' is not inside a block of '{prefix}'; quantize again")
        block = f"{prefix}.{rest.split('.', 1)[0]}"
        by_block.setdefault(block, []).append(local_record(LayerRecord.from_dict(data, where), block))
    kv_by_block = {block: [KVRecord.from_dict(r, where) for r in recs]
                   for block, recs in (desc.get("kv_cache") or {}).items()}
    tracer = BlockTracer(probe)
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}"
        gm = tracer(i, block, name)
        apply_kv_records(gm, kv_by_block.get(name, []), name)  # (before the linears become kernels)
        rebuild_block(gm, by_block.get(name, []), name)
        strip_routing_markers(gm)
        fill_block(gm, name, ckpt, block, dtype)
        eliminate_dead_attrs(gm)
        if lower_for == "npu":
            from qcompiler.runtime.npu import lower_for_npu

            lower_for_npu(gm, dtype)
        elif lower_for == "cuda":
            from qcompiler.runtime.cuda_prepack import prepack_for_cuda

            gm.to("cuda")  # (the tiled layout is made on the device)
            prepack_for_cuda(gm)
        elif dtype == torch.bfloat16:
            from qcompiler.runtime.cpu_prepack import prepack_for_cpu

            prepack_for_cpu(gm)
        elif dequantize_weights and dtype == torch.float32:
            from qcompiler.runtime.cpu_prepack import dequantize_once

            dequantize_once(gm)
        blocks[i] = CompiledBlock(gm, probe.calls[i], block)
    if lower_for == "cuda":
        model.to("cuda")
    model.qcompiler_description = desc  # type: ignore[assignment]
    return model
