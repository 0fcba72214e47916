"""Vision-language benchmark: a LLaVA-1.5-shaped model (the published head sizes: language heads of 128, CLIP
ViT-L/14-336 heads of 64 and 576 image tokens per image; 2 language and 2 vision blocks, 8 language heads instead of
32), random weights, each scheme quantized by a fresh `qcompile quant` process, calibrated on text (the default
corpus) and on image + prompt samples (`--calib-images`, through the model's processor).

    python benchmarks/vlm.py [--schemes w8a16,w4a16,w8a8_dynamic,w8a8] [--outlier-gain 20]
                             [--vision-schemes w8a16,w8a8_dynamic,w8a8]

--vision-schemes adds rows with the vision tower quantized too (`--vision-scheme`, image calibration), the language
model at w8a16, beside the same run with the tower float: what quantizing the ViT costs in logits SQNR.

Reported per scheme × calibration: quantization time, peak RSS (the process's VmHWM) and the SQNR of the logits on
4 held-out image prompts against the float model. Random weights have no outlier channels of their own; the
projector's first output channel is scaled by --outlier-gain so that image tokens carry one (trained VLMs' image
tokens differ from text ones in range; the size of that difference here is chosen, not measured).
JSON lines on stdout; the Markdown table goes to benchmarks/results/vlm-latest.txt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

TEXT = dict(model_type="llama", vocab_size=300, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=8, head_dim=128, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16, image_size=336,
              patch_size=14, projection_dim=768)
ALGO = {"w4a16": ["--algo", "gptq", "--group-size", "128"]}
PROMPTS = ["Describe this image in detail.", "What objects are in the picture?", "What colours dominate?",
           "Write a caption for this photo."]


def held_out_inputs(model: Path, images: list[Path]) -> list[dict[str, torch.Tensor]]:
    from PIL import Image

    from qcompiler.calib.images import load_processor, prompt_with_image

    processor = load_processor(model)
    batches = []
    for i, path in enumerate(images):
        inputs = processor(images=[Image.open(path).convert("RGB")],
                           text=[prompt_with_image(processor, PROMPTS[i % len(PROMPTS)])], return_tensors="pt")
        batches.append({k: v for k, v in inputs.items() if k != "attention_mask"})
    return batches


def logits_sqnr(out: Path, reference: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]]) -> float:
    from qcompiler.numerics import sqnr_db
    from qcompiler.runtime import load_quantized

    model = load_quantized(out)
    with torch.no_grad():
        ours = torch.cat([model(**x).logits.flatten() for x in inputs])
    return round(sqnr_db(torch.cat([r.flatten() for r in reference]), ours), 2)


def run(model: Path, scheme: str, calibration: list[str], out: Path, vision: str | None = None) -> dict[str, Any]:
    quant = [sys.executable, "-m", "qcompiler.cli", "quant", "--model", str(model), "--scheme", scheme, "--out",
             str(out), "--num-samples", "8", "--seq-len", "256", "--no-progress", *calibration,
             *ALGO.get(scheme, ["--algo", "rtn"]), *(["--vision-scheme", vision] if vision else [])]
    subprocess.run(quant, check=True, capture_output=True, text=True)
    run_info = json.loads((out / "run.json").read_text())
    return {"quantize_s": run_info["quantize_seconds"], "peak_rss_gb": round(run_info["peak_rss_bytes"] / 1e9, 2)}


def main() -> None:
    from transformers import LlavaForConditionalGeneration

    from qcompiler.synthetic import write_random_images, write_random_llava

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="w8a16,w4a16,w8a8_dynamic,w8a8")
    ap.add_argument("--outlier-gain", type=float, default=20.0)
    ap.add_argument("--vision-schemes", default="", help="also quantize the vision tower with each of these")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_random_llava(root / "llava", text=TEXT, vision=VISION, outlier_gain=a.outlier_gain)
        write_random_images(root / "calib", 8, size=(300, 400), seed=1, prompts=PROMPTS)
        inputs = held_out_inputs(model, write_random_images(root / "held-out", 4, size=(300, 400), seed=2))
        with torch.no_grad():
            float_model = LlavaForConditionalGeneration.from_pretrained(str(model), dtype=torch.float32)
            reference = [float_model(**x).logits for x in inputs]
        del float_model
        images = ["--calib-images", str(root / "calib")]
        jobs = [(scheme, name, calibration, None) for scheme in filter(None, a.schemes.split(","))
                for name, calibration in [("text", []), ("images", images)]]
        if a.vision_schemes:
            jobs += [("w8a16", "images", images, v) for v in ["float", *a.vision_schemes.split(",")]]
        for scheme, name, calibration, vision in jobs:
            out = root / f"{scheme}-{name}-{vision}"
            row = {"model": "llava-1.5-shaped", "scheme": scheme, "vision_tower": vision or "float",
                   "calibration": name, **run(model, scheme, calibration, out, None if vision == "float" else vision),
                   "logits_sqnr_db": logits_sqnr(out, reference, inputs)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(out)
    lines = ["| model (shape) | scheme | vision tower | calibration | quantize s | peak RSS GB | logits SQNR dB "
             "(image prompts) |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['scheme']} | {r['vision_tower']} | {r['calibration']} | {r['quantize_s']} | "
              f"{r['peak_rss_gb']} | {r['logits_sqnr_db']} |" for r in rows]
    results = Path(__file__).parent / "results" / "vlm-latest.txt"
    results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
