"""Lowering a (lowered) FX graph to ONNX Runtime nodes: one emission rule per FX op.

Kernel ops map to the ONNX Runtime CPU kernels that compute the same numbers:

  qc::linear_woq  ŵ = (q − z)·s, group g      → com.microsoft::MatMulNBits (bits 4|8, block = g or a power-of-two
                                                divisor of g with scales repeated; K padded to whole blocks;
                                                symmetric codes use the op's default zero point 2^(bits−1))
  qc::linear_w8a8 dynamic per-token           → MatMulNBits(bits=8, accuracy_level=4): onnxruntime's int8 GEMM,
                                                activations quantized per token per block of K (default), or
                                                with w8a8_dynamic=exact: s_t = max|x_t|/127; q = round(x/s_t)+128;
                                                MatMulInteger(q, W_int8 + 128, zp=128, zp=128) · s_t · s_w (+ b)
  qc::linear_w8a8 static per-tensor           → QuantizeLinear/DequantizeLinear on x and on W (QDQ), MatMul;
                                                onnxruntime fuses the pattern into its int8 GEMM
  aten.linear (float)                         → MatMul(x, Wᵀ) (+ b)
  aten.convolution with an int8 record        → DequantizeLinear(W_int8 + 128, s_w per channel, 128) → Conv, its input's
                                                qc::fake_quant_act → QuantizeLinear/DequantizeLinear (QDQ:
                                                onnxruntime runs the pattern as QLinearConv)
  qc::hadamard_transform (QuaRot, before down) → MatMul with H_K/√K (one initializer per K)
  RMSNorm  γ ⊙ x·rsqrt(mean(x²) + ε)          → RMSNormalization(x, γ, ε) (ONNX opset 23), or with the residual
                                                add feeding it, com.microsoft::SkipSimplifiedLayerNormalization
                                                (normalized output and the sum, one pass over memory)

Every int8 GEMM is written with unsigned codes on both sides (u = q + 128, zero points shifted by 128: the same
numbers). onnxruntime computes u8×u8 exactly on every x86 CPU, but on AVX2 CPUs without VNNI its u8×s8 kernels add
pairs of products in 16 bits with saturation (vpmaddubsw: 2·255·127 > 32767), and its optimizer turns int8 QDQ
activations into uint8 ones there (QDQS8ToU8): int8 weights gave logits 10–30 % off on such a CPU (AMD EPYC, AVX2,
onnxruntime 1.32), in a default session.

Everything else is elementwise/reduction ATen ops with direct ONNX counterparts. Values are emitted on demand
(only what the requested outputs need), so a caller can pre-bind nodes — the decoder exporter binds an
attention's output to a GroupQueryAttention node and the rotary/reshape nodes feeding it are never emitted.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.errors import ExportError
from qcompiler.export.onnx.builder import MS_DOMAIN, OnnxBuilder
from qcompiler.frontends.onnx import ONNX_META
from qcompiler.ir import qmeta
from qcompiler.ir.analysis import norm_multiplier
from qcompiler.ir.graph import CONV, PASSTHROUGH, aten, get_tensor, is_call, skip_passthrough
from qcompiler.kernels.packing import load_weight_codes, pack_int4

WOQ = torch.ops.qc.linear_woq.default
W8A8 = torch.ops.qc.linear_w8a8.default
FQ_STATIC = torch.ops.qc.fake_quant_act.default
MATMULNBITS_BLOCKS = (256, 128, 64, 32, 16)


@dataclass(frozen=True)
class EmitOptions:
    # MatMulNBits accuracy_level: 0 = compute in the activation dtype (exact dequantize-then-GEMM);
    # 4 = quantize activations per block to int8 inside the kernel (onnxruntime's fast CPU path).
    accuracy_level: int = 4
    # w8a8 dynamic: "matmulnbits" = MatMulNBits(bits=8, accuracy_level=4), onnxruntime's int8×int8 CPU kernel,
    # which quantizes activations per token *per block of K* (finer than our per-token oracle);
    # "exact" = per-token quantization in ONNX ops + MatMulInteger (our numbers exactly, slower).
    w8a8_dynamic: str = "matmulnbits"


def dividing_block(group_size: int) -> int | None:
    """The largest MatMulNBits block size (a power of two ≥ 16) that divides `group_size`, if any."""
    return next((b for b in MATMULNBITS_BLOCKS if group_size % b == 0), None)


def matmulnbits_block(group_size: int, k: int) -> int | None:
    """The MatMulNBits block size that reproduces groups of `group_size` along K exactly: a power of two
    ≥ 16 dividing the group (scales repeat), or, when one group spans the whole row, 128 (or the smallest
    power of two ≥ K for short rows; K is zero-padded to whole blocks)."""
    if group_size >= k:
        return 128 if k >= 128 else max(16, 1 << (k - 1).bit_length())
    return dividing_block(group_size)


def matmulnbits_tensors(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                        group_size: int, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """Our stored weight (packing.py layout) → MatMulNBits (block, B [N, kb, block·bits/8], scales [N·kb],
    zero points or None)."""
    codes = load_weight_codes(qweight, bits, k).to(torch.int32)  # unsigned for int4; int8 may be signed
    if bits == 8 and qweight.dtype == torch.int8:
        codes = codes + 128  # symmetric int8 → unsigned with the default zero point 128
    return matmulnbits_from_unsigned(codes, scale, zero, bits, group_size, k)


def matmulnbits_from_unsigned(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                              group_size: int, k: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
    """Unsigned codes u [N, K] in [0, 2^bits), scales [N, G] and unsigned zero points [N, G] (None: the default
    2^(bits−1)) → MatMulNBits (block, B, scales, zero points or None); ŵ = (u − z)·s."""
    block = matmulnbits_block(group_size, k)
    if block is None:
        raise ExportError(f"group size {group_size} has no MatMulNBits block (a power of two ≥ 16 must divide it)")
    n = codes.shape[0]
    kb = -(-k // block)
    pad_code = 2 ** (bits - 1) if zero is None else 0
    codes = torch.nn.functional.pad(codes, (0, kb * block - k), value=pad_code).to(torch.uint8)
    # group index of each block (blocks never straddle groups by construction)
    gi = torch.clamp(torch.arange(kb) * block // group_size, max=scale.shape[1] - 1)
    scales = scale.float()[:, gi].contiguous()
    b = (pack_int4(codes) if bits == 4 else codes).reshape(n, kb, block * bits // 8)
    zp = None
    if zero is not None:
        z = zero.to(torch.uint8)[:, gi]
        if bits == 4:
            if kb % 2:  # a whole byte per row: the unused nibble holds the default zero point
                z = torch.nn.functional.pad(z, (0, 1), value=8)
            z = pack_int4(z)
        zp = z.contiguous().numpy().reshape(-1)
    return block, b.contiguous().numpy(), scales.numpy().reshape(-1), zp


def match_rms_norm(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, torch.Tensor, float] | None:
    """γ ⊙ cast(x · rsqrt(mean(x², −1) + ε)) (γ or γ + c) → (x, effective γ, ε); None if not that shape."""
    if not is_call(node, aten.mul.Tensor):
        return None
    for w_arg, t_arg in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not isinstance(w_arg, fx.Node) or not isinstance(t_arg, fx.Node):
            continue
        mult = norm_multiplier(w_arg)  # γ or γ + c, as the block analysis reads norms
        if mult is None:
            continue
        gamma, offset = get_tensor(gm, mult[0]), mult[1]
        t = skip_passthrough(t_arg)
        if gamma.dim() != 1 or not is_call(t, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in t.args):
            continue
        for x1, r in ((t.args[0], t.args[1]), (t.args[1], t.args[0])):
            if not is_call(r, aten.rsqrt.default):
                continue
            a = r.args[0]
            if not (is_call(a, aten.add.Tensor) and isinstance(a.args[1], float | int)):
                continue
            m = a.args[0]
            if not (is_call(m, aten.mean.dim) and list(m.args[1]) == [-1] and m.args[2]):
                continue
            p = m.args[0]
            if not (is_call(p, aten.pow.Tensor_Scalar) and p.args[1] == 2):
                continue
            x = skip_passthrough(x1)
            if skip_passthrough(p.args[0]) is not x:
                continue
            return x, gamma.float() + offset, float(a.args[1])
    return None


Rule = Callable[["GraphEmitter", fx.Node], "str | list[str]"]
RULES: dict[Any, Rule] = {}


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


class GraphEmitter:
    """Emits the ONNX nodes computing requested values of one FX graph into a builder."""

    def __init__(self, b: OnnxBuilder, gm: fx.GraphModule, scope: str, options: EmitOptions | None = None):
        self.b, self.gm, self.scope = b, gm, scope
        self.options = options or EmitOptions()
        self.env: dict[fx.Node, str | list[str]] = {}
        self._attrs: dict[str, str] = {}
        self._norms: dict[fx.Node, tuple[fx.Node, torch.Tensor, float] | None] = {}

    # ---------------------------------------------------------------- values
    def name(self, node: fx.Node) -> str:
        return f"{self.scope}/{node.name}"

    def tensor(self, node: fx.Node) -> torch.Tensor:
        return get_tensor(self.gm, str(node.target))

    def v(self, arg: Any) -> str:
        """The ONNX value of an FX argument (python scalars become float32 constants)."""
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                if arg.target not in self._attrs:
                    self._attrs[arg.target] = self.b.initializer(f"{self.scope}.{arg.target}", self.tensor(arg))
                return self._attrs[arg.target]
            if arg not in self.env:
                self.emit([arg])
            out = self.env[arg]
            if isinstance(out, list):
                raise ExportError(f"{self.scope}: node '{arg.name}' has several outputs and is used as one value")
            return out
        if isinstance(arg, bool | int | float):
            return self.b.const(float(arg))
        raise ExportError(f"{self.scope}: cannot export argument {arg!r}")

    def norm(self, node: fx.Node) -> tuple[fx.Node, torch.Tensor, float] | None:
        if self.b.opset < 23:  # RMSNormalization is opset 23; older graphs keep the decomposed norm
            return None
        if node not in self._norms:
            self._norms[node] = match_rms_norm(node, self.gm)
        return self._norms[node]

    def deps(self, node: fx.Node) -> list[fx.Node]:
        if is_call(node, CONV) and qmeta.RECORD in node.meta:  # the kernel comes from the record's int8 tensors
            return [node.args[0]]  # type: ignore[list-item]
        if is_call(node, aten.index.Tensor):  # (its index is a constant, read at export: _index)
            return [node.args[0]]  # type: ignore[list-item]
        if is_call(node, aten.linear.default):  # (its weight, through any cast, is read at export: _linear)
            return [a for a in (node.args[0], *node.args[2:3]) if isinstance(a, fx.Node) and a.op != "get_attr"]
        m = self.norm(node) if is_call(node, aten.mul.Tensor) else None
        if m is not None:
            return [m[0]]
        if is_call(node, aten.sym_size.int) and node.args[0].op == "placeholder" and node.args[0] not in self.env:  # type: ignore[union-attr]
            return []
        return [a for a in node.all_input_nodes if a.op != "get_attr"]

    # ---------------------------------------------------------------- driving
    def emit(self, outputs: list[fx.Node]) -> list[str | list[str]]:
        needed: set[fx.Node] = set()
        stack = [o for o in outputs if o not in self.env]
        while stack:
            n = stack.pop()
            if n in needed or n in self.env:
                continue
            needed.add(n)
            stack.extend(d for d in self.deps(n) if d not in self.env)
        # residual add feeding an RMSNorm → one SkipSimplifiedLayerNormalization (both results kept)
        skip_norm: dict[fx.Node, fx.Node] = {}
        for n in needed:
            m = self.norm(n) if is_call(n, aten.mul.Tensor) else None
            if m is not None and m[0] in needed and is_call(m[0], aten.add.Tensor) and m[0] not in skip_norm \
                    and len(m[0].meta["val"].shape) <= 3 \
                    and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in m[0].args[:2]):
                # (the fused op takes [B, S, N] or [T, N]; a per-head norm of a sum, HunYuan's q/k norm after
                # rotary, stays Add + RMSNormalization)
                skip_norm[m[0]] = n
        for n in self.gm.graph.nodes:
            if n in needed and n not in self.env:
                if n in skip_norm:
                    self.env[skip_norm[n]], self.env[n] = _skip_rms_norm(self, n, skip_norm[n])
                else:
                    self.env[n] = self._emit_node(n)
        return [self.env[o] for o in outputs]

    def _emit_node(self, n: fx.Node) -> str | list[str]:
        if n.op == "placeholder":
            raise ExportError(f"{self.scope}: graph input '{n.name}' is used but has no ONNX value bound")
        if n.op != "call_function":
            raise ExportError(f"{self.scope}: node '{n.name}' ({n.op} {n.target}) cannot be exported to ONNX")
        if ONNX_META in n.meta:
            return _imported_node(self, n)
        if is_call(n, aten.mul.Tensor) and self.norm(n) is not None:
            return _rms_norm(self, n)
        fn = RULES.get(n.target)
        if fn is None and n.target is torch.ops.qc.fake_quant_kv.default:
            raise ExportError(f"{self.scope}: a quantized KV cache ('{n.name}') is kept only by GroupQueryAttention "
                              "(k_scale / v_scale), which this attention's key or value path does not reach; drop "
                              "--kv-cache for --target onnxruntime")
        if fn is None:
            raise ExportError(
                f"{self.scope}: op '{n.target}' (node '{n.name}') has no ONNX Runtime lowering; supported: "
                + ", ".join(sorted({str(t) for t in RULES}))
            )
        return fn(self, n)


# -------------------------------------------------------------------- rules
def _imported_node(em: GraphEmitter, n: fx.Node) -> str | list[str]:
    meta = n.meta[ONNX_META]
    inputs = ["" if a is None else em.v(a) for a in n.args]
    outs = em.b.copy_node(meta["op_type"], meta["domain"], inputs, f"{em.scope}/{meta['name'] or n.name}",
                          meta["outputs"], meta["attributes"])
    return outs if meta["outputs"] > 1 else outs[0]


def _rms_norm(em: GraphEmitter, n: fx.Node) -> str:
    x, gamma, eps = em.norm(n)  # type: ignore[misc]
    g = em.b.initializer(f"{em.scope}.norm_weight", gamma)
    return em.b.op("RMSNormalization", [em.v(x), g], em.name(n), axis=-1, epsilon=eps, stash_type=1)


def _skip_rms_norm(em: GraphEmitter, add: fx.Node, norm: fx.Node) -> tuple[str, str]:
    return skip_rms_norm(em, em.v(add.args[0]), em.v(add.args[1]), norm)


def skip_rms_norm(em: GraphEmitter, a: str, b: str, norm: fx.Node) -> tuple[str, str]:
    """(normalized, sum) of RMSNorm(a + b) as com.microsoft::SkipSimplifiedLayerNormalization."""
    _, gamma, eps = em.norm(norm)  # type: ignore[misc]
    g = em.b.initializer(f"{em.scope}.norm_weight", gamma)
    name = em.name(norm)
    y, s = em.b.fresh(name + "/out"), em.b.fresh(name + "/sum")
    em.b.node("SkipSimplifiedLayerNormalization", [a, b, g], name, domain=MS_DOMAIN, outputs=[y, "", "", s], epsilon=eps)
    return y, s


@rule(*PASSTHROUGH, aten.contiguous.default)
def _passthrough(em: GraphEmitter, n: fx.Node) -> str:
    dtype = n.kwargs.get("dtype") or next((a for a in n.args[1:] if isinstance(a, torch.dtype)), None)
    if dtype not in (None, torch.float32):
        raise ExportError(f"{em.scope}: node '{n.name}' casts to {dtype}; the ONNX export is float32 only")
    return em.v(n.args[0])


@rule(aten.dropout.default)
def _dropout(em: GraphEmitter, n: fx.Node) -> str:
    """Dropout of an inference graph (Phi-3's resid dropouts): train=False is the identity."""
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", False)
    if train:
        raise ExportError(f"{em.scope}: node '{n.name}' is dropout in training mode; export the model in eval mode")
    return em.v(n.args[0])


@rule(aten.sym_size.int)
def _sym_size(em: GraphEmitter, n: fx.Node) -> str:
    """A dimension read off a tensor, as the 1-element int64 tensor Reshape's shape is built from."""
    x, dim = n.args[:2]
    shape = x.meta["val"].shape  # type: ignore[union-attr]
    d = int(dim) % len(shape)  # type: ignore[call-overload]
    if isinstance(x, fx.Node) and x.op == "placeholder" and x not in em.env:
        # a size read off an input the export does not bind (the mask): the same symbolic size of a bound input
        for p in em.gm.graph.nodes:
            if p.op == "placeholder" and p in em.env:
                for i, size in enumerate(p.meta["val"].shape):
                    if str(size) == str(shape[d]):
                        return em.b.op("Shape", [em.v(p)], em.name(n), start=i, end=i + 1)
    return em.b.op("Shape", [em.v(x)], em.name(n), start=d, end=d + 1)


@rule(aten.layer_norm.default)
def _layer_norm(em: GraphEmitter, n: fx.Node) -> str:
    """LayerNorm over the last dimension: (x − mean)/√(var + ε)·γ + β (γ = 1, β = 0 where absent)."""
    x, shape = n.args[:2]
    weight, bias = (n.args[i] if len(n.args) > i else None for i in (2, 3))
    eps = float(n.args[4]) if len(n.args) > 4 else 1e-5  # type: ignore[arg-type]
    if len(shape) != 1:  # type: ignore[arg-type]
        raise ExportError(f"{em.scope}: node '{n.name}' normalizes over {len(shape)} dimensions, not the last one")  # type: ignore[arg-type]
    width = int(shape[0])  # type: ignore[index]
    gamma = em.v(weight) if weight is not None else em.b.initializer(f"{em.scope}.{n.name}.ones", torch.ones(width))
    beta = em.v(bias) if bias is not None else em.b.initializer(f"{em.scope}.{n.name}.zeros", torch.zeros(width))
    return em.b.op("LayerNormalization", [em.v(x), gamma, beta], em.name(n), axis=-1, epsilon=eps)


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(em: GraphEmitter, n: fx.Node) -> str:
    """Reshape to sizes that are constants or dimensions read off tensors (aten.sym_size)."""
    x, sizes = n.args[:2]
    if any(isinstance(d, int) and d == 0 for d in sizes):  # type: ignore[union-attr]
        raise ExportError(f"{em.scope}: node '{n.name}' reshapes to a size-0 dimension")
    parts = [em.v(d) if isinstance(d, fx.Node) else em.b.const([int(d)], np.int64) for d in sizes]  # type: ignore[union-attr]
    shape = parts[0] if len(parts) == 1 else em.b.op("Concat", parts, em.name(n) + "/shape", axis=0)
    return em.b.op("Reshape", [em.v(x), shape], em.name(n))


def _binary(op: str) -> Rule:
    def emit(em: GraphEmitter, n: fx.Node) -> str:
        if n.kwargs.get("alpha", 1) != 1:
            raise ExportError(f"{em.scope}: node '{n.name}' has alpha != 1")
        return em.b.op(op, [em.v(n.args[0]), em.v(n.args[1])], em.name(n))

    return emit


def _unary(op: str) -> Rule:
    def emit(em: GraphEmitter, n: fx.Node) -> str:
        return em.b.op(op, [em.v(n.args[0])], em.name(n))

    return emit


for _t, _op in ((aten.add.Tensor, "Add"), (aten.sub.Tensor, "Sub"), (aten.mul.Tensor, "Mul"),
                (aten.div.Tensor, "Div")):
    RULES[_t] = _binary(_op)


def _in_place(op: str) -> Rule:
    """x.op_(y) (Falcon's `mlp_output += attention_output`) as the out-of-place op: its result is the node's value,
    which is exact where nothing reads x after the mutation (checked: a later reader would see the new value)."""
    out_of_place = _binary(op)

    def emit(em: GraphEmitter, n: fx.Node) -> str:
        x = n.args[0]
        order = {node: i for i, node in enumerate(em.gm.graph.nodes)}
        if isinstance(x, fx.Node) and any(order[u] > order[n] for u in x.users if u is not n):
            raise ExportError(f"{em.scope}: node '{n.name}' updates '{x.name}' in place and a later node reads it")
        return out_of_place(em, n)

    return emit


for _t, _op in ((aten.add_.Tensor, "Add"), (aten.sub_.Tensor, "Sub"), (aten.mul_.Tensor, "Mul"),
                (aten.div_.Tensor, "Div")):
    RULES[_t] = _in_place(_op)
for _t, _op in ((aten.neg.default, "Neg"), (aten.sigmoid.default, "Sigmoid"), (aten.tanh.default, "Tanh"),
                (aten.relu.default, "Relu"), (aten.exp.default, "Exp"), (aten.sqrt.default, "Sqrt"),
                (aten.reciprocal.default, "Reciprocal")):
    RULES[_t] = _unary(_op)


@rule(aten.rsqrt.default)
def _rsqrt(em: GraphEmitter, n: fx.Node) -> str:
    return em.b.op("Reciprocal", [em.b.op("Sqrt", [em.v(n.args[0])], em.name(n) + "/sqrt")], em.name(n))


@rule(aten.pow.Tensor_Scalar)
def _pow(em: GraphEmitter, n: fx.Node) -> str:
    return em.b.op("Pow", [em.v(n.args[0]), em.b.const(float(n.args[1]))], em.name(n))


@rule(aten.mean.dim)
def _mean(em: GraphEmitter, n: fx.Node) -> str:
    keep = int(bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)))
    if em.b.opset < 18:  # axes became an input in opset 18
        return em.b.op("ReduceMean", [em.v(n.args[0])], em.name(n), keepdims=keep, axes=list(n.args[1]))
    axes = em.b.const(list(n.args[1]), np.int64)
    return em.b.op("ReduceMean", [em.v(n.args[0]), axes], em.name(n), keepdims=keep)


