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
is "router": the linear's output reaches a top-k or the experts' routing, ir/analysis.py).

Checkpoint names: modules the checkpoint names differently move to its names (rename_to_checkpoint, from
transformers' own rename table), so graphs and exports say what the checkpoint says; experts a checkpoint stores
stacked (GraniteMoE; gpt-oss: transposed, gate/up interleaved, biased, and in its release MXFP4-packed) are read one
expert at a time through the checkpoint's views. gpt-oss's clamped SwiGLU is its own combination (ClampedSwiGLU).
Llama 4's experts take rows already routed and weighted (input [E·T, H], σ(score)·x, zero where not routed):
RoutedInputExperts runs each expert's linears on its rows, the same per-expert graph.

Dense evaluation costs E/k times the MLP FLOPs of the sparse block during calibration (what llm-compressor's
calibrate_all_experts costs too); it keeps shapes static and every expert's statistics in one run.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import Tensor, fx, nn

from qcompiler.errors import ModelLoadError
from qcompiler.ir.analysis import expert_of
from qcompiler.ir.graph import is_call
from qcompiler.ir.routing import EXPERT_ROUTING, ROUTED, expert_routing, routed


class GatedActivation(nn.Module):
    """act(gate) ⊙ up: the gated MLP of Mixtral, Qwen-MoE, DeepSeek and most MoE families."""

    def __init__(self, act: Any):
        super().__init__()
        self.act_fn = act

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return self.act_fn(gate) * up


class ClampedSwiGLU(nn.Module):
    """gpt-oss: (clamp(up, −l, l) + 1) ⊙ g·σ(α·g) with g = min(gate, l). The +1 and the clamps make down's input
    not linear in up's output, so no scale moves between up and down (analysis finds no up/down pair here)."""

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class ClampedSiLUGLU(nn.Module):
    """HunYuan v4: silu(min(gate, l)) ⊙ clamp(up, −l, l) (a SwiGLU with both halves clamped at swiglu_limit)."""

    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        return nn.functional.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)


class ExpertMLP(nn.Module):
    """One expert: down(glu(gate(x), up(x))), its linears named as in the checkpoint."""

    def __init__(self, hidden: int, inter: int, names: tuple[str, str, str], glu: nn.Module, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.names = names
        for name, (o, i) in zip(names, ((inter, hidden), (inter, hidden), (hidden, inter)), strict=True):
            self.add_module(name, nn.Linear(i, o, bias=bias, device="meta", dtype=dtype))
        self.glu = glu

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        x = routed(x, weight)
        h = routed(self.glu(gate(x), up(x)), weight)
        return down(h)


class ExpertLinears(nn.ModuleList):
    """Drop-in for transformers' stacked experts: forward(hidden [T, H], top_k_index, top_k_weights)."""

    stored_stacked = False  # the checkpoint stores these experts stacked (GraniteMoE): served per expert

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:  # type: ignore[override]
        combine = expert_routing(top_k_index, top_k_weights.to(hidden_states.dtype), len(self))
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            w = combine[:, e]
            out = out + expert(hidden_states, w) * w[:, None]
        return out


class RoutedInputExperts(nn.ModuleList):
    """Drop-in for experts that take their tokens already routed and weighted (Llama 4): input [E·T, H] whose rows
    e·T … e·T+T−1 hold σ(score[t, e])·x[t] for the tokens routed to expert e and 0 for the others; output the same
    rows through each expert, y_e = down_e(act(gate_e(x_e)) ⊙ up_e(x_e)), which is 0 on a zero row. A row is
    non-zero exactly when its token is routed to e, so |row|_max is the routing weight the qc::routed markers need
    (calibration statistics over routed tokens). With calibrate_all_experts the others count as the zeros they are."""

    stored_stacked = False

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)

    def forward(self, hidden_states: Tensor) -> Tensor:  # type: ignore[override]
        rows = hidden_states.view(len(self), -1, hidden_states.shape[-1])
        return torch.cat([expert(rows[e], rows[e].abs().amax(dim=-1)) for e, expert in enumerate(self)])


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


