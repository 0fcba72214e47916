"""A QDQ ONNX model of a quantized diffusion transformer (`--target onnxruntime` for a diffusers folder): OUT/model.onnx.

The diffusers class with its float weights outside the blocks, every quantized linear of the blocks (fused q/k/v
split back to the model's own layers, export/layers.py) replaced by its QDQ form, exported by torch's ONNX exporter:

    x̂ = DequantizeLinear(QuantizeLinear(x, s_x, z_x + 128))           static per-tensor 8-bit activations (w8a8)
    ŵ = DequantizeLinear(q_w + 128, s_w, 128, axis=0)                    8-bit codes per output channel
    y = x̂ · ŵᵀ + b                                                       (MatMul / Gemm on the dequantized operands)

which onnxruntime's QDQ transformers fuse into integer GEMMs, and which computes, value for value, what our artefact
computes (q = clamp(round(x / s) + z, −128, 127), round half to even on both sides), written unsigned (u = q + 128,
zero points + 128: onnxruntime's u8×s8 kernels saturate on x86 CPUs without VNNI, u8×u8 is exact everywhere). The
weights are stored as uint8 initializers (each QuantizeLinear the exporter puts on a constant weight is folded into
its codes).

Weight-only layers (w8a16, w4a16: int8 / int4 codes per channel or in groups) are written as onnxruntime's
MatMulNBits instead (com.microsoft, the op its own weight-only quantizer writes), accuracy_level 0:

    y = x · ŵᵀ + b,  ŵ = (u − z)·s per block of K                         (u unsigned codes, z = 2^(bits−1) if none)

computed in float32, our numbers up to summation order. (A weight-only QDQ pair is no such thing: onnxruntime's
extended optimizations turn DequantizeLinear → MatMul into its dynamic int8 GEMM, which quantizes the activations
per tensor at run time.) The export traces `qc::onnx_matmulnbits`, a linear on ŵ for torch, translated into the
MatMulNBits node; ŵ does not reach the file.

Held: int8 weights per output channel with static per-tensor int8 activations (w8a8); int8 / int4 weight-only with
groups that are whole MatMulNBits blocks. Refused by name: per-token dynamic activations (QuantizeLinear takes one
scale per tensor), fp8, quantized attention, groups no power of two ≥ 16 divides.

Every input dimension is exported symbolic (torch.export's Dim.AUTO): the model runs at any batch, resolution, frame
count and text length, as the diffusers class does. (The QDQ pairs are torch's quantized_decomposed ops, which have
shape functions for symbolic sizes and which the exporter writes as QuantizeLinear / DequantizeLinear.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from onnx import numpy_helper
from onnx.defs import OpSchema
from torch import nn

from qcompiler.errors import ExportError
from qcompiler.export.layers import ExportLayer
from qcompiler.export.onnx.emit import dividing_block, matmulnbits_block, matmulnbits_from_unsigned
from qcompiler.schemes import QuantScheme


def qdq_scheme_reason(scheme: QuantScheme) -> str | None:
    """Why a DiT quantized with `scheme` has no QDQ ONNX form here (None: it has one)."""
    w, a = scheme.weights, scheme.activations
    if w is None or w.type != "int":
        return "the DiT ONNX export holds int8 / int4 weights; use w8a8, w8a16 or w4a16"
    if a is None:  # weight-only: MatMulNBits
        if w.bits not in (4, 8) or w.granularity == "tensor" or (
                w.granularity == "group" and dividing_block(w.group_size or 0) is None):
            return ("onnxruntime's MatMulNBits takes int4 / int8 weights per channel or in groups of a multiple of "
                    "16 (a power of two ≥ 16 dividing the group); use w4a16 / w8a16 with such a group")
        if scheme.kv_cache is not None or scheme.sparsity is not None:
            return "quantized attention / 2:4 sparsity have no ONNX form here; use w8a16 or w4a16"
        return None
    if w.bits != 8 or w.granularity != "channel":
        return "QDQ ONNX holds int8 weights per output channel with static int8 activations; use w8a8"
    if a.dynamic or a.granularity != "tensor" or a.type != "int":
        return "QuantizeLinear takes one activation scale per tensor (static); use w8a8"
    if scheme.kv_cache is not None or scheme.sparsity is not None:
        return "quantized attention / 2:4 sparsity have no QDQ form here; use w8a8"
    return None


def qdq_reason(layer: ExportLayer) -> str | None:
    """Why `layer` has no QDQ / MatMulNBits form here (None: it has one)."""
    if layer.type != "int":
        return "fp8 layers have no int8 QDQ form; use w8a8 or w8a16"
    if layer.act is None:
        if layer.bits not in (4, 8) or matmulnbits_block(layer.group_size or layer.in_features,
                                                         layer.in_features) is None:
            return f"group size {layer.group_size} has no MatMulNBits block (a power of two ≥ 16 must divide it)"
        return None
    if layer.bits != 8 or layer.group_size is not None:
        return (f"{layer.bits}-bit weights in groups have no per-channel DequantizeLinear; use w8a8 or w8a16 "
                "(int8 per channel)")
    if layer.act == "dynamic":
        return "per-token dynamic activations have no QuantizeLinear (one scale per tensor); use w8a8 (static)"
    return None


class QdqLinear(nn.Module):
    """One quantized linear as QuantizeLinear / DequantizeLinear pairs around a float GEMM."""

    def __init__(self, layer: ExportLayer):
        super().__init__()
        assert layer.codes is not None and layer.scale is not None
        scale = layer.scale.reshape(-1).float()
        zero = (layer.zero.reshape(-1) if layer.zero is not None else torch.zeros_like(scale)).round().to(torch.int32)
        self.register_buffer("w_hat", (layer.codes.float() - zero[:, None].float()) * scale[:, None])
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", zero)
        self.register_buffer("bias", layer.bias.float() if layer.bias is not None else None)
        self.static = layer.act == "static"
        self.x_scale = float(layer.input_scale) if self.static and layer.input_scale is not None else 1.0
        self.x_zero = int(round(float(layer.input_zero))) if self.static and layer.input_zero is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unsigned codes u = q + 128 with zero points z + 128: the same numbers, and the operand types every x86
        # kernel of onnxruntime computes exactly (export/onnx/emit.py's docstring: u8×s8 saturates without VNNI)
        qd = torch.ops.quantized_decomposed
        if self.static:
            q = qd.quantize_per_tensor(x, self.x_scale, self.x_zero + 128, 0, 255, torch.uint8)
            x = qd.dequantize_per_tensor(q, self.x_scale, self.x_zero + 128, 0, 255, torch.uint8)
        codes = qd.quantize_per_channel(self.w_hat, self.w_scale, self.w_zero + 128, 0, 0, 255, torch.uint8)
        w = qd.dequantize_per_channel(codes, self.w_scale, self.w_zero + 128, 0, 0, 255, torch.uint8)
        return nn.functional.linear(x, w, self.bias)


# MatMulNBits as onnxscript knows it (its schema is onnxruntime's, not in onnx's registry): A, B, scales, optional
# zero_points, g_idx (unused here) and bias; the attributes we set
_MATMULNBITS = OpSchema(
    "MatMulNBits", "com.microsoft", 1,
    inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
            OpSchema.FormalParameter("scales", "T1"),
            OpSchema.FormalParameter("zero_points", "T3", param_option=OpSchema.FormalParameterOption.Optional),
            OpSchema.FormalParameter("g_idx", "T4", param_option=OpSchema.FormalParameterOption.Optional),
            OpSchema.FormalParameter("bias", "T1", param_option=OpSchema.FormalParameterOption.Optional)],
    outputs=[OpSchema.FormalParameter("Y", "T1")],
    type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"], ""),
                      ("T4", ["tensor(int32)"], "")],
    attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in ("K", "N", "bits", "block_size",
                                                                          "accuracy_level")],
)


@torch.library.custom_op("qc::onnx_matmulnbits", mutates_args=())
def onnx_matmulnbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     bias: torch.Tensor | None, w_hat: torch.Tensor, k: int, n: int, bits: int, block: int
                     ) -> torch.Tensor:
    """For torch: the linear on ŵ it stands for (b, scales, zero_points are MatMulNBits' operands of ŵ)."""
    return nn.functional.linear(x, w_hat, bias)


@onnx_matmulnbits.register_fake
def _onnx_matmulnbits_fake(x, b, scales, zero_points, bias, w_hat, k, n, bits, block):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], n))


