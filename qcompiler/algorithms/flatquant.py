"""FlatQuant-style learned affine transforms: for every linear input x that is quantized per token at run time, an
invertible P = L ⊗ R (Kronecker, L [a, a], R [b, b], a·b = K) and an activation clip ratio c, fitted block by block
so that the quantized block reproduces the float block's output.

The transform and its inverse cancel exactly in float:

    y = x·Wᵀ = (x·P)·(W·P⁻ᵀ)ᵀ,    P = L ⊗ R,  P⁻ᵀ = L⁻ᵀ ⊗ R⁻ᵀ

and neither needs the [K, K] product: with X the row-major [a, b] view of one token x (vec(X) = x),

    x·(L ⊗ R) = vec(Lᵀ·X·R),    a row w of W:  w·(L ⊗ R)⁻ᵀ = vec(L⁻¹·W_r·R⁻ᵀ)

(row-major vec(A·X·B) = (A ⊗ Bᵀ)·vec(X)). At run time the block computes x' = x·P online (qc::kronecker_transform,
two small GEMMs per token), quantizes x' per token with the scale s_t = c·max|x'_t|/qmax (values beyond clamped),
and multiplies by the quantized W·P⁻ᵀ. The weights absorb P⁻ᵀ offline, so only L, R and c are stored.

A site whose producer can absorb a per-channel division (see passes/rotation/flatquant.py) also learns d ∈ ℝᴷ:
it reads (x/d)·P and its weights are W·diag(d)·P⁻ᵀ, equal in float; d starts at diag_init (SmoothQuant-style).

Fitting (`learn_block_transforms`): L = R = I (or the site's starting point, e.g. a Hadamard pair) and
c = σ(4) ≈ 0.98 at the start, then Adam on the mean squared error between the block's float output and its output with every
site transformed and quantized — per-token activations with the clip, and the weights on the scheme's grid
where `weight_args` names one (float otherwise: the pass's default when GPTQ follows) — through
straight-through rounding (∂round(u)/∂u = 1; the clamp keeps its true gradient, which is how c learns). Each step
runs a few calibration sequences (micro-batches) through the block, as FlatQuant does with its per-layer
calibration; the float targets are the unmodified block's outputs on the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from qcompiler.numerics import fake_quant_weight
from qcompiler.schemes import QuantArgs

CLIP_INIT_LOGIT = 4.0  # σ(4) ≈ 0.982: FlatQuant's starting activation clip
REPORT_SEQUENCES = 4  # micro-batches the block losses at the start and end of a fit are measured on (tune_grids too)


def kronecker_factors(k: int) -> tuple[int, int]:
    """(a, b) with a·b = k and a ≤ b as balanced as a difference of squares allows: the smallest m ≥ √k with
    m² − k = n² a square gives a = m − n, b = m + n. This is the split vllm-ascend's W4A4_FLATQUANT_DYNAMIC layer
    derives from the input size (so stored L, R have the shapes it allocates); k = 576 → (24, 24), 1536 → (32, 48)."""
    if k <= 0:
        raise ValueError(f"kronecker_factors: size must be positive, got {k}")
    m = math.isqrt(k)
    if m * m < k:
        m += 1
    while True:
        n = math.isqrt(m * m - k)
        if n * n == m * m - k:
            return m - n, m + n
        m += 1


def kronecker_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x·(L ⊗ R) over the last axis: vec(Lᵀ·X·R) for X the [a, b] view of each row. Computed in x's dtype."""
    a, b = left.shape[0], right.shape[0]
    shape = x.shape
    xs = x.reshape(-1, a, b)
    y = torch.matmul(torch.matmul(left.t().to(x.dtype), xs), right.to(x.dtype))
    return y.reshape(shape)


