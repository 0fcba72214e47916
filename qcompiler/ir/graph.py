"""Small helpers over torch.fx graphs produced by torch.export (ATen ops, get_attr weights)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
from torch import fx

from qcompiler.ir.routing import ROUTED

aten = torch.ops.aten

# Blocks are traced inside an adapter module whose attribute `block` is the decoder block; graph attribute
# names and module paths carry this prefix, which checkpoint names do not.
ADAPTER_PREFIX = "block."

LINEAR = aten.linear.default
CONV = aten.convolution.default  # imported ONNX Conv layers (weights [O, I/groups, *kernel])
# Ops that pass a tensor through unchanged in value (dtype casts at equal dtype, copies, views of layout).
PASSTHROUGH = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    ROUTED,  # the identity, marking an expert's input for calibration (ir/routing.py)
}
SDPA_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
SOFTMAX_OPS = {aten._softmax.default, aten.softmax.int}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
ACTIVATION_OPS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default}


def is_call(node: fx.Node, targets: object) -> bool:
    if node.op != "call_function":
        return False
    if isinstance(targets, set | frozenset | tuple | list):
        return node.target in targets
    return node.target == targets


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_call(n, LINEAR)]


def skip_passthrough(node: fx.Node) -> fx.Node:
    """Walk back through value-preserving ops (casts, copies) to the producing node."""
    while isinstance(node, fx.Node) and is_call(node, PASSTHROUGH):
        node = node.args[0]  # type: ignore[assignment]
    return node


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor), target
    return obj


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Create or replace the tensor attribute `target` (dotted), as a non-trainable buffer."""
    *path, leaf = target.split(".")
    mod: torch.nn.Module = gm
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if hasattr(mod, leaf):
        delattr(mod, leaf)
    mod.register_buffer(leaf, value.detach())


def delete_tensor(gm: fx.GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    mod: torch.nn.Module = gm
    for part in path:
        mod = getattr(mod, part)
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)


def is_code_constant(target: str) -> bool:
    """A tensor the block's code built while it ran (torch.export lifts it as `..lifted_tensor_N`, e.g. the
    index tensor of Falcon's `x[..., [-2], :]`): part of the program, not of the model's state."""
    return target.rsplit(".", 1)[-1].startswith("lifted_tensor")


def tensor_attrs(gm: fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the graph reads through get_attr, by target name."""
    seen: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in seen:
            seen.add(n.target)
            t = get_tensor(gm, n.target)
            yield n.target, t


def get_attr_node(gm: fx.GraphModule, target: str, before: fx.Node) -> fx.Node:
    """An existing get_attr node for `target`, or a new one inserted before `before`."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            return n
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(target)


def weight_attr(linear: fx.Node) -> str | None:
    w = linear.args[1]
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return str(w.target)
    return None


def linear_module_attr(linear: fx.Node) -> str:
    """The attribute prefix of a linear's weight ("block.self_attn.q_proj" for "...q_proj.weight"); the
    quantization tensors of that layer are stored beside it."""
    w = str(linear.args[1].target)  # type: ignore[union-attr]
    return w.removesuffix(".weight")


def bias_attr(linear: fx.Node) -> str | None:
    b = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if isinstance(b, fx.Node) and b.op == "get_attr":
        return str(b.target)
    return None


def module_path(node: fx.Node) -> str:
    """The innermost nn.Module path that produced this node: for a linear or convolution on a stored weight,
    the weight's own path (the module's name in the state dict and checkpoint, also where a module is
    reached through another attribute, as Mixtral's block_sparse_moe is through `mlp`); otherwise from
    torch.export's nn_module_stack."""
    if node.op == "call_function" and node.target in (LINEAR, CONV) and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight"):
            return str(w.target).removeprefix(ADAPTER_PREFIX).removesuffix(".weight")
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path).removeprefix(ADAPTER_PREFIX)


def swap_node(node: fx.Node, new: fx.Node) -> None:
    """`new` takes `node`'s place: its metadata and its users; `node` leaves the graph."""
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def eliminate_dead_attrs(gm: fx.GraphModule) -> None:
    """Remove dead nodes, then tensors no get_attr reads any more (frees replaced float weights)."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            delete_tensor(gm, name)
    gm.recompile()


def drop_tensors(gm: fx.GraphModule) -> None:
    """Free a graph module's tensors now. A GraphModule sits in reference cycles (graph ↔ owning module),
    so `del gm` frees nothing until a full garbage collection; its tensors are the bulk of its memory."""
    for mod in gm.modules():
        mod._parameters.clear()
        mod._buffers.clear()
        for k in [k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]:
            delattr(mod, k)


def copy_graph(gm: fx.GraphModule, share_tensors: bool = False) -> fx.GraphModule:
    """A deep copy of a graph module: its tensors copied too, or shared with `gm` (share_tensors=True; safe
    because passes never write a tensor in place: they set new ones, so the copy keeps the originals while
    `gm` is transformed, at no cost in memory)."""
    memo: dict[int, object] = {}
    if share_tensors:
        for mod in gm.modules():
            for t in [*mod._parameters.values(), *mod._buffers.values(),
                      *(v for v in vars(mod).values() if isinstance(v, torch.Tensor))]:
                if t is not None:
                    memo[id(t)] = t
    with warnings.catch_warnings():  # torch 2.13 deprecation inside its own pytree pickling
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm, memo)
