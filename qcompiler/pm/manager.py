"""PassManager: runs passes in order on one block graph, collecting statistics, linting and dumping."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from qcompiler.errors import PassError
from qcompiler.pm.base import Pass, PassContext, PassResult


@dataclass
class PassManager:
    passes: Sequence[Pass]
    dump_dir: Path | None = None  # write each graph before/after every pass as readable code
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        for i, p in enumerate(self.passes):
            t0 = time.perf_counter()
            if not p.keeps_values:
                ctx.block_outputs = None  # (computed by an earlier pass: this one may change the graph)
            if (p.quantizes_weights and ctx.reference_outputs is None
                    and any(q.reads_reference_outputs for q in self.passes[i + 1:])):
                ctx.reference_outputs = self._outputs(gm, ctx)
            requests = p.stat_requests(gm, ctx)
            # the first pass sees the float block: its statistics run may as well give the float outputs
            float_outputs = i == 0 and ctx.keep_float_outputs and bool(requests)
            stats = ctx.statistics(gm, requests, outputs=float_outputs)
            if float_outputs:
                ctx.float_block_outputs = stats.outputs
            self._dump(gm, ctx, i, p, "before")
            published = ctx.known_hessians
            result = p.run(gm, ctx, stats)
            if ctx.known_hessians is published and not p.keeps_values:
                ctx.known_hessians = {}  # (this pass may have moved the values they describe)
            if not isinstance(result, PassResult):
                raise PassError(f"pass '{p.name}' returned {type(result).__name__}, not PassResult")
            gm = result.graph_module
            try:
                gm.graph.lint()
            except Exception as e:
                raise PassError(f"pass '{p.name}' left an invalid graph in block '{ctx.block}': {e}") from e
            if result.modified:
                gm.recompile()
            self._dump(gm, ctx, i, p, "after")
            if result.details:
                ctx.report.setdefault(p.name, {}).update(result.details)
            self.timings[p.name] = self.timings.get(p.name, 0.0) + time.perf_counter() - t0
        return gm

    @staticmethod
    def _outputs(gm: fx.GraphModule, ctx: PassContext) -> list[Any]:
        """The block's outputs on every calibration batch, as the graph computes them now."""
        t0 = time.perf_counter()
        with torch.no_grad(), ctx.forwards():
            outputs = [gm(*args) for args in ctx.calib]
        ctx.forward_seconds += time.perf_counter() - t0
        return outputs

    def _dump(self, gm: fx.GraphModule, ctx: PassContext, i: int, p: Pass, when: str) -> None:
        if self.dump_dir is None:
            return
        d = Path(self.dump_dir) / ctx.block
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:02d}-{p.name}-{when}.txt").write_text(str(gm.graph))
