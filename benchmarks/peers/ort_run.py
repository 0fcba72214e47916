"""Peer run: ONNX Runtime's `MatMulNBitsQuantizer` on the demo model exported to ONNX.

Called by benchmarks/quality.py with the python of a virtual environment that has onnx, onnxscript,
onnxruntime, torch and transformers (never imported by qcompiler). The float model is exported once
(`torch.onnx.export(dynamo=True)`, input_ids → logits, no KV cache) into the folder of the ids file, in a
child process so that the quantization's peak RSS is its own. Then the float ONNX model is quantized
(timed; peak RSS read right after), and both the float and the quantized ONNX models are evaluated with
onnxruntime on the parent's evaluation windows with the same perplexity formula.

    python ort_run.py MODEL_DIR IDS.pt CONFIG   (CONFIG: rtn-g64 | hqq-g64 | rtn-g128)
Prints one JSON line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss_mb


def export(model_dir: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).logits

    ids = torch.zeros(2, 17, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(Logits(), (ids,), str(tmp), dynamo=True, external_data=True,
                      dynamic_shapes=({0: batch, 1: seq},), input_names=["input_ids"], output_names=["logits"])
    tmp.rename(out)  # the external-data file keeps the tmp name; the model file references it


def perplexity_ort(path: Path, ids, batch_size: int = 4) -> float:
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    arr = ids.numpy().astype(np.int64)
    for i in range(0, arr.shape[0], batch_size):
        batch = arr[i : i + batch_size]
        logits = sess.run(["logits"], {"input_ids": batch})[0].astype(np.float64)[:, :-1]
        m = logits.max(axis=-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
        tgt = batch[:, 1:]
        nll -= float(np.take_along_axis(logp, tgt[..., None], axis=-1).sum())
        count += tgt.size
    return math.exp(nll / count)


def main() -> None:
    if sys.argv[1] == "--export":
        export(sys.argv[2], Path(sys.argv[3]))
        return
    import onnx
    import onnxruntime
    import torch
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    model_dir, ids_path, config = sys.argv[1:4]
    float_onnx = Path(ids_path).parent / "float.onnx"
    if not float_onnx.is_file():
        subprocess.run([sys.executable, __file__, "--export", model_dir, str(float_onnx)], check=True,
                       capture_output=True)
    data = torch.load(ids_path, weights_only=True)  # (plain tensors this benchmark wrote; never unpickle objects)
    evalw = data["eval"]
    algo, group = config.split("-g")
    block = int(group)
    t0 = time.perf_counter()
    model = onnx.load(str(float_onnx))
    if algo == "rtn":
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True)
    elif algo == "hqq":
        cfg = mnb.HQQWeightOnlyQuantConfig(block_size=block)
    else:
        raise SystemExit(f"unknown config {config}")
    q = mnb.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=algo == "rtn", algo_config=cfg)
    q.process()
    out = Path(ids_path).parent / f"ort-{config}.onnx"
    q.model.save_model_to_file(str(out), use_external_data_format=True)
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    n_nbits = sum(1 for n in onnx.load(str(out), load_external_data=False).graph.node if n.op_type == "MatMulNBits")
    ppl = perplexity_ort(out, evalw)
    float_ppl = perplexity_ort(float_onnx, evalw)
    print(json.dumps({"ppl": ppl, "float_ppl": float_ppl, "quantize_s": round(seconds, 2), "peak_rss_mb": rss,
                      "version": onnxruntime.__version__, "matmulnbits_nodes": n_nbits}))


if __name__ == "__main__":
    main()
