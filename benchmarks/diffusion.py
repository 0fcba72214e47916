"""Diffusion-transformer benchmark: FLUX-, SD3-, Wan- and HunyuanVideo-shaped transformers (the published models'
head sizes, rotary axes, text and pooled widths; fewer heads and blocks), random weights, each scheme quantized by a
fresh `qcompile quant` process and measured by `qcompile eval` (a sampling run of the quantized transformer against the
float one).

    python benchmarks/diffusion.py [--schemes w8a16,w8a8_dynamic,w8a8,w4a16] [--models flux,sd3,wan,hunyuan]
    python benchmarks/diffusion.py --schemes w8a8,w8a8:tg4    (:tgN: static grids per group of steps, --timestep-groups)

Reported per model × scheme: quantization time and peak RSS (the process's VmHWM), the minimum per-step velocity SQNR
and the final latents' PSNR / cosine against float. Random weights have no outlier channels, so these numbers say
what the pipeline costs and that it holds the output, not how a trained FLUX or SD3 degrades.
JSON lines on stdout; the Markdown table goes to benchmarks/results/diffusion-latest.txt.
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

SHAPES = {
    # black-forest-labs/FLUX.1-dev: heads of 128, rotary axes (16, 56, 56), T5 width 4096, CLIP pooled 768, 64 latent
    # channels packed; here 8 heads (24 there), 2 double + 2 single blocks (19 + 38 there)
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                            attention_head_dim=128, num_attention_heads=8, joint_attention_dim=4096,
                                            pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
                                            guidance_embeds=True)),
    # stabilityai/stable-diffusion-3-medium-diffusers: heads of 64, joint width 4096, pooled 2048, patch 2 over 16
    # latent channels; here 16 heads (24 there), 2 blocks (24 there)
    "sd3": ("SD3Transformer2DModel", dict(sample_size=64, patch_size=2, in_channels=16, num_layers=2,
                                          attention_head_dim=64, num_attention_heads=16, joint_attention_dim=4096,
                                          caption_projection_dim=1024, pooled_projection_dim=2048, out_channels=16,
                                          pos_embed_max_size=96)),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: heads of 128, umT5 width 4096, frequency embedding 256, video patches
    # (1, 2, 2) over 16 channels; here 8 heads (12 there), FFN 4096 (8960), 2 blocks (30 there)
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=128,
                                          in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=4096,
                                          num_layers=2, rope_max_seq_len=1024)),
    # hunyuanvideo-community/HunyuanVideo: heads of 128, rotary axes (16, 56, 56), LLaMA text width 4096, CLIP pooled
    # 768, patches (1, 2, 2) over 16 channels; here 8 heads (24 there), 2 dual + 2 single blocks (20 + 40 there)
    "hunyuan": ("HunyuanVideoTransformer3DModel", dict(in_channels=16, out_channels=16, num_attention_heads=8,
                                                       attention_head_dim=128, num_layers=2, num_single_layers=2,
                                                       num_refiner_layers=2, patch_size=2, patch_size_t=1,
                                                       text_embed_dim=4096, pooled_projection_dim=768,
                                                       rope_axes_dim=(16, 56, 56), guidance_embeds=True)),
}
ALGO = {"w4a16": ["--algo", "gptq", "--group-size", "64"]}


def make_model(kind: str, folder: Path) -> Path:
    import diffusers

    cls, cfg = SHAPES[kind]
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**cfg)
    with torch.no_grad():  # (diffusers zero-initialises some projections: every weight gets a value)
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder / kind))
    return folder / kind


def run(model: Path, scheme: str, out: Path) -> dict[str, Any]:
    """One `qcompile quant` + `qcompile eval`; `scheme` may end in :tgN (--timestep-groups N)."""
    name, _, groups = scheme.partition(":tg")
    quant = [sys.executable, "-m", "qcompiler.cli", "quant", "--model", str(model), "--scheme", name, "--out",
             str(out), "--num-samples", "8", "--seq-len", "256", "--no-progress", *ALGO.get(name, ["--algo", "rtn"]),
             *(["--timestep-groups", groups] if groups else [])]
    subprocess.run(quant, check=True, capture_output=True, text=True)
    run_info = json.loads((out / "run.json").read_text())
    ev = subprocess.run([sys.executable, "-m", "qcompiler.cli", "eval", str(out), "--json"], check=True,
                        capture_output=True, text=True)
    r = json.loads(ev.stdout)
    return {"model": model.name, "scheme": scheme, "pipeline": r["pipeline"],
            "quantize_s": run_info["quantize_seconds"], "peak_rss_gb": round(run_info["peak_rss_bytes"] / 1e9, 2),
            "min_step_sqnr_db": min(r["step_sqnr_db"]), "final_latent_psnr_db": r["final_latent_psnr_db"],
            "final_latent_cosine": r["final_latent_cosine"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="w8a16,w8a8_dynamic,w8a8,w4a16")
    ap.add_argument("--models", default="flux,sd3,wan,hunyuan")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in a.models.split(","):
            model = make_model(kind, root)
            for scheme in a.schemes.split(","):
                out = root / f"{kind}-{scheme}"
                row = run(model, scheme, out)
                print(json.dumps(row), flush=True)
                rows.append(row)
                shutil.rmtree(out)
    lines = ["| model (shape) | scheme | pipeline | quantize s | peak RSS GB | min step SQNR dB | final latents PSNR dB "
             "| cosine |", "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['scheme']} | {r['pipeline']} | {r['quantize_s']} | {r['peak_rss_gb']} | "
              f"{r['min_step_sqnr_db']} | {r['final_latent_psnr_db']} | {r['final_latent_cosine']} |" for r in rows]
    subset = "" if a.models == ap.get_default("models") else "-" + a.models.replace(",", "-")
    results = Path(__file__).parent / "results" / f"diffusion{subset}-latest.txt"
    results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
