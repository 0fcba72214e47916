"""Graph ops of mixture-of-experts blocks (frontends/moe.py builds them, calibration reads them).

  qc::expert_routing(top_k_index [T, k], top_k_weights [T, k], E) -> combine [T, E]
      each token's routing weight for every expert, 0 where the expert is not among its top k
  qc::routed(x [T, C], weight [T]) -> x
      the identity; marks x as the input of one expert, whose routing weight per token is `weight`, so that
      calibration statistics of x are taken over the tokens routed to it (weight != 0)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx


@torch.library.custom_op("qc::expert_routing", mutates_args=())
def expert_routing(top_k_index: Tensor, top_k_weights: Tensor, num_experts: int) -> Tensor:
    """combine [T, E]: each token's routing weight for every expert (0 where the expert is not chosen)."""
    out = top_k_weights.new_zeros((top_k_index.shape[0], num_experts))
    return out.scatter_add(1, top_k_index.long(), top_k_weights)


@expert_routing.register_fake
def _expert_routing_fake(top_k_index: Tensor, top_k_weights: Tensor, num_experts: int) -> Tensor:
    return top_k_weights.new_empty((top_k_index.shape[0], num_experts))


@torch.library.custom_op("qc::routed", mutates_args=())
def routed(x: Tensor, weight: Tensor) -> Tensor:
    """Identity on x [T, C]; `weight` [T] is the expert's routing weight per token (0: not routed)."""
    return x.clone()


@routed.register_fake
def _routed_fake(x: Tensor, weight: Tensor) -> Tensor:
    return torch.empty_like(x)


ROUTED = torch.ops.qc.routed.default
EXPERT_ROUTING = torch.ops.qc.expert_routing.default


def strip_routing_markers(gm: fx.GraphModule) -> int:
    """Replace every qc::routed(x, w) by x: the markers only steer calibration (lowering and runtime drop
    them, so a served block pays no copy)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ROUTED:
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)
            n += 1
    if n:
        gm.recompile()
    return n
