"""Statistics requests and the collector that fills them in one calibration run.

Passes never run the model. A pass declares `StatRequest`s (which node, which statistic); the collector, an
`fx.Interpreter`, runs the block graph over every calibration batch once and accumulates every request
of the step as the node values go by (like torch.fx's ShapeProp, but for data statistics).

Statistics (x is the node's output, channels on the last axis, flattened over tokens):
  absmax_channel  max_t |x[t, c]|                       [C]      SmoothQuant
  absmean_channel mean_t |x[t, c]|                      [C]      AWQ
  sqsum_channel   Σ_t x[t, c]²  (= diag of the Hessian)  [C]      Wanda
  minmax          (min x, max x)                       2 × 0-d  static activation observers
  minmax_head_dim (min, max) over b, s of x [B, H, S, D] 2 × [H, D] KV-cache scales (per tensor/head/channel)
  percentile      q-th percentile of |x| (subsampled)  0-d      outlier-robust observers
  histogram       counts of |x| in 2048 bins on [0, R] Hist     MSE / KL observers (calib/observers.py)
  hessian         Σ_t x_tᵀ x_t and the token count    [C, C]   GPTQ, AWQ, activation-aware clipping
  token_sample    every TOKEN_SAMPLE_STRIDE-th token's x (at least 8 per batch, evenly spaced)
                                                       [T', C]  SmoothQuant's α search (scored on real tokens)
  hessian_quantized  with x̃_t = Q(x_t) the dynamic per-token quantization at `bits` (what the layer's integer
                  GEMM reads): Σ_t x̃_tᵀ x̃_t, Σ_t x̃_tᵀ x_t and the token count
                                                       2 × [C, C] GPTQ fitted to quantized activations

The histogram's range R is a power of two and grows by powers of two as larger values arrive, so old bins merge into new ones
without re-binning error (2^k old bins become one new bin; only values within float rounding of an
edge can land one bin over). The Hessian is accumulated in float64 from float32 batch products.

`StatsCache` stores collected statistics on disk under a key of everything they depend on (the graph's
code and tensors, the calibration inputs, the requests), so a re-run whose earlier passes are unchanged
reads them instead of recalibrating.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from qcompiler.distributed import active as dist_active
from qcompiler.distributed import all_gather_objects, all_reduce, global_batch_index
from qcompiler.errors import CalibrationError
from qcompiler.ir.routing import ROUTED
from qcompiler.numerics import fake_quant_act_per_token, gram

StatKind = Literal["absmax_channel", "absmean_channel", "sqsum_channel", "minmax", "minmax_head_dim", "percentile", "histogram",
                   "hessian", "hessian_quantized", "token_sample"]
_PERCENTILE_SAMPLE = 1 << 18  # values kept per batch for percentile estimates
HIST_BINS = 2048
TOKEN_SAMPLE_STRIDE = 32  # token_sample keeps 1 token in 32 (512 of a 32 × 512 calibration set)
CACHE_VERSION = "2"  # bump when a statistic's definition or the entry format changes

logger = logging.getLogger(__name__)


@dataclass
class Hist:
    """Counts of |x| in `counts.numel()` equal bins on [0, upper]."""

    counts: torch.Tensor  # float64 [B]
    upper: float

    def add(self, values: torch.Tensor) -> None:
        top = float(values.max()) if values.numel() else 0.0
        if top > self.upper:
            if self.upper <= 0:
                # a power of two, so histograms of different data (data-parallel ranks) merge exactly
                self.upper = 2.0 ** math.ceil(math.log2(top))
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
    bits: int = 8  # hessian_quantized: the bits of the per-token activation grid
    clip_ratio: float = 1.0  # hessian_quantized: the grid's scale is clip_ratio·max|x_t|/qmax (flatquant's clip)


@dataclass
class Stats:
    values: dict[StatRequest, Any] = field(default_factory=dict)
    empty: list[StatRequest] = field(default_factory=list)  # requests no calibration token reached
    all_token_fallback: list[str] = field(default_factory=list)  # expert inputs measured over all tokens
    # the graph's outputs, one per batch, when the run was asked to go on to the end (collect_stats(outputs=True))
    outputs: list[Any] | None = None

    def __getitem__(self, req: StatRequest) -> Any:
        return self.values[req]


class _AllSeen(Exception):
    """Raised inside a run once every requested node has been computed: the rest of the graph is skipped."""


class Accumulator:
    """Accumulates the statistics of a set of requests from node values, batch after batch.

    `rows` (a bool mask over the flattened tokens) restricts an update to some tokens: an expert's input is
    measured over the tokens routed to it. `finish` reduces across data-parallel ranks (qcompiler.distributed)
    before the final values are computed, so every rank returns the same statistics."""

    def __init__(self, requests: Sequence[StatRequest]):
        self.requests = list(dict.fromkeys(requests))
        self.acc: dict[StatRequest, Any] = {}
        self.tokens: dict[StatRequest, int] = {}
        self._samples: dict[StatRequest, list[tuple[int, torch.Tensor]]] = {}
        self.batch_index = 0  # global index of the batch being accumulated (seeds percentile subsampling)

    def update(self, req: StatRequest, x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        # (statistics run inside the calibration forward, which may be under bfloat16 autocast: calib/precision.py.
        # Their sums stay float32 / float64; a Hessian's xᵀx is then a bfloat16 product, like the block's GEMMs,
        # which read x rounded to bfloat16 too)
        bf16 = (torch.is_autocast_enabled(x.device.type)
                and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
        with torch.autocast(x.device.type, enabled=False):
            self._update(req, x, rows, bf16)

    def _update(self, req: StatRequest, x: torch.Tensor, rows: torch.Tensor | None, bf16: bool = False) -> None:
        x = x.detach().float()
        if req.kind == "minmax_head_dim":
            if x.dim() != 4:
                raise CalibrationError(f"node '{req.node}': per-head statistics need a [B, H, S, D] tensor, got "
                                       f"shape {list(x.shape)}")
            x = x.transpose(1, 2).reshape(-1, x.shape[1] * x.shape[3])  # tokens × (head, dim)
        x2 = x.reshape(-1, x.shape[-1])
        if rows is not None:
            x2 = x2[rows.reshape(-1)]
        # (one reduction first: a NaN or Inf anywhere makes the sum non-finite; only then the exact test, since a
        # finite tensor can overflow its sum)
        if not bool(torch.isfinite(x2.sum())) and not bool(torch.isfinite(x2).all()):
            raise CalibrationError(f"node '{req.node}' produced NaN/Inf during calibration")
        self.tokens[req] = self.tokens.get(req, 0) + x2.shape[0]
        c = x2.shape[-1]
        if req.kind == "absmax_channel":
            v = x2.abs().amax(dim=0) if x2.shape[0] else x2.new_zeros(c)
            self.acc[req] = v if req not in self.acc else torch.maximum(self.acc[req], v)
        elif req.kind in ("absmean_channel", "sqsum_channel"):
            # (float64 sums; |x| is cast element by element inside the sum, without a float64 copy of the batch)
            v = (x2.abs().sum(dim=0, dtype=torch.float64) if req.kind == "absmean_channel"
                 else x2.double().pow(2).sum(dim=0))
            prev = self.acc.get(req)
            self.acc[req] = v if prev is None else prev + v
        elif req.kind == "histogram":
            if req not in self.acc:
                self.acc[req] = Hist(torch.zeros(HIST_BINS, dtype=torch.float64), 0.0)
            self.acc[req].add(x2.abs().reshape(-1))
        elif req.kind == "minmax_head_dim":
            lo, hi = x2.amin(dim=0), x2.amax(dim=0)
            if req in self.acc:
                lo, hi = torch.minimum(self.acc[req][0], lo), torch.maximum(self.acc[req][1], hi)
            self.acc[req] = (lo, hi)
        elif req.kind == "minmax":
            inf = torch.tensor(float("inf"))
            lo, hi = (x2.min(), x2.max()) if x2.numel() else (inf, -inf)
            if req in self.acc:
                lo, hi = torch.minimum(self.acc[req][0], lo), torch.maximum(self.acc[req][1], hi)
            self.acc[req] = (lo, hi)
        elif req.kind == "percentile":
            flat = x2.abs().reshape(-1)
            if flat.numel() > _PERCENTILE_SAMPLE:
                # seeded by the global batch index: the same samples whichever rank holds the batch
                gen = torch.Generator().manual_seed(self.batch_index)
                flat = flat[torch.randint(0, flat.numel(), (_PERCENTILE_SAMPLE,), generator=gen)]
            self._samples.setdefault(req, []).append((self.batch_index, flat))
        elif req.kind == "token_sample":
            n = x2.shape[0]
            keep = min(n, max(8, n // TOKEN_SAMPLE_STRIDE))
            picked = x2[torch.linspace(0, n - 1, keep).round().long()] if keep else x2
            self._samples.setdefault(req, []).append((self.batch_index, picked.clone()))
        elif req.kind == "hessian":
            # float32 batch products summed in float64: exact for the few batches of a calibration set, so
            # the sum does not depend on the order (or the rank) the batches arrive in. Under a bfloat16 forward
            # the product is bfloat16's (inputs as the layer's GEMM reads them, float32 accumulation, the batch's
            # sum rounded to bfloat16: 4e-4 to 1.2e-3 relative on the demo's Hessians, where two halves of
            # the calibration set differ by 5e-2 to 0.6; 1.5× faster on bf16 hardware)
            h = gram(x2.bfloat16() if bf16 else x2).double()
            prev = self.acc.get(req)
            self.acc[req] = h if prev is None else prev + h
        elif req.kind == "hessian_quantized":
            xq = fake_quant_act_per_token(x2, req.bits, req.clip_ratio)
            pair = (gram(xq).double(), (xq.t() @ x2).double())
            prev = self.acc.get(req)
            self.acc[req] = pair if prev is None else (prev[0] + pair[0], prev[1] + pair[1])
        else:  # pragma: no cover - Literal guards this
            raise ValueError(req.kind)

    def _reduce_across_ranks(self) -> None:
        if not dist_active():
            return
        reqs = [r for r in self.requests if r in self.acc or r in self._samples]
        if [r for r in self.requests if r not in reqs]:
            raise CalibrationError("a data-parallel rank saw no calibration batch; use at least as many "
                                   "calibration batches as processes")
        counts = all_reduce(torch.tensor([self.tokens.get(r, 0) for r in reqs], dtype=torch.float64), "sum")
        self.tokens = {r: int(c) for r, c in zip(reqs, counts.tolist(), strict=True)}
        for r in reqs:
            v = self.acc.get(r)
            if r.kind == "absmax_channel":
                all_reduce(v, "max")
            elif r.kind in ("absmean_channel", "sqsum_channel", "hessian"):
                all_reduce(v, "sum")
            elif r.kind == "hessian_quantized":
                all_reduce(v[0], "sum")
                all_reduce(v[1], "sum")
            elif r.kind in ("minmax", "minmax_head_dim"):
                self.acc[r] = (all_reduce(v[0].clone(), "min"), all_reduce(v[1].clone(), "max"))
            elif r.kind == "histogram":
                upper = all_reduce(torch.tensor(v.upper, dtype=torch.float64), "max").item()
                if v.upper > 0 and upper > v.upper:
                    v._grow(round(math.log2(upper / v.upper)))
                elif v.upper <= 0 and upper > 0:  # no values here yet: all counts (zeros) sit in bin 0
                    v.upper = upper
                all_reduce(v.counts, "sum")
            elif r.kind in ("percentile", "token_sample"):
                # (finish puts them in global batch order)
                self._samples[r] = [s for part in all_gather_objects(self._samples.get(r, [])) for s in part]

    def _in_batch_order(self, req: StatRequest) -> torch.Tensor:
        """A sampled statistic's pieces concatenated in global batch order (whichever rank held each batch)."""
        return torch.cat([t for _, t in sorted(self._samples[req], key=lambda s: s[0])])

    def finish(self) -> Stats:
        """The statistics; requests that saw no token are left out (see `Stats.empty`)."""
        self._reduce_across_ranks()
        out: dict[StatRequest, Any] = {}
        empty = [r for r in self.requests if self.tokens.get(r, 0) == 0]
        for req in self.requests:
            if req in empty:
                continue
            if req.kind == "percentile":
                allv = self._in_batch_order(req)
                k = max(1, min(allv.numel(), round(req.percentile / 100.0 * allv.numel())))
                out[req] = allv.kthvalue(k).values
            elif req.kind == "token_sample":
                out[req] = self._in_batch_order(req)
            elif req.kind == "absmean_channel":
                out[req] = (self.acc[req] / self.tokens[req]).float()
            elif req.kind == "hessian":
                out[req] = (self.acc[req], self.tokens[req])
            elif req.kind == "hessian_quantized":
                out[req] = (*self.acc[req], self.tokens[req])
            else:
                out[req] = self.acc[req]
        return Stats(out, empty=empty)


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

    def __init__(self, gm: fx.GraphModule, requests: Sequence[StatRequest], routed_only: bool = True,
                 run_to_end: bool = False):
        super().__init__(gm)
        self.by_node = _by_node(gm, requests)
        self.accumulator = Accumulator(requests)
        self.routed_only = routed_only
        self.run_to_end = run_to_end  # run every batch through the whole graph and keep its outputs
        self._pending: set[str] = set()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        reqs = self.by_node.get(n.name)
        if reqs:
            rows = routed_rows(n, self.env.__getitem__) if self.routed_only else None
            for req in reqs:
                self.accumulator.update(req, out, rows)
            self._pending.discard(n.name)
            if not self._pending and not self.run_to_end:
                raise _AllSeen
        return out

    def collect(self, batches: Sequence[tuple[torch.Tensor, ...]]) -> Stats:
        if not batches:
            raise CalibrationError("no calibration batches")
        outputs = []
        with torch.no_grad():
            for j, args in enumerate(batches):
                self.accumulator.batch_index = global_batch_index(j)
                self._pending = set(self.by_node)
                try:
                    outputs.append(self.run(*args))
                except _AllSeen:
                    pass
        stats = self.accumulator.finish()
        if self.run_to_end:
            stats.outputs = outputs
        return stats


