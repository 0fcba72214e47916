"""Lowering rules for quantized linears → `qc::` kernel ops (shared by every target that uses these ops).

  linear(x, ŵ) with weight grid meta                 → qc::linear_woq(x, qweight, scale, zero, bias, bits, g, K)
  linear(fake_quant_act(x), ŵ) with int8 channel grid → qc::linear_w8a8(x, qweight, w_scale, x_scale, x_zero, bias)
  (int4 channel grids with per-token activations, w4a8, take the same op: their codes are held in int8)
  linear(fake_quant_act_per_token(x), ŵ)              → qc::linear_w8a8(x, qweight, w_scale, None, None, bias)
  linear(fake_quant_act_fp8[_per_token](x), ŵ) fp8    → qc::linear_fp8(x, w8 (e4m3), w_scale, x_scale|None, bias)
  linear(fake_quant_act_per_token(x, b[, c]), ŵ) with int4 group scales (w4a8 g), b = 4 activations (w4a4) or a
  clip ratio c < 1 (flatquant)                        → qc::linear_int_dynamic(x, qweight, w_scale [N, G], bias, b, g[, c])

Each rewrite writes the integer tensors into the graph module and a RECORD (op, scheme, tensor names)
in the new node's meta; `emit_linear_op` rebuilds the same node from a record when a saved model loads.
Stored static activation zero points are in the signed int8 domain the kernel uses (z_u − 128 for an
asymmetric [0, 255] grid).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.ir import qmeta
from qcompiler.ir.graph import (
    CONV,
    LINEAR,
    aten,
    get_attr_node,
    get_tensor,
    is_call,
    linear_module_attr,
    module_path,
    set_tensor,
)
from qcompiler.ir.rebuild import emit_linear_op
from qcompiler.ir.records import LayerRecord, Member
from qcompiler.kernels.packing import store_weight_codes
from qcompiler.numerics import quantize_weight
from qcompiler.pm.rewrite import MATCH, MatchResult, RewriteRule, fail

FQ_STATIC = torch.ops.qc.fake_quant_act.default
FQ_DYNAMIC = torch.ops.qc.fake_quant_act_per_token.default
FQ_FP8 = {torch.ops.qc.fake_quant_act_fp8.default, torch.ops.qc.fake_quant_act_fp8_per_token.default}


def _bias_node(node: fx.Node) -> fx.Node | None:
    b = node.args[2] if len(node.args) > 2 else None
    return b if isinstance(b, fx.Node) else None


def _record(node: fx.Node, op: str, wq: qmeta.WeightQuant | None, w: torch.Tensor,
            activations: dict[str, Any] | None, tensors: dict[str, str]) -> LayerRecord:
    """The description of one lowered layer (op, shape, scheme, fusion, activations, tensor names)."""
    bias = _bias_node(node)
    fused = node.meta.get(qmeta.FUSED_FROM)
    return LayerRecord(
        op=op,
        path=node.meta.get(qmeta.PATH) or module_path(node),
        role=node.meta.get(qmeta.ROLE),
        in_features=int(w.shape[1]),
        out_features=int(w.shape[0]),
        weights=dataclasses.asdict(wq.args) if wq else None,
        group_size=wq.group_size if wq else None,
        weight_sqnr_db=round(wq.weight_sqnr_db, 2) if wq and wq.weight_sqnr_db is not None else None,
        fused_from=None if fused is None else tuple(Member(m["path"], m["out_features"], m["role"]) for m in fused),
        bias=str(bias.target) if bias is not None else None,
        sparsity=node.meta[qmeta.SPARSE]["pattern"] if qmeta.SPARSE in node.meta else None,
        input_rotation=node.meta.get(qmeta.ROTATION),  # "hadamard": qc::hadamard_transform(x) feeds the layer
        activations=activations,
        tensors={**tensors, **transform_tensors(node)},
    )


def transform_tensors(node: fx.Node) -> dict[str, str]:
    """The learned transform's tensors of a layer flatquant transformed (read by qc::kronecker_transform)."""
    t = node.meta.get(qmeta.TRANSFORM)
    return {"left_trans": t["left"], "right_trans": t["right"]} if t else {}


