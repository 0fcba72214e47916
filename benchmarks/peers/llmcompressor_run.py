"""Peer run: llm-compressor `oneshot` on the demo model, in llm-compressor's own virtual environment.

Called by benchmarks/quality.py with that environment's python (never imported by qcompiler). Reads the
calibration and evaluation token ids the parent wrote (so both tools see identical tokens), quantizes,
and evaluates perplexity with the model as llm-compressor leaves it in memory (its fake-quantized
forward), using the same loop as qcompiler.eval.perplexity. The float model's perplexity is computed by
the same code afterwards (peak RSS is read before any evaluation): the parent checks it equals its own,
which proves the evaluation is identical.

    python llmcompressor_run.py MODEL_DIR IDS.pt CONFIG   (CONFIG: gptq-g64 | gptq-channel | awq-g64 |
                                                          sq-gptq-w8a8)
Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from common import peak_rss_mb, perplexity


def recipe(config: str):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    def w4(strategy: str) -> dict:
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": strategy}
        if strategy == "group":
            weights["group_size"] = 64
        return {"group_0": {"targets": ["Linear"], "weights": weights}}

    if config == "gptq-g64":
        return GPTQModifier(config_groups=w4("group"), ignore=["lm_head"])
    if config == "gptq-channel":
        return GPTQModifier(config_groups=w4("channel"), ignore=["lm_head"])
    if config == "awq-g64":
        return AWQModifier(config_groups=w4("group"), ignore=["lm_head"])
    if config == "sq-gptq-w8a8":
        return [SmoothQuantModifier(smoothing_strength=0.5), GPTQModifier(scheme="W8A8", ignore=["lm_head"])]
    raise SystemExit(f"unknown config {config}")


def main() -> None:
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model_dir, ids_path, config = sys.argv[1:4]
    data = torch.load(ids_path)
    calib, evalw = data["calib"], data["eval"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    try:
        oneshot(model=model, dataset=ds, recipe=recipe(config), max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
    except Exception as e:  # a peer failing on this machine is a result, reported as such
        print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}", "version": llmcompressor.__version__}))
        return
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    ppl = perplexity(model.eval(), evalw)
    del model
    float_ppl = perplexity(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), evalw)
    print(json.dumps({"ppl": ppl, "float_ppl": float_ppl, "quantize_s": round(seconds, 2), "peak_rss_mb": rss,
                      "version": llmcompressor.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
