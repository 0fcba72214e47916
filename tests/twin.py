"""transformers' own model computing what an artefact states: the oracle of the support matrix.

`transformers_twin(source, out)` loads the float model with transformers (eager attention), replaces every
tensor the artefact rewrote (norms scaled by smoothing, an embedding, a head), puts each quantized layer's
dequantized weight ŵ = (q − z)·s into the layer of the same name (fused groups split back, stacked experts
unfused into per-expert linears named as the checkpoint names them) and, for layers with quantized activations,
quantizes the layer's input in a forward pre-hook as the artefact states it (and a quantized KV cache through
transformers' attention interface, qcompiler/runtime/kv_attention.py):

    static per tensor:      x̂ = (clamp(round(x / s_x) + z_x, −128, 127) − z_x) · s_x
    dynamic per token:      s_t = max_k |x_tk| / (2^(b−1) − 1),  x̂_t = clamp(round(x_t / s_t), −2^(b−1), 2^(b−1)−1) · s_t

None of this runs our graphs, passes or kernels: the artefact's numbers are read from its files (export/layers.py
splits fused records) and transformers does the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from qcompiler.export.layers import ExportLayer, from_record
from qcompiler.ir.records import KVRecord, LayerRecord
from qcompiler.runtime.kv_attention import KvGrid, install_kv_cache_grids


def artefact_layers(out: Path) -> tuple[list[ExportLayer], dict[str, torch.Tensor]]:
    desc = json.loads((out / "qcompiler.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    records = [*desc["layers"].values(), *(desc.get("vision") or {}).get("layers", {}).values()]  # (+ --vision-scheme)
    layers = [layer for rec in records for layer in from_record(LayerRecord.from_dict(rec), tensors)]
    return layers, tensors


def _act_hook(layer: ExportLayer):
    if layer.act == "static":
        s = layer.input_scale.float()
        z = layer.input_zero.float() if layer.input_zero is not None else torch.zeros(())

        def static(_mod, args):
            x = args[0]
            return ((torch.clamp(torch.round(x / s) + z, -128, 127) - z) * s).to(x.dtype), *args[1:]
        return static
    qmax = 2 ** (layer.act_bits - 1) - 1

    def dynamic(_mod, args):
        x = args[0]
        scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(1e-8)
        return (torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale).to(x.dtype), *args[1:]
    return dynamic


def _hadamard_hook(k: int):
    from qcompiler.algorithms.hadamard import normalized_hadamard

    h = normalized_hadamard(k)
    assert h is not None, k

    def rotate(_mod, args):
        return (args[0].double() @ h.double()).to(args[0].dtype), *args[1:]
    return rotate


def _has_kv_cache(out: Path) -> bool:
    return bool(json.loads((out / "qcompiler.json").read_text()).get("kv_cache"))


def fill_meta_parameters(model: torch.nn.Module, ckpt) -> None:
    """Give every parameter still on the meta device (unfuse_experts' per-expert linears) its checkpoint tensor,
    read under the module's own name (through the checkpoint's views where it stores experts stacked)."""
    for name, mod in model.named_modules():
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            mod.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for p_name, p in mod.named_parameters(recurse=False):
                    p.copy_(ckpt.tensor(f"{name}.{p_name}"))


def transformers_twin(source: Path, out: Path, activations: bool = True) -> torch.nn.Module:
    """transformers' model of `source` with the weights (and, with `activations`, the activation grids) of the
    artefact in `out`."""
    from transformers import AutoConfig

    from qcompiler.frontends.hf import Checkpoint, find_blocks
    from qcompiler.frontends.moe import unfuse_experts
    from qcompiler.frontends.multimodal import auto_model_class

    auto = auto_model_class(AutoConfig.from_pretrained(str(source)))
    model = auto.from_pretrained(str(source), dtype=torch.float32, attn_implementation="eager").eval()
    if activations and _has_kv_cache(out) and not model._can_set_attn_implementation():
        # (its attention does not go through the attention interface: the cache is quantized on its SDPA call)
        model = auto.from_pretrained(str(source), dtype=torch.float32, attn_implementation="sdpa").eval()
    prefix, _ = find_blocks(model)
    ckpt = Checkpoint(source)
    unfuse_experts(model, ckpt, prefix)  # per-expert linears under the checkpoint's names (weightless)
    fill_meta_parameters(model, ckpt)
    return with_artefact_layers(model, out, activations)


def with_artefact_layers(model: torch.nn.Module, out: Path, activations: bool = True) -> torch.nn.Module:
    """`model` (float, named as the artefact names its layers) with the artefact's rewritten float tensors, each
    quantized layer's ŵ and, with `activations`, its input grid in a pre-hook."""
    layers, tensors = artefact_layers(out)
    desc = json.loads((out / "qcompiler.json").read_text())
    written_config = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    if getattr(model.config, "tie_word_embeddings", False) and written_config.get("tie_word_embeddings") is False:
        # the artefact gave the head its own weight (the residual rotation rotates it apart from the embeddings)
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    rotated = {path for path, rec in desc.get("layers", {}).items() if rec.get("input_rotation") == "hadamard"}
    state = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():  # float tensors the passes rewrote (smoothed norms, ...)
            if name in state and state[name].shape == t.shape:
                state[name].copy_(t)
        for layer in layers:
            mod = model.get_submodule(layer.name)
            mod.weight.copy_(layer.dequantized())
            if layer.bias is not None:
                mod.bias.copy_(layer.bias)
            if layer.name in rotated:  # x·H_K/√K feeds the layer (QuaRot's online Hadamard), before its grid
                mod.register_forward_pre_hook(_hadamard_hook(layer.in_features))
            if activations and layer.act is not None:
                mod.register_forward_pre_hook(_act_hook(layer))
    kv = desc.get("kv_cache") or {}
    # (a DiT's quantized attention, with Q: tests/test_diffusion.py runs it through its FAQuant emulation)
    if activations and kv and not any(r["kind"] == "q" for recs in kv.values() for r in recs):
        install_kv_cache_grids(model, kv_grids(desc["kv_cache"], tensors), str(out))
    return model


def kv_grids(records: dict, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, KvGrid]]:
    """The artefact's static KV-cache grids by attention module path, each expanded per channel of its cache:
    [1, H, 1, D] for K / V, [D] for MLA's latent and rotary key (one cache shared by every head)."""
    grids: dict[str, dict[str, KvGrid]] = {}
    for block, recs in records.items():
        for raw in recs:
            rec = KVRecord.from_dict(raw)
            assert rec.tensors is not None and rec.qmin is not None and rec.qmax is not None, "dynamic KV: not here"
            scale, zero = rec.per_channel(tensors)
            shape = (1, rec.heads, 1, rec.head_dim) if rec.kind in ("k", "v") else (rec.head_dim,)
            grids.setdefault(f"{block}.{rec.module}", {})[rec.kind] = KvGrid(
                scale.reshape(shape), zero.reshape(shape), rec.qmin, rec.qmax)
    return grids