@rule(aten.silu.default)
def _silu(em: GraphEmitter, n: fx.Node) -> str:
    x = em.v(n.args[0])
    return em.b.op("Mul", [x, em.b.op("Sigmoid", [x], em.name(n) + "/sigmoid")], em.name(n))


@rule(aten.gelu.default)
def _gelu(em: GraphEmitter, n: fx.Node) -> str:
    approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
    return em.b.op("Gelu", [em.v(n.args[0])], em.name(n), approximate=approx)


@rule(aten.split_with_sizes.default)
def _split(em: GraphEmitter, n: fx.Node) -> list[str]:
    sizes = list(n.args[1])
    axis = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    return em.b.node("Split", [em.v(n.args[0]), em.b.const(sizes, np.int64)], em.name(n), n_out=len(sizes), axis=axis)


@rule(aten.chunk.default)
def _chunk(em: GraphEmitter, n: fx.Node) -> list[str]:
    """chunk(x, k, dim) (Phi-3's fused gate_up split in two): Split with the traced piece sizes."""
    axis = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    sizes = [int(t.shape[axis]) for t in n.meta["val"]]
    return em.b.node("Split", [em.v(n.args[0]), em.b.const(sizes, np.int64)], em.name(n), n_out=len(sizes), axis=axis)


