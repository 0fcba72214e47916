"""Statistics requests and the collector that fills them in one calibration run.

Passes never run the model. A pass declares `StatRequest`s (which node, which statistic); the collector, an
`fx.Interpreter`, runs the block graph over every calibration batch once and accumulates every request
of the step as the node values go by (like torch.fx's ShapeProp, but for data statistics).

Statistics (x is the node's output, channels on the last axis, flattened over tokens):
  absmax_channel  max_t |x[t, c]|                       [C]      SmoothQuant
  absmean_channel mean_t |x[t, c]|                      [C]      AWQ
  minmax          (min x, max x)                       2 × 0-d  static activation observers
  percentile      q-th percentile of |x| (subsampled)  0-d      outlier-robust observers
  histogram       counts of |x| in 2048 bins on [0, R] Hist     MSE / KL observers (calib/observers.py)
  hessian         Σ_t x_tᵀ x_t and the token count    [C, C]   GPTQ, AWQ, activation-aware clipping

The histogram's range R grows by powers of two as larger values arrive, so old bins merge into new ones
without re-binning error (2^k old bins become one new bin; only values within float rounding of an
edge can land one bin over). The Hessian is accumulated in float64 from float32 batch products.

`StatsCache` stores collected statistics on disk under a key of everything they depend on (the graph's
code and tensors, the calibration inputs, the requests), so a re-run whose earlier passes are unchanged
reads them instead of recalibrating.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx

from qcompiler.errors import CalibrationError

StatKind = Literal["absmax_channel", "absmean_channel", "minmax", "percentile", "histogram", "hessian"]
_PERCENTILE_SAMPLE = 1 << 18  # values kept per batch for percentile estimates
HIST_BINS = 2048
CACHE_VERSION = "1"  # bump when a statistic's definition changes


@dataclass
class Hist:
    """Counts of |x| in `counts.numel()` equal bins on [0, upper]."""

    counts: torch.Tensor  # float64 [B]
    upper: float

    def add(self, values: torch.Tensor) -> None:
        top = float(values.max()) if values.numel() else 0.0
        if top > self.upper:
            if self.upper <= 0:
                self.upper = top
            else:
                k = math.ceil(math.log2(top / self.upper))
                self._grow(k)
        if self.upper > 0:
            self.counts += torch.histc(values.double(), bins=self.counts.numel(), min=0.0, max=self.upper)
        else:
            self.counts[0] += values.numel()

    def _grow(self, k: int) -> None:
        """Range × 2^k: every 2^k adjacent bins merge into one, in the lower part of the new histogram."""
        b = self.counts.numel()
        f = 2**k
        if f >= b:
            merged = self.counts.sum().reshape(1)
        else:
            merged = self.counts.reshape(b // f, f).sum(dim=1)
        self.counts = torch.cat([merged, torch.zeros(b - merged.numel(), dtype=self.counts.dtype)])
        self.upper *= f


@dataclass(frozen=True)
class StatRequest:
    node: str
    kind: StatKind
    percentile: float = 99.99


@dataclass
class Stats:
    values: dict[StatRequest, Any] = field(default_factory=dict)

    def __getitem__(self, req: StatRequest) -> Any:
        return self.values[req]


class _AllSeen(Exception):
    """Raised inside a run once every requested node has been computed: the rest of the graph is skipped."""


class Accumulator:
    """Accumulates the statistics of a set of requests from node values, batch after batch."""

    def __init__(self, requests: Sequence[StatRequest]):
        self.requests = list(dict.fromkeys(requests))
        self.acc: dict[StatRequest, Any] = {}
        self._samples: dict[StatRequest, list[torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(0)

    def update(self, req: StatRequest, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"node '{req.node}' produced NaN/Inf during calibration")
        x2 = x.reshape(-1, x.shape[-1])
        if req.kind == "absmax_channel":
            v = x2.abs().amax(dim=0)
            self.acc[req] = v if req not in self.acc else torch.maximum(self.acc[req], v)
        elif req.kind == "absmean_channel":
            v = x2.abs().double().sum(dim=0)
            prev = self.acc.get(req)
            self.acc[req] = (v, x2.shape[0]) if prev is None else (prev[0] + v, prev[1] + x2.shape[0])
        elif req.kind == "histogram":
            if req not in self.acc:
                self.acc[req] = Hist(torch.zeros(HIST_BINS, dtype=torch.float64), 0.0)
            self.acc[req].add(x2.abs().reshape(-1))
        elif req.kind == "minmax":
            lo, hi = x2.min(), x2.max()
            if req in self.acc:
                lo, hi = torch.minimum(self.acc[req][0], lo), torch.maximum(self.acc[req][1], hi)
            self.acc[req] = (lo, hi)
        elif req.kind == "percentile":
            flat = x2.abs().reshape(-1)
            if flat.numel() > _PERCENTILE_SAMPLE:
                idx = torch.randint(0, flat.numel(), (_PERCENTILE_SAMPLE,), generator=self._gen)
                flat = flat[idx]
            self._samples.setdefault(req, []).append(flat)
        elif req.kind == "hessian":
            h = (x2.t() @ x2).double()
            prev = self.acc.get(req)
            self.acc[req] = (h, x2.shape[0]) if prev is None else (prev[0] + h, prev[1] + x2.shape[0])
        else:  # pragma: no cover - Literal guards this
            raise ValueError(req.kind)

    def finish(self) -> Stats:
        for req, samples in self._samples.items():
            allv = torch.cat(samples)
            k = max(1, min(allv.numel(), round(req.percentile / 100.0 * allv.numel())))
            self.acc[req] = allv.kthvalue(k).values
        for req in self.acc:
            if req.kind == "absmean_channel":
                total, count = self.acc[req]
                self.acc[req] = (total / count).float()
        missing = [r for r in self.requests if r not in self.acc]
        if missing:
            raise CalibrationError(f"no calibration data reached nodes {sorted({r.node for r in missing})}")
        return Stats(dict(self.acc))


def _by_node(gm: fx.GraphModule, requests: Sequence[StatRequest]) -> dict[str, list[StatRequest]]:
    by_node: dict[str, list[StatRequest]] = {}
    for r in dict.fromkeys(requests):
        by_node.setdefault(r.node, []).append(r)
    missing = set(by_node) - {n.name for n in gm.graph.nodes}
    if missing:
        raise CalibrationError(f"statistics requested for nodes not in the graph: {sorted(missing)}")
    return by_node


class StatCollector(fx.Interpreter):
    """Runs a GraphModule on calibration batches, accumulating the requested statistics. Each run stops at
    the last requested node (statistics of an early node, e.g. the q/k/v input, cost a fraction of a
    block forward)."""

    def __init__(self, gm: fx.GraphModule, requests: Sequence[StatRequest]):
        super().__init__(gm)
        self.by_node = _by_node(gm, requests)
        self.accumulator = Accumulator(requests)
        self._pending: set[str] = set()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        reqs = self.by_node.get(n.name)
        if reqs:
            for req in reqs:
                self.accumulator.update(req, out)
            self._pending.discard(n.name)
            if not self._pending:
                raise _AllSeen
        return out

    def collect(self, batches: Sequence[tuple[torch.Tensor, ...]]) -> Stats:
        if not batches:
            raise CalibrationError("no calibration batches")
        with torch.no_grad():
            for args in batches:
                self._pending = set(self.by_node)
                try:
                    self.run(*args)
                except _AllSeen:
                    pass
        return self.accumulator.finish()


class _Resumable(fx.Interpreter):
    """One batch's run of the graph that can stop after any node and continue later."""

    def __init__(self, gm: fx.GraphModule, args: tuple[torch.Tensor, ...]):
        super().__init__(gm, garbage_collect_values=True)
        self.env = {}
        self.args_iter = iter(args)
        self.order = list(gm.graph.nodes)
        self.pos = 0

    def advance(self, targets: set[str], on_value: Any) -> None:
        """Run nodes until every name in `targets` has been computed, handing each value to `on_value`."""
        # Weights a pass replaced since the last stop must be read again (get_attr ran at the graph's top).
        for node in list(self.env):
            if node.op == "get_attr":
                self.env[node] = self.fetch_attr(str(node.target))
        pending = set(targets)
        while pending and self.pos < len(self.order):
            node = self.order[self.pos]
            self.pos += 1
            if node.op == "output":
                break
            self.env[node] = self.run_node(node)
            if node.name in pending:
                on_value(node, self.env[node])
                pending.discard(node.name)
            for dead in self.user_to_last_uses.get(node, []):
                del self.env[dead]
        if pending:
            raise CalibrationError(
                f"statistics requested for {sorted(pending)}, which this staged run has already passed "
                "(stages must be requested in graph order)"
            )


