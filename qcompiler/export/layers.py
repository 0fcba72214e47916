"""The serving formats' common view of a quantized layer: one original linear (fused groups split back), its
integer codes in the signed domain and its scales, independent of how our artefact stores them.

Signed domain (what compressed-tensors, msModelSlim and the kernels' docs use): codes q ∈ [−2^(b−1), 2^(b−1)−1],
ŵ = (q − z) · s with z the signed zero point (0 when symmetric). Our storage keeps asymmetric codes
unsigned (u = q + 2^(b−1), z_u = z + 2^(b−1)) and symmetric int4 as u = q + 8; `from_record` undoes that.

Activations: `act` is None (weight-only), "static" (per-tensor input scale and signed int8 zero point, the
kernel computes q_x = clamp(round(x / s_x) + z_x, −128, 127)) or "dynamic" (symmetric per token).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qcompiler.errors import ExportError
from qcompiler.ir.records import LayerRecord, Member
from qcompiler.kernels.packing import unpack_int4


@dataclass(frozen=True)
class WrittenLayer:
    """A layer already written by a format: its scheme and tensor names (for config / description files)."""

    name: str
    bits: int | None
    symmetric: bool
    group_size: int | None
    act: str | None
    static_zero: bool  # static activations with a non-zero (asymmetric) zero point
    tensors: tuple[str, ...]
    type: str = "int"  # "float": fp8 e4m3 weights and activations
    per_tensor: bool = False  # one weight scale for the whole matrix
    act_bits: int = 8
    sparse: bool = False  # 2:4 sparse weights
    transform: bool = False  # a learned online transform before the layer (FlatQuant's L ⊗ R and clip ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WrittenLayer:
        """The inverse of dataclasses.asdict (an exporter's saved state); TypeError on unknown or missing fields."""
        if not isinstance(d, dict) or not isinstance(d.get("tensors"), list):
            raise TypeError(f"not a written layer: {str(d)[:80]}")
        return cls(**{**d, "tensors": tuple(str(t) for t in d["tensors"])})

    @property
    def scheme_key(self) -> tuple[Any, ...]:
        """Layers with equal keys share one scheme (one config group, one description type)."""
        return (self.bits, self.symmetric, self.group_size, self.act, self.static_zero, self.type, self.per_tensor,
                self.act_bits, self.sparse, self.transform)


@dataclass
class ExportLayer:
    name: str  # checkpoint module path, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    bits: int | None  # None: a float layer (weight holds the float matrix)
    symmetric: bool = True
    group_size: int | None = None  # None: one scale per output channel
    codes: torch.Tensor | None = None  # int32 [N, K], signed domain
    scale: torch.Tensor | None = None  # fp32 [N, G]
    zero: torch.Tensor | None = None  # fp32 [N, G] signed zero point, None when symmetric
    act: str | None = None  # None | "static" | "dynamic"
    input_scale: torch.Tensor | None = None  # fp32 scalar
    input_zero: torch.Tensor | None = None  # fp32 scalar (signed int8 domain), None when 0
    bias: torch.Tensor | None = None
    weight: torch.Tensor | None = None  # float layers only
    type: str = "int"  # "float": fp8 e4m3 codes (codes is a float8_e4m3fn tensor)
    per_tensor: bool = False  # one weight scale for the matrix (repeated per row in `scale`)
    act_bits: int = 8  # dynamic activations: 8 or 4 (w4a4)
    sparse: bool = False  # 2:4 sparse weights (every 4 consecutive inputs hold at most 2 non-zeros)
    # FlatQuant (passes/rotation/flatquant.py): the layer reads x·(L ⊗ R), per-token activations scaled by
    # clip_ratio·max|x'|/qmax; L [a, a], R [b, b] float32, clip_ratio a float (None: no transform)
    left_trans: torch.Tensor | None = None
    right_trans: torch.Tensor | None = None
    clip_ratio: float | None = None

    def written(self, tensors: list[str]) -> WrittenLayer:
        """What stays in memory once the layer's tensors are on disk."""
        return WrittenLayer(self.name, self.bits, self.symmetric, self.group_size, self.act,
                            self.act == "static" and self.input_zero is not None, tuple(tensors), self.type,
                            self.per_tensor, self.act_bits, self.sparse, self.left_trans is not None)

    def dequantized(self) -> torch.Tensor:
        """ŵ in float32 [N, K] (for checks and float fallbacks)."""
        if self.bits is None:
            assert self.weight is not None
            return self.weight.float()
        assert self.codes is not None and self.scale is not None
        g = self.group_size or self.in_features
        s = self.scale.float().repeat_interleave(g, dim=1)[:, : self.in_features]
        z = self.zero.repeat_interleave(g, dim=1)[:, : self.in_features] if self.zero is not None else 0.0
        return (self.codes.float() - z) * s


def _signed_codes(stored: torch.Tensor, bits: int, symmetric: bool, k: int) -> torch.Tensor:
    if bits == 4:
        return unpack_int4(stored, k).to(torch.int32) - 8
    return stored.to(torch.int32) - (0 if symmetric else 128)


def _split(t: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if t is None else list(t.split(sizes, dim=0))


def from_record(record: LayerRecord, tensors: dict[str, torch.Tensor], split: bool = True) -> Iterator[ExportLayer]:
    """The original layers of one lowered layer `record` (tensor names as the record has them: checkpoint names
    in qcompiler.json, graph attributes in a graph). split=False keeps a fused layer whole."""
    names = record.tensors
    op = record.op
    parts = record.members if split else (Member(record.path, record.out_features, record.role),)
    sizes = [p.out_features for p in parts]
    k = record.in_features
    bias = tensors[record.bias].float() if record.bias else None
    sparse = record.sparsity == "2:4"
    if op == "linear":
        for p, w, b in zip(parts, _split(tensors[names["weight"]], sizes), _split(bias, sizes), strict=True):
            yield ExportLayer(p.path, k, p.out_features, None, weight=w, bias=b, sparse=sparse)
        return
    if op not in ("linear_woq", "linear_w8a8", "linear_fp8", "linear_int_dynamic") or record.weights is None:
        raise ExportError(f"layer '{record.path}': op '{op}' has no serving-format equivalent "
                          "(only linear layers are exported)")
    w = record.weights
    acts = record.activations or {}
    bits, symmetric = w["bits"], w["symmetric"]
    act = None
    act_bits = 8
    input_scale = input_zero = None
    number_type = "float" if op == "linear_fp8" else "int"
    if op == "linear_int_dynamic":  # symmetric integer codes, scales per channel [N, 1] or per group [N, G]
        codes = tensors[names["qweight"]].to(torch.int32)
        scale = tensors[names["weight_scale"]].float()
        zero = None
        group = record.group_size if w["granularity"] == "group" else None
        act, act_bits = "dynamic", acts["bits"]
    elif op == "linear_woq":
        codes = _signed_codes(tensors[names["qweight"]], bits, symmetric, k)
        scale = tensors[names["scale"]].float()
        zero = tensors[names["zero"]].float() - 2 ** (bits - 1) if names.get("zero") else None
        group = record.group_size if w["granularity"] == "group" else None
    else:  # linear_w8a8 / linear_fp8: symmetric codes, one scale per output channel (or per tensor)
        stored = tensors[names["qweight"]]
        codes = stored if op == "linear_fp8" else stored.to(torch.int32)
        w_scale = tensors[names["weight_scale"]].float().reshape(-1, 1)
        scale = w_scale if w_scale.numel() > 1 else w_scale.expand(record.out_features, 1)
        zero, group = None, None
        act = "dynamic" if acts["dynamic"] else "static"
        if act == "static":
            input_scale = tensors[names["input_scale"]].float().reshape(())
            input_zero = tensors[names["input_zero"]].float().reshape(()) if names.get("input_zero") else None
    left = tensors[names["left_trans"]].float() if names.get("left_trans") else None
    right = tensors[names["right_trans"]].float() if names.get("right_trans") else None
    if (left is None) != (right is None) or (left is not None and op != "linear_int_dynamic"):
        raise ExportError(f"layer '{record.path}': a learned input transform needs both left_trans and right_trans "
                          "and dynamic per-token activations")
    clip = float(acts.get("clip_ratio", 1.0)) if left is not None else None
    for p, q, s, z, b in zip(parts, _split(codes, sizes), _split(scale, sizes), _split(zero, sizes),
                             _split(bias, sizes), strict=True):
        # (shared activation qparams are cloned: every member owns its tensors in the written files)
        yield ExportLayer(p.path, k, p.out_features, bits, symmetric, group, q.contiguous(), s.contiguous(),
                          None if z is None else z.contiguous(), act,
                          None if input_scale is None else input_scale.clone(),
                          None if input_zero is None else input_zero.clone(), b, type=number_type,
                          per_tensor=w["granularity"] == "tensor", act_bits=act_bits, sparse=sparse,
                          left_trans=None if left is None else left.clone(),
                          right_trans=None if right is None else right.clone(), clip_ratio=clip)
