"""Mixture-of-experts blocks as graphs of ordinary linears, one per expert and projection.

transformers ≥ 5 keeps a block's experts as two stacked tensors (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) and loops over the experts that received tokens: data-dependent control flow that cannot be traced,
and weights that are not linears. Checkpoints on disk, and every serving engine, keep one linear per expert
and projection (`experts.3.gate_proj.weight`, Mixtral: `experts.3.w1.weight`). `unfuse_experts` replaces each
stacked-experts module of the weightless skeleton with `ExpertLinears`, which holds those per-expert linears
under their checkpoint names and computes the block densely:

    combine[t, e] = Σ_j top_k_weights[t, j] · [top_k_index[t, j] = e]          (qc::expert_routing)
    y[t]          = Σ_e combine[t, e] · down_e(act(gate_e(x_e)) ⊙ up_e(x_e))[t],   x_e = qc::routed(x, combine[:, e])

Every expert computes every token and the unrouted ones are weighted by exactly 0, so the block output is
the sparse block's (up to the order of the float sum). `qc::routed` is the identity; it marks the inputs of
an expert's linears so calibration statistics of those inputs are taken over the tokens routed to that
expert only (calib/stats.py) — or over all tokens with `calibrate_all_experts`, which then changes no output.
Lowering removes the markers (ir/routing.strip_routing_markers). Router linears stay in float by default (their role
is "router": the linear's output reaches a top-k, ir/analysis.py).

Dense evaluation costs E/k times the MLP FLOPs of the sparse block during calibration (what llm-compressor's
calibrate_all_experts costs too); it keeps shapes static and every expert's statistics in one run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from qcompiler.errors import ModelLoadError
from qcompiler.ir.analysis import expert_of
from qcompiler.ir.graph import is_call
from qcompiler.ir.routing import EXPERT_ROUTING, ROUTED, expert_routing, routed


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) ⊙ up(x)), its linears named as in the checkpoint."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str], act: Any, dtype: torch.dtype):
        super().__init__()
        self.names = names
        for name, (o, i) in zip(names, ((inter, hidden), (inter, hidden), (hidden, inter)), strict=True):
            self.add_module(name, nn.Linear(i, o, bias=False, device="meta", dtype=dtype))
        self.act_fn = act

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        x = routed(x, weight)
        h = routed(self.act_fn(gate(x)) * up(x), weight)
        return down(h)


class ExpertLinears(nn.ModuleList):
    """Drop-in for transformers' stacked experts: forward(hidden [T, H], top_k_index, top_k_weights)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:  # type: ignore[override]
        combine = expert_routing(top_k_index, top_k_weights.to(hidden_states.dtype), len(self))
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            w = combine[:, e]
            out = out + expert(hidden_states, w) * w[:, None]
        return out


def _is_stacked_experts(mod: nn.Module) -> bool:
    return isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor) and isinstance(
        getattr(mod, "down_proj", None), torch.Tensor) and mod.gate_up_proj.dim() == 3


def _expert_names(ckpt: Any, modules: set[str], full: str) -> tuple[str, str, str]:
    """The per-expert linear names the checkpoint uses (Mixtral's w1/w3/w2, or gate/up/down_proj)."""
    if f"{full}.0.w2" in modules:  # (down projections are never fused; gate/up may be)
        return ("w1", "w3", "w2")
    if f"{full}.0.down_proj" in modules or ckpt is None:
        return ("gate_proj", "up_proj", "down_proj")
    raise ModelLoadError(
        f"'{getattr(ckpt, 'path', ckpt)}': experts '{full}' hold neither '{full}.0.down_proj.*' nor "
        f"'{full}.0.w2.*' tensors; this checkpoint's expert naming is not supported"
    )