def kronecker_weight(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W·(L ⊗ R)⁻ᵀ for W [N, K]: row by row vec(L⁻¹·W_r·R⁻ᵀ), so that (x·P)·(W·P⁻ᵀ)ᵀ = x·Wᵀ."""
    a, b = left.shape[0], right.shape[0]
    wr = w.reshape(-1, a, b)
    # (one inverse per factor, not a solve per row: a batched solve would factorize L once for each of the N rows)
    y = torch.matmul(torch.matmul(torch.linalg.inv(left), wr), torch.linalg.inv(right).t())
    return y.reshape(w.shape)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quant_act_clipped(x: torch.Tensor, bits: int, clip_ratio: torch.Tensor | float) -> torch.Tensor:
    """Symmetric per-token fake quantization with the scale c·max|x_t|/qmax, differentiable in x (straight-through
    rounding) and in c (through the scale and the clamp): the training twin of numerics.quantize_act_per_token."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True).detach() * clip_ratio / qmax).clamp_min(1e-12)
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


@dataclass
class Site:
    """Linears (node names) that read one input node and quantize it per token with `act_bits`; the transform
    starts at `init` (L₀, R₀), the identity when None. `weight_absmax` ([K], max |W[:, j]| over the site's linears) is
    set where the input's producer (a norm's multiplier, up_proj's or v_proj's rows) can absorb a per-channel
    division: such a site also learns a diagonal d (it reads x/d·P). `scale_index` ([K] int64) ties channels to one
    entry of d where the producer holds fewer channels than the site reads (grouped-query attention: o_proj's input
    channel of query head h reads v's channel of kv head h // group); None: one entry per channel."""

    input: str
    linears: list[str]
    k: int
    act_bits: int
    init: tuple[torch.Tensor, torch.Tensor] | None = None
    weight_absmax: torch.Tensor | None = None
    scale_index: torch.Tensor | None = None


@dataclass
class SiteTransform:
    left: torch.Tensor  # [a, a] float32
    right: torch.Tensor  # [b, b] float32
    clip_ratio: float
    scale: torch.Tensor | None = None  # [K] float32: the site reads x/d (d folded into the producer), None: no d
    producer_scale: torch.Tensor | None = None  # d as the producer divides it (its entries, before scale_index)


def diag_init(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """FlatQuant's SmoothQuant-style start for the per-channel divisor: d_j = max|x_j|^α / max|W_:,j|^(1−α),
    normalised to geometric mean 1 (a common factor is the per-token scale's business, not d's)."""
    d = x_absmax.float().clamp_min(1e-5) ** alpha / w_absmax.float().clamp_min(1e-5) ** (1 - alpha)
    return d / d.log().mean().exp()


class _Params(torch.nn.Module):
    def __init__(self, sites: Sequence[Site], scale_init: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.left = torch.nn.ParameterList()
        self.right = torch.nn.ParameterList()
        self.clip = torch.nn.ParameterList()
        self.scale = torch.nn.ParameterList()
        self.scale_index: dict[int, int] = {}  # site index → index in self.scale (scalable sites only)
        for i, s in enumerate(sites):
            a, b = kronecker_factors(s.k)
            left, right = s.init if s.init is not None else (torch.eye(a), torch.eye(b))
            self.left.append(torch.nn.Parameter(left.float().clone()))
            self.right.append(torch.nn.Parameter(right.float().clone()))
            self.clip.append(torch.nn.Parameter(torch.tensor(CLIP_INIT_LOGIT)))
            if scale_init is not None and s.input in scale_init:
                self.scale_index[i] = len(self.scale)
                self.scale.append(torch.nn.Parameter(scale_init[s.input].float().clone()))

    def site_scale(self, i: int, sites: Sequence[Site]) -> torch.Tensor | None:
        """The site's [K] divisor (the learned entries spread by its scale_index), None without one."""
        j = self.scale_index.get(i)
        if j is None:
            return None
        index = sites[i].scale_index
        return self.scale[j] if index is None else self.scale[j][index]


class _QuantizedRun(fx.Interpreter):
    """Runs the block with every site's linears computing Q_a(x·P)·Q_w(W·P⁻ᵀ)ᵀ + b (straight-through)."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], params: _Params,
                 weight_args: dict[str, QuantArgs | None]):
        super().__init__(gm)
        self.site_of = {lin: i for i, s in enumerate(sites) for lin in s.linears}
        self.sites, self.params, self.weight_args = sites, params, weight_args
        self._x: dict[int, torch.Tensor] = {}

    def run_block(self, *args: torch.Tensor) -> Any:
        self._x = {}
        return self.run(*args)

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        node = self._node
        i = self.site_of.get(node.name)
        if i is None:
            return super().call_function(target, args, kwargs)
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        left, right = self.params.left[i], self.params.right[i]
        d = self.params.site_scale(i, self.sites)
        if i not in self._x:  # (linears sharing the input share its transformed, quantized value)
            xs = x.float() if d is None else x.float() / d
            xt = kronecker_apply(xs, left, right)
            self._x[i] = fake_quant_act_clipped(xt, self.sites[i].act_bits, torch.sigmoid(self.params.clip[i]))
        wt = kronecker_weight(w.float() if d is None else w.float() * d, left, right)
        wargs = self.weight_args.get(node.name)
        if wargs is not None:
            wt = wt + (fake_quant_weight(wt.detach(), wargs) - wt).detach()
        return F.linear(self._x[i], wt, None if bias is None else bias.float()).to(x.dtype)


def first_tensor(out: Any) -> torch.Tensor:
    """A block's output tensor (the first, when it returns several)."""
    if isinstance(out, torch.Tensor):
        return out
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise ValueError("the block returns no tensor")


def micro_batches(batches: Sequence[tuple[Any, ...]], size: int) -> list[tuple[Any, ...]]:
    """Each calibration batch split into `size` sequences at a time along its first axis: the tensors whose first
    axis is the batch's (the hidden states' first axis) are sliced, the rest (shared position tables) kept."""
    out = []
    for batch in batches:
        n = batch[0].shape[0]
        for start in range(0, n, size):
            out.append(tuple(t[start:start + size] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n
                             and n > 1 else t for t in batch))
    return out


def learn_block_transforms(
    gm: fx.GraphModule,
    sites: Sequence[Site],
    batches: Sequence[tuple[Any, ...]],
    weight_args: dict[str, QuantArgs | None],
    steps: int,
    lr: float = 5e-3,
    clip_lr: float = 5e-2,
    micro_batch: int = 2,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
    diag_alpha: float | None = None,
    target_batches: Sequence[tuple[Any, ...]] | None = None,
    precision: str = "float32",
) -> tuple[dict[str, SiteTransform], dict[str, float]]:
    """Fit every site's L, R and clip ratio to `gm`'s float outputs on `batches` (see the module docstring), and,
    where `diag_alpha` is given, a per-channel divisor d for every site with `weight_absmax`, started at diag_init(α).
    The targets are the float block's outputs on `batches`, or on `target_batches` where given (the float model's
    own inputs of the block, batch for batch: the fit then also pulls back the error of the blocks before it).
    `precision` "bfloat16": each step's quantized block run (and so its backward) under bfloat16 autocast — GEMMs
    and attention read bfloat16-rounded inputs, accumulate in float32 — as `--calib-precision bfloat16` runs the
    calibration forwards; the parameters, the loss and the optimizer stay float32.
    Returns the transforms by site input name and {"loss_start", "loss_end"} (mean squared error of the block
    output, over the first REPORT_SEQUENCES micro-batches, at the start and at the end, in float32)."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision is 'float32' or 'bfloat16', got '{precision}'")
    data = micro_batches(batches, micro_batch)
    scalable = {s.input for s in sites if s.weight_absmax is not None} if diag_alpha is not None else set()
    with torch.no_grad():
        recorder = _AbsmaxRecorder(gm, scalable)
        outputs = [first_tensor(recorder.run(*b)).float() if scalable or target_batches is None else None
                   for b in data]
        if target_batches is not None:
            float_data = micro_batches(target_batches, micro_batch)
            if len(float_data) != len(data):
                raise ValueError(f"{len(target_batches)} target batches for {len(batches)} input batches")
            targets = [first_tensor(gm(*b)).float() for b in float_data]
        else:
            targets = [t for t in outputs if t is not None]
        del outputs
    scale_init = None
    if scalable:
        assert diag_alpha is not None
        scale_init = {s.input: diag_init(_tied_max(recorder.absmax[s.input], s.scale_index),
                                         _tied_max(s.weight_absmax, s.scale_index), diag_alpha)
                      for s in sites if s.weight_absmax is not None}
    params = _Params(sites, scale_init)
    runner = _QuantizedRun(gm, sites, params, weight_args)
    opt = torch.optim.AdamW([
        {"params": [*params.left, *params.right, *params.scale], "lr": lr},
        {"params": list(params.clip), "lr": clip_lr},
    ], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=0.0)
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    perm: list[int] = []
    for step in range(steps):
        if not perm:
            perm = torch.randperm(len(data), generator=order).tolist()
        j = perm.pop()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            out = first_tensor(runner.run_block(*data[j])).float()
        loss = F.mse_loss(out, targets[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    # (the reported losses only, so a few micro-batches: at 100 steps this had been all 32 sequences, twice, per block)
    window = max(1, min(len(data), REPORT_SEQUENCES))
    with torch.no_grad():
        start = _mean_loss(gm, sites, _Params(sites), weight_args, data[:window], targets[:window])
        end = _mean_loss(gm, sites, params, weight_args, data[:window], targets[:window])
    out = {}
    for i, s in enumerate(sites):
        d = params.site_scale(i, sites)
        j = params.scale_index.get(i)
        out[s.input] = SiteTransform(params.left[i].detach().clone(), params.right[i].detach().clone(),
                                     float(torch.sigmoid(params.clip[i].detach())),
                                     None if d is None else d.detach().clone(),
                                     None if j is None else params.scale[j].detach().clone())
    return out, {"loss_start": start, "loss_end": end}


def _tied_max(v: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """max of v over the channels each entry ties together (v itself without an index)."""
    if index is None:
        return v
    out = torch.zeros(int(index.max()) + 1, dtype=v.dtype)
    return out.scatter_reduce(0, index, v, reduce="amax", include_self=False)


class _AbsmaxRecorder(fx.Interpreter):
    """Runs the block in float and keeps max|x_j| over all tokens of the named nodes' outputs."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.absmax: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            m = out.detach().abs().float().reshape(-1, out.shape[-1]).amax(dim=0)
            self.absmax[n.name] = torch.maximum(self.absmax[n.name], m) if n.name in self.absmax else m
        return out


def _mean_loss(gm: fx.GraphModule, sites: Sequence[Site], params: _Params, weight_args: dict[str, QuantArgs | None],
               data: Sequence[tuple[Any, ...]], targets: Sequence[torch.Tensor]) -> float:
    runner = _QuantizedRun(gm, sites, params, weight_args)
    total = 0.0
    for b, t in zip(data, targets, strict=True):
        total += float(F.mse_loss(first_tensor(runner.run_block(*b)).float(), t))
    return total / max(len(data), 1)