class _Resumable(fx.Interpreter):
    """One batch's run of the graph that can stop after any node and continue later."""

    def __init__(self, gm: fx.GraphModule, args: tuple[torch.Tensor, ...]):
        super().__init__(gm, garbage_collect_values=True)
        self.env = {}
        self.args_iter = iter(args)
        self.order = list(gm.graph.nodes)
        self.pos = 0

    def advance(self, targets: set[str], on_value: Any) -> None:
        """Run nodes until every name in `targets` has been computed, handing each (node, value, env) to
        `on_value`."""
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
                on_value(node, self.env[node], self.env)
                pending.discard(node.name)
            for dead in self.user_to_last_uses.get(node, []):
                del self.env[dead]
        if pending:
            raise CalibrationError(
                f"statistics requested for {sorted(pending)}, which this staged run has already passed "
                "(stages must be requested in graph order)"
            )

    def finish(self) -> Any:
        """Run the remaining nodes and return the graph's output (what gm(*args) returns for the graph as it is
        now: every node still to run reads the weights the passes have set)."""
        self.advance(set(), lambda *_: None)  # (only re-reads the weights; pending is empty)
        result = None
        while self.pos < len(self.order):
            node = self.order[self.pos]
            self.pos += 1
            value = self.run_node(node)
            if node.op == "output":
                result = self.graph.process_outputs(value)  # (as Interpreter.run and gm(*args) return it)
                break
            self.env[node] = value
            for dead in self.user_to_last_uses.get(node, []):
                del self.env[dead]
        self.env.clear()
        return result


