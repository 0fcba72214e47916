"""ONNX Runtime benchmark on the demo model (SmolLM2-135M-Instruct): our exports beside float32 ONNX,
ONNX Runtime's own quantizers and the onnxruntime-genai model builder, one run, same machine.

Rows
  float32                        the genai builder's fp32 export (GroupQueryAttention graph: the float baseline)
  genai builder int4             `python -m onnxruntime_genai.models.builder -p int4 -e cpu` (RTN, blocks of 32,
                                 int4 head, accuracy_level 4)
  ORT MatMulNBits int4 / int8    `MatMulNBitsQuantizer` (DefaultWeightOnlyQuantConfig, blocks of 32, symmetric,
                                 accuracy_level 4) on the float32 model above (head included)
  ORT quantize_dynamic int8      `quantize_dynamic(weight_type=QInt8[, per_channel=True])` on the float32 model
                                 above (activations: per-tensor dynamic uint8)
  ours ...                       `qcompile quant --target onnxruntime` (default options: accuracy_level 4,
                                 int8 head), calibrated on 32 × 512 tokens of speeches before 1990

Columns: quantization wall time; ONNX files on disk; token-level perplexity through onnxruntime on the
speeches from 1990 on (windows of 512, the same loop for every row); prefill latency (batch 1, 128 tokens);
single-token decode latency after a 128-token prompt (median of 30 steps, session.run with the KV cache);
decode ms/token through onnxruntime-genai's Generator (64 new tokens after the same prompt). This machine is
noisy, so every model is built first and the timings run in interleaved rounds (model A, B, C, … then again),
each figure being the median over rounds. Speed-ups are ratios to float32 measured in this run.

    python benchmarks/onnxruntime_speed.py [--max-tokens 16384] [--only NAME ...] [--out results.txt]
Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OURS: dict[str, dict[str, Any]] = {
    "ours w4a16 g32 rtn": {"scheme": "w4a16", "group_size": 32, "algo": "rtn"},
    "ours w4a16 g32 rtn, int4 head": {"scheme": "w4a16", "group_size": 32, "algo": "rtn", "options": ["lm_head_bits=4"]},
    "ours w4a16 g32 gptq": {"scheme": "w4a16", "group_size": 32, "algo": "gptq"},
    "ours w4a16 g32 gptq, int4 head": {"scheme": "w4a16", "group_size": 32, "algo": "gptq", "options": ["lm_head_bits=4"]},
    "ours w8a16 rtn": {"scheme": "w8a16", "algo": "rtn"},
    "ours w8a16 g32 rtn": {"scheme": "w8a16", "group_size": 32, "algo": "rtn"},
    "ours w8a8_dynamic sq+rtn": {"scheme": "w8a8_dynamic", "algo": "rtn"},
    "ours w8a8_dynamic sq+rtn, exact per-token": {"scheme": "w8a8_dynamic", "algo": "rtn",
                                                  "options": ["w8a8_dynamic=exact"]},
}
PEERS = ("genai builder int4", "ORT MatMulNBits int4", "ORT MatMulNBits int8", "ORT quantize_dynamic int8",
         "ORT quantize_dynamic int8 per-channel")


def onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def builder(model_dir: Path, out: Path, precision: str, cache: Path) -> float:
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(cache)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def copy_folder_metadata(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if not p.name.startswith("model.onnx"):
            shutil.copy2(p, dst / p.name)


def ort_nbits(float_dir: Path, out: Path, bits: int) -> float:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    copy_folder_metadata(float_dir, out)
    t0 = time.perf_counter()
    model = onnx.load(str(float_dir / "model.onnx"))
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    return time.perf_counter() - t0


def ort_dynamic(float_dir: Path, out: Path, per_channel: bool) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    copy_folder_metadata(float_dir, out)
    t0 = time.perf_counter()
    quantize_dynamic(str(float_dir / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8,
                     per_channel=per_channel, use_external_data_format=True)
    return time.perf_counter() - t0


def ours(model_dir: Path, out: Path, spec: dict[str, Any]) -> float:
    cmd = [sys.executable, "-c", "from qcompiler.cli import main; raise SystemExit(main())", "quant", "--model",
           str(model_dir), "--scheme", spec["scheme"], "--target", "onnxruntime", "--algo", spec["algo"],
           "--out", str(out), "--no-progress"]
    if "group_size" in spec:
        cmd += ["--group-size", str(spec["group_size"])]
    for opt in spec.get("options", []):
        cmd += ["--target-option", opt]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def perplexity(folder: Path, ids: Any) -> float:
    from qcompiler.eval.perplexity import perplexity as ppl
    from qcompiler.runtime.onnxruntime import OrtCausalLM

    return ppl(OrtCausalLM(folder), ids, "smollm2", batch_size=4).perplexity  # type: ignore[arg-type]


def latencies(folder: Path, prompt: np.ndarray, steps: int = 30) -> tuple[float, float]:
    """(prefill ms for the prompt, median single-token decode ms with the prompt in the KV cache)."""
    from qcompiler.runtime.onnxruntime import OrtCausalLM

    m = OrtCausalLM(folder)
    m.run(prompt)  # warm-up
    pre = []
    for _ in range(5):
        t0 = time.perf_counter()
        logits, past = m.run(prompt)
        pre.append(time.perf_counter() - t0)
    tok = logits[:, -1:].argmax(-1).astype(np.int64)
    dec = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, past = m.run(tok, past)
        dec.append(time.perf_counter() - t0)
        tok = logits[:, -1:].argmax(-1).astype(np.int64)
    return 1000 * statistics.median(pre), 1000 * statistics.median(dec[2:])


def genai_decode_ms(folder: Path, prompt: list[int], new_tokens: int = 64) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    times = []
    for _ in range(2):  # the first run warms up
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        gen.generate_next_token()
        t0 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        times.append(1000 * (time.perf_counter() - t0) / max(n, 1))
        del gen
    return times[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines and table here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the model folders here")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from qcompiler.calib import data as calib_data
    from qcompiler.demo import demo_model_dir
    from qcompiler.eval.perplexity import evaluation_windows

    model_dir = demo_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = evaluation_windows(tok, calib_data.default_texts("eval"), 512, a.max_tokens)
    prompt = ids[0:1, :128].numpy().astype(np.int64)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="qc-ortbench-"))
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(row: dict[str, Any]) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        lines.append(line)

    rows: list[dict[str, Any]] = []
    float_dir = work / "float32"
    if not (float_dir / "model.onnx").is_file():
        builder(model_dir, float_dir, "fp32", work / "cache")
    folders: dict[str, Path] = {}
    for name in ["float32", *PEERS, *OURS]:
        if a.only and name != "float32" and not any(o in name for o in a.only):
            continue
        folder = float_dir if name == "float32" else work / name.replace(" ", "_").replace(",", "")
        if folder.exists() and name != "float32":
            shutil.rmtree(folder)
        qtime = None
        if name == "genai builder int4":
            qtime = builder(model_dir, folder, "int4", work / "cache")
        elif name.startswith("ORT MatMulNBits"):
            qtime = ort_nbits(float_dir, folder, 4 if "int4" in name else 8)
        elif name.startswith("ORT quantize_dynamic"):
            qtime = ort_dynamic(float_dir, folder, per_channel=name.endswith("per-channel"))
        elif name in OURS:
            qtime = ours(model_dir, folder, OURS[name])
        folders[name] = folder
        rows.append({"config": name, "quantize_s": None if qtime is None else round(qtime, 1),
                     "onnx_mb": round(onnx_bytes(folder) / 1e6, 1), "perplexity": round(perplexity(folder, ids), 3),
                     "eval_tokens": int(ids.shape[0] * (ids.shape[1] - 1))})
        print(json.dumps({"built": rows[-1]}), flush=True)
    timings: dict[str, list[tuple[float, float, float]]] = {n: [] for n in folders}
    for _ in range(a.rounds):
        for name, folder in folders.items():
            pre, dec = latencies(folder, prompt)
            timings[name].append((pre, dec, genai_decode_ms(folder, prompt[0].tolist())))
    for row in rows:
        t = timings[row["config"]]
        row.update({"prefill128_ms": round(statistics.median(x[0] for x in t), 2),
                    "decode_ms": round(statistics.median(x[1] for x in t), 2),
                    "genai_decode_ms": round(statistics.median(x[2] for x in t), 2), "rounds": len(t)})
        emit(row)

    base = next(r for r in rows if r["config"] == "float32")
    table = ["", "| config | quantize s | ONNX MB | perplexity | Δ ppl | prefill 128 ms | decode ms (×fp32) | "
             "genai ms/token (×fp32) | tokens/s (genai) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = 100 * (r["perplexity"] / base["perplexity"] - 1)
        table.append(
            f"| {r['config']} | {r['quantize_s'] if r['quantize_s'] is not None else '-'} | {r['onnx_mb']} | "
            f"{r['perplexity']:.2f} | {d:+.1f}% | {r['prefill128_ms']:.1f} | "
            f"{r['decode_ms']:.2f} ({base['decode_ms'] / r['decode_ms']:.2f}×) | "
            f"{r['genai_decode_ms']:.2f} ({base['genai_decode_ms'] / r['genai_decode_ms']:.2f}×) | "
            f"{1000 / r['genai_decode_ms']:.0f} |"
        )
    print("\n".join(table))
    if a.out:
        a.out.write_text("\n".join(lines + table) + "\n")


if __name__ == "__main__":
    main()
