"""Peer run: NNCF `compress_weights` on the demo model, in NNCF's own virtual environment.

Called by benchmarks/quality.py with that environment's python (never imported by qcompiler). Same
protocol as llmcompressor_run.py (common.run_torch_peer): identical calibration/evaluation token ids from
the parent, the compressed model's perplexity as NNCF runs it, then the float model's through the same loop
(the parent checks it against its own).

    python nncf_run.py MODEL_DIR IDS.pt CONFIG   (CONFIG: int4-g64-awq-se | int4-g64 | int4-channel-awq-se)
Prints one JSON line.
"""

from __future__ import annotations

from common import run_torch_peer


def main() -> None:
    import nncf
    import torch

    def prepare(calib, config: str):  # type: ignore[no-untyped-def]
        group = -1 if "channel" in config else 64
        data_aware = config.endswith("awq-se")
        items = [{"input_ids": calib[i : i + 1], "attention_mask": torch.ones_like(calib[i : i + 1])}
                 for i in range(calib.shape[0])]

        def quantize(model):  # type: ignore[no-untyped-def]
            return nncf.compress_weights(
                model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group, ratio=1.0,
                dataset=nncf.Dataset(items), subset_size=calib.shape[0],  # torch models are traced with it
                awq=data_aware or None, scale_estimation=data_aware or None,
            )

        return quantize

    run_torch_peer(nncf.__version__, prepare)


if __name__ == "__main__":
    main()