@rule(aten.transpose.int)
def _transpose(em: GraphEmitter, n: fx.Node) -> str:
    rank = len(n.meta["val"].shape)
    a, b = (int(d) % rank for d in n.args[1:3])  # type: ignore[call-overload]
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return em.b.op("Transpose", [em.v(n.args[0])], em.name(n), perm=perm)


@rule(aten.permute.default)
def _permute(em: GraphEmitter, n: fx.Node) -> str:
    rank = len(n.meta["val"].shape)
    return em.b.op("Transpose", [em.v(n.args[0])], em.name(n), perm=[int(d) % rank for d in n.args[1]])  # type: ignore[union-attr]


@rule(aten.unsqueeze.default)
def _unsqueeze(em: GraphEmitter, n: fx.Node) -> str:
    rank = len(n.meta["val"].shape)
    return em.b.op("Unsqueeze", [em.v(n.args[0]), em.b.const([int(n.args[1]) % rank], np.int64)], em.name(n))  # type: ignore[call-overload]


@rule(aten.slice.Tensor)
def _slice(em: GraphEmitter, n: fx.Node) -> str:
    """x[start:end:step] along one dimension (the rotated and passed-through parts of a partially rotated head);
    constant bounds only (an end past the dimension, torch's "to the end", is clipped by Slice itself)."""
    x = n.args[0]
    rank = len(x.meta["val"].shape)  # type: ignore[union-attr]
    dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    if not all(v is None or isinstance(v, int) for v in (dim, start, end, step)):
        raise ExportError(f"{em.scope}: node '{n.name}' slices with bounds computed at run time")
    last = int(np.iinfo(np.int64).max)
    bounds = [0 if start is None else int(start), last if end is None else min(int(end), last)]  # type: ignore[arg-type]
    return em.b.op("Slice", [em.v(x), em.b.const([bounds[0]], np.int64), em.b.const([bounds[1]], np.int64),
                             em.b.const([int(dim) % rank], np.int64), em.b.const([int(step or 1)], np.int64)],  # type: ignore[call-overload]
                   em.name(n))