def _renaming_rules(model: nn.Module) -> list[Any]:
    """transformers' WeightRenaming rules for this architecture (its own table, by model type and by class)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # older transformers load checkpoints without renaming
        return []
    return [r for key in (model.config.model_type, type(model).__name__)
            for r in get_checkpoint_conversion_mapping(key) or [] if type(r) is WeightRenaming]


def checkpoint_renames(rules: list[Any]) -> list[tuple[str, str, bool]]:
    """(module path suffix, checkpoint path suffix, anchored at the model's root) for the plain renames transformers
    applies when loading this architecture (its own table, by model type and by class): Mixtral's checkpoint
    `.block_sparse_moe.` is the module `.mlp.`, Phi-3.5-MoE's `.gate` is `.router`, ERNIE 4.5's `mlp.moe_statics` is
    `mlp.gate.moe_statics`, GPT-NeoX's `embed_out` is `lm_head` (`rules`: _renaming_rules). Rules that merge or split
    tensors are not renames."""
    out = []
    for rule in rules:
        src, dst = list(rule.source_patterns), list(rule.target_patterns)
        if len(src) != 1 or len(dst) != 1:
            continue
        ends = [_module_path(p) for p in (src[0], dst[0])]
        leaves = [p.rpartition(".")[2] for p in (src[0], dst[0])]
        if leaves[0] != leaves[1]:  # a tensor renamed to another parameter (granitemoe's stacked experts): no move
            continue
        if ends[0] is not None and ends[1] is not None:  # (anchored: as the checkpoint's pattern is)
            out.append((ends[1][0], ends[0][0], ends[0][1]))
    return out


def _module_path(pattern: str) -> tuple[str, bool] | None:
    """A rename pattern as a plain module path ('.gate.weight' -> 'gate', 'mlp.moe_statics.bias' -> 'mlp.moe_statics',
    '^embed_out\\.' -> 'embed_out', anchored),
    None when it is a real regular expression."""
    p = pattern.removeprefix("^").replace("\\.", ".")
    path = _plain_path(p if p.endswith(".") else p.rpartition(".")[0])  # (a tensor's name: its module is what moves)
    return None if path is None else (path, pattern.startswith("^"))


def _plain_path(pattern: str) -> str | None:
    """A rename pattern (unescaped) as a dotted path without its outer dots, None when it is a real regular
    expression."""
    p = pattern.removeprefix("^").replace("\\.", ".").strip(".")
    return p if p and all(part.isidentifier() for part in p.split(".")) else None


def _move_module(model: nn.Module, path: str, to: str) -> None:
    """Register the module at `path` under `to` (the checkpoint's path); forward still reads the old attribute (an
    instance attribute, outside _modules), while state dicts, traced graphs and exports see the checkpoint's name."""
    parent_name, _, leaf = path.rpartition(".")
    new_parent_name, _, new_leaf = to.rpartition(".")
    parent = model.get_submodule(parent_name)
    child = parent._modules.pop(leaf)
    object.__setattr__(parent, leaf, child)
    model.get_submodule(new_parent_name)._modules[new_leaf] = child


def module_aliases(model: nn.Module) -> dict[str, str]:
    """Checkpoint path -> transformers' own path of every module whose path rename_to_checkpoint changed (what a
    client that builds the model with transformers calls it: GPT-NeoX's `embed_out` is its `lm_head`, Phi-3.5-MoE's
    `block_sparse_moe.gate` its `mlp.router`)."""
    modules = dict(model.named_modules())
    owner: dict[int, tuple[nn.Module, str]] = {}  # module -> (the module whose attribute it is, the attribute)
    for path, mod in modules.items():
        if path:
            parent, _, leaf = path.rpartition(".")
            owner.setdefault(id(mod), (modules[parent], leaf))
    for mod in modules.values():  # a moved module: its old parent still holds it as an instance attribute
        for attr, value in vars(mod).items():
            if isinstance(value, nn.Module) and attr not in mod._modules:
                owner[id(value)] = (mod, attr)
    own: dict[int, str] = {id(model): ""}

    def path_of(mod: nn.Module) -> str:
        if id(mod) not in own:
            parent, attr = owner[id(mod)]
            base = path_of(parent)
            own[id(mod)] = f"{base}.{attr}" if base else attr
        return own[id(mod)]

    return {path: path_of(mod) for path, mod in modules.items() if path and path_of(mod) != path}


def rename_to_checkpoint(model: nn.Module, ckpt: Any, rules: list[Any]) -> int:
    """Give every module the checkpoint names differently (checkpoint_renames) the checkpoint's path; returns how
    many moved. A module moves only where the checkpoint holds tensors under the new path and none under the old."""
    renames = checkpoint_renames(rules)
    stored = {k.rsplit(".", 1)[0] for k in (ckpt.weight_map if ckpt is not None else ())}
    prefixes = {".".join(m.split(".")[:i]) for m in stored for i in range(1, m.count(".") + 2)}
    moved = 0
    for module_suffix, ckpt_suffix, anchored in renames:
        for path, _ in list(model.named_modules()):
            if anchored:
                if path != module_suffix:
                    continue
                target = ckpt_suffix
            elif path.endswith("." + module_suffix) or path == module_suffix:
                target = path[: len(path) - len(module_suffix)] + ckpt_suffix
            else:
                continue
            parent = target.rpartition(".")[0]
            if (target.startswith(path + ".") and target in stored and path not in stored
                    and hasattr(ckpt, "add_views")):
                # deeper under its own name (GraniteMoE's router is stored as `router.layer`): a module cannot
                # sit inside itself, so the checkpoint serves the tensors under the module's names instead
                names = [n for n in ckpt.weight_map if n.rsplit(".", 1)[0] == target]
                ckpt.add_views({f"{path}.{n.rsplit('.', 1)[1]}": ((n,), lambda t: t) for n in names}, replace=names)
                moved += 1
            elif target in prefixes and path not in stored and (not parent or _has_module(model, parent)
                                                                 or _has_module(model, parent.rpartition(".")[0])):
                if parent and not _has_module(model, parent):  # (HunYuan 3: `mlp.gate` is stored as `mlp.router.gate`)
                    grand, _, leaf = parent.rpartition(".")
                    model.get_submodule(grand)._modules[leaf] = nn.Module()
                _move_module(model, path, target)
                moved += 1
    return moved


def view_renamed_tensors(model: nn.Module, ckpt: Any, rules: list[Any]) -> int:
    """Serve a stored tensor that transformers loads under another leaf name of the same module (HunYuan 3's
    `mlp.expert_bias` is the router's `mlp.e_score_correction_bias`) under the module's name; returns how many."""
    if ckpt is None or not hasattr(ckpt, "add_views"):
        return 0
    state = set(model.state_dict())
    views: dict[str, tuple[tuple[str, ...], Any]] = {}
    for rule in rules:
        src, dst = list(rule.source_patterns), list(rule.target_patterns)
        if len(src) != 1 or len(dst) != 1:
            continue
        ends = [_plain_path(p) for p in (src[0], dst[0])]
        if ends[0] is None or ends[1] is None:
            continue  # (a real regular expression)
        if ends[0].rpartition(".")[0] != ends[1].rpartition(".")[0] or ends[0] == ends[1]:
            continue  # (a module rename: rename_to_checkpoint)
        for stored in ckpt.weight_map:
            if stored.endswith("." + ends[0]):
                name = stored[: len(stored) - len(ends[0])] + ends[1]
                if name in state and name not in ckpt.weight_map:
                    views[name] = ((stored,), lambda t: t)
    if views:
        ckpt.add_views(views, replace=[sources[0] for sources, _ in views.values()])
    return len(views)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """OCP microscaling FP4 (gpt-oss's released experts): blocks [..., G, 16] uint8 hold two E2M1 codes a byte (low
    nibble first), scales [..., G] uint8 are E8M0 exponents biased by 127; value = e2m1(code) · 2^(scale − 127).
    Returns [..., G·32]. Every product is exact in bfloat16 (an E2M1 value has two significant bits)."""
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).long()  # [..., G, 32]
    values = lut[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2).to(dtype)


