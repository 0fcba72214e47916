"""GPTQ (Frantar et al., 2023) as a pure tensor function: quantize W column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

With H = Σ_t x_tᵀ x_t (the [K, K] input Gram matrix) the layer's output error is tr(ΔHΔᵀ) for Δ = W − Ŵ.
GPTQ minimises it greedily (Optimal Brain Quantization): with U the upper Cholesky factor of H⁻¹
(H⁻¹ = UᵀU), for column j in order
    ŵ_j = Q(w_j),   e_j = (w_j − ŵ_j) / U_jj,   w_{j'} ← w_{j'} − e_j·U_{j j'}   for every j' > j.
Columns are processed in blocks of B (lazy batch updates: the update of the columns after a block is one
matrix product E·U[block, rest]). The reported loss tr(ΔHΔᵀ) comes from the sweep's errors (Δ = E·U, so
tr(Δ(H + λI)Δᵀ) = ‖E‖²), without another N·K² product.

Options:
  damp          H += damp·mean(diag H)·I before the inversion (numerical stability; 0.01 is the paper's)
  act_order     process columns by decreasing diag(H) (the most active inputs first)
  static_groups group scales/zero points computed once on the original W, before any update. With
                act_order this keeps groups contiguous in the *original* column order, so the kernels need
                no g_idx permutation (act_order forces it); without act_order the default computes each
                group's grid when the sweep reaches it, on the already-updated columns (better error).
  clip          how a grid is fitted to a group: "minmax", "mse" (range shrink minimising the weight error,
                numerics.mse_clip_search) or "awq" (range shrink minimising the group's output error
                δ·H_JJ·δᵀ, algorithms/awq.activation_aware_clip).
  mask          a fixed sparsity mask (bool [N, K], e.g. 2:4 from Wanda): masked weights are quantized to 0 and
                their whole value is the error pushed onward, so the kept weights compensate and stay the
                only non-zeros.
Dead inputs (diag H = 0: the channel never fired in calibration) get W[:, j] = 0, as in the reference code.

Quantized activations (`fit_to_quantized_input`): a layer whose integer GEMM reads x̃ = Q(x) (dynamic per-token
activations) computes Ŵx̃, not Ŵx. The error to minimise is Σ_t ‖W x_t − Ŵ x̃_t‖²; with H̃ = Σ x̃ᵀx̃ and
C = Σ x̃ᵀx (the rows of X are tokens) its continuous minimiser is the least-squares W* = W·Cᵀ·H̃⁻¹, and because
the residual X·Wᵀ − X̃·W*ᵀ is orthogonal to X̃,
    Σ_t ‖W x_t − Ŵ x̃_t‖² = tr((W* − Ŵ) H̃ (W* − Ŵ)ᵀ) + const,
so GPTQ on W* with the Hessian H̃ minimises exactly the layer's error with its activations quantized (the
activation-error compensation of GPTAQ, Li et al. 2025, for the layer's own input grid).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from qcompiler.algorithms.awq import activation_aware_clip
from qcompiler.errors import CalibrationError
from qcompiler.numerics import (
    dequantize_weight,
    group_size_of,
    mse_clip_search,
    num_groups,
    quantize_weight,
    weight_qparams,
)
from qcompiler.schemes import QuantArgs


@dataclass
class GPTQResult:
    w_hat: torch.Tensor  # [N, K] fake-quantized weight (q − z)·s, float32
    scale: torch.Tensor  # [N, G]
    zero: torch.Tensor | None  # [N, G] or None (symmetric)
    group_size: int
    proxy_loss: float  # tr(ΔHΔᵀ)/tokens after GPTQ (the quantity it minimises)
    rtn_proxy_loss: float  # the same for min-max round-to-nearest, for comparison
    damp_used: float


def _fit_grid(
    w: torch.Tensor, args: QuantArgs, clip: str, h_block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero for a slice w [N, g] that is exactly one group (or all of K for per-channel); `h_block` is
    the slice's [g, g] block of H (used by clip="awq")."""
    one_group = QuantArgs(bits=args.bits, symmetric=args.symmetric, granularity="channel")
    ratio: torch.Tensor | float = 1.0
    if clip == "mse":
        ratio = mse_clip_search(w, one_group)
    elif clip == "awq":
        ratio = activation_aware_clip(w, h_block, one_group)
    return weight_qparams(w, one_group, ratio)