@rule(aten.cat.default)
def _cat(em: GraphEmitter, n: fx.Node) -> str:
    rank = len(n.meta["val"].shape)
    dim = int(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0))  # type: ignore[call-overload]
    return em.b.op("Concat", [em.v(x) for x in n.args[0]], em.name(n), axis=dim % rank)  # type: ignore[union-attr]


@rule(aten.index.Tensor)
def _index(em: GraphEmitter, n: fx.Node) -> str:
    """x[..., idx, ...] with one constant integer index tensor (Falcon's multi-query split `qkv[..., [-2], :]`):
    Gather along that dimension."""
    x, indices = n.args[:2]
    given = [(d, i.args[0] if is_call(i, aten.lift_fresh_copy.default) else i)  # (a constant lifted into the graph)
             for d, i in enumerate(indices) if i is not None]  # type: ignore[arg-type]
    if len(given) != 1 or not (isinstance(given[0][1], fx.Node) and given[0][1].op == "get_attr"):
        raise ExportError(f"{em.scope}: node '{n.name}' indexes with tensors computed at run time or along several "
                          "dimensions")
    dim, index = given[0]
    values = em.tensor(index)
    if values.dtype not in (torch.int64, torch.int32) or values.dim() != 1:
        raise ExportError(f"{em.scope}: node '{n.name}' indexes with a {values.dtype} tensor of {values.dim()} dims")
    return em.b.op("Gather", [em.v(x), em.b.const(values.tolist(), np.int64)], em.name(n), axis=dim)


