"""The cuda target's linears as the lowered graph calls them — `torch.ops.qc.*`, each call dispatched by
kernels/cuda/table.py — beside torch's half-precision `F.linear` on the same shape, in one run, as ratios.

Shapes: Llama-3-8B's (4096 → 4096, 4096 → 14336, 14336 → 4096) and Qwen2.5-7B's (3584 → 18944) layers at M = 1, 16,
128, 2048 tokens. Ops: w4a16 (int4 g128 weight-only: as stored, and on a GPU with the tinygemm layout the cuda
runtime gives it at load time), w8a16, w8a8 (int8 × int8, per-token activations), fp8 (e4m3 × e4m3, per-token
activations). Each row also checks the result against the oracle (kernels/reference.py).

    python benchmarks/cuda_kernels.py            (a CUDA GPU: bf16 activations, CUDA-event timing)
    python benchmarks/cuda_kernels.py --quick    (any device: shapes / 8, M ≤ 128; on the CPU the baseline is
                                                  float32 F.linear and the ops run their CPU kernels — a smoke run)

JSON lines on stdout, then a Markdown table; with --out FILE the table is also written there.
Not included yet: the decode loop of the lowered demo model against the float one (tokens/s).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LAYERS = {"llama3-8b qkv/o": (4096, 4096), "llama3-8b gate/up": (4096, 14336), "llama3-8b down": (14336, 4096),
          "qwen2.5-7b gate/up": (3584, 18944)}
TOKENS = (1, 16, 128, 2048)


def timed_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn` after `warmup` calls (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def operands(k: int, n: int, seed: int = 0) -> dict[str, Any]:
    """A random layer's weights quantized for every op (CPU tensors)."""
    from qcompiler import numerics as nm
    from qcompiler.kernels.packing import store_weight_codes
    from qcompiler.schemes import QuantArgs

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    g128 = QuantArgs(bits=4, granularity="group", group_size=128)
    s4, _ = nm.weight_qparams(w, g128)
    a8 = QuantArgs(bits=8)
    s8, _ = nm.weight_qparams(w, a8)
    s_fp8 = (w.abs().amax(dim=1) / 448.0).clamp_min(1e-12)
    return {"w": w, "w4": store_weight_codes(nm.quantize_weight(w, s4, None, g128), 4, True), "s4": s4,
            "w8": nm.quantize_weight(w, s8, None, a8).to(torch.int8), "s8": s8.reshape(-1),
            "wf8": (w / s_fp8[:, None]).to(torch.float8_e4m3fn), "sf8": s_fp8}


def measure(name: str, m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
    from qcompiler.kernels import reference
    from qcompiler.kernels.cuda.table import choose

    ops = operands(k, n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    xd, wd = x.to(device, dtype), ops["w"].to(device, dtype)
    d = {key: v.to(device) for key, v in ops.items()}
    baseline = timed_ms(lambda: torch.nn.functional.linear(xd, wd), device, reps)
    qc = torch.ops.qc
    cases = {
        "w4a16 g128": ("linear_woq", lambda: qc.linear_woq(xd, d["w4"], d["s4"], None, None, 4, 128, k),
                       lambda: reference.linear_woq(x, ops["w4"], ops["s4"], None, None, 4, 128, k)),
        "w8a16": ("linear_woq", lambda: qc.linear_woq(xd, d["w8"], d["s8"][:, None], None, None, 8, k, k),
                  lambda: reference.linear_woq(x, ops["w8"], ops["s8"][:, None], None, None, 8, k, k)),
        "w8a8 dynamic": ("linear_w8a8", lambda: qc.linear_w8a8(xd, d["w8"], d["s8"], None, None, None),
                         lambda: reference.linear_w8a8(x, ops["w8"], ops["s8"], None, None, None)),
        "fp8 dynamic": ("linear_fp8", lambda: qc.linear_fp8(xd, d["wf8"], d["sf8"], None, None),
                        lambda: reference.linear_fp8(x, ops["wf8"], ops["sf8"], None, None)),
    }
    if device.type == "cuda":  # the layout runtime/cuda_prepack.py makes once at load time (not timed)
        from qcompiler.kernels.cuda.tinygemm import tinygemm_weight

        tg = tinygemm_weight(d["w4"], d["s4"], None, 128, k)
        cases["w4a16 g128 tinygemm layout"] = (
            "linear_woq_tinygemm",
            lambda: qc.linear_woq_tinygemm(xd, tg.packed, tg.scales_and_zeros, d["w4"], d["s4"], None, None, 128, k,
                                           tg.kernel_group, tg.k_pad),
            cases["w4a16 g128"][2])
    rows = []
    for op_name, (op, run, oracle) in cases.items():
        got, want = run().float().cpu(), oracle()
        ms = timed_ms(run, device, reps)
        rows.append({"layer": name, "op": op_name, "m": m, "k": k, "n": n, "device": str(device),
                     "kernel": choose(op, m, k, n, dtype).kernel if device.type == "cuda" else "cpu",
                     "rel_err_vs_oracle": float((got - want).norm() / want.norm()), "ms": round(ms, 4),
                     "f_linear_ms": round(baseline, 4), "speedup_vs_f_linear": round(baseline / ms, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shapes / 8 and M ≤ 128 (a smoke run on any device)")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table to this file")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale, tokens = (8, [t for t in TOKENS if t <= 128]) if a.quick else (1, list(TOKENS))
    rows = []
    for name, (k, n) in LAYERS.items():
        for m in tokens:
            for row in measure(name, m, k // scale, n // scale, device, dtype, reps=5 if a.quick else 20):
                rows.append(row)
                print(json.dumps(row), flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"{where}, torch {torch.__version__}, {dtype} activations; median of {5 if a.quick else 20} after "
             "warm-up; speedup = F.linear ms / op ms", "",
             "| layer | op | M × K × N | kernel | rel. error vs oracle | ms | F.linear ms | speedup |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['op']} | {r['m']}×{r['k']}×{r['n']} | {r['kernel']} | {r['rel_err_vs_oracle']:.1e} "
              f"| {r['ms']} | {r['f_linear_ms']} | {r['speedup_vs_f_linear']} |" for r in rows]
    print("\n".join(lines))
    if a.out is not None:
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
