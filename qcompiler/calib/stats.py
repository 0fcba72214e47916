"""Statistics requests and the collector that fills them in one calibration run.

Passes never run the model. A pass declares `StatRequest`s (which node, which statistic); the collector, an
`fx.Interpreter`, runs the block graph over every calibration batch once and accumulates every request
of the step as the node values go by (like torch.fx's ShapeProp, but for data statistics).

Statistics (x is the node's output, channels on the last axis, flattened over tokens):
  absmax_channel  max_t |x[t, c]|                       [C]      SmoothQuant, AWQ
  minmax          (min x, max x)                       2 × 0-d  static activation observers
  percentile      q-th percentile of |x| (subsampled)  0-d      outlier-robust observers
  hessian         Σ_t x_tᵀ x_t and the token count    [C, C]   GPTQ (later issue)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from qcompiler.errors import CalibrationError

StatKind = Literal["absmax_channel", "minmax", "percentile", "hessian"]
_PERCENTILE_SAMPLE = 1 << 18  # values kept per batch for percentile estimates


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


class StatCollector(fx.Interpreter):
    """Runs a GraphModule on calibration batches, accumulating the requested statistics."""

    def __init__(self, gm: fx.GraphModule, requests: Sequence[StatRequest]):
        super().__init__(gm)
        self.by_node: dict[str, list[StatRequest]] = {}
        for r in requests:
            self.by_node.setdefault(r.node, []).append(r)
        missing = set(self.by_node) - {n.name for n in gm.graph.nodes}
        if missing:
            raise CalibrationError(f"statistics requested for nodes not in the graph: {sorted(missing)}")
        self.acc: dict[StatRequest, Any] = {}
        self._samples: dict[StatRequest, list[torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(0)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for req in self.by_node.get(n.name, ()):
            self._update(req, out)
        return out

    def _update(self, req: StatRequest, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"node '{req.node}' produced NaN/Inf during calibration")
        x2 = x.reshape(-1, x.shape[-1])
        if req.kind == "absmax_channel":
            v = x2.abs().amax(dim=0)
            self.acc[req] = v if req not in self.acc else torch.maximum(self.acc[req], v)
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
            h = x2.t().double() @ x2.double()
            prev = self.acc.get(req)
            self.acc[req] = (h, x2.shape[0]) if prev is None else (prev[0] + h, prev[1] + x2.shape[0])
        else:  # pragma: no cover - Literal guards this
            raise ValueError(req.kind)

    def collect(self, batches: Sequence[tuple[torch.Tensor, ...]]) -> Stats:
        if not batches:
            raise CalibrationError("no calibration batches")
        with torch.no_grad():
            for args in batches:
                self.run(*args)
        for req, samples in self._samples.items():
            allv = torch.cat(samples)
            k = max(1, min(allv.numel(), round(req.percentile / 100.0 * allv.numel())))
            self.acc[req] = allv.kthvalue(k).values
        return Stats(dict(self.acc))


def collect_stats(
    gm: fx.GraphModule, requests: Sequence[StatRequest], batches: Sequence[tuple[torch.Tensor, ...]]
) -> Stats:
    if not requests:
        return Stats()
    return StatCollector(gm, list(dict.fromkeys(requests))).collect(batches)
