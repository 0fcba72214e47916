"""The bf16 scores of the clip search and of AWQ's scale search against float32 ones, on the demo model's own layers.

GPTQ's default grid fit (clip="awq") scores 21 clip ratios per group by δ·H_JJ·δᵀ; for per-channel grids that is an
N·K² product per candidate, most of an 8-bit GPTQ's own arithmetic. Groups of ≥ 256 columns score in bfloat16 where
the CPU multiplies it in hardware (qcompiler/algorithms/awq.py). This script captures the (weight, Hessian) pairs
GPTQ hands the search in the first blocks of a w8a8_dynamic SmoothQuant + GPTQ run of the demo, then, on the same
pairs and alternating the two in one process:
  - the search's time with float32 scores and with bf16 scores (best of --repeats);
  - the chosen grids' exact error Σ δ·H·δᵀ (float64) with bf16 scores relative to float32's, and the share of rows
    whose ratio is the same.
With --awq, the same for AWQ's scale search (every candidate s scored by the Gram ⟨H, ΔᵀΔ⟩, in bf16 on such CPUs):
the groups of the first blocks of a w4a16 g64 AWQ run, the share of groups with the same α, and the chosen scales'
exact error (float64) with bf16 scores relative to float32's. Prints JSON lines.

    python benchmarks/clip_search.py [--blocks 6] [--repeats 3] [--awq] [--cli-gemms]

--cli-gemms runs everything with float32 GEMMs as `qcompile` runs them (through the CPU's bf16 units where it has
them, kernels/cpu.fast_fp32_matmul), so the float32 scores are timed at the speed a run gets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import qcompiler.algorithms.awq as awq
import qcompiler.algorithms.gptq as gptq
from qcompiler.numerics import fake_quant_weight
from qcompiler.schemes import QuantArgs


class _Captured(Exception):
    pass


def capture(blocks: int) -> list[tuple[torch.Tensor, torch.Tensor, QuantArgs]]:
    """(w, H, args) of every clip search GPTQ runs in the first `blocks` blocks (8 calibration windows)."""
    from qcompiler.demo import demo_model_dir
    from qcompiler.driver import QuantizeConfig, quantize
    from qcompiler.pm.pipeline import parse_pipeline
    from qcompiler.schemes import get_scheme

    cases: list[tuple[torch.Tensor, torch.Tensor, QuantArgs]] = []
    search = awq.activation_aware_clip
    per_block = 4  # (q/k/v fused, o, gate/up fused, down)

    def record(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, **kw: object) -> torch.Tensor:
        cases.append((w.clone(), h.clone(), args))
        if len(cases) >= blocks * per_block:
            raise _Captured
        return search(w, h, args, **kw)  # type: ignore[arg-type]

    gptq.activation_aware_clip = record  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = QuantizeConfig(model=demo_model_dir(), scheme=get_scheme("w8a8_dynamic"), out=Path(d) / "out",
                                 algo="gptq", progress=False, num_samples=8,
                                 passes=parse_pipeline("smoothquant,fuse_linears,gptq,act_quant,lower"))
            try:
                quantize(cfg, log=lambda s: None)
            except _Captured:
                pass
    finally:
        gptq.activation_aware_clip = search  # type: ignore[assignment]
    return cases


AWQCase = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, QuantArgs]


def capture_awq(blocks: int) -> list[AWQCase]:
    """(weights, mean |x|, H, args) of every scale search AWQ runs in the first `blocks` blocks (8 windows)."""
    from qcompiler.demo import demo_model_dir
    from qcompiler.driver import QuantizeConfig, quantize
    from qcompiler.passes.smoothing import awq as awq_pass
    from qcompiler.schemes import get_scheme

    cases: list[AWQCase] = []
    search = awq_pass.awq_search_scales
    per_block = 3  # (q/k/v, gate/up, up->down; v->o is skipped on the demo's GQA attention)

    def record(ws: list[torch.Tensor], x_mean: torch.Tensor, h: torch.Tensor, args: QuantArgs, **kw: object
               ) -> awq.AWQResult:
        cases.append(([w.clone() for w in ws], x_mean.clone(), h.clone(), args))
        if len(cases) >= blocks * per_block:
            raise _Captured
        return search(ws, x_mean, h, args, **kw)  # type: ignore[arg-type]

    awq_pass.awq_search_scales = record  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = QuantizeConfig(model=demo_model_dir(), scheme=get_scheme("w4a16", group_size=64),
                                 out=Path(d) / "out", algo="awq", progress=False, num_samples=8)
            try:
                quantize(cfg, log=lambda s: None)
            except _Captured:
                pass
    finally:
        awq_pass.awq_search_scales = search  # type: ignore[assignment]
    return cases


def awq_exact_error(case: AWQCase, scales: torch.Tensor) -> float:
    ws, _, h, args = case
    hd = h.double()
    total = 0.0
    for w in ws:
        d = (w - fake_quant_weight(w * scales, args) / scales).double()
        total += float(((d @ hd) * d).sum())
    return total


def main_awq(blocks: int, repeats: int) -> None:
    from qcompiler.cpu_features import native_bf16

    cases = capture_awq(blocks)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    picks: dict[str, list[awq.AWQResult]] = {}
    for _ in range(repeats):
        for name, on in (("float32", False), ("bfloat16", True)):
            t0 = time.perf_counter()
            picks[name] = [awq.awq_search_scales(ws, xm, h, args, bf16=on) for ws, xm, h, args in cases]
            times[name].append(time.perf_counter() - t0)
    err32 = sum(awq_exact_error(c, r.scales) for c, r in zip(cases, picks["float32"], strict=True))
    err16 = sum(awq_exact_error(c, r.scales) for c, r in zip(cases, picks["bfloat16"], strict=True))
    same = sum(a.alpha == b.alpha for a, b in zip(picks["float32"], picks["bfloat16"], strict=True))
    score_err = max(abs(b.loss_unscaled / a.loss_unscaled - 1)
                    for a, b in zip(picks["float32"], picks["bfloat16"], strict=True))
    print(json.dumps({
        "search": "awq scales", "groups": len(cases), "shapes": sorted({tuple(w.shape) for c in cases for w in c[0]}),
        "native_bf16": native_bf16(), "float32_s": round(min(times["float32"]), 3),
        "bfloat16_s": round(min(times["bfloat16"]), 3), "speedup": round(min(times["float32"]) / min(times["bfloat16"]), 2),
        "error_excess_rel": float(f"{err16 / err32 - 1:.3g}"), "same_alpha_groups": round(same / len(cases), 4),
        "max_score_rel_error_at_s1": float(f"{score_err:.3g}"),
    }))


def exact_error(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, ratio: torch.Tensor) -> float:
    d = (w - fake_quant_weight(w, args, ratio)).double()
    return float(((d @ h.double()) * d).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--awq", action="store_true", help="AWQ's scale search instead of the clip search")
    ap.add_argument("--cli-gemms", action="store_true", help="float32 GEMMs as qcompile runs them")
    a = ap.parse_args()
    from qcompiler.kernels.cpu import fast_fp32_matmul

    with fast_fp32_matmul(a.cli_gemms) as gemms:
        print(json.dumps({"float32_gemms": gemms}))
        if a.awq:
            main_awq(a.blocks, a.repeats)
        else:
            main_clip(a.blocks, a.repeats)


def main_clip(blocks: int, repeats: int) -> None:
    from qcompiler.cpu_features import native_bf16

    cases = capture(blocks)
    real = awq.bf16_scores
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    picks: dict[str, list[torch.Tensor]] = {}
    try:
        for _ in range(repeats):
            for name, on in (("float32", False), ("bfloat16", True)):
                awq.bf16_scores = lambda gs, on=on: on  # type: ignore[misc]
                t0 = time.perf_counter()
                picks[name] = [awq.activation_aware_clip(w, h, args) for w, h, args in cases]
                times[name].append(time.perf_counter() - t0)
    finally:
        awq.bf16_scores = real
    err32 = sum(exact_error(w, h, args, r) for (w, h, args), r in zip(cases, picks["float32"], strict=True))
    err16 = sum(exact_error(w, h, args, r) for (w, h, args), r in zip(cases, picks["bfloat16"], strict=True))
    same = sum(int((x == y).sum()) for x, y in zip(picks["float32"], picks["bfloat16"], strict=True))
    rows = sum(x.numel() for x in picks["float32"])
    print(json.dumps({
        "layers": len(cases), "shapes": sorted({tuple(w.shape) for w, _, _ in cases}), "native_bf16": native_bf16(),
        "float32_s": round(min(times["float32"]), 3), "bfloat16_s": round(min(times["bfloat16"]), 3),
        "speedup": round(min(times["float32"]) / min(times["bfloat16"]), 2),
        "error_excess_rel": float(f"{err16 / err32 - 1:.3g}"), "same_ratio_rows": round(same / rows, 5),
    }))


if __name__ == "__main__":
    main()
