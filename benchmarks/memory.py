"""Memory benchmark: streaming quantization against whole-model loading, on a random-weight Llama checkpoint.

    python benchmarks/memory.py                      # 60 blocks of 2048/5632 (6.3 GB bf16), w4a16 and w8a8
    python benchmarks/memory.py --layers 8 --schemes w8a16      # a quick look
    python benchmarks/memory.py --large              # 30 GB, larger than this machine's RAM; streaming only
    python benchmarks/memory.py --demo               # the demo model (SmolLM2-135M): streamed = not streamed

Each run is a fresh `qcompile quant` process. The streaming run (with --low-memory) gets an RSS budget of a third of the
checkpoint's size, enforced the way a cgroup memory limit would be: a watchdog polls the process every 20 ms
and kills it past the budget (the kernel's high-water mark, VmHWM, in run.json confirms the true peak). The
--no-streaming run (every weight read into memory first, the way whole-model loaders work) runs without a
budget, for comparison. Reported per run: peak RSS, its fixed part (RSS before the first block: imports,
embeddings/head, calibration inputs), the part above it in units of one block's float32 weights, throughput
in GB of checkpoint per second, and whether streaming and whole-model runs wrote identical files (manifest).
JSON lines on stdout; the Markdown table goes to benchmarks/results/memory-latest.txt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qcompiler.synthetic import llama_block_shapes, write_random_llama

GB = 1e9


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(model: Path, out: Path, scheme: str, streaming: bool, budget: int | None,
        extra: list[str] | None = None) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "qcompiler.cli", "quant", "--model", str(model), "--scheme", scheme,
           "--out", str(out), "--no-progress"] + ([] if streaming else ["--no-streaming"]) + (extra or [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    polled_peak = 0
    while proc.poll() is None:
        rss = _rss(proc.pid)
        polled_peak = max(polled_peak, rss)
        if budget is not None and rss > budget:
            proc.kill()
            killed = True
            break
        time.sleep(0.02)
    output = proc.communicate()[0]
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"scheme": scheme, "streaming": streaming, "budget_bytes": budget, "killed": killed,
                              "wall_seconds": round(seconds, 1)}
    if killed or proc.returncode != 0:
        result.update({"ok": False, "peak_rss_bytes": polled_peak, "tail": output[-500:]})
        return result
    info = json.loads((out / "run.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    result.update({
        "ok": True,
        "peak_rss_bytes": info["peak_rss_bytes"],
        "rss_before_blocks_bytes": info["rss_before_blocks_bytes"],
        "quantize_seconds": info["quantize_seconds"],
        "files": {k: v["sha256"] for k, v in manifest.items()},
    })
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--schemes", default="w4a16,w8a8")
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows (for schemes that calibrate)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--budget-fraction", type=float, default=1 / 3, help="streaming RSS budget / checkpoint size")
    p.add_argument("--work", type=Path, default=Path("/tmp/qcompiler-memory-bench"))
    p.add_argument("--large", action="store_true",
                   help="a ~30 GB checkpoint (4096/11008 × 75 blocks): larger than 24 GiB of RAM; streaming only")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint and outputs")
    p.add_argument("--table", type=Path, default=None, help="where the Markdown table goes (default: results/)")
    p.add_argument("--demo", action="store_true", help="quantize the demo model streamed and not; compare files")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.demo:
        demo(a)
        return
    if a.large:
        a.hidden, a.inter, a.layers, a.heads, a.kv_heads, a.schemes = 4096, 11008, 75, 32, 8, "w8a16"
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / f"llama-{a.hidden}-{a.inter}-{a.layers}"
    if not (model / "config.json").is_file():
        t0 = time.perf_counter()
        write_random_llama(model, hidden=a.hidden, inter=a.inter, layers=a.layers, heads=a.heads,
                           kv_heads=a.kv_heads, vocab=a.vocab, shard_bytes=2 << 30)
        print(f"# wrote {model} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    block_params = sum(int(__import__("math").prod(s)) for s in
                       llama_block_shapes(a.hidden, a.inter, a.heads, a.kv_heads).values())
    block_fp32 = 4 * block_params
    budget = int(size * a.budget_fraction)
    rows = []
    for scheme in a.schemes.split(","):
        calib = ["--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len)]
        streamed = run(model, a.work / f"out-{scheme}-stream", scheme, True, budget, [*calib, "--low-memory"])
        whole = None if a.large else run(model, a.work / f"out-{scheme}-whole", scheme, False, None, calib)
        for r in (streamed, whole):
            if r is None:
                continue
            r.update({"checkpoint_bytes": size, "block_fp32_bytes": block_fp32, "blocks": a.layers})
            if r["ok"]:
                r["gb_per_s"] = round(size / GB / r["quantize_seconds"], 3)
                r["blocks_above_fixed"] = round((r["peak_rss_bytes"] - r["rss_before_blocks_bytes"]) / block_fp32, 2)
            if whole is not None and streamed["ok"] and whole["ok"]:
                r["identical_to_other_run"] = streamed["files"] == whole["files"]
            print(json.dumps({k: v for k, v in r.items() if k != "files"}), flush=True)
        rows.append((scheme, streamed, whole))

    lines = [f"Random Llama checkpoint: {a.layers} blocks × ({a.hidden}, {a.inter}), vocab {a.vocab}, bf16, "
             f"calibration {a.num_samples} × {a.seq_len} tokens, "
             f"{size / GB:.2f} GB; one block's float32 weights = {block_fp32 / GB:.3f} GB. Streaming RSS budget: "
             f"{budget / GB:.2f} GB ({a.budget_fraction:.2f} × checkpoint).", "",
             "| scheme | run | peak RSS (GB) | peak / checkpoint | fixed part (GB) | above fixed (blocks) | "
             "GB/s | result |", "|---|---|---|---|---|---|---|---|"]
    for scheme, s, w in rows:
        for label, r in (("streaming, under budget", s), ("whole model (--no-streaming)", w)):
            if r is None:
                continue
            if not r["ok"]:
                lines.append(f"| {scheme} | {label} | >{r['peak_rss_bytes'] / GB:.2f} | | | | | "
                             f"{'killed at the budget' if r['killed'] else 'failed'} |")
                continue
            same = r.get("identical_to_other_run")
            lines.append(
                f"| {scheme} | {label} | {r['peak_rss_bytes'] / GB:.2f} | {r['peak_rss_bytes'] / size:.2f} | "
                f"{r['rss_before_blocks_bytes'] / GB:.2f} | {r['blocks_above_fixed']:.2f} | {r['gb_per_s']:.3f} | "
                + ("files identical to the other run" if same else "" if same is None else "FILES DIFFER") + " |")
    table = "\n".join(lines)
    print(table, file=sys.stderr)
    results = a.table or Path(__file__).parent / "results" / ("memory-large-latest.txt" if a.large else "memory-latest.txt")
    results.write_text(table + "\n")
    if not a.keep:
        for scheme, *_ in rows:
            for kind in ("stream", "whole"):
                shutil.rmtree(a.work / f"out-{scheme}-{kind}", ignore_errors=True)


def demo(a: argparse.Namespace) -> None:
    from qcompiler.demo import resolve_model

    model = resolve_model("demo")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    lines = ["| demo model, w4a16 | peak RSS (GB) | fixed part (GB) | quantize s | files |", "|---|---|---|---|---|"]
    runs = [run(model, a.work / f"demo-{k}", "w4a16", k == "stream", None) for k in ("stream", "whole")]
    same = runs[0]["files"] == runs[1]["files"]
    for label, r in zip(("streaming", "whole model (--no-streaming)"), runs, strict=True):
        r["identical_to_other_run"] = same
        r["checkpoint_bytes"] = size
        print(json.dumps({k: v for k, v in r.items() if k != "files"}), flush=True)
        lines.append(f"| {label} | {r['peak_rss_bytes'] / GB:.2f} | {r['rss_before_blocks_bytes'] / GB:.2f} | "
                     f"{r['quantize_seconds']:.1f} | {'identical' if same else 'DIFFER'} |")
    table = "\n".join(lines)
    print(table, file=sys.stderr)
    (Path(__file__).parent / "results" / "memory-demo-latest.txt").write_text(table + "\n")
    if not a.keep:
        for k in ("stream", "whole"):
            shutil.rmtree(a.work / f"demo-{k}", ignore_errors=True)


if __name__ == "__main__":
    main()