def _fit_grids(
    w: torch.Tensor, args: QuantArgs, clip: str, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero [N, G] of every group of w [N, K] at once (static groups): the same numbers as _fit_grid on each
    group's slice, since every clip search scores each group on its own columns (and its own block of H)."""
    ratio: torch.Tensor | float = 1.0
    if clip == "mse":
        ratio = mse_clip_search(w, args)
    elif clip == "awq":
        ratio = activation_aware_clip(w, h, args)
    return weight_qparams(w, args, ratio)


def _quant_column(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """ŵ of one column w [N] on its grid (scales s, zero points z: [N])."""
    return _quant_column_into(torch.empty_like(w), w, s, z, args)


def _quant_column_into(out: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                       args: QuantArgs) -> torch.Tensor:
    """_quant_column written into `out` (GPTQ's sweep: no allocation per column); numerics.grouped_fake_quant's
    operations in the same order, so the same bits."""
    torch.div(w, s, out=out).round_()
    if z is not None:
        return out.add_(z).clamp_(args.qmin, args.qmax).sub_(z).mul_(s)
    return out.clamp_(args.qmin, args.qmax).mul_(s)


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, tokens: int) -> float:
    """tr(ΔHΔᵀ)/tokens for Δ = w − ŵ: the layer's output error on the calibration tokens (one N·K² product)."""
    d = (w.float() - w_hat.float())
    return float(torch.dot((d @ hessian.float()).view(-1), d.view(-1)) / max(tokens, 1))


def _damped(h: torch.Tensor, damp: float) -> Iterator[tuple[torch.Tensor, float]]:
    """H + λI with λ = d·mean(diag H) (in H's dtype), d = damp first, then growing ×10: the damping schedule a
    Cholesky solve walks while H is singular."""
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        d = damp if attempt == 0 else max(damp, 1e-4) * (10**attempt)
        yield h + d * mean_diag * eye, d


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H); damping grows ×10 if H is singular.
    (h is float32 here: 2x faster than float64 for K = 1536.)"""
    d = damp
    for h_damped, d in _damped(h, damp):
        L, info = torch.linalg.cholesky_ex(h_damped)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U, d
    raise CalibrationError(f"GPTQ: the Hessian is not positive definite even with damping {d:g}")


def fit_to_quantized_input(w: torch.Tensor, h_quantized: torch.Tensor, cross: torch.Tensor,
                           damp: float = 1e-6) -> torch.Tensor:
    """W* = W·Cᵀ·(H̃ + λI)⁻¹ for w [N, K], H̃ = Σ x̃ᵀx̃ and C = Σ x̃ᵀx [K, K] (λ = damp·mean(diag H̃)): the float weight
    that best maps the quantized inputs x̃ to the float outputs W·x. Solved in float64 by Cholesky; damping grows
    ×10 while H̃ is singular. The default is a trace only: GPTQ's 1 % ridge zeroed the weights' components along
    the Gram's weak directions (measured on the demo: w8a8_dynamic +8.7 % instead of +0.75 %)."""
    rhs = cross.double() @ w.double().t()  # C·Wᵀ [K, N]
    d = damp
    for h_damped, d in _damped(h_quantized.double(), damp):  # noqa: B007  (d: read by the error below)
        L, info = torch.linalg.cholesky_ex(h_damped)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, L).t().to(w.dtype).contiguous()
    raise CalibrationError(f"GPTQ: the quantized inputs' Gram matrix is singular even with damping {d:g}")


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    *,
    tokens: int = 1,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    clip: Literal["minmax", "mse", "awq"] = "minmax",
    mask: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize w [N, K] with the input Gram matrix `hessian` [K, K] (summed over `tokens` tokens)."""
    if args.granularity == "tensor":
        raise ValueError("GPTQ fits per-channel or per-group grids, not a per-tensor one")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight [N={n}, K={k}]")
    W = w.detach().float().clone()
    H = hessian.detach().double() / max(tokens, 1)  # (a new tensor: the caller's is not changed)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    gs = group_size_of(args, k)
    n_groups = num_groups(k, gs)
    grouped = gs < k
    static = static_groups or act_order or not grouped
    scale = torch.zeros(n, n_groups)
    zero = None if args.symmetric else torch.zeros(n, n_groups)
    h_float = H.float()
    if static:
        grid_args = args if grouped else QuantArgs(bits=args.bits, symmetric=args.symmetric, granularity="channel")
        scale, fitted_zero = _fit_grids(W, grid_args, clip, h_float)
        if zero is not None and fitted_zero is not None:
            zero = fitted_zero
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W = W[:, perm]
    h_perm = h_float[perm][:, perm] if act_order else h_float  # (permuting float32: half the bytes of H)
    keep = None if mask is None else mask[:, perm]
    U, damp_used = _inverse_cholesky(h_perm, damp)  # float32 like the reference code; damping escalates

    col_group = (perm // gs).tolist()  # original group of each processed column (a list: read once per column)

    if grouped and not static:
        block_size = max(block_size // gs, 1) * gs  # a group never straddles two blocks
    # The sweep works on transposed copies ([K, N]): column j of W is row j, contiguous, so the per-column vector
    # maths and the rank-1 updates stream through memory instead of striding across rows.
    Wt = W.t().contiguous()
    St = scale.t().contiguous()  # [G, N]
    Zt = None if zero is None else zero.t().contiguous()
    drop_t = None if keep is None else ~keep.t().contiguous()
    Qt = torch.zeros_like(Wt)
    E1 = torch.empty(block_size, n)
    err_sq = 0.0  # Σ_j ‖e_j‖²: the damped objective of the result (see below)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()
        Q1 = Qt[i1:i2]  # (a view: each quantized column is written in place)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group[col]
            if not static and col % gs == 0:  # no act_order here: processing order = original order
                s, z = _fit_grid(W1[i : i + gs].t(), args, clip, h_float[col : col + gs, col : col + gs])
                St[g] = s[:, 0]
                if Zt is not None and z is not None:
                    Zt[g] = z[:, 0]
            # (in place, into preallocated rows: the sweep is ~10 small ops per column, their count is its cost)
            w_col, q_col, e = W1[i], Q1[i], E1[i]
            _quant_column_into(q_col, w_col, St[g], None if Zt is None else Zt[g], args)
            if drop_t is not None:
                q_col.masked_fill_(drop_t[col], 0.0)
            torch.sub(w_col, q_col, out=e).div_(U1[i, i])
            # (row i itself is done: only the columns after it take the update; product then difference, not addr_,
            # whose fused rounding moved the demo's perplexity by 0.4 % on no change of method)
            W1[i + 1 :] -= U1[i, i + 1 :][:, None] * e[None, :]
        Wt[i2:] -= U[i1:i2, i2:].t() @ E1[: i2 - i1]
        err_sq += float(E1[: i2 - i1].double().square().sum())
    Q = Qt.t()
    scale = St.t().contiguous()
    zero = None if Zt is None else Zt.t().contiguous()

    inv = torch.argsort(perm)
    w_hat = Q[:, inv]
    h_orig = hessian.detach().float()
    w0 = w.detach().float().clone()
    w0[:, dead] = 0.0
    # GPTQ's own loss without another N·K² product: the sweep's final error is Δ = W − Ŵ = E·U (row j of U carries
    # e_j onto the later columns), so with UᵀU = (H + λI)⁻¹, i.e. U(H + λI)Uᵀ = I, tr(Δ(H + λI)Δᵀ) = ‖E‖² and
    # tr(ΔHΔᵀ) = ‖E‖² − λ‖Δ‖² (H here normalised by tokens; dead columns have Δ = 0). tests/test_algorithms.py
    # checks it against the product.
    lam = damp_used * float(torch.diag(h_perm).mean())  # (the λ _inverse_cholesky added)
    own_loss = err_sq - lam * float((w0 - w_hat).double().square().sum())
    rtn_args = args if grouped else QuantArgs(bits=args.bits, symmetric=args.symmetric, granularity="channel")
    rtn_scale, rtn_zero = weight_qparams(w0, rtn_args)
    rtn = dequantize_weight(quantize_weight(w0, rtn_scale, rtn_zero, rtn_args), rtn_scale, rtn_zero, gs)
    return GPTQResult(
        w_hat=w_hat,
        scale=scale,
        zero=zero,
        group_size=gs,
        proxy_loss=own_loss,
        rtn_proxy_loss=proxy_loss(w0, rtn, h_orig, tokens),
        damp_used=damp_used,
    )
