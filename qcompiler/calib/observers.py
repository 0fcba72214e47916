"""Activation range observers on a histogram of |x| (pure functions; the collector builds the histogram).

All return a symmetric clipping threshold T for a b-bit grid with step Δ = T / (2^(b−1) − 1):
  minmax      T = max |x|
  percentile  T = the p-th percentile of |x|
  mse         T minimising the expected squared error Σ_bins n_i·e(c_i, T): values above T are clipped
              (e = (c − T)²), values below are rounded (e = Δ²/12, uniform rounding noise)
  kl          TensorRT's entropy calibration: T minimising KL(P‖Q) between P, the first i bins with the
              clipped outliers added to the last, and Q, the first i bins *without* the outliers merged into
              2^(b−1) levels and spread back over the bins that are non-zero in P (so Q misses exactly the
              clipped mass, and clipping costs divergence)
Bin centres c_i = (i + ½)·R/B for B bins on [0, R].
"""

from __future__ import annotations

import torch

from qcompiler.calib.stats import Hist


def _centres(h: Hist) -> torch.Tensor:
    b = h.counts.numel()
    return (torch.arange(b, dtype=torch.float64) + 0.5) * (h.upper / b)


def hist_minmax(h: Hist) -> float:
    nz = torch.nonzero(h.counts).flatten()
    if nz.numel() == 0:
        return 0.0
    return float((int(nz[-1]) + 1) * h.upper / h.counts.numel())


def hist_percentile(h: Hist, percentile: float) -> float:
    total = float(h.counts.sum())
    if total == 0:
        return 0.0
    cdf = torch.cumsum(h.counts, 0) / total
    idx = int(torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=torch.float64)))
    return float(min(idx + 1, h.counts.numel()) * h.upper / h.counts.numel())


def hist_mse(h: Hist, bits: int = 8, candidates: int = 256) -> float:
    """Threshold minimising clipping + rounding error, searched over `candidates` evenly spaced values."""
    top = hist_minmax(h)
    if top == 0:
        return 0.0
    c = _centres(h)
    n = h.counts
    qmax = 2 ** (bits - 1) - 1
    ts = torch.linspace(top / candidates, top, candidates, dtype=torch.float64)
    step = ts / qmax
    clipped = (c[None, :] - ts[:, None]).clamp_min(0)
    err = (n[None, :] * (clipped.pow(2) + (c[None, :] <= ts[:, None]) * step[:, None].pow(2) / 12)).sum(dim=1)
    return float(ts[int(torch.argmin(err))])


def hist_kl(h: Hist, bits: int = 8, stride: int = 8) -> float:
    """TensorRT-style entropy calibration (bins searched with `stride`)."""
    counts = h.counts.double()
    b = counts.numel()
    levels = 2 ** (bits - 1)
    if float(counts.sum()) == 0:
        return 0.0
    last = int(torch.nonzero(counts).flatten()[-1]) + 1
    if last <= levels:
        return hist_minmax(h)
    best_i, best_kl = last, float("inf")
    for i in list(range(levels, last, stride)) + [last]:
        p = counts[:i].clone()
        p[-1] += counts[i:].sum()
        nonzero = p > 0
        # merge the i bins into `levels` levels, then spread each level evenly over its non-zero bins
        level = torch.arange(i) * levels // i
        sums = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, level, counts[:i])
        nz = torch.zeros(levels, dtype=torch.float64).scatter_add_(0, level, nonzero.double())
        q = torch.where(nonzero, sums[level] / nz[level].clamp_min(1), 0.0)
        ps = p / p.sum()
        qs = q / q.sum().clamp_min(1e-30)
        mask = ps > 0
        if bool((qs[mask] == 0).any()):
            continue
        kl = float((ps[mask] * torch.log(ps[mask] / qs[mask])).sum())
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(best_i * h.upper / b)


def threshold(h: Hist, observer: str, bits: int = 8, percentile: float = 99.99) -> float:
    if observer == "minmax":
        return hist_minmax(h)
    if observer == "percentile":
        return hist_percentile(h, percentile)
    if observer == "mse":
        return hist_mse(h, bits)
    if observer == "kl":
        return hist_kl(h, bits)
    raise ValueError(f"unknown observer '{observer}'; use minmax, percentile, mse or kl")