def _view_stacked_experts(ckpt: Any, rules: list[Any], modules: set[str], full: str, inter: int,
                          layout: dict[str, bool]) -> bool:
    """Checkpoints that store each layer's experts stacked: serve every expert's gate/up/down_proj (weight, and bias
    where stored) as a slice of those tensors, so that each expert is its own linear like a per-expert
    checkpoint's. Returns whether it did. Layouts (transformers' flags for the experts class, `layout`):

    - GraniteMoE (`input_linear` / `output_linear`), Qwen3-MoE's own saves: gate_up [E, 2I, H], down [E, H, I];
    - transposed (gpt-oss, Llama 4): gate_up [E, H, 2I], down [E, I, H];
    - interleaved gate/up (gpt-oss, not concatenated): gate is row 2j of gate_up, up row 2j+1;
    - biased (gpt-oss): gate_up_proj_bias [E, 2I], down_proj_bias [E, H];
    - MXFP4 (gpt-oss's release): `<name>_blocks` / `<name>_scales` in linear orientation, dequantized on read."""
    if ckpt is None or not hasattr(ckpt, "add_views") or f"{full}.0.down_proj" in modules or f"{full}.0.w2" in modules:
        return False
    stored = {}  # the model's name of each stored tensor of this layer, by transformers' rename rules
    layer = full.rsplit(".", 2)[0] + "."
    for name in [n for n in ckpt.weight_map if n.startswith(layer)]:
        renamed = name
        for rule in rules:
            for src, dst in zip(rule.source_patterns, rule.target_patterns, strict=False):
                renamed = re.sub(src, dst, renamed)
        stored[renamed] = name
    transposed = layout["is_transposed"]

    def weight_source(proj: str) -> tuple[tuple[str, ...], Any] | None:
        """(stored names, function of them and an expert index -> that expert's [out, in] weight)."""
        if f"{full}.{proj}" in stored:
            return (stored[f"{full}.{proj}"],), lambda t, i: t[i].T if transposed else t[i]
        blocks, scales = stored.get(f"{full}.{proj}_blocks"), stored.get(f"{full}.{proj}_scales")
        if blocks is not None and scales is not None:
            return (blocks, scales), lambda b, s, i: mxfp4_dequantize(b[i], s[i])
        return None

    gate_up, down = weight_source("gate_up_proj"), weight_source("down_proj")
    if gate_up is None or down is None:
        return False
    halves = ((slice(0, None, 2), slice(1, None, 2)) if not layout["is_concatenated"]
              else (slice(0, inter), slice(inter, 2 * inter)))
    bias_gate_up, bias_down = stored.get(f"{full}.gate_up_proj_bias"), stored.get(f"{full}.down_proj_bias")
    views: dict[str, tuple[tuple[str, ...], Any]] = {}
    mxfp4 = len(gate_up[0]) == 2
    n_experts = ckpt.headers[gate_up[0][0]][1][0]
    for i in range(n_experts):
        for proj, rows in zip(("gate_proj", "up_proj"), halves, strict=True):
            views[f"{full}.{i}.{proj}.weight"] = (gate_up[0], lambda *t, i=i, rows=rows, f=gate_up[1]: f(*t, i)[rows])
            if bias_gate_up is not None:
                views[f"{full}.{i}.{proj}.bias"] = ((bias_gate_up,), lambda t, i=i, rows=rows: t[i][rows])
        views[f"{full}.{i}.down_proj.weight"] = (down[0], lambda *t, i=i, f=down[1]: f(*t, i))
        if bias_down is not None:
            views[f"{full}.{i}.down_proj.bias"] = ((bias_down,), lambda t, i=i: t[i])
    replaced = [*gate_up[0], *down[0], *(b for b in (bias_gate_up, bias_down) if b is not None)]
    ckpt.add_views(views, replace=replaced, dtype="BF16" if mxfp4 else None)
    return True