class StagedCollector:
    """Statistics for passes that change the graph between stages (GPTQ's true-sequential order): each batch
    runs once through the graph, stopping after the nodes of each stage, so stage k costs only the nodes
    between stage k−1 and stage k, and sees every weight the pass changed before it."""

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, ...]], routed_only: bool = True):
        if not batches:
            raise CalibrationError("no calibration batches")
        self.gm = gm
        self.batches = batches
        self.runs = [_Resumable(gm, args) for args in batches]
        self.routed_only = routed_only

    def collect(self, requests: Sequence[StatRequest]) -> Stats:
        by_node = _by_node(self.gm, requests)
        acc = Accumulator(requests)

        def on_value(node: fx.Node, value: Any, env: dict[fx.Node, Any]) -> None:
            rows = routed_rows(node, env.__getitem__) if self.routed_only else None
            for req in by_node[node.name]:
                acc.update(req, value, rows)

        with torch.no_grad():
            for j, run in enumerate(self.runs):
                acc.batch_index = global_batch_index(j)
                run.advance(set(by_node), on_value)
        return acc.finish()

    def divide_value(self, node: str, divisor: torch.Tensor, moved: set[str]) -> bool:
        """Divide the paused runs' value of `node` by `divisor` (along its last axis), after a pass rewrote the graph
        so that `node` now computes value / divisor and every node in `moved` computes something else too (AWQ's
        scales: a norm or producer divided, its consumers multiplied). Exact only if no run holds a value of `moved`
        besides `node`: then nothing is changed and False is returned (call `restart`). A run not yet at `node`
        computes it from the rewritten graph when it gets there."""
        for run in self.runs:
            if any(n.name in moved and n.name != node for n in run.env):
                return False
        for run in self.runs:
            held = next((n for n in run.env if n.name == node), None)
            if held is not None:
                value = run.env[held]
                run.env[held] = (value.float() / divisor.float()).to(value.dtype)
        return True

    def restart(self) -> None:
        """Every run back to the start: it reads the graph as it is now."""
        self.runs = [_Resumable(self.gm, args) for args in self.batches]

    def outputs(self) -> list[Any]:
        """Every batch's run finished: the graph's outputs for the graph as the pass left it (one per batch) —
        the block's calibration outputs without running the block again."""
        with torch.no_grad():
            return [run.finish() for run in self.runs]


