"""What every peer run shares. Peers run in their own virtual environments without qcompiler, so this
is imported from the scripts' own folder; `perplexity` is the same formula as qcompiler.eval.perplexity
(the parent checks that each peer's float perplexity equals its own)."""

from __future__ import annotations

import math


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
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = batch[:, 1:]
            nll -= float(logp.gather(-1, tgt.unsqueeze(-1)).sum())
            count += tgt.numel()
    return math.exp(nll / count)
