"""The plan of a run, resolved and checked once before anything is read: the target, the pass pipeline (the
default one is the table below), and the scheme as it will be stored.

The default pipeline, read top to bottom: a row whose condition holds adds its pass; a step takes its first
matching row only. `qcompile quant --dry-run` prints this table with the rows that fired.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompiler.errors import PipelineError, SchemeError
from qcompiler.kernels.cpu import fp32_matmul_precision
from qcompiler.pm.base import Pass
from qcompiler.pm.pipeline import format_pipeline, make_pass
from qcompiler.schemes import QuantScheme, with_grid
from qcompiler.targets import get_target
from qcompiler.targets.base import Target

ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq", "flatquant")


def dynamic_int8_acts(scheme: QuantScheme) -> bool:
    """Every quantized activation of the scheme (its overrides too) is int8 per token, on integer weights in channels
    or groups, and nothing is 2:4 sparse: act_quant may then go before GPTQ (it needs no statistics, and GPTQ fits
    each weight on its input before the rounding), whose staged runs give the final block's outputs."""
    all_ = scheme.all_schemes()
    acts = [s.activations for s in all_ if s.activations is not None]
    return (bool(acts) and all(a.dynamic and not a.is_float and a.bits == 8 for a in acts)
            and all(s.weights is not None and not s.weights.is_float and s.weights.granularity != "tensor"
                    for s in all_ if s.activations is not None)
            and not any(s.sparsity for s in all_))


@dataclass(frozen=True)
class Traits:
    """What the default pipeline asks of a scheme (over its per-layer overrides too), the algorithm and the target."""

    algo: str
    quantizes_weights: bool  # (w16a16s: 2:4-sparse float weights)
    four_bit_weights: bool
    quantizes_acts: bool
    four_bit_acts: bool
    smooths: bool  # static activation grids, or 8-bit weights under dynamic ones
    rotates_static: bool  # static int8 activations, dense weights, no KV cache, on a target that rotates them
    # every quantized activation is int8 per token, on integer weights in channels or groups, dense: act_quant may go
    # before GPTQ (it needs no statistics), whose staged runs then give the final block's outputs
    dynamic_int8_acts: bool
    sparse: bool
    kv_cache: bool
    online_rotation: bool  # the target's formats hold an online Hadamard transform
    head_bits: int | None  # the target's format stores the output projection quantized (Target.head_bits)

    @classmethod
    def of(cls, scheme: QuantScheme, target: Target, algo: str, options: dict[str, str] | None = None,
           rotation: bool = True) -> Traits:
        """`rotation`: False where the model does not admit the residual rotation (the driver's fallback)."""
        all_ = scheme.all_schemes()
        acts = [s.activations for s in all_ if s.activations is not None]
        return cls(
            algo=algo,
            quantizes_weights=any(s.weights is not None for s in all_),
            four_bit_weights=scheme.weight_bits == 4,
            quantizes_acts=any(s.activations is not None for s in all_),
            four_bit_acts=any(s.activations is not None and s.activations.bits == 4 for s in all_),
            # SmoothQuant moves activation outliers into the weights: right for static activation grids and 8-bit
            # weights, wrong for int4 weights under per-token activations (w4a8 on the demo: 202 ppl smoothed)
            smooths=any(s.activations is not None and (not s.activations.dynamic or (s.weights is not None
                                                                                      and s.weights.bits == 8))
                        for s in all_),
            rotates_static=(rotation and target.rotates_static_activations and bool(acts)
                            and all(not a.dynamic and a.bits == 8 and not a.is_float for a in acts)
                            and not any(s.sparsity for s in all_) and scheme.kv_cache is None),
            dynamic_int8_acts=dynamic_int8_acts(scheme),
            sparse=any(s.sparsity for s in all_),
            kv_cache=scheme.kv_cache is not None,
            online_rotation=target.online_rotation,
            head_bits=None if options is None else target.head_bits(options),  # (no options: no model head)
        )


