"""The Triton kernels on a real GPU: each `qc::` linear's CUDA implementation against the oracle (run on the CPU in
float64 / float32 as in tests) and its time beside torch's bf16 / fp16 GEMM on the same shape, in one run.

Shapes: a decode-like M = 16 and a prefill-like M = 2048 tokens × the demo model's layer shapes (K = 576 → N = 1536,
K = 1536 → N = 576) and a 4096 × 4096 layer. Prints one JSON line per (kernel, shape), then a markdown table.

    python benchmarks/triton_gpu.py        (needs a CUDA GPU and the `cuda` extra)
"""

from __future__ import annotations

import json

import torch
from cuda_kernels import timed_ms  # (benchmarks/ is the script's folder: sys.path[0])

SHAPES = [(16, 576, 1536), (2048, 576, 1536), (2048, 1536, 576), (16, 4096, 4096), (2048, 4096, 4096)]


def _time(fn, reps: int = 20) -> float:
    """Median milliseconds of `fn` on the GPU (after warm-up)."""
    return timed_ms(fn, torch.device("cuda"), reps, warmup=3)


def measure_shape(m: int, k: int, n: int) -> list[dict]:
    """Every kernel on one shape: error against the oracle and time beside the fp16 GEMM."""
    from qcompiler import numerics as nm
    from qcompiler.kernels import reference
    from qcompiler.kernels.cuda import triton_linear
    from qcompiler.kernels.packing import store_weight_codes
    from qcompiler.schemes import QuantArgs

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    w16, x16, b = w.to(dev, torch.float16), x.to(dev, torch.float16), bias.to(dev)
    t_fp16 = _time(lambda: x16 @ w16.t())
    # weight-only int4 g128 (w4a16)
    args = QuantArgs(bits=4, granularity="group", group_size=128)
    s, z = nm.weight_qparams(w, args)
    qw = store_weight_codes(nm.quantize_weight(w, s, z, args), 4, True)
    qw_d, s_d = qw.to(dev), s.to(dev)
    # int8 × int8 per-token (w8a8_dynamic)
    a8 = QuantArgs(bits=8)
    s8, _ = nm.weight_qparams(w, a8)
    q8 = nm.quantize_weight(w, s8, None, a8).to(torch.int8)
    q8_d, s8_d = q8.to(dev), s8.reshape(-1).to(dev)
    # int4 g128 × int8 per-token (w4a8 groups): the group-scaled GEMM
    ag = QuantArgs(bits=4, granularity="group", group_size=128)
    sg, _ = nm.weight_qparams(w, ag)
    qg = nm.quantize_weight(w, sg, None, ag).to(torch.int8)
    qg_d, sg_d = qg.to(dev), sg.to(dev)
    cases = {
        "linear_woq int4 g128 (fp16 x)": (
            lambda: triton_linear.linear_woq(x16, qw_d, s_d, None, b, 4, 128, k),
            reference.linear_woq(x, qw, s, None, bias, 4, 128, k)),
        "linear_w8a8 dynamic": (
            lambda: triton_linear.linear_w8a8(x16, q8_d, s8_d, None, None, b),
            reference.linear_w8a8(x, q8, s8.reshape(-1), None, None, bias)),
        "linear_int_dynamic w4a8 g128": (
            lambda: triton_linear.linear_int_dynamic(x16, qg_d, sg_d, b, 8, 128),
            reference.linear_int_dynamic(x, qg, sg, bias, 8, 128)),
    }
    rows = []
    for name, (run, want) in cases.items():
        got = run().float().cpu()
        ms = _time(run)
        rows.append({"kernel": name, "m": m, "k": k, "n": n,
                     "rel_err_vs_oracle": float((got - want).norm() / want.norm()), "ms": round(ms, 4),
                     "fp16_matmul_ms": round(t_fp16, 4), "ratio_vs_fp16": round(ms / t_fp16, 2),
                     "gpu": torch.cuda.get_device_name()})
    return rows


def main() -> None:
    rows = []
    for m, k, n in SHAPES:
        for row in measure_shape(m, k, n):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{rows[0]['gpu']}, torch {torch.__version__}; median of 20 after warm-up; fp16 = torch x16 @ w16ᵀ")
    print()
    print("| kernel | M × K × N | rel. error vs oracle | ms | fp16 GEMM ms | × fp16 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['m']}×{r['k']}×{r['n']} | {r['rel_err_vs_oracle']:.1e} | {r['ms']} | "
              f"{r['fp16_matmul_ms']} | {r['ratio_vs_fp16']} |")


if __name__ == "__main__":
    main()