@rule(operator.getitem)
def _getitem(em: GraphEmitter, n: fx.Node) -> str:
    src = n.args[0]
    assert isinstance(src, fx.Node)
    if src not in em.env:
        em.emit([src])
    outs = em.env[src]
    if not isinstance(outs, list):
        raise ExportError(f"{em.scope}: node '{n.name}' indexes a single-output value")
    return outs[n.args[1]]


def _bias(em: GraphEmitter, y: str, bias: fx.Node | None, name: str) -> str:
    return y if bias is None else em.b.op("Add", [y, em.v(bias)], name + "/bias")


@rule(aten.linear.default)
def _linear(em: GraphEmitter, n: fx.Node) -> str:
    weight = skip_passthrough(n.args[1])  # (a router computing in float32 casts its weight: GLM-4.5)
    w = em.tensor(weight)
    wt = em.b.initializer(f"{em.scope}.{weight.target}.T", w.float().t().contiguous())
    y = em.b.op("MatMul", [em.v(n.args[0]), wt], em.name(n))
    return _bias(em, y, n.args[2] if len(n.args) > 2 else None, em.name(n))


@rule(CONV)
def _conv(em: GraphEmitter, n: fx.Node) -> str:
    x, w, bias, stride, padding, dilation, transposed, _out_pad, groups = n.args
    if transposed:
        raise ExportError(f"{em.scope}: node '{n.name}' is a transposed convolution (not exported)")
    rec = n.meta.get(qmeta.RECORD)
    if rec is not None:  # int8 kernel: DequantizeLinear(W_int8 + 128, per-output-channel scale, 128) feeds Conv
        t = rec.tensors
        q_w = get_tensor(em.gm, t["qweight"])
        qw = em.b.initializer(t["qweight"] + "_uint8", _unsigned(q_w))
        ws = em.b.initializer(t["weight_scale"], get_tensor(em.gm, t["weight_scale"]))
        wz = em.b.initializer(t["qweight"] + "_zero", torch.full((q_w.shape[0],), 128, dtype=torch.uint8))
        wv = em.b.op("DequantizeLinear", [qw, ws, wz], em.name(n) + "/dequantize_w", axis=0)
    else:
        wv = em.v(w)
    inputs = [em.v(x), wv] + ([em.v(bias)] if bias is not None else [])
    return em.b.op("Conv", inputs, em.name(n), strides=list(stride), pads=list(padding) * 2,
                   dilations=list(dilation), group=int(groups))