def staged_awq(t: Traits) -> bool:
    """AWQ quantizes the weights in its own stages (awq_rtn / awq_gptq): dense weights, and for GPTQ no int8 per-token
    activations (act_quant goes before GPTQ there, which AWQ's groups on the unfused graph do not see through)."""
    return (t.algo.startswith("awq") and t.quantizes_weights and not t.sparse
            and not (t.algo == "awq+gptq" and t.dynamic_int8_acts))


def staged_smoothquant(t: Traits) -> bool:
    """SmoothQuant goes inside the weight pass's stages (sq_rtn, sq_gptq): --algo rtn or gptq where SmoothQuant is the
    default smoother and act_quant may go before the weights (int8 per-token activations on int8 weights), so that the
    stages' finished runs are the block's outputs."""
    return t.algo in ("rtn", "gptq") and t.smooths and t.dynamic_int8_acts and t.quantizes_weights


@dataclass(frozen=True)
class Row:
    step: str
    when: str  # the condition, in words (printed by --dry-run)
    applies: Callable[[Traits], bool]
    make: Callable[[Traits], tuple[str, dict[str, Any]]]  # (pass name, options)


def _always(_: Traits) -> bool:
    return True


DEFAULT_PIPELINE: tuple[Row, ...] = (
    # QuaRot: a 4-bit activation grid needs rotations, smoothing cannot save it
    Row("outliers", "4-bit activations", lambda t: t.four_bit_acts,
        # (with --algo flatquant too: flatquant could fold the online Hadamard into its transform on ascend, but only
        # where the width has Hadamard Kronecker factors, which the plan cannot know before reading the model)
        lambda t: ("rotate", {} if t.online_rotation else {"online": False})),
    # QuaRot before one static scale per tensor: the rotation spreads every outlier channel over all channels
    # (demo static w8a8: +8.2 % against +93 % smoothed); where the model admits no rotation, the driver re-plans
    # without this row (SmoothQuant)
    Row("outliers", "static int8 activations on the reference target, where the model admits the rotation",
        lambda t: t.rotates_static, lambda t: ("rotate", {})),
    Row("outliers", "static activations, or int8 weights under dynamic ones (under int8 per-token "
        "activations with --algo rtn or gptq: inside the weights' stages, sq_rtn / sq_gptq below)",
        lambda t: t.smooths and not staged_smoothquant(t),
        lambda t: ("smoothquant", {})),  # (α searched per input, o_proj / down_proj smoothed from their producers)
    # (AWQ on dense weights quantizes in its own stages: each group searched with the layers before it quantized, and
    # the block's outputs from the same runs, one block forward fewer; 2:4 weights are pruned first, and int8 per-token
    # activations go before GPTQ, so those keep awq, ..., gptq)
    Row("scales", "--algo awq, dense weights: scales and round-to-nearest weights (activation-aware clip), stage by "
        "stage", lambda t: t.algo == "awq" and staged_awq(t), lambda t: ("awq_rtn", {})),
    Row("scales", "--algo awq+gptq, dense weights without int8 per-token activations: scales and GPTQ weights, stage "
        "by stage", lambda t: t.algo == "awq+gptq" and staged_awq(t), lambda t: ("awq_gptq", {})),
    Row("scales", "--algo awq or awq+gptq", lambda t: t.algo.startswith("awq"), lambda t: ("awq", {})),
    Row("fusion", "always (the target decides whether linears sharing an input fuse)", _always,
        lambda t: ("fuse_linears", {})),
    # (FlatQuant after QuaRot: demo w4a4 +34 % against QuaRot + GPTQ's +90 %, at 7.5× the time; the three rows of
    # --algo flatquant are docs/kv-rotation-sparsity.md's run 9 pipeline)
    Row("transforms", "--algo flatquant (4-bit activations): learned Kronecker transforms and clip ratios per layer "
        "input, fitted to each block's output", lambda t: t.algo == "flatquant", lambda t: ("flatquant", {})),
    Row("sparsity", "2:4 scheme with --algo gptq or awq+gptq (prunes and quantizes in one sweep)",
        lambda t: t.sparse and t.algo.endswith("gptq"), lambda t: ("sparsegpt", {})),
    Row("sparsity", "2:4 scheme", lambda t: t.sparse, lambda t: ("prune_wanda", {})),
    # int8 per-token activations before GPTQ: its staged runs then compute the final block's outputs, which saves the
    # extra forward of every block that act_quant after it costs (demo w8a8_dynamic SmoothQuant + GPTQ: docs/benchmarks.md)
    Row("activations", "int8 per-token activations with --algo gptq or awq+gptq, or smoothed inside the weights' stages "
        "(before the weights: the staged runs then give the block's outputs)",
        lambda t: t.dynamic_int8_acts and (t.algo.endswith("gptq") or staged_smoothquant(t)),
        lambda t: ("act_quant", {})),
    # (min-max: on the signed int4 grid the peak sits exactly on −8, and MSE-searched clipping, which shrinks it,
    # measured worse on held-out perplexity: demo g64 +29.1 % vs +20.7 %, per channel +134 % vs +94 %)
    Row("weights", "--algo rtn with int8 per-token activations on int8 weights: SmoothQuant's scales and RTN weights, "
        "stage by stage", lambda t: t.algo == "rtn" and staged_smoothquant(t), lambda t: ("sq_rtn", {})),
    Row("weights", "--algo rtn", lambda t: t.quantizes_weights and t.algo == "rtn", lambda t: ("rtn", {})),
    Row("weights", "--algo awq with 2:4 sparsity (activation-aware clipping, after pruning)",
        lambda t: t.quantizes_weights and t.algo == "awq" and t.sparse, lambda t: ("rtn", {"clip": "awq"})),
    # (SmoothQuant's statistics measured in GPTQ's paused runs: one block forward fewer, docs/benchmarks.md)
    Row("weights", "--algo gptq with int8 per-token activations on int8 weights: SmoothQuant's scales and GPTQ's "
        "weights, stage by stage", lambda t: t.algo == "gptq" and staged_smoothquant(t), lambda t: ("sq_gptq", {})),
    Row("weights", "--algo flatquant: GPTQ fitted to the transformed, quantized inputs the layer will read",
        lambda t: t.quantizes_weights and t.algo == "flatquant", lambda t: ("gptq", {"quantized_input": True})),
    Row("weights", "--algo gptq or awq+gptq", lambda t: t.quantizes_weights and t.algo != "awq" and not staged_awq(t),
        lambda t: ("gptq", {})),
    Row("grids", "--algo flatquant: weight scales and clip ratios tuned on the block's output, codes fixed",
        lambda t: t.algo == "flatquant", lambda t: ("tune_grids", {})),
    Row("activations", "the scheme quantizes activations (rotated static grids: MSE-fitted, +8.2 % vs +9.4 % min-max)",
        lambda t: t.quantizes_acts, lambda t: ("act_quant", {"observer": "mse"} if t.rotates_static else {})),
    Row("kv cache", "the scheme quantizes the KV cache", lambda t: t.kv_cache, lambda t: ("kv_quant", {})),
    Row("head", "the target stores a quantized head (onnxruntime: lm_head_bits, default 8)",
        lambda t: t.head_bits is not None, lambda t: ("quantize_head", {"bits": t.head_bits})),
    Row("lowering", "always", _always, lambda t: ("lower", {})),
)