def routed_rows(node: fx.Node, value_of: Any) -> torch.Tensor | None:
    """For an expert-input marker (qc::routed), the mask of tokens routed to that expert; otherwise None."""
    if node.op == "call_function" and node.target is ROUTED and isinstance(node.args[1], fx.Node):
        return value_of(node.args[1]) != 0
    return None


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
    """Statistics on disk keyed by (graph code, graph tensors, calibration digest, requests).

    An entry is `<key>.safetensors` (the tensors) and `<key>.json` (which request each tensor belongs to, and the
    numbers that are not tensors): data only, nothing that runs code when read, so a shared cache folder is safe.
    An entry that cannot be read, or does not answer the requests exactly, is a miss (with a warning), never an
    error: the statistics are then collected again and the entry rewritten."""

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
        tensors_file, index_file = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if not tensors_file.is_file() and not index_file.is_file():
            self.misses += 1
            return None
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
            tensors = load_file(str(tensors_file))
            if not isinstance(index, dict) or index.get("key") != key:
                raise ValueError("the entry was written for another key")
            entries = index["requests"]
            values = {req: _decode_stat(req, entries[repr(req)], tensors) for req in requests}
        except Exception as e:  # noqa: BLE001 (any damage to a cache entry is a miss: the statistics are recomputed)
            logger.warning("qcompile: ignoring damaged stats-cache entry '%s' (%s); collecting again",
                           tensors_file, " ".join(str(e).split())[:160])
            self.misses += 1
            return None
        self.hits += 1
        return Stats(values)

    def store(self, key: str, stats: Stats) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        entries = {repr(req): _encode_stat(req, v, str(i), tensors) for i, (req, v) in enumerate(stats.values.items())}
        # atomic: a crash never leaves a truncated entry (the index, which makes it a hit, is renamed last)
        tmp = self.root / f".{key}.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.root / f"{key}.safetensors")
        tmp_index = self.root / f".{key}.json.tmp"
        tmp_index.write_text(json.dumps({"key": key, "version": CACHE_VERSION, "requests": entries}, allow_nan=False))
        tmp_index.replace(self.root / f"{key}.json")


