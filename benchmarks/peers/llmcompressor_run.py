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

from common import run_torch_peer


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

    def prepare(calib, config: str):  # type: ignore[no-untyped-def]
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})

        def quantize(model):  # type: ignore[no-untyped-def]
            oneshot(model=model, dataset=ds, recipe=recipe(config), max_seq_length=calib.shape[1],
                    num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
            return model

        return quantize

    run_torch_peer(llmcompressor.__version__, prepare)


if __name__ == "__main__":
    main()