def default_rows(scheme: QuantScheme, target: Target, algo: str = "rtn", options: dict[str, str] | None = None,
                 rotation: bool = True) -> list[Row]:
    """The rows of DEFAULT_PIPELINE that fire for this scheme, target, algorithm and target options (the first
    per step)."""
    if algo not in ALGORITHMS:
        raise PipelineError(f"unknown algorithm '{algo}'; use one of {', '.join(ALGORITHMS)}")
    traits = Traits.of(scheme, target, algo, options, rotation)
    if algo == "flatquant" and not (traits.four_bit_acts and traits.quantizes_weights):
        raise PipelineError(f"--algo flatquant learns transforms for int4 per-token activations on int4 weights "
                            f"(w4a4); scheme '{scheme.name}' has none: use --algo gptq")
    fired: list[Row] = []
    for row in DEFAULT_PIPELINE:
        if row.applies(traits) and not any(f.step == row.step for f in fired):
            fired.append(row)
    return fired


def default_pipeline(scheme: QuantScheme, target: Target, algo: str = "rtn", options: dict[str, str] | None = None,
                     rotation: bool = True) -> list[Pass]:
    traits = Traits.of(scheme, target, algo, options, rotation)
    return [make_pass(*row.make(traits)) for row in default_rows(scheme, target, algo, options, rotation)]


