"""Automatic mixed-precision fallback: keep the fewest layers in float that meet a perplexity budget.

1. Quantize everything; measure perplexity on held-out calibration-side windows (never the evaluation
   text) against the float model's, and each layer's sensitivity: its output SQNR against the float block
   on calibration data (the driver measures it for every layer, in context, with the earlier layers of the
   block already quantized).
2. If the increase exceeds the budget, re-quantize with the k least accurate layers overridden to float,
   for k = 1, 2, 4, ... until the budget is met, then bisect between the last failing and the first passing
   k. Every candidate is a complete quantization whose perplexity is measured, not predicted.
3. The chosen candidate is published atomically at the output path with a "fallback" section in its
   description (budget, float ppl, every trial, the layers kept in float). The others are deleted.

Like msModelSlim's automatic rollback, but the rollback set is chosen by measured perplexity.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qcompiler.calib import data as calib_data
from qcompiler.errors import CalibrationError
from qcompiler.eval.perplexity import perplexity
from qcompiler.export.artifact import DESCRIPTION, check_output_dir, publish, write_manifest
from qcompiler.files import dumps


def validation_windows(
    tokenizer, texts: list[calib_data.Sample], num_samples: int, seq_len: int, count: int, chat_template: bool
) -> torch.Tensor:
    """`count` windows of the calibration text that calibration itself does not use."""
    stream = calib_data.token_stream(tokenizer, texts, chat_template)
    all_windows = calib_data.windows(stream, seq_len)
    used = set(torch.linspace(0, all_windows.shape[0] - 1, num_samples).round().long().tolist())
    free = [i for i in range(all_windows.shape[0]) if i not in used]
    if len(free) < count:
        raise CalibrationError(
            f"fallback needs {count} validation windows of {seq_len} tokens besides the {num_samples} "
            f"calibration ones; the calibration text has {all_windows.shape[0]} in all"
        )
    pick = torch.linspace(0, len(free) - 1, count).round().long().tolist()
    return all_windows[[free[i] for i in pick]]


def layer_sensitivity(description: dict[str, Any]) -> list[tuple[str, float]]:
    """(checkpoint layer name, output SQNR dB) of every quantized layer, least accurate first."""
    sqnr: dict[str, float] = {}
    for rec in description["layers"].values():
        for name, db in (rec.get("output_sqnr_db") or {}).items():
            sqnr[name] = float("inf") if db is None else db  # (None in a file: an exact layer)
    return sorted(sqnr.items(), key=lambda kv: kv[1])


def quantize_with_fallback(
    cfg: Any,
    max_ppl_increase: float,
    quantize: Callable[..., dict[str, Any]],
    validation_count: int = 8,
    max_trials: int = 10,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize `cfg` (a QuantizeConfig) keeping the fewest layers float so that the validation perplexity
    is at most (1 + max_ppl_increase) × float. Returns the published description."""
    from qcompiler.driver import load_tokenizer
    from qcompiler.eval.report import load_float
    from qcompiler.runtime import load_quantized

    if max_ppl_increase <= 0:
        raise CalibrationError(f"--max-ppl-increase must be positive, got {max_ppl_increase}")
    out = Path(cfg.out)
    check_output_dir(out.absolute())
    tokenizer = load_tokenizer(Path(cfg.model), cfg.trust_remote_code)
    texts = cfg.calib_texts if cfg.calib_texts is not None else calib_data.default_texts("calib")
    ids = validation_windows(tokenizer, texts, cfg.num_samples, cfg.seq_len, validation_count, cfg.chat_template)
    fm = load_float(Path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    float_ppl = perplexity(fm, ids, "validation").perplexity
    del fm
    budget = float_ppl * (1.0 + max_ppl_increase)
    log(f"fallback: float validation ppl {float_ppl:.3f}, budget {budget:.3f} (+{100 * max_ppl_increase:g}%)")

    work = Path(tempfile.mkdtemp(prefix=".qcompile-fallback-", dir=out.absolute().parent))
    trials: list[dict[str, Any]] = []
    results: dict[int, tuple[Path, float, dict[str, Any]]] = {}
    ranking: list[tuple[str, float]] = []

    def trial(k: int) -> float:
        floats = [name for name, _ in ranking[:k]]
        # first=True: a layer chosen to stay float wins over the user's own overrides (e.g. down=w8a16)
        scheme = cfg.scheme.with_overrides([(n, None) for n in floats], first=True) if floats else cfg.scheme
        path = work / f"k{k}"
        desc = quantize(dataclasses.replace(cfg, scheme=scheme, out=path), log=lambda _m: None)
        qm = load_quantized(path, trust_remote_code=cfg.trust_remote_code)
        ppl = perplexity(qm, ids, "validation").perplexity
        del qm
        trials.append({"float_layers": k, "validation_ppl": round(ppl, 4),
                       "increase": round(ppl / float_ppl - 1.0, 5), "quantize_seconds": desc["run"]["quantize_seconds"]})
        log(f"fallback: {k:>3} float layers -> validation ppl {ppl:.3f} ({100 * (ppl / float_ppl - 1):+.2f}%)")
        results[k] = (path, ppl, desc)
        return ppl

    try:
        trial(0)
        ranking = layer_sensitivity(results[0][2])
        n_layers = len(ranking)
        lo, hi = 0, None  # lo: largest failing k, hi: smallest passing k
        if results[0][1] <= budget:
            hi = 0
        k = 1
        while hi is None and len(trials) < max_trials:
            k = min(k, n_layers)
            if trial(k) <= budget:
                hi = k
            else:
                lo = k
                if k == n_layers:
                    break
                k *= 2
        while hi is not None and hi - lo > 1 and len(trials) < max_trials:
            mid = (lo + hi) // 2
            if trial(mid) <= budget:
                hi = mid
            else:
                lo = mid
        met = hi is not None
        chosen = hi if hi is not None else min(results, key=lambda kk: results[kk][1])
        path, ppl, _ = results[chosen]
        desc_path = path / DESCRIPTION
        description = json.loads(desc_path.read_text())
        description["fallback"] = {
            "max_ppl_increase": max_ppl_increase,
            "validation": {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                           "text": "calibration-side windows not used for calibration"},
            "float_validation_ppl": round(float_ppl, 4),
            "met": met,
            "chosen_float_layers": [name for name, _ in ranking[:chosen]],
            "sensitivity_sqnr_db": dict(ranking[: max(chosen, 10)]),
            "trials": trials,
        }
        desc_path.write_text(dumps(description))
        write_manifest(path)
        publish(path, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    msg = "met" if met else "NOT met (best candidate kept)"
    log(f"fallback: budget {msg} with {chosen} float layers: validation ppl {ppl:.3f} vs float {float_ppl:.3f}")
    return description