def unfuse_experts(model: nn.Module, ckpt: Any, prefix: str) -> int:
    """Replace every stacked-experts module under `prefix` by ExpertLinears named as in `ckpt` (a Checkpoint,
    or None to use gate/up/down_proj) and move modules the checkpoint names differently (rename_to_checkpoint; a
    tensor it names differently within its module is served under the module's name: view_renamed_tensors).
    Returns the number of experts modules replaced."""
    rules = _renaming_rules(model)
    rename_to_checkpoint(model, ckpt, rules)
    view_renamed_tensors(model, ckpt, rules)
    # module paths of the checkpoint's tensors ("model.layers.0.mlp.experts.3.gate_proj", ...)
    modules = {k.rsplit(".", 1)[0] for k in (ckpt.weight_map if ckpt is not None else ())}
    replaced = 0
    for name, mod in list(model.named_modules()):
        if not name.startswith(prefix + ".") or not _is_stacked_experts(mod):
            continue
        routed_input = len(inspect.signature(mod.forward).parameters) < 3  # (Llama 4: bmm on pre-routed rows)
        layout = {flag: bool(getattr(mod, flag, default)) for flag, default in (
            ("is_transposed", routed_input), ("has_bias", False), ("has_gate", True), ("is_concatenated", True))}
        glu: nn.Module | None = None
        if callable(getattr(mod, "act_fn", None)):
            glu = GatedActivation(mod.act_fn)
        elif isinstance(getattr(mod, "alpha", None), float) and isinstance(getattr(mod, "limit", None), float):
            glu = ClampedSwiGLU(mod.alpha, mod.limit)  # (gpt-oss's _apply_gate)
        elif isinstance(getattr(mod, "swiglu_limit", None), int | float):
            glu = ClampedSiLUGLU(float(mod.swiglu_limit))  # (HunYuan v4's _apply_gate)
        if glu is None or not layout["has_gate"]:
            raise ModelLoadError(f"{model.config.model_type}: experts '{name}' use an activation or an ungated "
                                 f"layout ({type(mod).__name__}) that qcompiler does not unfuse yet")
        e = mod.gate_up_proj.shape[0]
        inter = mod.down_proj.shape[1] if layout["is_transposed"] else mod.down_proj.shape[2]
        h = mod.down_proj.shape[2] if layout["is_transposed"] else mod.down_proj.shape[1]
        stacked = _view_stacked_experts(ckpt, rules, modules, name, inter, layout)
        if stacked:
            modules |= {f"{name}.{i}.{p}" for i in range(e) for p in ("gate_proj", "up_proj", "down_proj")}
        names = _expert_names(ckpt, modules, name)
        mlps = [ExpertMLP(h, inter, names, glu, mod.gate_up_proj.dtype, bias=layout["has_bias"]) for _ in range(e)]
        experts = RoutedInputExperts(mlps) if routed_input else ExpertLinears(mlps)
        experts.stored_stacked = stacked  # (per-expert tensors a client of the checkpoint's layout cannot read)
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
