"""The pass API.

A pass is a frozen dataclass: its fields are its options (and its CLI syntax `name{field=value,...}`).
It may ask for calibration statistics (`stat_requests`) and then transforms a block graph in `run`,
returning a PassResult. The manager lints the graph after every pass and can dump it before/after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from qcompiler.calib.precision import CalibPrecision, calibration_forward
from qcompiler.calib.stats import StagedCollector, StatRequest, Stats, StatsCache, collect_stats
from qcompiler.schemes import QuantScheme

if TYPE_CHECKING:
    from qcompiler.ir.analysis import LinearInfo
    from qcompiler.targets.base import Target


@dataclass
class PassContext:
    """What a pass may read besides the graph. Nothing here is global; one context per block."""

    block: str  # checkpoint prefix of the block, e.g. "model.layers.3"
    scheme: QuantScheme
    target: Target
    calib: Sequence[tuple[torch.Tensor, ...]] = ()  # flat block inputs, one tuple per batch
    # the float model's inputs of this block, batch for batch as `calib` (which, propagated through the quantized
    # blocks before, carries their error): given when a pass of the pipeline asks (Pass.uses_float_stream)
    float_calib: Sequence[tuple[torch.Tensor, ...]] | None = None
    report: dict[str, Any] = field(default_factory=dict)  # per-pass facts for the user-facing report
    stats_cache: StatsCache | None = None  # statistics on disk, reused when graph + inputs are unchanged
    calib_digest: str | None = None  # digest of `calib` (computed once per block by the driver)
    # MoE: measure every expert's inputs over all calibration tokens instead of the tokens routed to it
    calibrate_all_experts: bool = False
    # The block's outputs on `calib` (one per batch) for the graph as the last pass left it, when that pass ran the
    # whole graph anyway (GPTQ's staged runs); the driver propagates them instead of running the block again.
    # The manager clears them before every pass that may change a value (all but Pass.keeps_values: fusion), so only
    # the outputs of the last pass that computes values survive.
    block_outputs: list[torch.Tensor] | None = None
    # --propagate float: the float block's outputs on `calib`, kept from the first pass's statistics run (the graph
    # is still the float block then; that run goes on to the end when `keep_float_outputs` asks for it), so that the
    # driver does not run the float block again
    keep_float_outputs: bool = False
    # a diffusion transformer's calibration batches by group of sampling steps (--timestep-groups): the act_quant
    # pass fits one static grid per group besides the one over every step (driver/diffusers.py)
    calib_groups: list[list[int]] | None = None
    float_block_outputs: list[torch.Tensor] | None = None
    # seconds the passes spent running calibration data through the block (statistics, staged runs): the rest of a
    # pass's time is its own arithmetic (the driver reports the two apart)
    forward_seconds: float = 0.0
    # Hessians (Σ xᵀx, tokens) of node values as the graph computes them now, published by a pass that measured
    # them and knows how its own rewrite moved them (AWQ: X → X·diag(s)⁻¹ gives H → S⁻¹HS⁻¹), so that a later pass
    # asking for them does not run the calibration data through the block again. The manager drops them after
    # every pass that neither published them nor keeps every node's value (Pass.keeps_values).
    known_hessians: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)
    # Linears whose output channels a pass divided (by module path: [out_features] divisors), compensated exactly
    # downstream (SmoothQuant / FlatQuant folding an input's scale into its producer's rows): the per-layer error
    # report multiplies them back before comparing the layer with the float block's
    output_divisors: dict[str, torch.Tensor] = field(default_factory=dict)
    # The block's outputs on `calib` (one per batch) as the graph computed them just before the pipeline's first
    # weight quantizer: the float block, in the basis the float-exact passes before it left (rotated, transformed).
    # Computed by the manager only when a later pass reads them (Pass.reads_reference_outputs).
    reference_outputs: list[Any] | None = None
    # the precision of the calibration forwards (calib/precision.py): statistics runs, staged runs' outputs and the
    # driver's propagation; a pass's own arithmetic stays float32
    forward_precision: CalibPrecision = "float32"

    def forwards(self) -> contextlib.AbstractContextManager[None]:
        """The context calibration forwards run in (`forward_precision`)."""
        return calibration_forward(self.forward_precision)

    def statistics(
        self, gm: fx.GraphModule, requests: Sequence[StatRequest], staged: StagedCollector | None = None,
        outputs: bool = False,
    ) -> Stats:
        """Run the calibration batches through `gm` (or read the cache) to fill `requests`. Passes that need
        statistics of an intermediate state (GPTQ's sequential stages) call this themselves, with a
        StagedCollector so that each stage continues the previous one's runs."""
        known = {r: self.known_hessians[r.node] for r in requests
                 if staged is None and r.kind == "hessian" and r.node in self.known_hessians}
        t0 = time.perf_counter()
        with self.forwards():
            stats = collect_stats(gm, [r for r in requests if r not in known], self.calib, self.stats_cache,
                                  self.calib_digest, staged, routed_only=not self.calibrate_all_experts,
                                  outputs=outputs)
        self.forward_seconds += time.perf_counter() - t0
        stats.values.update(known)
        if stats.all_token_fallback:
            from qcompiler.ir.analysis import expert_of

            nodes = {n.name: n for n in gm.graph.nodes}
            experts = self.report.setdefault("moe", {}).setdefault("experts_calibrated_on_all_tokens", [])
            for name in stats.all_token_fallback:
                path = expert_of(nodes[name]) or name
                if path not in experts:
                    experts.append(path)
        return stats

    def layer_scheme(self, info: LinearInfo) -> QuantScheme | None:
        """The scheme of one linear (None: kept in float) after the scheme's ignore list and overrides.
        A fused linear takes its first member's (fusion only joins members with equal schemes)."""
        members = info.fused_from or [{"path": info.path, "role": info.role}]
        m = members[0]
        return self.scheme.for_layer(f"{self.block}.{m['path']}" if self.block else m["path"], m["role"])


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, type[Pass]] = {}  # every Pass subclass with a name (the built-ins: qcompiler.passes)


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses set `name`, declare options as fields and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    quantizes_weights: ClassVar[bool] = False  # it writes weight grids (a pipeline without one keeps weights float)
    keeps_values: ClassVar[bool] = False  # every node value the graph computed before, it computes after (fusion)
    # it reads ctx.reference_outputs: the block's outputs before the first weight quantizer (tune_grids)
    reads_reference_outputs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in _REGISTRY and _REGISTRY[cls.name].__qualname__ != cls.__qualname__:
                raise RuntimeError(f"two passes named '{cls.name}'")
            _REGISTRY[cls.name] = cls

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        """Statistics this pass needs, collected on the current graph before `run` (default: none)."""
        return []

    def uses_calibration(self) -> bool:
        """Whether this pass may read calibration data (statistics or ctx.calib). When no pass of a pipeline
        does, the driver propagates only the few windows its error report needs (weight-only RTN is ~2×
        faster). Conservative default: True."""
        return True

    def uses_float_stream(self) -> bool:
        """Whether this pass reads ctx.float_calib: the float model's own inputs of the block (the driver then
        carries them beside the quantized model's, one extra float forward of each block)."""
        return False

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        raise NotImplementedError

    def weight_grid(self) -> dict[str, Any]:
        """The weight grid this pass's options impose on the layers of the run's scheme (bits, group_size,
        symmetric that differ from None); empty for passes whose options only choose how to quantize. The driver
        writes them into the scheme before any target check, so the scheme stated and checked is what is stored."""
        return {}

    def refusal(self, model: torch.nn.Module, blocks: Iterable[tuple[str, fx.GraphModule]]) -> str | None:
        """Why this pass cannot transform `model` (None: it can), decided before anything changes from the model
        and its traced blocks (name, meta graph), which are traced only as far as this reads them. A default
        pipeline uses it to choose between passes (the rotation, else SmoothQuant). Default: None."""
        return None

    def transform_outer(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """Change the weights outside the blocks (embeddings, final norm, head) the way `run` changes every block
        (the residual rotation); the driver calls it on the model before calibration and again when the outer
        weights are read back for writing. Default: nothing."""
        return None

    def spec(self) -> str:
        """This pass in pipeline-string syntax (options that differ from the defaults)."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("internal"):
                continue  # (set by the driver, not an option: e.g. rotate's learned rotation)
            if v != f.default:
                opts.append(f"{f.name}={v}")
        return f"{self.name}{{{','.join(opts)}}}" if opts else self.name