def checkpoint_renames(model_type: str) -> list[tuple[str, str]]:
    """(module name, checkpoint name) segment renames transformers applies when loading this architecture,
    e.g. Mixtral's checkpoint `.block_sparse_moe.` is the module `.mlp.` (from transformers' own table)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # older transformers load checkpoints without renaming
        return []
    out = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        if not isinstance(rule, WeightRenaming):
            continue
        src, dst = list(rule.source_patterns), list(rule.target_patterns)
        if len(src) == len(dst) == 1 and all(p.startswith(".") and p.endswith(".") and p[1:-1].isidentifier()
                                             for p in (src[0], dst[0])):
            out.append((dst[0][1:-1], src[0][1:-1]))
    return out


def unfuse_experts(model: nn.Module, ckpt: Any, prefix: str) -> int:
    """Replace every stacked-experts module under `prefix` by ExpertLinears named as in `ckpt` (a Checkpoint,
    or None to use gate/up/down_proj) and rename modules the checkpoint names differently (Mixtral's
    block_sparse_moe). Returns the number of experts modules replaced."""
    renames = checkpoint_renames(model.config.model_type)
    # module paths of the checkpoint's tensors ("model.layers.0.mlp.experts.3.gate_proj", ...)
    modules = {k.rsplit(".", 1)[0] for k in (ckpt.weight_map if ckpt is not None else ())}
    parents = {m.rsplit(".", 1)[0] for m in modules}
    replaced = 0
    for layer_name, layer in list(model.named_modules()):
        if not layer_name.startswith(prefix + "."):
            continue
        for child_name, child in list(layer.named_children()):
            for module_seg, ckpt_seg in renames:
                if child_name == module_seg and any(m == f"{layer_name}.{ckpt_seg}" or m.startswith(
                        f"{layer_name}.{ckpt_seg}.") for m in parents):
                    # forward still reads self.<module_seg> (an instance attribute, outside _modules); state
                    # dicts, traced graphs and exports see the checkpoint's name
                    del layer._modules[child_name]
                    layer._modules[ckpt_seg] = child
                    object.__setattr__(layer, child_name, child)
    for name, mod in list(model.named_modules()):
        if not name.startswith(prefix + ".") or not _is_stacked_experts(mod):
            continue
        if getattr(mod, "is_transposed", False) or getattr(mod, "has_bias", False) or not getattr(
                mod, "has_gate", True) or not getattr(mod, "is_concatenated", True):
            raise ModelLoadError(f"{model.config.model_type}: experts '{name}' use a layout (transposed, biased, "
                                 "ungated or interleaved) that qcompiler does not unfuse yet")
        e, two_i, h = mod.gate_up_proj.shape
        names = _expert_names(ckpt, modules, name)
        experts = ExpertLinears([ExpertMLP(h, two_i // 2, names, mod.act_fn, mod.gate_up_proj.dtype)
                                 for _ in range(e)])
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[leaf] = experts
        replaced += 1
    return replaced


def _routing_column(w: fx.Node) -> tuple[fx.Node, int] | None:
    """(routing node, expert index) when `w` is combine[:, e] (export writes it as slice → select)."""
    e = None
    while isinstance(w, fx.Node) and w.op == "call_function":
        if w.target is torch.ops.aten.select.int and w.args[1] in (1, -1):
            e = int(w.args[2])  # type: ignore[arg-type]
        elif w.target is EXPERT_ROUTING:
            return (w, e) if e is not None else None
        elif w.target not in (torch.ops.aten.slice.Tensor, torch.ops.aten.alias.default):
            return None
        w = w.args[0]  # type: ignore[assignment]
    return None


def expert_token_counts(gm: fx.GraphModule, batches: Any) -> dict[str, int]:
    """Tokens routed to each expert over `batches`, read from the routing nodes (the run stops there)."""
    routing = [n for n in gm.graph.nodes if is_call(n, EXPERT_ROUTING)]
    if not routing:
        return {}
    experts: dict[str, dict[int, str]] = {}  # routing node -> column -> expert path
    for n in gm.graph.nodes:
        column = _routing_column(n.args[1]) if is_call(n, ROUTED) else None  # type: ignore[arg-type]
        path = expert_of(n)
        if column is not None and path is not None:
            experts.setdefault(column[0].name, {})[column[1]] = path
    counts = {path: 0 for cols in experts.values() for path in cols.values()}
    last = routing[-1].name

    class Stop(Exception):
        pass

    class Census(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            if is_call(node, EXPERT_ROUTING):
                hits = (out != 0).sum(dim=0)
                for e, path in experts.get(node.name, {}).items():
                    counts[path] += int(hits[e])
                if node.name == last:
                    raise Stop
            return out

    with torch.no_grad():
        for args in batches:
            try:
                Census(gm).run(*args)
            except Stop:
                pass
    return counts
