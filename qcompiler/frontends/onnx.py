"""ONNX frontend: an ONNX model (external data included) → the same FX IR the passes work on.

Translation, node by node, through one op table:
  * Conv with initializer weights becomes `aten.convolution` (quantized per output channel, int8 only).
  * MatMul(x, B) with a 2-D initializer B and Gemm(A, B[, C]) with initializer weights become
    `aten.linear(x, W[, b])` with W = Bᵀ (or B when transB=1) stored as `<layer>.weight`, so every weight
    pass (RTN, GPTQ, AWQ, SmoothQuant, act_quant, lowering) applies unchanged. The layer is named from the
    exporter's scope metadata (torch.onnx: `pkg.torch.onnx.name_scopes`) or the node name.
  * Elementwise ops and ReduceMean with constant axes become their ATen ops (norm and MLP patterns are
    then recognised by the same analysis as traced graphs).
  * Every other supported op becomes a call of its torch implementation (`ONNX_OPS`) carrying the original
    node (op type, domain, attributes) in `node.meta["onnx"]`; the ONNX Runtime emitter writes it back as is.
  * Constant nodes become initializers. Graph inputs become placeholders in order.

An unsupported op is reported (op type, domain, node name — all of them at once) before anything is built.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import fx

from qcompiler.errors import ModelLoadError, QCompilerError, UnsupportedOpError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import CONV, LINEAR, aten, set_tensor

ONNX_META = "onnx"  # node.meta key: {"op_type", "domain", "attributes": [AttributeProto], "outputs": int}


def _i(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(attrs: dict, axes: torch.Tensor | None) -> list[int] | None:
    if axes is not None:
        return _i(axes)
    return list(attrs["axes"]) if "axes" in attrs else None


def _reshape(a: dict, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    s = _i(shape)
    if not a.get("allowzero", 0):
        s = [x.shape[i] if v == 0 else v for i, v in enumerate(s)]
    return x.reshape(s)


def _slice(a: dict, x: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, axes: torch.Tensor | None = None,
           steps: torch.Tensor | None = None) -> torch.Tensor:
    st, en = _i(starts), _i(ends)
    ax = _i(axes) if axes is not None else list(range(len(st)))
    sp = _i(steps) if steps is not None else [1] * len(st)
    idx: list[Any] = [slice(None)] * x.dim()
    for s, e, d, p in zip(st, en, ax, sp, strict=True):
        d = d % x.dim()
        n = x.shape[d]
        if p > 0:
            s, e = max(min(s + n if s < 0 else s, n), 0), max(min(e + n if e < 0 else e, n), 0)
            idx[d] = slice(s, e, p)
        else:  # negative steps: flip, then slice forwards
            s = min(s + n if s < 0 else s, n - 1)
            e = e + n if e < 0 else e
            e = max(e, -1)
            x = x.flip(d)
            idx[d] = slice(n - 1 - s, n - 1 - e, -p)
    return x[tuple(idx)]


def _unsqueeze(a: dict, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    ax = sorted(v % (x.dim() + len(_axes(a, axes) or [])) for v in _axes(a, axes) or [])
    for d in ax:
        x = x.unsqueeze(d)
    return x


def _squeeze(a: dict, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
    ax = _axes(a, axes)
    if ax is None:
        return x.squeeze()
    for d in sorted((v % x.dim() for v in ax), reverse=True):
        x = x.squeeze(d)
    return x


def _reduce(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(a: dict, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        ax = _axes(a, axes)
        keep = bool(a.get("keepdims", 1))
        if not ax:
            if a.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        return fn(x, dim=ax, keepdim=keep)

    return run


def _amax(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
    return x.amax(dim=dim, keepdim=keepdim)


def _amin(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
    return x.amin(dim=dim, keepdim=keepdim)


def _gather(a: dict, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _gather_elements(a: dict, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    axis = a.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx).long())


def _einsum(a: dict, *xs: torch.Tensor) -> torch.Tensor:
    eq = a["equation"]
    return torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *xs)


def _gather_nd(a: dict, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    b = a.get("batch_dims", 0)
    if b:
        return torch.stack([_gather_nd({"batch_dims": b - 1}, xi, ii) for xi, ii in zip(x, idx, strict=True)])
    k = idx.shape[-1]
    flat = idx.reshape(-1, k).long()
    out = x[tuple(flat[:, j] for j in range(k))]
    return out.reshape((*idx.shape[:-1], *x.shape[k:]))


def _conv(a: dict, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    nd = x.dim() - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelLoadError("Conv auto_pad is not supported; re-export the model with explicit pads")
    pads = list(a.get("pads", [0] * 2 * nd))
    if pads[:nd] != pads[nd:]:
        x = torch.nn.functional.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])])
        pads = [0] * 2 * nd
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    return fn(x, w, b, stride=list(a.get("strides", [1] * nd)), padding=pads[:nd],
              dilation=list(a.get("dilations", [1] * nd)), groups=a.get("group", 1))


def _pool(kind: str) -> Callable[..., torch.Tensor]:
    def run(a: dict, x: torch.Tensor) -> torch.Tensor:
        nd = x.dim() - 2
        k = list(a["kernel_shape"])
        pads = list(a.get("pads", [0] * 2 * nd))
        stride = list(a.get("strides", [1] * nd))
        if pads[:nd] != pads[nd:]:
            raise ModelLoadError(f"{kind} with asymmetric pads is not supported")
        if kind == "max":
            fn = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d}[nd]
            return fn(x, k, stride, pads[:nd], list(a.get("dilations", [1] * nd)), bool(a.get("ceil_mode", 0)))
        fn2 = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d}[nd]
        return fn2(x, k, stride, pads[:nd], bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))

    return run


def _batch_norm(a: dict, x: torch.Tensor, s: torch.Tensor, b: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.batch_norm(x, m, v, s, b, False, 0.0, a.get("epsilon", 1e-5))


def _layer_norm(a: dict, x: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    axis = a.get("axis", -1) % x.dim()
    return torch.nn.functional.layer_norm(x, x.shape[axis:], s, b, a.get("epsilon", 1e-5))


def _rms_norm(a: dict, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    axis = a.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + a.get("epsilon", 1e-5))).to(x.dtype) * s


def _split(a: dict, x: torch.Tensor, split: torch.Tensor | None = None, *, n_out: int = 1) -> tuple[torch.Tensor, ...]:
    axis = a.get("axis", 0)
    sizes = _i(split) if split is not None else list(a.get("split", []))
    if not sizes:
        n = x.shape[axis]
        sizes = [-(-n // n_out)] * (n_out - 1) + [n - -(-n // n_out) * (n_out - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _cast(a: dict, x: torch.Tensor) -> torch.Tensor:
    return x.to(_DTYPES[a["to"]])


def _clip(a: dict, x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    lo_v = lo if lo is not None else a.get("min")
    hi_v = hi if hi is not None else a.get("max")
    return torch.clamp(x, lo_v, hi_v)


def _softmax(a: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=a.get("axis", -1))


def _concat(a: dict, *xs: torch.Tensor) -> torch.Tensor:
    return torch.cat(list(xs), dim=a["axis"])


def _transpose(a: dict, x: torch.Tensor) -> torch.Tensor:
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return x.permute(list(perm))


def _expand(a: dict, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    s = _i(shape)
    return x * torch.ones(s, dtype=x.dtype) if x.dtype != torch.bool else x.expand(torch.broadcast_shapes(x.shape, tuple(s)))


def _constant_of_shape(a: dict, shape: torch.Tensor) -> torch.Tensor:
    v = a.get("value")
    value = torch.from_numpy(numpy_helper.to_array(v).copy()) if v is not None else torch.zeros(1)
    return value.reshape(()).expand(_i(shape)).clone()


def _range(a: dict, start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _flatten(a: dict, x: torch.Tensor) -> torch.Tensor:
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis  # 0 ≤ axis ≤ rank
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _gemm(a: dict, x: torch.Tensor, w: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * c if c is not None else y


def _where(a: dict, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(c, x, y)


def _trilu(a: dict, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
    kk = int(k.item()) if k is not None else 0
    return torch.triu(x, kk) if a.get("upper", 1) else torch.tril(x, kk)


def _cumsum(a: dict, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    if a.get("exclusive", 0) or a.get("reverse", 0):
        raise ModelLoadError("CumSum with exclusive/reverse is not supported")
    return torch.cumsum(x, int(axis.item())).to(x.dtype)


def _gelu(a: dict, x: torch.Tensor) -> torch.Tensor:
    approx = a.get("approximate", b"none")
    return torch.nn.functional.gelu(x, approximate=approx.decode() if isinstance(approx, bytes) else approx)


def _tile(a: dict, x: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    return x.repeat(_i(reps))


def _simple(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(a: dict, *xs: torch.Tensor) -> torch.Tensor:
        return fn(*xs)

    return run


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(a: dict, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return run


_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float16, 11: torch.float64, 16: torch.bfloat16}

# Ops kept as ONNX nodes (torch implementation for calibration; re-emitted as they were).
ONNX_OPS: dict[str, Callable[..., Any]] = {
    "Reshape": _reshape, "Slice": _slice, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(_amax),
    "ReduceMin": _reduce(_amin), "Gather": _gather, "GatherND": _gather_nd, "Conv": _conv,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"), "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm, "RMSNormalization": _rms_norm, "Split": _split, "Cast": _cast,
    "Clip": _clip, "Softmax": _softmax, "Concat": _concat, "Transpose": _transpose, "Expand": _expand,
    "ConstantOfShape": _constant_of_shape, "Range": _range, "Flatten": _flatten, "Gemm": _gemm, "Where": _where,
    "Trilu": _trilu, "CumSum": _cumsum, "Gelu": _gelu, "Tile": _tile,
    "MatMul": _simple(torch.matmul), "Shape": lambda a, x: torch.tensor(list(x.shape), dtype=torch.int64)[a.get("start", 0):a.get("end", None)],
    "Size": _simple(lambda x: torch.tensor(x.numel(), dtype=torch.int64)),
    "GlobalAveragePool": _simple(lambda x: x.mean(dim=list(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _simple(lambda x: x.amax(dim=list(range(2, x.dim())), keepdim=True)),
    "Identity": _simple(lambda x: x), "Dropout": _simple(lambda x, *_: x),
    "Equal": _simple(torch.eq), "Less": _simple(torch.lt), "Greater": _simple(torch.gt),
    "LessOrEqual": _simple(torch.le), "GreaterOrEqual": _simple(torch.ge), "And": _simple(torch.logical_and),
    "Or": _simple(torch.logical_or), "Not": _simple(torch.logical_not), "IsNaN": _simple(torch.isnan),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Abs": _simple(torch.abs),
    "Cos": _simple(torch.cos), "Sin": _simple(torch.sin), "Log": _simple(torch.log), "Erf": _simple(torch.erf),
    "Floor": _simple(torch.floor), "Ceil": _simple(torch.ceil),
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "HardSwish": _simple(torch.nn.functional.hardswish),
    "LeakyRelu": lambda a, x: torch.nn.functional.leaky_relu(x, a.get("alpha", 0.01)),
    "Softplus": _simple(torch.nn.functional.softplus), "Pow": _simple(torch.pow),
    "GatherElements": _gather_elements, "Einsum": _einsum, "Sum": _variadic(torch.add),
    "Sign": _simple(torch.sign), "Mod": lambda a, x, y: torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y),
}
# Ops translated to ATen (recognised by the analysis and re-emitted by the ATen emission rules).
ATEN_OPS: dict[str, Any] = {
    "Add": aten.add.Tensor, "Sub": aten.sub.Tensor, "Mul": aten.mul.Tensor, "Div": aten.div.Tensor,
    "Neg": aten.neg.default, "Sigmoid": aten.sigmoid.default, "Tanh": aten.tanh.default, "Relu": aten.relu.default,
    "Exp": aten.exp.default, "Sqrt": aten.sqrt.default,
}
SUPPORTED_OPS = sorted({*ONNX_OPS, *ATEN_OPS, "Constant", "Pow", "Reciprocal"})


class OnnxOp:
    """A call target running one ONNX node's torch implementation (attributes bound)."""

    def __init__(self, op_type: str, attrs: dict[str, Any], n_out: int):
        self.op_type, self.attrs, self.n_out = op_type, attrs, n_out
        self.__name__ = f"onnx_{op_type}"

    def __call__(self, *inputs: torch.Tensor | None) -> Any:
        args = list(inputs)
        while args and args[-1] is None:
            args.pop()
        if self.op_type == "Split":
            return ONNX_OPS["Split"](self.attrs, *args, n_out=self.n_out)
        return ONNX_OPS[self.op_type](self.attrs, *args)

    def __repr__(self) -> str:
        return f"onnx.{self.op_type}"


