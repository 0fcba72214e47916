"""The README's main command, timed: what a newcomer waits for and sees.

    python benchmarks/main_command.py              # w4a16 GPTQ g64 on the demo model, then `qcompile eval`
    python benchmarks/main_command.py --scheme w8a8_dynamic --algo auto --group-size 0

Runs `qcompile quant --model demo --scheme w4a16 --algo gptq --group-size 64 --out <tmp>` and `qcompile eval <tmp>`
as fresh processes (the demo model already converted from its GGUF, a one-time step timed apart), the eval with
the float perplexity computed (a fresh machine's first run) rather than read from the cache, and both with a cache
folder of their own (only the converted demo model in it), so the calibration text is encoded as on a first run.
Reported: wall seconds of each command, perplexities, and where the quantization's time went (run.json's
phase_seconds); with --ieee-too the same commands again with plain IEEE float32 GEMMs (`qcompile --ieee-fp32`), with
--bf16-forwards-too with `--calib-precision bfloat16`, for the ratios in one run. This machine's speed varies by 2x
from day to day, so the time is also given as a ratio to one float perplexity pass over the
same evaluation text, measured in the same run: a figure that travels between machines and days.
JSON lines on stdout; the Markdown table goes to benchmarks/results/main-command-latest.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "main-command-latest.txt"


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def run_command(args: argparse.Namespace, ieee: bool, bf16_forwards: bool = False) -> tuple[dict, dict]:
    """The quant command and the eval command as fresh processes: (row, run.json)."""
    precision = ["--calib-precision", "bfloat16"] if bf16_forwards else []
    qcompile = [sys.executable, "-m", "qcompiler.cli", *(["--ieee-fp32"] if ieee else [])]
    from qcompiler.demo import demo_model_dir

    with tempfile.TemporaryDirectory(prefix="qc-main-") as tmp:
        out = Path(tmp) / "out"
        # a cache folder of its own with only the converted demo model in it: the run is a first run, with the
        # calibration text's token ids encoded, not read from calib-tokens/
        cache = Path(tmp) / "cache"
        (cache / "qcompiler").mkdir(parents=True)
        (cache / "qcompiler" / demo_model_dir().name).symlink_to(demo_model_dir(), target_is_directory=True)
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        quant_cmd = [*qcompile, "quant", "--model", "demo", "--scheme", args.scheme, "--algo", args.algo,
                     "--group-size", args.group_size, *precision, "--out", str(out), "--no-progress"]
        quant_s, _ = _timed(quant_cmd, env)
        run = json.loads((out / "run.json").read_text())
        eval_s, stdout = _timed([*qcompile, "eval", str(out), "--json", "--no-float-cache"], env)
        result = json.loads(stdout)
    f, q = result["float"], result["quantized"]
    row = {
        "command": f"qcompile {'--ieee-fp32 ' if ieee else ''}quant --model demo --scheme {args.scheme} --algo "
                   f"{args.algo} --group-size {args.group_size} {' '.join(precision) + ' ' if precision else ''}"
                   "--out out/ && qcompile eval out/",
        "calibration_forwards": "bfloat16" if bf16_forwards else "float32",
        "fp32_matmul": "ieee" if ieee else "default (bf16 units where the CPU has them)",
        "quant_s": round(quant_s, 1), "eval_s": round(eval_s, 1), "total_s": round(quant_s + eval_s, 1),
        "total_float_cached_s": round(quant_s + eval_s - f["seconds"], 1),
        "float_ppl_pass_s": round(f["seconds"], 1),
        "total_in_float_passes": round((quant_s + eval_s) / f["seconds"], 2),
        "quant_in_float_passes": round(quant_s / f["seconds"], 2),
        "ppl_float": round(f["perplexity"], 3), "ppl_quantized": round(q["perplexity"], 3),
        "delta_pct": round(100 * (q["perplexity"] / f["perplexity"] - 1), 2),
        "phase_seconds": run["phase_seconds"], "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20, 1),
    }
    return row, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="w4a16")
    ap.add_argument("--algo", default="gptq")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--ieee-too", action="store_true",
                    help="also time the same commands with --ieee-fp32 (plain float32 GEMMs), in the same run")
    ap.add_argument("--bf16-forwards-too", action="store_true",
                    help="also time the commands with --calib-precision bfloat16 (calibration forwards in bf16)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from qcompiler.demo import demo_model_dir

    demo_model_dir()  # (converts the GGUF once; every later run reads the converted folder)
    convert_s = time.perf_counter() - t0
    row, run = run_command(args, ieee=False)
    row["demo_conversion_s"] = round(convert_s, 1)
    rows = [row]
    if args.ieee_too:
        rows.append(run_command(args, ieee=True)[0])
        print(json.dumps(rows[-1]))
    if args.bf16_forwards_too:
        rows.append(run_command(args, ieee=False, bf16_forwards=True)[0])
        print(json.dumps(rows[-1]))
    print(json.dumps(row))
    lines = [
        f"`{row['command']}` — one run, {time.strftime('%Y-%m-%d')}",
        "",
        "| quant s | eval s (float + quantized) | total s | total, float ppl cached | float ppl pass s "
        "| total / float pass | Δ ppl | peak RSS MB | float32 GEMMs | calibration forwards |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *(f"| {r['quant_s']} | {r['eval_s']} | {r['total_s']} | {r['total_float_cached_s']} "
          f"| {r['float_ppl_pass_s']} | {r['total_in_float_passes']}× | {r['delta_pct']:+.2f} % | {r['peak_rss_mb']} "
          f"| {r['fp32_matmul']} | {r['calibration_forwards']} |" for r in rows),
        "",
        "Where the quantization's time went (run.json phase_seconds):",
        "",
        "| phase | s | share |",
        "|---|---:|---:|",
    ]
    total = sum(run["phase_seconds"].values())
    for phase, s in sorted(run["phase_seconds"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {phase} | {s:.1f} | {100 * s / total:.0f} % |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
