"""2:4 (N:M) weight sparsity as pure tensor functions.

A weight W [N, K] is 2:4 sparse when every run of 4 consecutive inputs of a row (k = 4i … 4i+3) holds at most
2 non-zeros; sparse tensor cores then skip half of the products. A ragged tail (K mod 4 inputs) keeps at
most 2 as well. Masks keep the 2 largest *scores* of each group of 4:

  magnitude   s_nk = |W_nk|
  Wanda       s_nk = |W_nk| · ‖X_k‖₂   (Sun et al., 2023: the weight times the norm of its input over the
              calibration tokens; ‖X_k‖₂² = H_kk, the Hessian diagonal)
  SparseGPT   (Frantar & Alistarh, 2023) the OBS saliency s_nk = W_nk² / [U]_kk² with U the upper Cholesky
              factor of H⁻¹ (the GPTQ sweep's), chosen group by group *during* the sweep on the already-updated
              weights; a pruned weight's error w_nk / U_kk is pushed onto the columns not yet processed exactly
              as GPTQ pushes a rounding error, so the kept weights compensate. With quantization args the kept
              weights are quantized in the same sweep (joint sparsify + quantize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.algorithms.gptq import _inverse_cholesky, _quant_column, proxy_loss
from qcompiler.numerics import group_size_of, num_groups, weight_qparams
from qcompiler.schemes import QuantArgs

N_OF_M = (2, 4)


def mask_2_4(scores: torch.Tensor) -> torch.Tensor:
    """bool mask [N, K]: the 2 highest scores of every 4 consecutive inputs (ties: the first)."""
    n, k = scores.shape
    full = k - k % 4
    mask = torch.zeros(n, k, dtype=torch.bool)
    if full:
        groups = scores[:, :full].reshape(n, full // 4, 4)
        top = groups.topk(2, dim=2, sorted=False).indices
        mask[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True).reshape(n, full)
    if k % 4:
        tail = scores[:, full:]
        keep = min(2, tail.shape[1])
        mask[:, full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(1, tail.topk(keep, dim=1).indices, True)
    return mask


def is_2_4(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every row has at most 2 non-zeros (tail included)."""
    n, k = w.shape
    pad = (-k) % 4
    nz = torch.nn.functional.pad((w != 0).to(torch.int8), (0, pad)).reshape(n, -1, 4).sum(dim=2)
    return bool((nz <= 2).all())


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.float().abs()


def wanda_scores(w: torch.Tensor, input_sqsum: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_k‖₂ with input_sqsum[k] = Σ_t x_tk² (any positive scaling of it selects the same mask)."""
    return w.float().abs() * input_sqsum.float().clamp_min(0).sqrt()[None, :]


@dataclass
class SparseGPTResult:
    w_hat: torch.Tensor  # [N, K] pruned (and, with args, fake-quantized) weight, float32
    mask: torch.Tensor  # bool [N, K]
    scale: torch.Tensor | None  # [N, G] with args
    zero: torch.Tensor | None
    group_size: int
    proxy_loss: float  # tr(ΔHΔᵀ)/tokens of the result
    magnitude_proxy_loss: float  # the same for magnitude pruning (+ the same grids, min-max RTN), for comparison


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, args: QuantArgs | None = None, *, tokens: int = 1,
              block_size: int = 128, damp: float = 0.01) -> SparseGPTResult:
    """2:4-prune (and with `args` quantize) w [N, K] given the input Gram matrix `hessian` [K, K]. Grids are
    fitted on the unpruned weight, per channel or per group (static groups: the sweep needs them up front)."""
    n, k = w.shape
    W = w.detach().float().clone()
    H = hessian.detach().double().clone() / max(tokens, 1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = group_size_of(args, k) if args is not None else k
    scale = zero = None
    if args is not None:
        one = QuantArgs(bits=args.bits, symmetric=args.symmetric, granularity="channel")
        grids = [weight_qparams(W[:, g * gs:(g + 1) * gs], one) for g in range(num_groups(k, gs))]
        scale = torch.cat([s for s, _ in grids], dim=1)
        zero = None if args.symmetric else torch.cat([z for _, z in grids], dim=1)  # type: ignore[misc]
    U, _ = _inverse_cholesky(H.float(), damp)
    block_size = max(block_size // 4, 1) * 4  # a 4-group never straddles two blocks
    Q = torch.zeros_like(W)
    mask = torch.zeros(n, k, dtype=torch.bool)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if i % 4 == 0:
                cols = slice(i, min(i + 4, i2 - i1))
                saliency = W1[:, cols] ** 2 / torch.diag(U1)[cols][None, :] ** 2
                mask[:, i1 + i:i1 + cols.stop] = mask_2_4(saliency)
            col = i1 + i
            w_col = W1[:, i]
            if args is not None:
                assert scale is not None
                g = col // gs
                q_col = _quant_column(w_col, scale[:, g], None if zero is None else zero[:, g], args)
            else:
                q_col = w_col.clone()
            q_col = torch.where(mask[:, col], q_col, torch.zeros_like(q_col))
            Q[:, col] = q_col
            e = (w_col - q_col) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    w0 = w.detach().float().clone()
    w0[:, dead] = 0.0
    h = hessian.detach().float()
    base = w0 * mask_2_4(magnitude_scores(w0))
    if args is not None:
        assert scale is not None
        base_q = torch.zeros_like(base)
        for c in range(k):
            g = c // gs
            base_q[:, c] = _quant_column(base[:, c], scale[:, g], None if zero is None else zero[:, g], args)
        base = base_q
    return SparseGPTResult(Q, mask, scale, zero, gs, proxy_loss(w0, Q, h, tokens), proxy_loss(w0, base, h, tokens))