def load_onnx(path: str | Path) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"ONNX model '{p}' does not exist")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"ONNX model '{p}' is empty (0 bytes); export or copy it again")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as e:  # noqa: BLE001 (onnx raises several unrelated types)
        raise ModelLoadError(f"'{p}' is not a readable ONNX model (external data must sit beside it): "
                             f"{' '.join(str(e).split())[:300]}") from None
    if not model.graph.node or not model.graph.output:
        raise ModelLoadError(f"'{p}' holds no ONNX graph (no nodes or no outputs); is it an ONNX model file?")
    return model


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(op_type, domain, node name) of every node the frontend cannot translate."""
    bad = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS:
            bad.append((n.op_type, n.domain or "ai.onnx", n.name))
    return bad


def check_supported(model: onnx.ModelProto, path: str | Path) -> None:
    bad = unsupported_ops(model)
    if bad:
        kinds = sorted({f"{d}::{o}" for o, d, _ in bad})
        examples = "; ".join(f"{o} ({d}) at node '{n}'" for o, d, n in bad[:8])
        raise UnsupportedOpError(
            f"'{path}': {len(bad)} node(s) use operators the ONNX frontend does not translate: {', '.join(kinds)} "
            f"(e.g. {examples}). Supported: {', '.join(SUPPORTED_OPS)}. Export the model without these "
            "operators (e.g. torch.onnx.export at a plain opset, without contrib fusions) or open an issue."
        )
    sub = next((a for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH), None)
    if sub is not None:
        raise UnsupportedOpError(f"'{path}': control flow with subgraphs (attribute '{sub.name}') is not supported")


def _sanitize(name: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "t"
    return "t" + s if s[0].isdigit() else s


def _layer_name(node: onnx.NodeProto) -> str:
    """A linear's layer name: the torch module scope (dynamo exports), its weight's parameter name
    (`fc1.weight`, TorchScript exports), else the node name."""
    if len(node.input) > 1 and node.input[1].endswith(".weight"):
        return node.input[1].removesuffix(".weight")
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            scopes = [s for s in scopes if s]
            if len(scopes) >= 2:
                return scopes[-2]
    name = node.name or node.output[0]
    if name.startswith("/") and name.count("/") > 1:  # TorchScript scope names: /model/layers.0/mlp/up_proj/MatMul
        parts = name.strip("/").split("/")
        if parts[-1].split("_")[0] == node.op_type:
            parts = parts[:-1]
        return ".".join(parts)
    return name


@dataclass
class ImportedModel:
    gm: fx.GraphModule
    inputs: list[onnx.ValueInfoProto]  # the graph inputs (names, types, symbolic shapes), in placeholder order
    outputs: list[onnx.ValueInfoProto]
    opset: int


def import_onnx(model: onnx.ModelProto, path: str | Path = "<model>") -> ImportedModel:
    """The FX graph of `model` (module docstring). A graph that is not valid ONNX (a damaged or hand-edited file:
    a node reading a value nothing produces, an initializer of the wrong size, ...) is refused naming the file."""
    check_supported(model, path)
    try:
        return _import(model, path)
    except QCompilerError:
        raise
    except Exception as e:  # noqa: BLE001 (the translation of an invalid graph fails in many ways)
        raise ModelLoadError(f"'{path}' is not a valid ONNX graph ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}); check it with onnx.checker.check_model") from None


def _import(model: onnx.ModelProto, path: str | Path) -> ImportedModel:
    root = torch.nn.Module()
    graph = fx.Graph()
    init = {t.name: t for t in model.graph.initializer}
    values: dict[str, fx.Node] = {}
    consts: dict[str, torch.Tensor] = {}
    used_attrs: set[str] = set()

    def attr_node(hint: str, tensor: torch.Tensor) -> fx.Node:
        target = hint
        i = 1
        while target in used_attrs:
            target, i = f"{hint}_{i}", i + 1
        used_attrs.add(target)
        set_tensor(root, target, tensor)  # type: ignore[arg-type]
        return graph.get_attr(target)

    def const_value(name: str) -> torch.Tensor | None:
        if name in consts:
            return consts[name]
        if name in init:
            consts[name] = torch.from_numpy(numpy_helper.to_array(init[name]).copy())
            return consts[name]
        return None

    def value(name: str) -> fx.Node | None:
        if name == "":
            return None
        if name not in values:
            t = const_value(name)
            if t is None:
                raise ModelLoadError(f"'{path}': value '{name}' is used before it is produced (graph not topologically sorted)")
            values[name] = attr_node(f"const.{_sanitize(name)}", t)
        return values[name]

    graph_inputs = [i for i in model.graph.input if i.name not in init]
    for vi in graph_inputs:
        values[vi.name] = graph.placeholder(_sanitize(vi.name))

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            t = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy()) if "value" in attrs else None
            if t is None:
                raise UnsupportedOpError(f"'{path}': Constant node '{node.name}' without a 'value' tensor")
            consts[node.output[0]] = t
            continue
        new = _translate_weight_layer(node, attrs, const_value, value, attr_node, graph)
        if new is None:
            new = _translate_other(node, attrs, value, const_value, graph)
        outs = list(new) if isinstance(new, list) else [new]
        for name, fxn in zip(node.output, outs, strict=True):
            if name:
                values[name] = fxn
                fxn.meta.setdefault("onnx_value", name)

    outputs = [values[o.name] if o.name in values else value(o.name) for o in model.graph.output]
    graph.output(tuple(outputs) if len(outputs) > 1 else outputs[0])
    gm = fx.GraphModule(root, graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    return ImportedModel(gm, graph_inputs, list(model.graph.output), opset)


def _conv_parts(node: onnx.NodeProto, attrs: dict, const_value: Callable
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[Any]] | None:
    """Conv with initializer weights and symmetric explicit pads: (kernel, bias, the remaining
    aten.convolution arguments)."""
    w = const_value(node.input[1])
    bias = const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or not w.is_floating_point() or (len(node.input) > 2 and node.input[2] and bias is None):
        return None
    nd = w.dim() - 2
    pads = list(attrs.get("pads", [0] * 2 * nd))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:nd] != pads[nd:]:
        return None
    return w, bias, [list(attrs.get("strides", [1] * nd)), pads[:nd], list(attrs.get("dilations", [1] * nd)),
                     False, [0] * nd, int(attrs.get("group", 1))]


def _linear_parts(node: onnx.NodeProto, attrs: dict, const_value: Callable
                  ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """MatMul/Gemm with an initializer weight: (W as [N, K], bias)."""
    w = const_value(node.input[1])
    if w is None or w.dim() != 2 or not w.is_floating_point() or const_value(node.input[0]) is not None:
        return None
    if node.op_type == "MatMul":
        return w.t(), None
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    bias = const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and (bias is None or bias.dim() != 1):
        return None
    return (w if attrs.get("transB", 0) else w.t()), bias


def _translate_weight_layer(node: onnx.NodeProto, attrs: dict, const_value: Callable, value: Callable,
                            attr_node: Callable, graph: fx.Graph) -> fx.Node | None:
    """MatMul/Gemm → aten.linear(x, W[, b]) and Conv → aten.convolution(x, W, b, …) with the weights stored
    as graph attributes named after the layer; None when the node is not such a weight layer."""
    tail: list[Any] | None = None
    if node.op_type == "Conv":
        conv = _conv_parts(node, attrs, const_value)
        if conv is None:
            return None
        weight, bias, tail = conv
    elif node.op_type in ("MatMul", "Gemm"):
        linear = _linear_parts(node, attrs, const_value)
        if linear is None:
            return None
        weight, bias = linear
    else:
        return None
    path = _layer_name(node)  # reports and --override globs use it as is (dots kept)
    # graph attribute names keep the path's hierarchy (fusion names the fused layer after its parent)
    attr = "w." + ".".join(re.sub(r"[^0-9A-Za-z_]", "_", seg) or "_" for seg in path.split("."))
    args: list[Any] = [value(node.input[0]), attr_node(f"{attr}.weight", weight.contiguous().float())]
    b_node = attr_node(f"{attr}.bias", bias.float()) if bias is not None else None
    if tail is not None:  # convolution: bias slot always present
        args += [b_node, *tail]
    elif b_node is not None:
        args.append(b_node)
    n = graph.call_function(CONV if tail is not None else LINEAR, tuple(args))
    n.meta["nn_module_stack"] = {path: (path, "onnx." + node.op_type)}
    n.meta[qmeta.PATH] = path
    return n


def _translate_other(node: onnx.NodeProto, attrs: dict, value: Callable, const_value: Callable,
                     graph: fx.Graph) -> fx.Node | list[fx.Node]:
    ins = [value(i) for i in node.input]
    op = node.op_type
    if op in ATEN_OPS and len(ins) == (2 if op in ("Add", "Sub", "Mul", "Div") else 1):
        return graph.call_function(ATEN_OPS[op], tuple(ins))
    if op == "Pow":
        e = const_value(node.input[1])
        if e is not None and e.numel() == 1:
            return graph.call_function(aten.pow.Tensor_Scalar, (ins[0], float(e.item())))
        return _onnx_node(node, attrs, ins, graph, torch_fn=OnnxOp("Pow", attrs, 1))
    if op == "Reciprocal":
        return graph.call_function(aten.reciprocal.default, (ins[0],))
    if op == "ReduceMean":
        axes = const_value(node.input[1]) if len(node.input) > 1 else None
        ax = _i(axes) if axes is not None else list(attrs.get("axes", []))
        if ax:
            return graph.call_function(aten.mean.dim, (ins[0], ax, bool(attrs.get("keepdims", 1))))
    n_out = len(node.output)
    return _onnx_node(node, attrs, ins, graph, torch_fn=OnnxOp(op, attrs, n_out))


def _onnx_node(node: onnx.NodeProto, attrs: dict, ins: list, graph: fx.Graph, torch_fn: OnnxOp) -> fx.Node | list[fx.Node]:
    n = graph.call_function(torch_fn, tuple(ins))
    n.meta[ONNX_META] = {"op_type": node.op_type, "domain": node.domain, "attributes": list(node.attribute),
                         "outputs": len(node.output), "name": node.name}
    if len(node.output) == 1:
        return n
    return [graph.call_function(operator.getitem, (n, i)) for i in range(len(node.output))]

