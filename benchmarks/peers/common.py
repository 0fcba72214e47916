"""What every peer run shares. Peers run in their own virtual environments without qcompiler, so this
is imported from the scripts' own folder; `perplexity` is the same formula as qcompiler.eval.perplexity
(the parent checks that each peer's float perplexity equals its own)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def perplexity(model, ids, batch_size: int = 4) -> float:  # type: ignore[no-untyped-def]
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i : i + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            # −log p(t) = logsumexp(x) − x_t: no [B, S, V] log-probability tensor (a third faster than log_softmax
            # at a 49k vocabulary), each token's term in float32, the sum in float64
            x, tgt = logits[:, :-1], batch[:, 1:]
            nll += float((torch.logsumexp(x, dim=-1) - x.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)).double().sum())
            count += tgt.numel()
    return math.exp(nll / count)


def run_torch_peer(version: str, prepare: Callable[[Any, str], Callable[[Any], Any]]) -> None:
    """The protocol of a peer that quantizes a transformers model in place: `argv = MODEL_DIR IDS.pt CONFIG`;
    `prepare(calib_ids, config)` builds the peer's quantizer (untimed), which is then timed on the float
    model; peak RSS is read before any evaluation; the quantized and then a fresh float model are evaluated on
    the parent's windows. Prints one JSON line (or {"error": ...} when the peer fails on this machine)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, ids_path, config = sys.argv[1:4]
    data = torch.load(ids_path, weights_only=True)  # (plain tensors this benchmark wrote; never unpickle objects)
    calib, evalw = data["calib"], data["eval"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantizer = prepare(calib, config)
    t0 = time.perf_counter()
    try:
        model = quantizer(model)
    except Exception as e:  # a peer failing on this machine is a result, reported as such
        print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}", "version": version}))
        return
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    ppl = perplexity(model.eval(), evalw)
    del model
    float_ppl = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), evalw)
    print(json.dumps({"ppl": ppl, "float_ppl": float_ppl, "quantize_s": round(seconds, 2), "peak_rss_mb": rss,
                      "version": version, "torch": torch.__version__}))