def _clip_ratio(fq: fx.Node) -> float:
    return float(fq.meta.get(qmeta.ACT_FQ, {}).get("clip_ratio", 1.0))


def _store_scaled_weight(gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype
                         ) -> tuple[qmeta.WeightQuant, torch.Tensor, dict[str, str]]:
    """Symmetric codes of the linear's weight stored as `dtype` with its scales [N] (or [1]) beside it."""
    wq: qmeta.WeightQuant = node.meta[qmeta.WQ]
    w = get_tensor(gm, str(node.args[1].target))  # type: ignore[union-attr]
    base = linear_module_attr(node)
    set_tensor(gm, base + ".qweight", quantize_weight(w, wq.scale, None, wq.args).to(dtype).contiguous())
    set_tensor(gm, base + ".weight_scale", wq.scale.reshape(-1).float().contiguous())
    return wq, w, {"qweight": base + ".qweight", "weight_scale": base + ".weight_scale"}


class WeightOnlyLinearRule:
    name = "linear_woq"

    def matches(self, node: fx.Node) -> bool:
        return is_call(node, LINEAR) and qmeta.WQ in node.meta

    def check(self, gm: fx.GraphModule, node: fx.Node) -> MatchResult:
        x = node.args[0]
        if isinstance(x, fx.Node) and is_call(x, {FQ_STATIC, FQ_DYNAMIC, *FQ_FP8}):
            return fail("input activations are quantized: not a weight-only pattern")
        if node.meta[qmeta.WQ].args.is_float:
            return fail("fp8 weights run only in the fp8 × fp8 GEMM (quantize the activations)")
        return MATCH

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> None:
        wq: qmeta.WeightQuant = node.meta[qmeta.WQ]
        w = get_tensor(gm, str(node.args[1].target))  # type: ignore[union-attr]
        base = linear_module_attr(node)
        q = quantize_weight(w, wq.scale, wq.zero, wq.args)
        set_tensor(gm, base + ".qweight", store_weight_codes(q, wq.args.bits, wq.args.symmetric))
        set_tensor(gm, base + ".scale", wq.scale.float().contiguous())
        tensors = {"qweight": base + ".qweight", "scale": base + ".scale"}
        if wq.zero is not None:
            set_tensor(gm, base + ".zero", wq.zero.to(torch.uint8).contiguous())
            tensors["zero"] = base + ".zero"
        record = _record(node, "linear_woq", wq, w, None, tensors)
        emit_linear_op(gm, node, node.args[0], record)  # type: ignore[arg-type]


class W8A8LinearRule:
    name = "linear_w8a8"

    def matches(self, node: fx.Node) -> bool:
        x = node.args[0] if is_call(node, LINEAR) else None
        return qmeta.WQ in node.meta and isinstance(x, fx.Node) and is_call(x, {FQ_STATIC, FQ_DYNAMIC})

    def check(self, gm: fx.GraphModule, node: fx.Node) -> MatchResult:
        args = node.meta[qmeta.WQ].args
        if args.is_float or not args.symmetric or args.granularity != "channel":
            return fail(f"int8 GEMM needs symmetric per-channel integer weights, got {args.describe()}")
        x = node.args[0]
        fq = x.meta.get(qmeta.ACT_FQ, {})  # type: ignore[union-attr]
        if fq.get("bits", 8) != 8:
            return fail("int8 GEMM needs 8-bit activations")
        if fq.get("clip_ratio", 1.0) != 1.0:
            return fail("clipped per-token activations run in the dynamic integer GEMM")
        if args.bits == 4 and not fq.get("dynamic"):
            return fail("int4 weights run in the int8 GEMM with dynamic per-token activations only (w4a8)")
        return MATCH

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> None:
        wq, w, tensors = _store_scaled_weight(gm, node, torch.int8)
        fq: fx.Node = node.args[0]  # type: ignore[assignment]
        info = fq.meta[qmeta.ACT_FQ]
        activations: dict[str, Any] = {"bits": 8, "dynamic": info["dynamic"]}
        if not info["dynamic"]:
            zero = get_tensor(gm, info["zero"]).float()
            if info["qmin"] == 0:  # asymmetric [0, 255] grid -> signed int8 domain
                zero = zero - 128.0
            tensors["input_scale"] = info["scale"]
            activations.update({"granularity": "tensor", "symmetric": info["qmin"] != 0})
            if bool((zero != 0).any()):
                set_tensor(gm, info["zero"], zero.reshape(()))
                tensors["input_zero"] = info["zero"]
        else:
            activations.update({"granularity": "token", "symmetric": True})
        record = _record(node, "linear_w8a8", wq, w, activations, tensors)
        x = fq.args[0]
        emit_linear_op(gm, node, x, record)  # type: ignore[arg-type]
        if not fq.users:
            gm.graph.erase_node(fq)