class StagedCollector:
    """Statistics for passes that change the graph between stages (GPTQ's true-sequential order): each batch
    runs once through the graph, stopping after the nodes of each stage, so stage k costs only the nodes
    between stage k−1 and stage k, and sees every weight the pass changed before it."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, ...]]):
        if not batches:
            raise CalibrationError("no calibration batches")
        self.gm = gm
        self.runs = [_Resumable(gm, args) for args in batches]

    def collect(self, requests: Sequence[StatRequest]) -> Stats:
        by_node = _by_node(self.gm, requests)
        acc = Accumulator(requests)

        def on_value(node: fx.Node, value: Any) -> None:
            for req in by_node[node.name]:
                acc.update(req, value)

        with torch.no_grad():
            for run in self.runs:
                run.advance(set(by_node), on_value)
        return acc.finish()


def digest_tensors(tensors: Sequence[tuple[str, torch.Tensor]] | Sequence[torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes (order-sensitive)."""
    h = hashlib.sha256()
    for item in tensors:
        name, t = item if isinstance(item, tuple) else ("", item)
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class StatsCache:
    """Statistics on disk keyed by (graph code, graph tensors, calibration digest, requests)."""

    root: Path
    hits: int = 0
    misses: int = 0

    def key(self, gm: fx.GraphModule, requests: Sequence[StatRequest], calib_digest: str) -> str:
        from qcompiler.ir.graph import tensor_attrs

        h = hashlib.sha256(CACHE_VERSION.encode())
        h.update(gm.code.encode())
        h.update(digest_tensors(sorted(tensor_attrs(gm), key=lambda kv: kv[0])).encode())
        h.update(calib_digest.encode())
        h.update(repr(sorted(map(repr, requests))).encode())
        return h.hexdigest()

    def load(self, key: str, requests: Sequence[StatRequest]) -> Stats | None:
        path = self.root / f"{key}.pt"
        if not path.is_file():
            self.misses += 1
            return None
        values = torch.load(path, weights_only=False)
        self.hits += 1
        return Stats({req: values[repr(req)] for req in requests})

    def store(self, key: str, stats: Stats) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp"
        torch.save({repr(req): v for req, v in stats.values.items()}, tmp)
        tmp.replace(self.root / f"{key}.pt")  # atomic: a crash never leaves a truncated entry


def collect_stats(
    gm: fx.GraphModule,
    requests: Sequence[StatRequest],
    batches: Sequence[tuple[torch.Tensor, ...]],
    cache: StatsCache | None = None,
    calib_digest: str | None = None,
    staged: StagedCollector | None = None,
) -> Stats:
    """Fill `requests` by running `batches` through `gm` (or through `staged`, continuing its runs), or read
    them from `cache`."""
    if not requests:
        return Stats()
    requests = list(dict.fromkeys(requests))
    key = None
    if cache is not None:
        key = cache.key(gm, requests, calib_digest or digest_tensors([t for b in batches for t in b]))
        hit = cache.load(key, requests)
        if hit is not None:
            return hit
    stats = staged.collect(requests) if staged is not None else StatCollector(gm, requests).collect(batches)
    if cache is not None and key is not None:
        cache.store(key, stats)
    return stats
