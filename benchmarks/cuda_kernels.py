"""The cuda target's linears — every kernel each `qc::` op can run on — beside torch's half-precision `F.linear`
on the same shape, in one run, as ratios; the dispatch table (kernels/cuda/table.py) is chosen from these rows.

Shapes: Llama-3-8B's (4096 → 4096, 4096 → 14336, 14336 → 4096) and Qwen2.5-7B's (3584 → 18944) layers at M = 1, 16,
128, 2048 tokens. Cases and the kernels timed for each:

    w4a16 g128    qc::linear_woq_tinygemm   tinygemm (layout made at load time, untimed) | triton | dequant_mm
    w8a16         qc::linear_woq            triton | dequant_mm
    w8a8 dynamic  qc::linear_w8a8           int_mm (M > 16) | triton      (activations quantized by one Triton launch)
    fp8 dynamic   qc::linear_fp8            scaled_mm | triton
    w4a8 g128     qc::linear_int_dynamic    triton

Each timed call is also checked against the oracle (kernels/reference.py, float32 on the same device): rel. error
below 2⁻⁶ (bf16 output and one rounding of ŵ or of the activations, ≤ 2⁻⁸ each, times a margin) or the row is
marked not ok and never chosen. Timing: median of CUDA-event timings with the L2 cache flushed before each call
(weights do not stay cached between calls, as in a model's forward); F.linear gets the same treatment.

Also on a GPU: a self-check (the Triton activation quantizer bit-equal to torch's on the device; tinygemm against
its pure-torch arithmetic) and a decode loop — a Llama of the demo model's shape (SmolLM2-135M: 30 layers, 576
wide, random bf16 weights) generating 64 tokens greedily with transformers' own cache, its decoder linears on the
cuda target's `qc::` ops (w4a16 g64, w8a8 dynamic, fp8 dynamic) against the bf16 model, in tokens/s.

    python benchmarks/cuda_kernels.py --jsonl rows.jsonl --out table.md   (a CUDA GPU)
    python benchmarks/cuda_kernels.py --quick                             (any device: shapes / 8, M ≤ 128; on the
                                                                           CPU a smoke run of the oracle-equal paths)
    python benchmarks/cuda_kernels.py --table-from rows.jsonl             (writes kernels/cuda/measured_table.json)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LAYERS = {"llama3-8b qkv/o": (4096, 4096), "llama3-8b gate/up": (4096, 14336), "llama3-8b down": (14336, 4096),
          "qwen2.5-7b gate/up": (3584, 18944)}
TOKENS = (1, 16, 128, 2048)
CASE_OP = {"w4a16 g128": "linear_woq_tinygemm", "w8a16": "linear_woq", "w8a8 dynamic": "linear_w8a8",
           "fp8 dynamic": "linear_fp8", "w4a8 g128": "linear_int_dynamic"}
REL_ERR_OK = 2.0**-6
_FLUSH: dict[str, torch.Tensor] = {}


def timed_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2, graph: bool = False) -> float:
    """Median milliseconds of `fn` after `warmup` calls (CUDA events with the L2 flushed before each call on a
    GPU, the wall clock elsewhere). graph=True: `fn` captured once in a CUDA graph and each replay timed — the
    GPU's time alone, as a serving engine's graphs run it (no Python or launch gaps between its kernels)."""
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # (warm-up off the default stream, as graph capture wants)
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        call = fn
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            call = g.replay
        flush = _FLUSH.setdefault("l2", torch.empty(256 * 2**20, dtype=torch.int8, device=device))
    else:
        for _ in range(warmup):
            fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def quantized_weights(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """One float weight [N, K] (CPU) in every stored form the cases read: int4 codes packed with g-group scales
    (w4, s4; w4i8 the same codes unpacked), int8 per channel (w8, s8), e4m3 per channel (wf8, sf8)."""
    from qcompiler import numerics as nm
    from qcompiler.kernels.packing import store_weight_codes
    from qcompiler.schemes import QuantArgs

    groups = QuantArgs(bits=4, granularity="group", group_size=group_size)
    s4, _ = nm.weight_qparams(w, groups)
    q4 = nm.quantize_weight(w, s4, None, groups)
    a8 = QuantArgs(bits=8)
    s8, _ = nm.weight_qparams(w, a8)
    s_fp8 = (w.abs().amax(dim=1) / 448.0).clamp_min(1e-12)
    return {"w": w, "w4": store_weight_codes(q4, 4, True), "s4": s4.float(), "w4i8": q4.to(torch.int8),
            "w8": nm.quantize_weight(w, s8, None, a8).to(torch.int8), "s8": s8.reshape(-1).float(),
            "wf8": (w / s_fp8[:, None]).to(torch.float8_e4m3fn), "sf8": s_fp8}


def operands(k: int, n: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A random layer's weights quantized for every case (on `device`)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5  # (quantized on the CPU: the packing helpers make CPU tensors)
    return {key: v.to(device) for key, v in quantized_weights(w, 128).items()}


def candidates(case: str, ops: dict[str, Any], x: torch.Tensor, k: int) -> dict[str, tuple[Callable[[], Any],
                                                                                        Callable[[], Any]]]:
    """kernel → (the call on that kernel, the oracle's call) for one case."""
    from qcompiler.kernels.cuda import triton_linear

    d, gpu = ops, x.device.type == "cuda"
    xf = x.float()
    if not gpu and not triton_linear.INTERPRETING:  # (on the CPU, Triton runs only under its interpreter)
        return {kern: calls for kern, calls in _candidates(case, d, x, xf, k, gpu).items() if kern != "triton"}
    return _candidates(case, d, x, xf, k, gpu)


def _candidates(case: str, d: dict[str, Any], x: torch.Tensor, xf: torch.Tensor, k: int, gpu: bool
                ) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    from qcompiler.kernels import library_gemm, reference
    from qcompiler.kernels.cuda import dispatch, triton_linear

    if case == "w4a16 g128":
        oracle = lambda: reference.linear_woq(xf, d["w4"], d["s4"], None, None, 4, 128, k)  # noqa: E731
        out = {"triton": lambda: triton_linear.linear_woq(x, d["w4"], d["s4"], None, None, 4, 128, k),
               "dequant_mm": lambda: dispatch.linear_woq_cuda(x, d["w4"], d["s4"], None, None, 4, 128, k, "dequant_mm")}
        if gpu and x.dtype == torch.bfloat16:
            from qcompiler.kernels.cuda.tinygemm import run_tinygemm, tinygemm_weight

            tg = tinygemm_weight(d["w4"], d["s4"], None, 128, k)
            out["tinygemm"] = lambda: run_tinygemm(x, tg.packed, tg.scales_and_zeros, None, tg.kernel_group, tg.k_pad)
        return {kern: (run, oracle) for kern, run in out.items()}
    if case == "w8a16":
        oracle = lambda: reference.linear_woq(xf, d["w8"], d["s8"][:, None], None, None, 8, k, k)  # noqa: E731
        return {"triton": (lambda: triton_linear.linear_woq(x, d["w8"], d["s8"][:, None], None, None, 8, k, k), oracle),
                "dequant_mm": (lambda: dispatch.linear_woq_cuda(x, d["w8"], d["s8"][:, None], None, None, 8, k, k,
                                                                "dequant_mm"), oracle)}
    if case == "w8a8 dynamic":
        oracle = lambda: reference.linear_w8a8(xf, d["w8"], d["s8"], None, None, None)  # noqa: E731
        out = {"triton": lambda: triton_linear.linear_w8a8(x, d["w8"], d["s8"], None, None, None)}
        if x.shape[0] > 16:
            out["int_mm"] = lambda: library_gemm.linear_w8a8_int_mm(
                x, d["w8"], d["s8"], None, None, None, quantize=dispatch.prologue("quantize_act_w8a8"))
        return {kern: (run, oracle) for kern, run in out.items()}
    if case == "fp8 dynamic":
        oracle = lambda: reference.linear_fp8(xf, d["wf8"], d["sf8"], None, None)  # noqa: E731
        out = {"triton": lambda: triton_linear.linear_fp8(x, d["wf8"], d["sf8"], None, None)}
        if gpu:
            out["scaled_mm"] = lambda: library_gemm.linear_fp8_scaled_mm(
                x, d["wf8"], d["sf8"], None, None, out_dtype=x.dtype, quantize=dispatch.prologue("quantize_act_fp8"))
        return {kern: (run, oracle) for kern, run in out.items()}
    if case == "w4a8 g128":
        oracle = lambda: reference.linear_int_dynamic(xf, d["w4i8"], d["s4"], None, 8, 128)  # noqa: E731
        return {"triton": (lambda: triton_linear.linear_int_dynamic(x, d["w4i8"], d["s4"], None, 8, 128), oracle)}
    raise ValueError(case)


def measure(name: str, m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, reps: int,
            cases: list[str]) -> list[dict]:
    import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)

    ops = operands(k, n, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    wd = ops["w"].to(dtype)
    gpu = device.type == "cuda"
    baseline = timed_ms(lambda: torch.nn.functional.linear(x, wd), device, reps, graph=gpu)
    baseline_eager = timed_ms(lambda: torch.nn.functional.linear(x, wd), device, reps) if gpu else baseline
    rows = []
    for case in cases:
        for kernel, (run, oracle) in candidates(case, ops, x, k).items():
            row = {"layer": name, "case": case, "op": CASE_OP[case], "kernel": kernel, "m": m, "k": k, "n": n,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "f_linear_ms": round(baseline, 4), "f_linear_eager_ms": round(baseline_eager, 4)}
            try:
                got, want = run().float(), oracle().float()
                err = float((got - want).norm() / want.norm())
                row.update(rel_err_vs_oracle=err, ok=err < REL_ERR_OK)
                eager = timed_ms(run, device, reps)
                ms = timed_ms(run, device, reps, graph=gpu) if gpu else eager
                row.update(ms=round(ms, 4), speedup_vs_f_linear=round(baseline / ms, 3), eager_ms=round(eager, 4),
                           eager_speedup=round(baseline_eager / eager, 3))
            except Exception as e:  # (one kernel failing must not cost the other rows of a GPU lease)
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
    return rows


def self_check(device: torch.device) -> list[dict]:
    """On the device: the Triton quantizer bit-equal to torch's quantizers; tinygemm within bf16 of its
    pure-torch arithmetic."""
    from qcompiler.kernels import reference
    from qcompiler.kernels.cuda import triton_linear
    from qcompiler.kernels.cuda.tinygemm import reference_tinygemm, tinygemm_weight
    from qcompiler.kernels.packing import int4pack_operands

    x = (torch.randn(64, 4096, generator=torch.Generator().manual_seed(2)) * 3).to(device)
    rows = []
    for xs, xz in [(None, None), (torch.tensor(0.02, device=device), torch.tensor(-7.0, device=device))]:
        mode = "static" if xs is not None else "dynamic"
        q, s = triton_linear.quantize_act_w8a8(x, xs, xz)
        q8, s8 = triton_linear.quantize_act_fp8(x, xs)
        # the oracle on the CPU and on this GPU (torch's CUDA division by a Python number multiplies by its
        # reciprocal: the dynamic scale absmax / 127 can differ from the CPU's in the last bit)
        for where in ("cpu", "cuda"):
            xo = x.to(where)
            xso, xzo = (xs.to(where), xz.to(where)) if xs is not None else (None, None)
            q_ref, s_ref = reference.quantize_act_w8a8(xo, xso, xzo)
            q8_ref, s8_ref = reference.quantize_act_fp8(xo, xso)
            rows.append({"check": f"int8 quantizer {mode} bit-equal to the oracle on {where}",
                         "ok": bool(torch.equal(q.cpu(), q_ref.cpu()) and torch.equal(s.cpu(), s_ref.cpu())),
                         "codes_differing": int((q.cpu() != q_ref.cpu()).sum())})
            rows.append({"check": f"e4m3 quantizer {mode} bit-equal to the oracle on {where}",
                         "ok": bool(torch.equal(q8.float().cpu(), q8_ref.float().cpu())
                                    and torch.equal(s8.cpu(), s8_ref.cpu())),
                         "codes_differing": int((q8.float().cpu() != q8_ref.float().cpu()).sum())})
    ops = operands(4096, 1024, device)
    xb = x[:8].bfloat16()
    tg = tinygemm_weight(ops["w4"], ops["s4"], None, 128, 4096)
    got = torch.ops.aten._weight_int4pack_mm(xb, tg.packed, tg.kernel_group, tg.scales_and_zeros).float()
    u, table, group, _ = int4pack_operands(ops["w4"], ops["s4"], None, 128, 4096)
    want = reference_tinygemm(xb, u, table, group).float()
    err = float((got - want).norm() / want.norm())
    rows.append({"check": "tinygemm vs reference_tinygemm", "rel_err": err, "ok": err < 2.0**-7})
    return rows


def static_cache_decode(m: torch.nn.Module, ids: torch.Tensor, new_tokens: int, graph: bool = True, loops: int = 3
                        ) -> tuple[float, list[int]]:
    """Greedy decode of `new_tokens` after `ids` [1, L], one step (a token against transformers' static cache)
    captured in a CUDA graph and replayed per token, the greedy choice made outside the graph — how serving
    engines run decode. graph=False runs the same steps eagerly (how the CPU tests check the loop). Returns the
    best tokens/s over `loops` loops and the last loop's tokens."""
    from transformers import StaticCache

    device = ids.device
    length = ids.shape[1]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        cache = StaticCache(config=m.config, max_cache_len=length + new_tokens + 8)
        out = m(input_ids=ids, past_key_values=cache, cache_position=torch.arange(length, device=device))
        first = out.logits[:, -1:].argmax(-1)
        tok, pos = first.clone(), torch.tensor([length], device=device)

        def rewind() -> None:
            # (newer transformers' static layers count their own length and ignore cache_position: every step,
            # warm-up and replay included, advances it, so it is set back in place before each loop — without
            # this the H200 run indexed past the cache)
            tok.copy_(first)
            pos.fill_(length)
            for layer in getattr(cache, "layers", []):
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                    layer.cumulative_length.fill_(length)

        def step() -> torch.Tensor:
            return m(input_ids=tok, past_key_values=cache, cache_position=pos).logits

        replay: Callable[[], torch.Tensor] = step
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                logits = step()

            def replay() -> torch.Tensor:
                g.replay()
                return logits

        best, tokens = math.inf, []
        for _ in range(loops):
            rewind()
            sync()
            tokens = []
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                tok.copy_(replay()[:, -1:].argmax(-1))
                pos.add_(1)
                tokens.append(tok.clone())  # (one tiny copy per token, read after the loop)
            sync()
            best = min(best, time.perf_counter() - t0)
    return new_tokens / best, [int(t) for t in tokens]


def decode_loop(device: torch.device, new_tokens: int = 64, graph: bool = False) -> list[dict]:
    """tokens/s of greedy generation (batch 1, 32-token prompt) by a demo-shaped Llama: bf16 against its decoder
    linears on the cuda target's qc:: ops (RTN weights; speed is what is measured here, not quality)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.kernels.cuda.tinygemm import tinygemm_weight

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192)

    class QcLinear(torch.nn.Module):
        def __init__(self, w_device: torch.Tensor, scheme: str):
            super().__init__()
            self.scheme = scheme
            w = w_device.float().cpu()
            forms = {key: v.to(device) for key, v in quantized_weights(w, 64).items()}
            if scheme == "w4a16 g64":
                self.q, self.s = forms["w4"], forms["s4"]
                self.tg = tinygemm_weight(self.q, self.s, None, 64, w.shape[1])
            elif scheme == "w8a8 dynamic":
                self.q, self.s = forms["w8"], forms["s8"]
            else:  # fp8 dynamic
                self.q, self.s = forms["wf8"], forms["sf8"]
            self.k = w.shape[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            qc = torch.ops.qc
            if self.scheme == "w4a16 g64":
                t = self.tg
                return qc.linear_woq_tinygemm(x, t.packed, t.scales_and_zeros, self.q, self.s, None, None, 64, self.k,
                                              t.kernel_group, t.k_pad)
            if self.scheme == "w8a8 dynamic":
                return qc.linear_w8a8(x, self.q, self.s, None, None, None)
            return qc.linear_fp8(x, self.q, self.s, None, None)

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def tokens_per_s(m: torch.nn.Module) -> float:
        kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        with torch.inference_mode():
            m.generate(ids, **kw)  # (warm-up: compiles and tunes the kernels)
            sync()
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                m.generate(ids, **kw)
                sync()
                best = min(best, time.perf_counter() - t0)
        return new_tokens / best

    def graph_tokens_per_s(m: torch.nn.Module) -> float:
        return static_cache_decode(m, ids, new_tokens)[0]

    def both(label: str, m: torch.nn.Module, float_rates: tuple[float, float] | None) -> list[dict]:
        out = []
        modes = (("eager generate", tokens_per_s), ("CUDA graph", graph_tokens_per_s))
        for mode, rate in modes if graph else modes[:1]:
            try:
                tps = rate(m)
                base = float_rates[0 if mode == "eager generate" else 1] if float_rates else tps
                out.append({"decode": f"{label}, {mode}", "tokens_per_s": round(tps, 1),
                            "vs_float": round(tps / base, 3) if base else None})
            except Exception as e:  # (a failing mode must not cost the other rows of a GPU lease)
                out.append({"decode": f"{label}, {mode}", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        return out

    rows = both("bf16 (transformers)", model, None)
    float_rates = (rows[0].get("tokens_per_s", 0.0), rows[-1].get("tokens_per_s", 0.0))
    originals = {name: mod for name, mod in model.model.layers.named_modules() if isinstance(mod, torch.nn.Linear)}
    for scheme in ("w4a16 g64", "w8a8 dynamic", "fp8 dynamic"):
        try:
            for name, lin in originals.items():
                model.model.layers.set_submodule(name, QcLinear(lin.weight.data, scheme))
            rows += both(f"{scheme} (qc:: ops)", model, float_rates)
        except Exception as e:
            rows.append({"decode": f"{scheme} (qc:: ops)", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            for name, lin in originals.items():
                model.model.layers.set_submodule(name, lin)
    return rows


def bucket_of(m: int) -> int:
    from qcompiler.kernels.cuda.table import bucket

    return bucket(m)


def table_from(rows: list[dict]) -> dict[str, Any]:
    """Per op and M bucket, the kernel with the best geometric-mean time over the layer shapes, among the kernels
    that were correct (ok) on every shape of that bucket."""
    from qcompiler.kernels.cuda.table import M_BUCKETS

    timed = [r for r in rows if "ms" in r or "error" in r]
    ops: dict[str, list[str]] = {}
    for op in sorted({r["op"] for r in timed}):
        per_bucket = []
        for b in range(len(M_BUCKETS) + 1):
            mine = [r for r in timed if r["op"] == op and bucket_of(r["m"]) == b]
            shapes = {(r["layer"], r["m"]) for r in mine}
            score = {}
            for kernel in {r["kernel"] for r in mine}:
                rs = [r for r in mine if r["kernel"] == kernel and r.get("ok")]
                if len({(r["layer"], r["m"]) for r in rs}) == len(shapes):
                    score[kernel] = sum(math.log(r["ms"]) for r in rs) / len(rs)
            if not score:
                break
            per_bucket.append(min(score, key=lambda kern: score[kern]))
        if len(per_bucket) == len(M_BUCKETS) + 1:
            ops[op] = per_bucket
    device = next((r["device"] for r in timed), "?")
    return {"device": device, "ops": ops}


def summary(rows: list[dict]) -> str:
    """The README's table: per case and M, the dispatched kernel's speed against F.linear over the four layer
    shapes (min–max; CUDA-graph replay, then called eagerly from Python)."""
    from qcompiler.kernels.cuda.table import refusal

    kernel_rows = [r for r in rows if "case" in r and "ms" in r]
    table = table_from(kernel_rows)
    lines = [f"| {table['device']}: × bf16 `F.linear` | " + " | ".join(f"M = {m}" for m in TOKENS) + " |",
             "|---|" + "---|" * len(TOKENS)]

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}–{max(values):.2f}×" if values else "–"

    for case, op in CASE_OP.items():
        cells = []
        for m in TOKENS:
            mine = [r for r in kernel_rows if r["case"] == case and r["m"] == m]
            pick = table["ops"].get(op, [None] * 4)[bucket_of(m)]
            chosen = [r for r in mine if r["kernel"] == pick and refusal(pick, m, r["k"], r["n"], torch.bfloat16) is None]
            cells.append(f"{pick} {span([r['speedup_vs_f_linear'] for r in chosen])} "
                         f"(eager {span([r['eager_speedup'] for r in chosen])})" if chosen else "–")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], torch_version: str) -> str:
    kernel_rows = [r for r in rows if "case" in r]
    table = table_from(kernel_rows)
    from qcompiler.kernels.cuda.table import refusal

    lines = [f"{table['device']}, torch {torch_version}; bf16 activations on a GPU; median CUDA-event time with the L2 "
             "flushed before each call; × = F.linear ms / kernel ms (above 1: faster than half precision), each call "
             "replayed from a CUDA graph (eager: called from Python, launch gaps included); **bold** = the kernel the "
             "measured table dispatches to", "",
             "| layer | case | M × K × N | F.linear ms | kernels (× F.linear, rel. error vs oracle) |", "|---|---|---|---:|---|"]
    keys = []
    for r in kernel_rows:
        if (r["layer"], r["case"], r["m"]) not in keys:
            keys.append((r["layer"], r["case"], r["m"]))
    for layer, case, m in keys:
        mine = [r for r in kernel_rows if (r["layer"], r["case"], r["m"]) == (layer, case, m)]
        pick = table["ops"].get(mine[0]["op"], [None] * 4)[bucket_of(m)]
        if pick is not None and refusal(pick, m, mine[0]["k"], mine[0]["n"], torch.bfloat16) is not None:
            pick = None
        cells = []
        for r in sorted(mine, key=lambda r: -r.get("speedup_vs_f_linear", 0)):
            text = (f"{r['kernel']} {r['speedup_vs_f_linear']}× (eager {r.get('eager_speedup', '?')}×; "
                    f"{r['rel_err_vs_oracle']:.0e})" if "ms" in r else f"{r['kernel']} failed")
            cells.append(f"**{text}**" if r["kernel"] == pick else text)
        lines.append(f"| {layer} | {case} | {m}×{mine[0]['k']}×{mine[0]['n']} | {mine[0]['f_linear_ms']} | "
                     + ", ".join(cells) + " |")
    decode = [r for r in rows if "decode" in r]
    if decode:
        lines += ["", "| decode loop (demo shape, batch 1, 64 tokens) | tokens/s | × bf16 |", "|---|---:|---:|"]
        lines += [f"| {r['decode']} | {r.get('tokens_per_s', 'failed')} | {r.get('vs_float', r.get('error', ''))} |"
                  for r in decode]
    checks = [r for r in rows if "check" in r]
    if checks:
        lines += ["", "Self-check on the device: " + "; ".join(f"{r['check']}: {'ok' if r['ok'] else 'FAILED'}"
                                                            for r in checks)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shapes / 8 and M ≤ 128 (a smoke run on any device)")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table to this file")
    ap.add_argument("--jsonl", type=Path, default=None, help="also append every row to this file as it is measured")
    ap.add_argument("--cases", nargs="*", default=list(CASE_OP), help="cases to time (default: all)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode loop")
    ap.add_argument("--decode-only", action="store_true", help="only the decode loop")
    ap.add_argument("--decode-graph", action="store_true",
                    help="also decode through a CUDA-graph-captured static-cache step (its first GPU run indexed past "
                         "the static cache, which counts its own length; rewound since, checked on the CPU only)")
    ap.add_argument("--table-from", type=Path, default=None,
                    help="write kernels/cuda/measured_table.json from these JSON lines (no timing)")
    a = ap.parse_args()
    if a.table_from is not None:
        rows = [json.loads(line) for line in a.table_from.read_text().splitlines() if line.strip()]
        table = table_from([r for r in rows if "case" in r])
        table["source"] = f"benchmarks/results/{a.table_from.name}"
        from qcompiler.kernels.cuda.table import MEASURED

        MEASURED.write_text(json.dumps(table, indent=1) + "\n")
        print(json.dumps(table))
        if a.out is not None:
            a.out.write_text(markdown(rows, "(see the rows)") + "\n")
        print(summary(rows))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale, tokens = (8, [t for t in TOKENS if t <= 128]) if a.quick else (1, list(TOKENS))
    rows: list[dict] = []

    def emit(new: list[dict]) -> None:
        for row in new:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.jsonl is not None:
                with a.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    if device.type == "cuda" and not a.decode_only:
        emit(self_check(device))
    for name, (k, n) in ({} if a.decode_only else LAYERS).items():
        for m in tokens:
            emit(measure(name, m, k // scale, n // scale, device, dtype, 5 if a.quick else 20, a.cases))
    if device.type == "cuda" and not a.no_decode:
        emit(decode_loop(device, graph=a.decode_graph))
    text = markdown(rows, torch.__version__)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
