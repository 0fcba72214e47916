"""Typed records of what lowering made: one `LayerRecord` per lowered linear (or convolution), one `KVRecord` per
quantized KV cache. They are the single description of a quantized layer that every consumer reads:

    lowering (passes/lowering/linear_rules.py)  creates them in node.meta, with graph attribute names
    the driver                                  renames them to checkpoint names once per block (`block_records`)
    exporters (export/*, targets/onnxruntime)   receive the block's records with the block
    qcompiler.json                              holds them as JSON (`to_dict` / `from_dict`, checked on reading)
    the runtime (runtime.py)                    rebuilds the block's kernel ops from them

Records are frozen: a renamed record is a new record (`renamed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from qcompiler.errors import ArtifactError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import ADAPTER_PREFIX


def checkpoint_name(block_prefix: str, target: str) -> str:
    """The checkpoint name of a block graph's attribute `target` (e.g. block.self_attn.q_proj.qweight)."""
    return f"{block_prefix}.{target.removeprefix(ADAPTER_PREFIX)}"


@dataclass(frozen=True)
class Member:
    """One original linear of a fused layer (q of q|k|v): its path, rows of the fused output and role."""

    path: str
    out_features: int
    role: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "out_features": self.out_features, "role": self.role}


@dataclass(frozen=True)
class LayerRecord:
    """A lowered layer: kernel op, shape, weight and activation grids (QuantArgs as dicts), fusion and the names of
    its tensors (graph attributes in a block graph, checkpoint names in qcompiler.json)."""

    op: str  # linear_woq | linear_w8a8 | linear_int_dynamic | linear_fp8 | conv_int8 | linear (float, fused)
    path: str
    role: str | None
    in_features: int
    out_features: int
    weights: Mapping[str, Any] | None  # QuantArgs as a dict (None: float weights)
    group_size: int | None  # effective group length along K (K for per channel)
    weight_sqnr_db: float | None
    fused_from: tuple[Member, ...] | None
    bias: str | None  # the bias tensor's name
    sparsity: str | None  # "2:4"
    input_rotation: str | None  # "hadamard": qc::hadamard_transform(x) feeds the layer
    activations: Mapping[str, Any] | None  # None: weight-only
    tensors: Mapping[str, str]  # role of the tensor (qweight, scale, ...) -> its name
    output_sqnr_db: Mapping[str, float | None] | None = None  # per member, measured by the driver

    @property
    def members(self) -> tuple[Member, ...]:
        """The original linears this layer computes (itself when not fused)."""
        return self.fused_from or (Member(self.path, self.out_features, self.role),)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object qcompiler.json holds (key order is part of the byte-identical format)."""
        d: dict[str, Any] = {
            "op": self.op, "path": self.path, "role": self.role, "in_features": self.in_features,
            "out_features": self.out_features, "weights": None if self.weights is None else dict(self.weights),
            "group_size": self.group_size, "weight_sqnr_db": self.weight_sqnr_db,
            "fused_from": None if self.fused_from is None else [m.to_dict() for m in self.fused_from],
            "bias": self.bias, "sparsity": self.sparsity, "input_rotation": self.input_rotation,
            "activations": None if self.activations is None else dict(self.activations),
            "tensors": dict(self.tensors),
        }
        if self.output_sqnr_db is not None:
            d["output_sqnr_db"] = dict(self.output_sqnr_db)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "qcompiler.json") -> LayerRecord:
        """A record read from a file, checked: ArtifactError naming the layer when a field is missing or mistyped."""
        try:
            fused = d["fused_from"]
            record = cls(
                op=_typed(d["op"], str), path=_typed(d["path"], str), role=_typed(d["role"], str, None),
                in_features=_typed(d["in_features"], int), out_features=_typed(d["out_features"], int),
                weights=_typed(d["weights"], dict, None), group_size=_typed(d["group_size"], int, None),
                weight_sqnr_db=_typed(d["weight_sqnr_db"], float, int, None),
                fused_from=None if fused is None else tuple(
                    Member(_typed(m["path"], str), _typed(m["out_features"], int), _typed(m["role"], str, None))
                    for m in _typed(fused, list)),
                bias=_typed(d["bias"], str, None), sparsity=_typed(d["sparsity"], str, None),
                input_rotation=_typed(d["input_rotation"], str, None), activations=_typed(d["activations"], dict, None),
                tensors={_typed(k, str): _typed(v, str) for k, v in _typed(d["tensors"], dict).items()},
                output_sqnr_db=_typed(d.get("output_sqnr_db"), dict, None),
            )
        except (KeyError, TypeError) as e:
            name = d.get("path") if isinstance(d, dict) else None
            raise ArtifactError(f"{where}: layer record {name!r} is damaged ({e}); quantize again") from None
        return record

    def renamed(self, path: Callable[[str], str], tensor: Callable[[str], str]) -> LayerRecord:
        """The record with every layer path and every tensor name mapped (block-local <-> checkpoint names)."""
        return dataclasses.replace(
            self, path=path(self.path),
            fused_from=None if self.fused_from is None else tuple(
                dataclasses.replace(m, path=path(m.path)) for m in self.fused_from),
            bias=None if self.bias is None else tensor(self.bias),
            tensors={k: tensor(v) for k, v in self.tensors.items()},
        )


@dataclass(frozen=True)
class KVRecord:
    """A quantized KV cache of one attention: which cache (k / v, or MLA's kv_latent / k_rope), its shape, its
    grid (QuantArgs as a dict) and, when static, its scale / zero tensors and code range."""

    kind: str
    attention: int  # index of the attention in the block (graph order: ir/kv_cache.CachePoint)
    module: str  # its module path
    heads: int
    head_dim: int
    args: Mapping[str, Any]
    qmin: int | None = None  # static only
    qmax: int | None = None
    tensors: Mapping[str, str] | None = None  # {"scale", "zero"}: static only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "attention": self.attention, "module": self.module,
                             "heads": self.heads, "head_dim": self.head_dim, "args": dict(self.args)}
        if self.tensors is not None:
            d.update(qmin=self.qmin, qmax=self.qmax, tensors=dict(self.tensors))
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "qcompiler.json") -> KVRecord:
        try:
            tensors = _typed(d.get("tensors"), dict, None)
            return cls(kind=_typed(d["kind"], str), attention=_typed(d["attention"], int),
                       module=_typed(d["module"], str), heads=_typed(d["heads"], int),
                       head_dim=_typed(d["head_dim"], int), args=_typed(d["args"], dict),
                       qmin=_typed(d.get("qmin"), int, None), qmax=_typed(d.get("qmax"), int, None),
                       tensors=None if tensors is None else {str(k): _typed(v, str) for k, v in tensors.items()})
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{where}: a KV-cache record is damaged ({e}); quantize again") from None

    def per_channel(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A static record's (scale, zero) expanded to one value per channel [H·D] (per tensor / head / channel
        alike), in the head-major order of the cache's hidden dimension."""
        assert self.tensors is not None
        scale, zero = (tensors[self.tensors[k]].float() for k in ("scale", "zero"))
        return (scale.expand(1, self.heads, 1, self.head_dim).reshape(-1),
                zero.expand(1, self.heads, 1, self.head_dim).reshape(-1))

    def signed_zero(self, zero: torch.Tensor) -> torch.Tensor:
        """The zero point in the signed domain (the asymmetric grid [0, 2^b − 1] shifted by −2^(b−1))."""
        return zero if self.args["symmetric"] else zero - 2 ** (self.args["bits"] - 1)


HEAD_GRID = "qcompiler_grid"  # the head module's attribute holding its HeadGrid (passes/weight/quantize_head.py)


@dataclass(frozen=True)
class HeadGrid:
    """The output projection's quantization, kept on the module for formats that store it quantized (the ONNX
    decoder's MatMulNBits); the module's weight holds ŵ = codes · scale."""

    args: Any  # QuantArgs: symmetric groups
    codes: torch.Tensor  # int32 [V, H]
    scale: torch.Tensor  # fp32 [V, H / group]


def _typed(value: Any, *kinds: type | None) -> Any:
    """`value` if it is one of `kinds` (None for null); TypeError otherwise (bool is not an int here)."""
    for kind in kinds:
        if kind is None and value is None:
            return value
        if kind is not None and isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            return value
    raise TypeError(f"{value!r} is not {' or '.join('null' if k is None else k.__name__ for k in kinds)}")


def block_records(gm: fx.GraphModule, block: str | None, layer_sqnr: Mapping[str, float] | None = None
                  ) -> dict[str, LayerRecord]:
    """The records of a lowered block under checkpoint names (block None: a whole imported graph, names as they
    are), keyed by layer path, each with its members' output SQNR from `layer_sqnr` (by block-local path)."""
    sqnr = layer_sqnr or {}
    out = {}
    for n in gm.graph.nodes:
        rec: LayerRecord | None = n.meta.get(qmeta.RECORD)
        if rec is None:
            continue
        measured = {m.path: round(sqnr[m.path], 2) for m in rec.members if m.path in sqnr}
        if block is not None:
            rec = rec.renamed(lambda p: f"{block}.{p}", lambda t: checkpoint_name(block, t))
            measured = {f"{block}.{p}": v for p, v in measured.items()}
        out[rec.path] = dataclasses.replace(rec, output_sqnr_db=measured)
    return out


def kv_records(gm: fx.GraphModule, block: str | None) -> list[KVRecord]:
    """The KV-cache records of a lowered block (tensor names as checkpoint names; block None: as they are)."""
    out = []
    for n in gm.graph.nodes:
        info = n.meta.get(qmeta.KV_FQ)
        if info is None:
            continue
        tensors = None
        if "scale" in info:
            tensors = {k: info[k] if block is None else checkpoint_name(block, info[k]) for k in ("scale", "zero")}
        out.append(KVRecord(kind=info["kind"], attention=info["attention"], module=info["module"],
                            heads=info["heads"], head_dim=info["head_dim"], args=info["args"],
                            qmin=info.get("qmin"), qmax=info.get("qmax"), tensors=tensors))
    return out