class DynamicIntLinearRule:
    """Integer weights × dynamic per-token activations the int8 GEMM epilogue cannot take: int4 weights with
    group scales (w4a8, --group-size) and 4-bit activations (w4a4)."""

    name = "linear_int_dynamic"

    def matches(self, node: fx.Node) -> bool:
        x = node.args[0] if is_call(node, LINEAR) else None
        if qmeta.WQ not in node.meta or not isinstance(x, fx.Node) or not is_call(x, FQ_DYNAMIC):
            return False
        return (node.meta[qmeta.WQ].args.granularity == "group" or x.meta.get(qmeta.ACT_FQ, {}).get("bits") == 4
                or _clip_ratio(x) != 1.0)

    def check(self, gm: fx.GraphModule, node: fx.Node) -> MatchResult:
        args = node.meta[qmeta.WQ].args
        if args.is_float or not args.symmetric:
            return fail(f"the dynamic integer GEMM needs symmetric integer weights, got {args.describe()}")
        bits = node.args[0].meta[qmeta.ACT_FQ]["bits"]  # type: ignore[union-attr]
        if bits == 4 and (args.bits != 4 or args.granularity != "channel"):
            return fail(f"4-bit activations run with int4 per-channel weights (w4a4), got {args.describe()}")
        if args.granularity == "group" and (args.bits != 4 or bits != 8):
            return fail(f"group-wise scales in the integer GEMM are int4 weights × int8 activations (w4a8), got "
                        f"{args.describe()} × int{bits}")
        return MATCH

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> None:
        wq: qmeta.WeightQuant = node.meta[qmeta.WQ]
        w = get_tensor(gm, str(node.args[1].target))  # type: ignore[union-attr]
        base = linear_module_attr(node)
        set_tensor(gm, base + ".qweight", quantize_weight(w, wq.scale, None, wq.args).to(torch.int8).contiguous())
        set_tensor(gm, base + ".weight_scale", wq.scale.float().reshape(w.shape[0], -1).contiguous())
        fq: fx.Node = node.args[0]  # type: ignore[assignment]
        activations: dict[str, Any] = {"bits": fq.meta[qmeta.ACT_FQ]["bits"], "dynamic": True, "granularity": "token",
                                       "symmetric": True}
        if _clip_ratio(fq) != 1.0:
            activations["clip_ratio"] = _clip_ratio(fq)
        record = _record(node, "linear_int_dynamic", wq, w, activations,
                         {"qweight": base + ".qweight", "weight_scale": base + ".weight_scale"})
        emit_linear_op(gm, node, fq.args[0], record)  # type: ignore[arg-type]
        if not fq.users:
            gm.graph.erase_node(fq)