def complete_pipeline(passes: Sequence[Pass], scheme: QuantScheme, target: Target | None = None,
                      options: dict[str, str] | None = None) -> list[Pass]:
    """A user pipeline gets `act_quant` (if the scheme quantizes activations: before GPTQ for int8 per-token
    activations, else at the end), `kv_quant` (if it quantizes the KV cache), `quantize_head` (if the target's format
    stores a quantized head) and `lower` appended."""
    out = list(passes)
    names = [p.name for p in out]
    if "lower" in names and names[-1] != "lower":
        raise PipelineError("'lower' must be the last pass of a pipeline")
    if any(s.activations is not None for s in scheme.all_schemes()) and "act_quant" not in names:
        # (before GPTQ where the default pipeline puts it: int8 per-token activations, see dynamic_int8_acts)
        gptq = [i for i, name in enumerate(names) if name in ("gptq", "sq_gptq", "sq_rtn")]
        at = gptq[0] if gptq and dynamic_int8_acts(scheme) else len(out) - (1 if "lower" in names else 0)
        out.insert(at, make_pass("act_quant", {}))
    if scheme.kv_cache is not None and "kv_quant" not in names:
        out.insert(len(out) - (1 if "lower" in names else 0), make_pass("kv_quant", {}))
    head = target.head_bits(options) if target is not None and options is not None else None
    if head is not None and "quantize_head" not in names:
        out.insert(len(out) - (1 if "lower" in names else 0), make_pass("quantize_head", {"bits": head}))
    if "lower" not in names:
        out.append(make_pass("lower", {}))
    return out


def stored_scheme(scheme: QuantScheme, passes: Sequence[Pass]) -> QuantScheme:
    """The scheme a pipeline stores: weight passes' grid options (rtn/gptq bits, group_size, symmetric) replace the
    scheme's weight grid (per-layer overrides keep their own), so what targets check and exports state is what
    the tensors hold. Two weight passes asking for different grids are refused."""
    grids = {tuple(sorted(p.weight_grid().items())): p for p in passes if p.weight_grid()}
    if len(grids) > 1:
        raise PipelineError("the pipeline's weight passes ask for different grids ("
                            + "; ".join(p.spec() for p in grids.values()) + "); set bits / group size once")
    if not grids or scheme.weights is None:
        return scheme
    options = dict(next(iter(grids)))
    weights = with_grid(scheme.weights, options.get("bits"), options.get("group_size"), options.get("symmetric"))
    return dataclasses.replace(scheme, weights=weights)


@dataclass(frozen=True)
class RunPlan:
    """What a run will do: the target, the pipeline, and the scheme as it will be stored (stored_scheme)."""

    target: Target
    passes: list[Pass]
    scheme: QuantScheme
    rotation_fallback: bool = False  # its rotation is the default's: re-plan with SmoothQuant if the model refuses it

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)


