"""The activation-aware clip search's bf16 scores against float32 ones, on the demo model's own layers.

GPTQ's default grid fit (clip="awq") scores 21 clip ratios per group by δ·H_JJ·δᵀ; for per-channel grids that is an
N·K² product per candidate, most of an 8-bit GPTQ's own arithmetic. Groups of ≥ 256 columns score in bfloat16 where
the CPU multiplies it in hardware (qcompiler/algorithms/awq.py). This script captures the (weight, Hessian) pairs
GPTQ hands the search in the first blocks of a w8a8_dynamic SmoothQuant + GPTQ run of the demo, then, on the same
pairs and alternating the two in one process:
  - the search's time with float32 scores and with bf16 scores (best of --repeats);
  - the chosen grids' exact error Σ δ·H·δᵀ (float64) with bf16 scores relative to float32's, and the share of rows
    whose ratio is the same.
Prints JSON lines.

    python benchmarks/clip_search.py [--blocks 6] [--repeats 3]
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


def exact_error(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, ratio: torch.Tensor) -> float:
    d = (w - fake_quant_weight(w, args, ratio)).double()
    return float(((d @ h.double()) * d).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from qcompiler.cpu_features import native_bf16

    cases = capture(a.blocks)
    real = awq.bf16_scores
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    picks: dict[str, list[torch.Tensor]] = {}
    try:
        for _ in range(a.repeats):
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