@rule(torch.ops.qc.hadamard_transform.default)
def _hadamard_transform(em: GraphEmitter, n: fx.Node) -> str:
    """QuaRot's online Hadamard before a linear: MatMul with H_K/√K, one initializer shared by every block."""
    from qcompiler.algorithms.hadamard import normalized_hadamard

    (x,) = n.args
    k = int(x.meta["val"].shape[-1])
    h = em.b.shared_initializer(f"hadamard_{k}", lambda: normalized_hadamard(k).float())  # type: ignore[union-attr]
    return em.b.op("MatMul", [em.v(x), h], em.name(n))


@rule(FQ_STATIC)
def _fake_quant_act(em: GraphEmitter, n: fx.Node) -> str:
    """A static activation fake-quant left in the graph (before an int8 convolution): QuantizeLinear +
    DequantizeLinear with the same scale and zero point, uint8 (a grid of [−128, 127] shifted by 128: the same numbers,
    unsigned as the module docstring says why)."""
    x, scale, zero, qmin, qmax = n.args
    if (qmin, qmax) not in ((-128, 127), (0, 255)):
        raise ExportError(f"{em.scope}: node '{n.name}' fake-quantizes to [{qmin}, {qmax}]; ONNX has 8-bit Q/DQ only")
    shift = 128 if qmin < 0 else 0
    s = em.b.initializer(str(scale.target), get_tensor(em.gm, str(scale.target)).float().reshape(()))
    zero_u8 = (get_tensor(em.gm, str(zero.target)).reshape(()).float().round().to(torch.int32) + shift).to(torch.uint8)
    z = em.b.initializer(str(zero.target), zero_u8)
    q = em.b.op("QuantizeLinear", [em.v(x), s, z], em.name(n) + "/quantize")
    return em.b.op("DequantizeLinear", [q, s, z], em.name(n))