class Fp8LinearRule:
    name = "linear_fp8"

    def matches(self, node: fx.Node) -> bool:
        x = node.args[0] if is_call(node, LINEAR) else None
        return qmeta.WQ in node.meta and isinstance(x, fx.Node) and is_call(x, FQ_FP8)

    def check(self, gm: fx.GraphModule, node: fx.Node) -> MatchResult:
        args = node.meta[qmeta.WQ].args
        if not args.is_float or args.granularity not in ("channel", "tensor"):
            return fail(f"the fp8 GEMM needs fp8 weights per channel or per tensor, got {args.describe()}")
        return MATCH

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> None:
        wq, w, tensors = _store_scaled_weight(gm, node, torch.float8_e4m3fn)  # (e4m3 codes are exact in fp32)
        fq: fx.Node = node.args[0]  # type: ignore[assignment]
        info = fq.meta[qmeta.ACT_FQ]
        if not info["dynamic"]:
            tensors["input_scale"] = info["scale"]
        record = _record(node, "linear_fp8", wq, w,
                         {"bits": 8, "type": "float", "dynamic": info["dynamic"], "symmetric": True,
                          "granularity": "token" if info["dynamic"] else "tensor"}, tensors)
        emit_linear_op(gm, node, fq.args[0], record)  # type: ignore[arg-type]
        if not fq.users:
            gm.graph.erase_node(fq)


class ConvRule:
    """A weight-quantized convolution reads its kernel as ŵ = float(q_int8) · s_w[:, None, …] computed in the
    graph from the stored codes (there is no `qc::` conv kernel; the ONNX Runtime emitter writes the layer as
    DequantizeLinear(int8 W) → Conv with the input's fake-quant as QuantizeLinear/DequantizeLinear, which
    onnxruntime runs as QLinearConv). The float kernel is dropped."""

    name = "conv_int8"

    def matches(self, node: fx.Node) -> bool:
        return is_call(node, CONV) and qmeta.WQ in node.meta and qmeta.RECORD not in node.meta

    def check(self, gm: fx.GraphModule, node: fx.Node) -> MatchResult:
        args = node.meta[qmeta.WQ].args
        if args.bits != 8 or not args.symmetric or args.granularity != "channel":
            return fail(f"convolutions are lowered as symmetric per-channel int8, got {args.describe()}")
        return MATCH

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> None:
        wq: qmeta.WeightQuant = node.meta[qmeta.WQ]
        w4 = get_tensor(gm, str(node.args[1].target))  # type: ignore[union-attr]
        w = w4.reshape(w4.shape[0], -1)
        base = linear_module_attr(node)
        set_tensor(gm, base + ".qweight", quantize_weight(w, wq.scale, None, wq.args).to(torch.int8).reshape(w4.shape))
        set_tensor(gm, base + ".weight_scale", wq.scale.reshape(-1).float().contiguous())
        with gm.graph.inserting_before(node):
            codes = gm.graph.call_function(aten._to_copy.default, (get_attr_node(gm, base + ".qweight", node),),
                                           {"dtype": torch.float32})
            scale = gm.graph.call_function(aten.view.default, (get_attr_node(gm, base + ".weight_scale", node),
                                                               [w4.shape[0]] + [1] * (w4.dim() - 1)))
            kernel = gm.graph.call_function(aten.mul.Tensor, (codes, scale))
        node.replace_input_with(node.args[1], kernel)  # type: ignore[arg-type]
        x = node.args[0]
        fq = x.meta.get(qmeta.ACT_FQ) if isinstance(x, fx.Node) and is_call(x, FQ_STATIC) else None
        node.meta[qmeta.RECORD] = _record(
            node, "conv_int8", wq, w,
            None if fq is None else {"bits": 8, "dynamic": False, "granularity": "tensor", "symmetric": fq["qmin"] != 0},
            {"qweight": base + ".qweight", "weight_scale": base + ".weight_scale"})


def record_float_linear(gm: fx.GraphModule, node: fx.Node) -> None:
    """Describe a float linear whose structure differs from the source model (fused) so it can reload."""
    weight = str(node.args[1].target)  # type: ignore[union-attr]
    node.meta[qmeta.RECORD] = _record(node, "linear", None, get_tensor(gm, weight), None, {"weight": weight})


def linear_rules() -> list[RewriteRule]:
    return [DynamicIntLinearRule(), W8A8LinearRule(), Fp8LinearRule(), WeightOnlyLinearRule(), ConvRule()]  # type: ignore[list-item]
