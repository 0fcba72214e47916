"""lower_npu: rewrite the portable kernel ops of a lowered block into the torch_npu calls Ascend runs.

    qc::linear_w8a8 (static)   →  npu_quantize → npu_quant_matmul(W [K, N], deq_scale, quant_bias)
    qc::linear_w8a8 (dynamic)  →  npu_dynamic_quant → npu_quant_matmul(W, s_w, pertoken_scale)
    qc::linear_woq  (int8/int4) →  npu_weight_quant_batchmatmul(W [K, N] | int4pack [K, N/8], s, −z, g)

Each layer goes through exactly what the Ascend export writes and the Ascend loaders do with it: the layer's
msModelSlim tensors (export/msmodelslim.py), then the kernels' layout (kernels/ascend/layout.py), so a test
of this graph on the emulated ops checks the exported numbers too. Fused layers (q/k/v, gate/up) stay fused.
A runtime lowering (`load_quantized(..., lower_for="npu")`), never saved: the artefact keeps portable ops.
"""

from __future__ import annotations

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.export.layers import from_record
from qcompiler.export.msmodelslim import msmodelslim_tensors
from qcompiler.ir import qmeta
from qcompiler.ir.graph import eliminate_dead_attrs, is_call, set_tensor, swap_node, tensor_attrs
from qcompiler.kernels.ascend import layout

LINEAR_OPS = {torch.ops.qc.linear_w8a8.default, torch.ops.qc.linear_woq.default}


def lower_for_npu(gm: fx.GraphModule, model_dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Rewrite every qc:: linear of `gm`; deq_scale is encoded for `model_dtype` (int64 unless bf16)."""
    counts: dict[str, int] = {}
    tensors = dict(tensor_attrs(gm))
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    for node in list(gm.graph.nodes):
        if not is_call(node, LINEAR_OPS):
            continue
        record = node.meta[qmeta.RECORD]
        (layer,) = from_record(record, tensors, split=False)
        kind, npu_tensors = msmodelslim_tensors(layer, model_dtype == torch.bfloat16)
        params = layout.prepare(kind, npu_tensors, layer.group_size or 0)
        base = record.path.replace(".", "_")
        with gm.graph.inserting_before(node):
            proxies: dict[str, object] = {}
            for key, value in params.items():
                if isinstance(value, torch.Tensor):
                    set_tensor(gm, f"npu.{base}.{key}", value)
                    proxies[key] = fx.Proxy(gm.graph.get_attr(f"npu.{base}.{key}"), tracer)
                else:
                    proxies[key] = value
            out = layout.forward(kind, fx.Proxy(node.args[0], tracer), proxies)  # type: ignore[arg-type]
        swap_node(node, out.node)  # type: ignore[attr-defined]
        counts[kind] = counts.get(kind, 0) + 1
    eliminate_dead_attrs(gm)
    gm.recompile()
    return counts