def matmulnbits_node(b: OnnxBuilder, name: str, x: str, weights: tuple[str, str, str], bias: str, k: int, n: int,
                     bits: int, block: int, accuracy_level: int, output: str | None = None) -> str:
    """One MatMulNBits node; `weights` = (B, scales, zero points or "") initializer names, `bias` or ""."""
    inputs = [x, *weights, "", bias]  # (input 4, g_idx, is unused)
    while inputs[-1] == "":
        inputs.pop()
    return b.node("MatMulNBits", inputs, name, domain=MS_DOMAIN, outputs=None if output is None else [output],
                  K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)[0]


def matmulnbits_initializers(b: OnnxBuilder, base: str, b_data: np.ndarray, scales: np.ndarray,
                             zero_points: np.ndarray | None) -> tuple[str, str, str]:
    return (b.initializer(base + ".MatMulNBits.B", b_data), b.initializer(base + ".MatMulNBits.scales", scales),
            b.initializer(base + ".MatMulNBits.zero_points", zero_points) if zero_points is not None else "")


@rule(WOQ)
def _linear_woq(em: GraphEmitter, n: fx.Node) -> str:
    x, qw, scale, zero, bias, bits, g, k = n.args
    block, b, s, zp = matmulnbits_tensors(em.tensor(qw), em.tensor(scale), em.tensor(zero) if zero else None,
                                          bits, g, k)
    weights = matmulnbits_initializers(em.b, f"{em.scope}.{str(qw.target).removesuffix('.qweight')}", b, s, zp)
    return matmulnbits_node(em.b, em.name(n), em.v(x), weights, "" if bias is None else em.v(bias), int(k),
                            int(b.shape[0]), int(bits), block, em.options.accuracy_level)