def _encode_stat(req: StatRequest, value: Any, slot: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One statistic as tensors (added to `tensors` as "<slot>.<part>") and a JSON entry."""
    entry: dict[str, Any] = {"kind": req.kind, "slot": slot}
    if isinstance(value, Hist):
        parts, entry["upper"] = {"counts": value.counts}, value.upper
    elif req.kind == "hessian":
        parts, entry["tokens"] = {"h": value[0]}, int(value[1])
    elif req.kind == "hessian_quantized":
        parts, entry["tokens"] = {"h": value[0], "cross": value[1]}, int(value[2])
    elif isinstance(value, tuple):  # (min, max)
        parts = {"lo": value[0], "hi": value[1]}
    else:
        parts = {"value": value}
    tensors.update({f"{slot}.{k}": v for k, v in parts.items()})
    return entry


def _decode_stat(req: StatRequest, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """The statistic `_encode_stat` wrote for `req` (KeyError / ValueError / TypeError when the entry does not fit)."""
    if entry["kind"] != req.kind:
        raise ValueError(f"the entry for {req.node} holds a '{entry['kind']}' statistic, not '{req.kind}'")
    slot = str(entry["slot"])
    if req.kind == "histogram":
        return Hist(tensors[f"{slot}.counts"].double(), float(entry["upper"]))
    if req.kind == "hessian":
        return (tensors[f"{slot}.h"], int(entry["tokens"]))
    if req.kind == "hessian_quantized":
        return (tensors[f"{slot}.h"], tensors[f"{slot}.cross"], int(entry["tokens"]))
    if req.kind in ("minmax", "minmax_head_dim"):
        return (tensors[f"{slot}.lo"], tensors[f"{slot}.hi"])
    return tensors[f"{slot}.value"]


def collect_stats(
    gm: fx.GraphModule,
    requests: Sequence[StatRequest],
    batches: Sequence[tuple[torch.Tensor, ...]],
    cache: StatsCache | None = None,
    calib_digest: str | None = None,
    staged: StagedCollector | None = None,
    routed_only: bool = True,
    outputs: bool = False,
) -> Stats:
    """Fill `requests` by running `batches` through `gm` (or through `staged`, continuing its runs), or read
    them from `cache`. `outputs`: run every batch through the whole graph and keep the graph's outputs in
    `Stats.outputs` (None when the statistics came from the cache or a staged run: no full run happened).

    An expert's inputs (qc::routed markers) are measured over the tokens routed to that expert
    (`routed_only`); an expert that no calibration token reached is measured over all tokens instead, and
    named in `Stats.all_token_fallback`, rather than left with empty statistics. Any other request that saw
    no data is an error."""
    if not requests and not outputs:
        return Stats()
    requests = list(dict.fromkeys(requests))
    key = None
    if cache is not None and requests:
        # (statistics of a forward under bf16 autocast, calib/precision.py, are not those of a float32 one)
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        key = cache.key(gm, requests, (calib_digest or digest_tensors([t for b in batches for t in b]))
                        + f"|routed_only={routed_only}" + (f"|autocast={autocast}" if autocast is not None else ""))
        hit = cache.load(key, requests)
        if hit is not None:
            return hit
    if staged is not None:
        staged.routed_only = routed_only
        stats = staged.collect(requests)
    else:
        stats = StatCollector(gm, requests, routed_only, run_to_end=outputs).collect(batches)
    if stats.empty:
        nodes = {n.name: n for n in gm.graph.nodes}
        unreached = sorted({r.node for r in stats.empty if nodes[r.node].target is not ROUTED})
        if unreached:
            raise CalibrationError(f"no calibration data reached nodes {unreached}")
        # the graph as it is now (a staged pass may have changed earlier weights): the same values the staged
        # run saw, all tokens counted
        fallback = StatCollector(gm, stats.empty, routed_only=False).collect(batches)
        stats.values.update(fallback.values)
        stats.all_token_fallback = sorted({r.node for r in stats.empty})
        stats.empty = []
    if cache is not None and key is not None:
        cache.store(key, stats)
    return stats
