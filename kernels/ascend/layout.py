"""From an msModelSlim layer (its type and tensors) to the torch_npu calls that run it, as the Ascend loaders do
after loading (vllm-ascend `process_weights_after_loading`): weights transposed to [K, N], int4 packed with
npu_convert_weight_to_int4pack, offsets negated (the kernel adds its offset), scales laid out [G, N].

`prepare` makes the kernel arguments once; `forward` is the call sequence of one linear:
  W8A8          npu_quantize(x, s_x, z_x) → npu_quant_matmul(·, W, deq_scale, bias=quant_bias)
  W8A8_DYNAMIC  npu_dynamic_quant(x) → npu_quant_matmul(·, W, s_w, pertoken_scale=s_tok) + bias
  W4A8_DYNAMIC  the same with W as int4pack [K, N/8] (scale_bias serves the grouped-matmul MoE kernels only)
  W8A16, W4A16  npu_weight_quant_batchmatmul(x, W, s, −z, bias, antiquant_group_size)
  W4A4_DYNAMIC  npu_dynamic_quant(x, dst_type=quint4x2) → npu_quant_matmul(·, int4pack(W [N, K])ᵀ, s_w,
                pertoken_scale=s_tok) + bias (vllm-ascend's W4A4 linear: both operands packed along K)
  W4A4_FLATQUANT_DYNAMIC  npu_kronecker_quant(x [M, a, b], left_transᵀ, right_trans, clip_ratio) → the same
                matmul (vllm-ascend's FlatQuant linear: per token X' = Lᵀ·X·R, s_tok = clip·absmax(X')/7)
Both run through the `qc_npu::` ops: torch_npu's kernels on an NPU, the emulation elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

import qcompiler.kernels.ascend.dispatch  # noqa: F401  (registers torch.ops.qc_npu.*)
from qcompiler.kernels.ascend.npu_ops import npu_convert_weight_to_int4pack
from qcompiler.kernels.packing import unpack_int4_pairs

npu = torch.ops.qc_npu


def prepare(kind: str, t: dict[str, Tensor], group_size: int) -> dict[str, Tensor | int | float | None]:
    """Kernel arguments for one layer of type `kind` from its msModelSlim tensors `t` (suffix -> tensor)."""
    bias = t.get("bias")
    if kind in ("W8A8", "W8A8S"):  # (W8A8S: the same tensors, of a 2:4-sparse weight)
        return {"weight": t["weight"].t().contiguous(), "deq_scale": t["deq_scale"], "quant_bias": t["quant_bias"],
                "input_scale": t["input_scale"].float(), "input_offset": t["input_offset"].float()}
    if kind == "W8A8_DYNAMIC":
        return {"weight": t["weight"].t().contiguous(), "weight_scale": t["weight_scale"].float().flatten(),
                "bias": bias}
    if kind == "W4A8_DYNAMIC" and "weight_scale_second" in t:
        raise ValueError("W4A8_DYNAMIC with two-level group scales (weight_scale_second) has no NPU emulation here; "
                         "run our artefact with qcompiler.runtime.load_quantized")
    if kind == "W4A8_DYNAMIC":  # int4 codes packed in pairs along N -> [K, N] -> int4pack [K, N/8]
        codes = unpack_int4_pairs(t["weight"], dim=0).to(torch.int32)
        return {"weight": npu_convert_weight_to_int4pack(codes.t().contiguous()),
                "weight_scale": t["weight_scale"].float().flatten(), "bias": bias}
    if kind in ("W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC"):  # int4 codes held in int8 [N, K]
        packed = npu_convert_weight_to_int4pack(t["weight"].to(torch.int32).contiguous())  # [N, K/8]
        p: dict[str, Tensor | int | float | None] = {"weight": packed.t(), "weight_scale": t["weight_scale"].float().flatten(),
                                                     "bias": bias}
        if kind == "W4A4_FLATQUANT_DYNAMIC":
            p.update(left=t["left_trans"].t().contiguous(), right=t["right_trans"].contiguous(),
                     clip_ratio=float(t["clip_ratio"].float().reshape(-1)[0]))
        return p
    if kind in ("W8A16", "W4A16"):
        # the description's one global group size says it: a layer whose K equals the group holds one group
        # ([N, 1] scales, like a per-channel layer) and is still packed as a grouped layer
        grouped = group_size > 0
        if kind == "W4A16":
            # msModelSlim packs int4 pairs along N for group scales, along K for channel scales
            codes = unpack_int4_pairs(t["weight"], dim=0 if grouped else 1).to(torch.int32)
            weight = npu_convert_weight_to_int4pack(codes.t().contiguous())
        else:
            weight = t["weight"].t().contiguous()
        return {"weight": weight, "antiquant_scale": t["weight_scale"].float().t().contiguous(),
                "antiquant_offset": (-t["weight_offset"].float()).t().contiguous(), "bias": bias,
                "group_size": group_size if grouped else 0}
    raise ValueError(f"layer type '{kind}' has no NPU lowering here "
                     "(supported: W8A8, W8A8S, W8A8_DYNAMIC, W4A8_DYNAMIC per channel, W4A4_DYNAMIC, W4A4_FLATQUANT_DYNAMIC, "
                     "W8A16, W4A16; W16A16S loads as float)")


def forward(kind: str, x: Tensor, p: dict[str, Tensor | int | float | None]) -> Tensor:
    """One linear on x [..., K] (the kernels take any leading dims)."""
    if kind in ("W8A8", "W8A8S"):
        q = npu.npu_quantize(x, p["input_scale"], p["input_offset"], True)
        return npu.npu_quant_matmul(q, p["weight"], p["deq_scale"], None, p["quant_bias"], x.dtype)
    if kind in ("W8A8_DYNAMIC", "W4A8_DYNAMIC"):
        q, s = npu.npu_dynamic_quant(x)
        return npu.npu_quant_matmul(q, p["weight"], p["weight_scale"], s, p["bias"], x.dtype)
    if kind in ("W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC"):
        x2 = x.reshape(-1, x.shape[-1])
        if kind == "W4A4_FLATQUANT_DYNAMIC":
            left, right = p["left"], p["right"]
            assert isinstance(left, Tensor) and isinstance(right, Tensor)
            q, s = npu.npu_kronecker_quant(x2.reshape(-1, left.shape[0], right.shape[0]), left.to(x.dtype),
                                           right.to(x.dtype), p["clip_ratio"])
        else:
            q, s = npu.npu_dynamic_quant_int4(x2)
        y = npu.npu_quant_matmul(q, p["weight"], p["weight_scale"], s, None, x.dtype)
        if p["bias"] is not None:  # (added after the matmul, as vllm-ascend does)
            y = y + p["bias"].to(x.dtype)  # type: ignore[union-attr]
        return y.reshape(*x.shape[:-1], -1)
    return npu.npu_weight_quant_batchmatmul(x, p["weight"], p["antiquant_scale"], p["antiquant_offset"], p["bias"],
                                            p["group_size"])