@rule(W8A8)
def _linear_w8a8(em: GraphEmitter, n: fx.Node) -> str:
    x, qw, w_scale, x_scale, x_zero, bias = n.args
    name = em.name(n)
    b = em.b
    base = f"{em.scope}.{str(qw.target).removesuffix('.qweight')}"
    q_w = em.tensor(qw)
    s_w = em.tensor(w_scale).float().reshape(-1)
    xv = em.v(x)
    if x_scale is None and em.options.w8a8_dynamic == "matmulnbits":
        k = int(q_w.shape[1])
        block, bq, sq, _ = matmulnbits_tensors(q_w, s_w.reshape(-1, 1), None, 8, k, k)
        return matmulnbits_node(b, name, xv, matmulnbits_initializers(b, base, bq, sq, None),
                                "" if bias is None else em.v(bias), k, int(q_w.shape[0]), 8, block, accuracy_level=4)
    if x_scale is None:  # dynamic symmetric per-token
        w_t = b.initializer(base + ".W_uint8.T", _unsigned(q_w).t().contiguous())
        absx = b.op("Abs", [xv], name + "/abs")
        amax = (b.op("ReduceMax", [absx, b.const([-1], np.int64)], name + "/amax", keepdims=1) if b.opset >= 18
                else b.op("ReduceMax", [absx], name + "/amax", keepdims=1, axes=[-1]))
        s_x = b.op("Max", [b.op("Div", [amax, b.const(127.0)], name + "/div"), b.const(1e-12)], name + "/scale")
        q = b.op("Add", [b.op("Round", [b.op("Div", [xv, s_x], name + "/x_over_s")], name + "/round"),
                         b.const(128.0)], name + "/shift")
        q = b.op("Cast", [b.op("Clip", [q, b.const(0.0), b.const(255.0)], name + "/clip")], name + "/u8",
                 to=TensorProto.UINT8)
        acc = b.op("MatMulInteger", [q, w_t, b.const(128, np.uint8), b.const(128, np.uint8)], name + "/matmul_integer")
        y = b.op("Cast", [acc], name + "/acc_f32", to=TensorProto.FLOAT)
        y = b.op("Mul", [y, b.op("Mul", [s_x, b.initializer(base + ".weight_scale", s_w)], name + "/s_xw")], name)
        if bias is None:
            return y
        # Sum, not Add: onnxruntime 1.32's extended optimizations fuse MatMulInteger → Cast → Mul → Add(bias) into
        # MatMulIntegerToFloat and get per-token scales wrong there (logits off by ~50% with biased q/k/v, exact with
        # optimizations off); the bias-free chain is left alone (tests/test_support_matrix.py's qwen2 cells)
        return b.op("Sum", [y, em.v(bias)], name + "/bias")
    # static per-tensor: QDQ on activation and weight, unsigned codes (see the module docstring)
    z = em.tensor(x_zero).to(torch.int32).reshape(()) if x_zero is not None else torch.zeros((), dtype=torch.int32)
    s = em.tensor(x_scale).float().reshape(())
    xs, xz = b.initializer(base + ".input_scale", s), b.initializer(base + ".input_zero", (z + 128).to(torch.uint8))
    xq = b.op("QuantizeLinear", [xv, xs, xz], name + "/quantize_x")
    xd = b.op("DequantizeLinear", [xq, xs, xz], name + "/dequantize_x")
    w_zero = b.initializer(base + ".weight_zero", torch.full((q_w.shape[0],), 128, dtype=torch.uint8))
    wd = b.op("DequantizeLinear", [b.initializer(base + ".W_uint8.T", _unsigned(q_w).t().contiguous()),
                                   b.initializer(base + ".weight_scale", s_w), w_zero], name + "/dequantize_w", axis=1)
    return _bias(em, b.op("MatMul", [xd, wd], name), bias, name)


def _unsigned(q_w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 weight codes q → u = q + 128 (uint8; read with zero point 128)."""
    return (q_w.to(torch.int32) + 128).to(torch.uint8)