def _matmulnbits_translation(x, b, scales, zero_points, bias, w_hat, k: int, n: int, bits: int,  # type: ignore[no-untyped-def]
                             block: int):
    import onnxscript  # (what torch's ONNX exporter itself needs: the `onnx` extra)

    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", op_schema=_MATMULNBITS)
    return op(x, b, scales, zero_points, None, bias, K=k, N=n, bits=bits, block_size=block, accuracy_level=0)


class NBitsLinear(nn.Module):
    """One weight-only linear as onnxruntime's MatMulNBits (module docstring)."""

    def __init__(self, layer: ExportLayer):
        super().__init__()
        assert layer.codes is not None and layer.scale is not None and layer.bits is not None
        offset = 2 ** (layer.bits - 1)
        unsigned_zero = None if layer.zero is None else (layer.zero.round() + offset).to(torch.int32)
        self.k, self.n, self.bits = layer.in_features, layer.out_features, layer.bits
        self.block, b, scales, zp = matmulnbits_from_unsigned(
            layer.codes.to(torch.int32) + offset, layer.scale, unsigned_zero, layer.bits,
            layer.group_size or layer.in_features, layer.in_features)
        self.register_buffer("b", torch.from_numpy(b))
        self.register_buffer("scales", torch.from_numpy(scales))
        self.register_buffer("zero_points", None if zp is None else torch.from_numpy(zp))
        self.register_buffer("bias", layer.bias.float() if layer.bias is not None else None)
        self.register_buffer("w_hat", layer.dequantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qc.onnx_matmulnbits(x, self.b, self.scales, self.zero_points, self.bias, self.w_hat,
                                            self.k, self.n, self.bits, self.block)


class _ByName(nn.Module):
    """The transformer called with its keyword inputs as positional ones (ONNX inputs are named in this order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True)), return_dict=False)[0]


def export_dit_qdq(model: nn.Module, layers: Mapping[str, ExportLayer], example: dict[str, torch.Tensor],
                   path: Path) -> None:
    """Write `model` (float, diffusers) with `layers` in QDQ form to `path`, traced on `example` inputs."""
    for layer in layers.values():
        reason = qdq_reason(layer)
        if reason is not None:
            raise ExportError(f"onnxruntime QDQ: layer '{layer.name}': {reason}")
        parent, _, leaf = layer.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                NBitsLinear(layer) if layer.act is None else QdqLinear(layer))
    names = list(example)
    # every dimension symbolic (batch, latent frames / height / width or packed tokens, text tokens): the exporter
    # keeps the ones the model computes with and fixes the ones it reads as constants
    dims = tuple({i: torch.export.Dim.AUTO for i in range(t.dim())} for t in example.values())
    try:
        with torch.no_grad():
            program = torch.onnx.export(_ByName(model, names).eval(), tuple(example.values()), input_names=names,
                                        output_names=["sample"], dynamo=True, verbose=False, dynamic_shapes=(dims,),
                                        custom_translation_table={
                                            torch.ops.qc.onnx_matmulnbits.default: _matmulnbits_translation})
    except Exception as e:  # (the exporter raises many kinds for an op it cannot translate)
        raise ExportError(f"onnxruntime QDQ: torch's ONNX exporter cannot export {type(model).__name__} "
                          f"({' '.join(str(e).split())[:200]})") from None
    assert program is not None
    proto = _boolean_where_as_logic(_int8_weights(program.model_proto))
    onnx.save(proto, str(path))


def _boolean_where_as_logic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Where(c, x, y) on boolean x, y (HunyuanVideo's text mask: masked_fill of a bool tensor), which onnxruntime
    has no kernel for, as (c ∧ x) ∨ (¬c ∧ y): the same truth table in ops it runs."""
    graph = proto.graph
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    nodes = []
    for node in graph.node:
        c, x, y = node.input if node.op_type == "Where" else ("", "", "")
        if node.op_type == "Where" and types.get(x) == types.get(y) == onnx.TensorProto.BOOL:
            out, tag = node.output[0], node.output[0] + "_bool_where"
            nodes += [onnx.helper.make_node("And", [c, x], [tag + "_then"]),
                      onnx.helper.make_node("Not", [c], [tag + "_not"]),
                      onnx.helper.make_node("And", [tag + "_not", y], [tag + "_else"]),
                      onnx.helper.make_node("Or", [tag + "_then", tag + "_else"], [out], name=node.name)]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _int8_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every QuantizeLinear of a constant (a weight) into 8-bit codes (the zero point's type): DequantizeLinear then reads the codes
    directly (the QDQ layout onnxruntime's quantizer writes), and the float weights leave the file."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = consts.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    keep = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and (w := value(node.input[0])) is not None:
            scale = value(node.input[1])
            zero = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scale is not None and w.ndim == 2:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [-1, 1] if axis == 0 else [1, -1]
                s = scale.reshape(shape) if scale.ndim else scale
                z = (zero.astype(np.float32).reshape(shape) if zero is not None and zero.ndim
                     else np.float32(zero if zero is not None else 0))
                unsigned = zero is not None and zero.dtype == np.uint8
                lo, hi, dtype = (0, 255, np.uint8) if unsigned else (-128, 127, np.int8)
                codes = np.clip(np.rint(w / s) + z, lo, hi).astype(dtype)
                graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
                continue
        keep.append(node)
    used = {i for n in keep for i in n.input}
    keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in used]  # (the float weights' constants)
    del graph.node[:]
    graph.node.extend(keep)
    unused = [i for i in graph.initializer if i.name not in used and i.name not in {o.name for o in graph.output}]
    for i in unused:
        graph.initializer.remove(i)
    return proto
