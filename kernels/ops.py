"""The quantized ops, declared once (torch.library, namespace `qc`).

Each op's default implementation is the pure-torch oracle in reference.py; devices register faster
kernels for the same schema (cpu/ here; cuda/ and ascend/ by later targets). A fake (meta) implementation
lets torch.export / FakeTensor tracing see the ops without running them.

Ops:
  qc::linear_woq        weight-only int8/int4 linear (int4 packed two per byte), group scales (negative where
                        the signed int4 grid put a positive peak on −8), zero points
  qc::linear_w8a8       int8 × int8 → int32 linear, per-token (dynamic) or per-tensor (static) activation
                        scale × per-channel weight scale epilogue
  qc::linear_int_dynamic  integer GEMM with dynamic per-token activations of 8 or 4 bits and integer weight codes
                        with per-channel or per-group scales: w4a8 with group scales, w4a4 (a clip ratio
                        below 1 shrinks the per-token activation scale: FlatQuant)
  qc::linear_fp8        fp8 e4m3 × e4m3 linear, per-tensor or per-channel weight scale, static per-tensor or
                        dynamic per-token activation scale
  qc::linear_int4pack_cpu / qc::linear_int8pack_cpu
                        CPU-prepacked weight-only variants (bf16 activations), produced by the CPU
                        target's prepack lowering from qc::linear_woq; never stored on disk
  qc::linear_woq_tinygemm  int4 weight-only with CUDA tinygemm's tiled copy beside the portable storage (made by
                        the cuda runtime lowering at load time; kernels/cuda/tinygemm.py); never stored on disk
  qc::fake_quant_act    per-tensor static activation fake-quantization (simulation in the fake-quant graph)
  qc::fake_quant_act_per_token   dynamic symmetric per-token fake-quantization (optionally clipped: scale
                        clip_ratio·max|x_t|/qmax)
  qc::fake_quant_act_fp8 / qc::fake_quant_act_fp8_per_token
                        fp8 e4m3 activation fake-quantization (static per-tensor scale / dynamic absmax/448
                        per token), the same rounding as reference.quantize_act_fp8
  qc::fake_quant_kv     KV cache written and read back with calibrated scales (per tensor / head / channel,
                        broadcast over [B, H, S, D]); kept in lowered graphs: it *is* the cache's semantics
  qc::fake_quant_kv_dynamic   the same with one scale (and zero point) per token and head, computed at run time
  qc::gated_delta_rule  Gated DeltaNet's linear-attention recurrence (Qwen3-Next's linear layers) from a zero state:
                        one node for a loop whose chunking depends on the sequence length, which export cannot
                        keep symbolic; the projections around it are ordinary linears
  qc::lightning_attention  MiniMax's causal linear attention with per-head decay (its lightning-attention layers),
                        from a zero state: one node for a loop over blocks of the sequence, as gated_delta_rule
  qc::hadamard_transform  y = x·H_K/√K over the last axis (QuaRot's online Hadamard before down_proj; nothing
                        stored: fast Walsh–Hadamard kernels compute the same on accelerators)
  qc::kronecker_transform  y = x·(L ⊗ R) over the last axis, as vec(Lᵀ·X·R) of each row's [a, b] view (FlatQuant's
                        learned online transform; L, R stored beside the layer)
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompiler import numerics
from qcompiler.kernels import reference


@torch.library.custom_op("qc::linear_woq", mutates_args=())
def linear_woq(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    return reference.linear_woq(x, qweight, scale, zero, bias, bits, group_size, in_features)


@linear_woq.register_fake
def _linear_woq_fake(x, qweight, scale, zero, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("qc::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    x_scale: Tensor | None,
    x_zero: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    return reference.linear_w8a8(x, qweight, w_scale, x_scale, x_zero, bias)


@linear_w8a8.register_fake
def _linear_w8a8_fake(x, qweight, w_scale, x_scale, x_zero, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("qc::linear_int_dynamic", mutates_args=())
def linear_int_dynamic(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int,
                       group_size: int, clip_ratio: float = 1.0) -> Tensor:
    return reference.linear_int_dynamic(x, qweight, w_scale, bias, act_bits, group_size, clip_ratio)


@linear_int_dynamic.register_fake
def _linear_int_dynamic_fake(x, qweight, w_scale, bias, act_bits, group_size, clip_ratio=1.0):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("qc::linear_fp8", mutates_args=())
def linear_fp8(x: Tensor, qweight: Tensor, w_scale: Tensor, x_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return reference.linear_fp8(x, qweight, w_scale, x_scale, bias)


@linear_fp8.register_fake
def _linear_fp8_fake(x, qweight, w_scale, x_scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("qc::fake_quant_act", mutates_args=())
def fake_quant_act(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    # (the grid in float32 whatever x's dtype: a bfloat16 x / scale would round before the rounding to codes)
    q = torch.clamp(torch.round(x.float() / scale.float()) + zero.float(), qmin, qmax)
    return ((q - zero.float()) * scale.float()).to(x.dtype)


@fake_quant_act.register_fake
def _fake_quant_act_fake(x, scale, zero, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qc::fake_quant_act_per_token", mutates_args=())
def fake_quant_act_per_token(x: Tensor, bits: int, clip_ratio: float = 1.0) -> Tensor:
    return numerics.fake_quant_act_per_token(x, bits, clip_ratio)


@fake_quant_act_per_token.register_fake
def _fake_quant_act_per_token_fake(x, bits, clip_ratio=1.0):
    return torch.empty_like(x)


@torch.library.custom_op("qc::fake_quant_act_fp8", mutates_args=())
def fake_quant_act_fp8(x: Tensor, scale: Tensor) -> Tensor:
    x8, s = reference.quantize_act_fp8(x, scale)
    return (x8.float() * s).to(x.dtype)


@fake_quant_act_fp8.register_fake
def _fake_quant_act_fp8_fake(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("qc::fake_quant_act_fp8_per_token", mutates_args=())
def fake_quant_act_fp8_per_token(x: Tensor) -> Tensor:
    x8, s = reference.quantize_act_fp8(x, None)
    return (x8.float() * s).to(x.dtype)


@fake_quant_act_fp8_per_token.register_fake
def _fake_quant_act_fp8_per_token_fake(x):
    return torch.empty_like(x)


@torch.library.custom_op("qc::hadamard_transform", mutates_args=())
def hadamard_transform(x: Tensor) -> Tensor:
    return reference.hadamard_transform(x)


@hadamard_transform.register_fake
def _hadamard_transform_fake(x):
    return torch.empty_like(x)


def _hadamard_transform_backward(ctx, grad):  # y = x·H  ⇒  ∂L/∂x = ∂L/∂y·Hᵀ (flatquant trains through it)
    return reference.hadamard_transform_transposed(grad)


hadamard_transform.register_autograd(_hadamard_transform_backward)


@torch.library.custom_op("qc::kronecker_transform", mutates_args=())
def kronecker_transform(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    return reference.kronecker_transform(x, left, right)


@kronecker_transform.register_fake
def _kronecker_transform_fake(x, left, right):
    return torch.empty_like(x)


@torch.library.custom_op("qc::fake_quant_kv", mutates_args=())
def fake_quant_kv(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    return reference.fake_quant_kv(x, scale, zero, qmin, qmax)


@fake_quant_kv.register_fake
def _fake_quant_kv_fake(x, scale, zero, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qc::fake_quant_kv_dynamic", mutates_args=())
def fake_quant_kv_dynamic(x: Tensor, bits: int, symmetric: bool) -> Tensor:
    return reference.fake_quant_kv_dynamic(x, bits, symmetric)


@fake_quant_kv_dynamic.register_fake
def _fake_quant_kv_dynamic_fake(x, bits, symmetric):
    return torch.empty_like(x)


# The CPU kernels register themselves on import (they override the oracle for CPU tensors); the CUDA and
# Ascend registrations import Triton / torch_npu only when a GPU / NPU tensor first reaches an op.
from qcompiler.kernels.ascend import dispatch as _ascend_dispatch  # noqa: E402,F401
from qcompiler.kernels.cpu import linear as _cpu_linear  # noqa: E402,F401
from qcompiler.kernels.cuda import dispatch as _cuda_dispatch  # noqa: E402,F401
from qcompiler.kernels.cuda import tinygemm as _cuda_tinygemm  # noqa: E402,F401


@torch.library.custom_op("qc::gated_delta_rule", mutates_args=())
def gated_delta_rule(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, l2norm_qk: bool) -> Tensor:
    # transformers' chunk-parallel torch implementation (the one its models run without the fla kernels): the
    # same values as reference.gated_delta_rule's token loop, a chunk of 64 tokens per step
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    out, _ = torch_chunk_gated_delta_rule(query, key, value, g=g, beta=beta, use_qk_l2norm_in_kernel=l2norm_qk)
    return out.contiguous()


@gated_delta_rule.register_fake
def _gated_delta_rule_fake(query, key, value, g, beta, l2norm_qk):
    return query.new_empty(value.shape)


LIGHTNING_BLOCK = 64


@torch.library.custom_op("qc::lightning_attention", mutates_args=())
def lightning_attention(query: Tensor, key: Tensor, value: Tensor, slope: Tensor) -> Tensor:
    # block-parallel (MiniMax's own form): within a block of n tokens (QKᵀ ⊙ D)V with D_ij = e^(−λ(i−j)), i ≥ j;
    # across blocks q_i e^(−λ(i+1)) S with the state S = Σ_s e^(−λ(end−s)) k_sᵀ v_s carried block to block.
    # The same values as reference.lightning_attention's token loop, grouped by block.
    b, h, t, dk = key.shape
    lam = slope.float().reshape(1, h, 1, 1)
    q, k, v = query.float(), key.float(), value.float()
    state = q.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for start in range(0, t, LIGHTNING_BLOCK):
        qb, kb, vb = (x[:, :, start:start + LIGHTNING_BLOCK] for x in (q, k, v))
        n = qb.shape[2]
        pos = torch.arange(n, device=q.device, dtype=torch.float32)
        gap = pos[:, None] - pos[None, :]
        within = torch.where(gap >= 0, torch.exp(-lam * gap.clamp(min=0)), torch.zeros((), device=q.device))
        intra = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * within, vb)
        inter = torch.matmul(qb * torch.exp(-lam * (pos + 1)[:, None]), state)
        outs.append(intra + inter)
        state = state * torch.exp(-lam * n) + torch.matmul(
            (kb * torch.exp(-lam * (n - 1 - pos)[:, None])).transpose(-1, -2), vb)
    return torch.cat(outs, dim=2).to(query.dtype)


@lightning_attention.register_fake
def _lightning_attention_fake(query, key, value, slope):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))
