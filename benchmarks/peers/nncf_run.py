"""Peer run: NNCF `compress_weights` on the demo model, in NNCF's own virtual environment.

Called by benchmarks/quality.py with that environment's python (never imported by qcompiler). Same
protocol as llmcompressor_run.py: identical calibration/evaluation token ids from the parent, the float
perplexity computed by the same loop afterwards (peak RSS is read before any evaluation) (the parent checks it against its own), then the compressed
model's perplexity as NNCF runs it.

    python nncf_run.py MODEL_DIR IDS.pt CONFIG   (CONFIG: int4-g64-awq-se | int4-g64 | int4-channel-awq-se)
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from common import peak_rss_mb, perplexity


def main() -> None:
    import nncf
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, ids_path, config = sys.argv[1:4]
    data = torch.load(ids_path)
    calib, evalw = data["calib"], data["eval"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    group = -1 if "channel" in config else 64
    data_aware = config.endswith("awq-se")
    items = [{"input_ids": calib[i : i + 1], "attention_mask": torch.ones_like(calib[i : i + 1])}
             for i in range(calib.shape[0])]
    t0 = time.perf_counter()
    try:
        model = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group, ratio=1.0,
            dataset=nncf.Dataset(items), subset_size=calib.shape[0],  # torch models are traced with it
            awq=data_aware or None, scale_estimation=data_aware or None,
        )
    except Exception as e:  # a peer failing on this machine is a result, reported as such
        print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}", "version": nncf.__version__}))
        return
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    ppl = perplexity(model, evalw)
    del model
    float_ppl = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), evalw)
    print(json.dumps({"ppl": ppl, "float_ppl": float_ppl, "quantize_s": round(seconds, 2), "peak_rss_mb": rss,
                      "version": nncf.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
