"""Automatic mixed-precision fallback: keep the fewest layers in float that meet a perplexity budget.

1. Quantize everything; measure perplexity on held-out calibration-side windows (never the evaluation
   text) against the float model's, and rank the layers by their predicted effect on the model's loss:
   the Fisher-weighted output error
       ΔL_i ≈ ½ Σ_t E[(g_t · Δy_t)²] = ½ σ_i² · Σ_t ‖g_t‖²        (Δy isotropic, variance σ_i² per element)
   where g_t = ∂(Σ token NLL)/∂y_t is layer i's output gradient in the float model on the validation windows
   (one backward pass, the same one that gives the float perplexity) and σ_i² = E[y²] · 10^(−SQNR_i/10) its
   quantization error, from the layer's output SQNR against the float block (measured by the driver in
   context, with the earlier layers of the block already quantized) and the float output's energy E[y²].
   A layer's own SQNR alone ranks a 20 dB layer whose error the network ignores above a 30 dB one it
   amplifies; the gradient says how much the loss listens to each output. (`ranking="sqnr"` keeps the old
   order, for comparison.)
2. If the increase exceeds the budget, re-quantize with the k most harmful layers overridden to float,
   for k = 1, 2, 4, ... until the budget is met, then bisect between the last failing and the first passing
   k. Every candidate is a complete quantization whose perplexity is measured, not predicted.
3. The chosen candidate is published atomically at the output path with a "fallback" section in its
   description (budget, float ppl, every trial, the layers kept in float). The others are deleted.

Like msModelSlim's automatic rollback, but the rollback set is chosen by measured perplexity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
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
from qcompiler.frontends.multimodal import model_logits


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


@dataclasses.dataclass
class OutputFisher:
    """One linear's output statistics in the float model over the validation tokens."""

    grad_sq: float  # Σ_t ‖g_t‖²: the squared output gradient of the summed token NLL
    out_sq: float  # Σ_t ‖y_t‖²
    elements: int  # tokens × output features

    @property
    def weight(self) -> float:
        """Predicted loss increase per unit of relative output error (σ² = ρ · E[y²]): ½ · E[y²] · Σ‖g‖²."""
        return 0.5 * self.out_sq / max(self.elements, 1) * self.grad_sq


def float_fisher(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, OutputFisher]]:
    """(perplexity, per nn.Linear module name: OutputFisher) of `model` on the windows `ids`, one window at a time:
    a forward pass with hooks on every linear output and a backward pass of the summed token NLL. Gradients flow
    from the input embeddings only (no weight gradients are formed)."""
    stats: dict[str, OutputFisher] = {}
    handles = []

    def hook(name: str):
        def record(_mod: torch.nn.Module, _args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            rec = stats.setdefault(name, OutputFisher(0.0, 0.0, 0))
            rec.out_sq += float(out.detach().float().square().sum())
            rec.elements += out.numel()

            def grad(g: torch.Tensor) -> None:
                rec.grad_sq += float(g.float().square().sum())

            out.register_hook(grad)
        return record

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(hook(name)))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    nll, count = 0.0, 0
    try:
        embed = model.get_input_embeddings()
        for window in ids:
            batch = window.unsqueeze(0)
            with torch.no_grad():
                embeds = embed(batch)
            embeds.requires_grad_(True)
            with torch.enable_grad():
                logits = model_logits(model, inputs_embeds=embeds, use_cache=False).float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
                loss.backward()
            nll += float(loss.detach())
            count += batch.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return math.exp(nll / max(count, 1)), stats


def layer_sensitivity(description: dict[str, Any], fisher: dict[str, OutputFisher] | None = None
                      ) -> list[tuple[str, float, float]]:
    """(checkpoint layer name, output SQNR dB, predicted loss increase) of every quantized layer, most harmful
    first. Without `fisher` (or for a layer it has no statistics of, e.g. experts the float model stores stacked,
    not as nn.Linear) the weight is the median of the measured ones, so such a layer ranks by its SQNR."""
    sqnr: dict[str, float] = {}
    for rec in description["layers"].values():
        for name, db in (rec.get("output_sqnr_db") or {}).items():
            sqnr[name] = float("inf") if db is None else db  # (None in a file: an exact layer)
    weights = {n: fisher[n].weight for n, db in sqnr.items() if fisher and n in fisher and not math.isinf(db)}
    typical = statistics.median(weights.values()) if weights else 1.0
    ranked = [(n, db, (0.0 if math.isinf(db) else weights.get(n, typical) * 10.0 ** (-db / 10.0)))
              for n, db in sqnr.items()]
    return sorted(ranked, key=lambda r: (-r[2], r[1]))


def quantize_with_fallback(
    cfg: Any,
    max_ppl_increase: float,
    quantize: Callable[..., dict[str, Any]],
    validation_count: int = 8,
    max_trials: int = 10,
    log: Callable[[str], None] = print,
    ranking: str = "fisher",
) -> dict[str, Any]:
    """Quantize `cfg` (a QuantizeConfig) keeping the fewest layers float so that the validation perplexity
    is at most (1 + max_ppl_increase) × float. `ranking`: "fisher" (predicted loss increase, the default) or
    "sqnr" (the layer's own output SQNR alone). Returns the published description."""
    from qcompiler.driver import load_tokenizer
    from qcompiler.eval.report import load_float
    from qcompiler.runtime import load_quantized

    if ranking not in ("fisher", "sqnr"):
        raise CalibrationError(f"fallback ranking must be 'fisher' or 'sqnr', got '{ranking}'")
    if max_ppl_increase <= 0:
        raise CalibrationError(f"--max-ppl-increase must be positive, got {max_ppl_increase}")
    out = Path(cfg.out)
    check_output_dir(out.absolute())
    tokenizer = load_tokenizer(Path(cfg.model), cfg.trust_remote_code)
    texts = cfg.calib_texts if cfg.calib_texts is not None else calib_data.default_texts("calib")
    ids = validation_windows(tokenizer, texts, cfg.num_samples, cfg.seq_len, validation_count, cfg.chat_template)
    fm = load_float(Path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    if ranking == "fisher":
        float_ppl, fisher = float_fisher(fm, ids)
    else:
        float_ppl, fisher = perplexity(fm, ids, "validation").perplexity, None
    del fm
    budget = float_ppl * (1.0 + max_ppl_increase)
    log(f"fallback: float validation ppl {float_ppl:.3f}, budget {budget:.3f} (+{100 * max_ppl_increase:g}%)")

    work = Path(tempfile.mkdtemp(prefix=".qcompile-fallback-", dir=out.absolute().parent))
    trials: list[dict[str, Any]] = []
    results: dict[int, tuple[Path, float, dict[str, Any]]] = {}
    order: list[tuple[str, float, float]] = []

    def trial(k: int) -> float:
        floats = [name for name, _, _ in order[:k]]
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
        order = layer_sensitivity(results[0][2], fisher)
        n_layers = len(order)
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
            "ranking": ranking,
            "chosen_float_layers": [name for name, _, _ in order[:chosen]],
            # the most harmful layers, in the order the search took them
            "sensitivity": [{"layer": name, "output_sqnr_db": db, "predicted_nll_increase": float(f"{loss:.4g}")}
                            for name, db, loss in order[: max(chosen, 10)]],
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