def plan_run(cfg: Any, imported: bool = False, rotation: bool = True) -> RunPlan:
    """Resolve the target and the pipeline of `cfg` (a QuantizeConfig) and refuse, before any work, what the target
    or its formats cannot hold. `imported`: an ONNX graph (no model head for the target's head option to apply to).
    `rotation`: False re-plans a default pipeline without the rotation before static activations (the driver, for a
    model the rotation does not admit)."""
    target = get_target(cfg.target)
    groups = getattr(cfg, "timestep_groups", 1)
    if groups < 1:
        raise SchemeError(f"--timestep-groups {groups}: give 1 (one grid for every step) or more")
    if groups > 1 and target.name != "reference":
        raise SchemeError(f"--timestep-groups {groups}: target '{target.name}' writes formats that hold one "
                          "activation grid per layer; use --target reference (our artefact switches them by timestep)")
    if groups > 1 and (cfg.scheme.activations is None or cfg.scheme.activations.dynamic):
        raise SchemeError(f"--timestep-groups {groups}: scheme '{cfg.scheme.name}' has no static activation grid to "
                          "fit per group of steps (w8a8 has)")
    options = None if imported else cfg.target_options
    passes = (complete_pipeline(cfg.passes, cfg.scheme, target, options) if cfg.passes is not None
              else default_pipeline(cfg.scheme, target, cfg.algo, options, rotation))
    scheme = stored_scheme(cfg.scheme, passes)
    target.check(scheme, cfg.target_options)
    # (flatquant folds rotate's online Hadamard into its own transform, which a learned-transform format holds)
    absorbs = target.learned_transforms and any(p.name == "flatquant" and getattr(p, "absorb_hadamard", False)
                                                for p in passes)
    if not target.online_rotation and not absorbs and any(getattr(p, "online", False) for p in passes):
        raise PipelineError(f"target '{target.name}': its formats have no online Hadamard transform before a linear; "
                            "use rotate{online=false} (the residual rotation alone is all in the weights)")
    transform_reason = target.learned_transform_reason(scheme)
    if transform_reason is not None and any(p.name == "flatquant" for p in passes):
        raise PipelineError(f"target '{target.name}': {transform_reason}")
    # (the default's rotation before static activations gives way to SmoothQuant where the model does not admit it)
    fallback = (cfg.passes is None and not imported
                and Traits.of(cfg.scheme, target, cfg.algo, options, rotation).rotates_static)
    return RunPlan(target, passes, scheme, rotation_fallback=fallback)


def description_head(cfg: Any, plan: RunPlan) -> dict[str, Any]:
    """The fields every artefact description starts with (HF and ONNX paths alike)."""
    return {
        "scheme": plan.scheme.to_dict(),
        "target": plan.target.name,
        "target_options": dict(cfg.target_options),
        "pipeline": plan.pipeline,
        "source_model": str(Path(cfg.model).absolute()),
        # how float32 GEMMs ran (qcompiler.kernels.cpu.fast_fp32_matmul): "bf16" = oneDNN's float32-class bf16 path
        "fp32_matmul": fp32_matmul_precision(),
    }


def describe_plan(cfg: Any, plan: RunPlan) -> list[str]:
    """`qcompile quant --dry-run`: the plan in words — scheme, target and what loads its output, the pipeline (the
    default table with the rows that fired), and which other targets would refuse this scheme and why."""
    from qcompiler.targets import registered_targets

    lines = [f"model:    {cfg.model} (not read)", f"scheme:   {plan.scheme.describe()} (as stored)",
             f"target:   {plan.target.name}: {plan.target.description}"]
    lines += [f"  can write: {c}" for c in plan.target.consumers(plan.scheme)] or ["  can write: our artefact only"]
    lines.append(f"pipeline: {plan.pipeline}")
    if cfg.passes is None:
        fired = {id(r) for r in default_rows(cfg.scheme, plan.target, cfg.algo, cfg.target_options)}
        lines.append("  default pipeline (step | when | pass; * = taken for this run):")
        traits = Traits.of(cfg.scheme, plan.target, cfg.algo, cfg.target_options)
        for row in DEFAULT_PIPELINE:
            name, options = row.make(traits)
            spec = name + ("{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}" if options else "")
            lines.append(f"  {'*' if id(row) in fired else ' '} {row.step:<12} {row.when:<72} {spec}")
    else:
        lines.append("  (your pipeline; act_quant / kv_quant / quantize_head / lower added where the scheme or target needs "
                     "them)")
    others = []
    for name, make in registered_targets().items():
        if name == plan.target.name:
            continue
        reason = make().unsupported_reason(plan.scheme)
        others.append(f"  {name}: " + ("runs it" if reason is None else f"refuses: {reason}"))
    return lines + ["other targets:"] + others
