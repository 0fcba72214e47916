"""`qcompile eval` for a diffusion transformer: the quantized transformer against the float one it came from,
inside a sampling run (the pipeline's scheduler, same seed and text embeddings).

    step SQNR      at each step of the float model's own run: 10·log10(‖v_float‖² / ‖v_float − v_quant‖²) of the
                   velocity both predict from the same inputs (how far each step's prediction moves)
    final latents  each model integrates its own run from the same noise: PSNR = 10·log10(max|x_float|² / MSE) and
                   the cosine of the flattened final latents (what a user sees after decoding, before the VAE)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import ArtifactError
from qcompiler.export.artifact import read_description
from qcompiler.numerics import sqnr_db


def evaluate_dit(out: Path, float_model: Path | None = None, steps: int = 8, seed: int = 1234,
                 latent_side: int | None = None) -> dict[str, Any]:
    from qcompiler.frontends.diffusers import load_dit, sample
    from qcompiler.runtime import load_quantized

    desc = read_description(out)
    source = Path(float_model or desc["source_model"])
    if not (source / "config.json").is_file():
        raise ArtifactError(f"the float model '{source}' this artefact was made from is not there; pass --float-model")
    side = latent_side or int(desc["calibration"]["latent_side"])
    quantized, float_ = load_quantized(out), load_dit(source)
    t0 = time.perf_counter()
    float_inputs, float_final = sample(float_, steps, 1, seed, side)
    t_float = time.perf_counter() - t0
    with torch.no_grad():
        step_sqnr = [round(sqnr_db(float_(**x, return_dict=False)[0], quantized(**x, return_dict=False)[0]), 2)
                     for x in float_inputs]
    t0 = time.perf_counter()
    _, quant_final = sample(quantized, steps, 1, seed, side, inputs_from=float_)
    t_quant = time.perf_counter() - t0
    mse = float((float_final - quant_final).pow(2).mean())
    peak = float(float_final.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(float_final.flatten(), quant_final.flatten(), dim=0))
    return {
        "artefact": str(out), "kind": "diffusion", "architecture": desc["architecture"],
        "scheme": desc["scheme"]["name"], "pipeline": desc["pipeline"],
        "sampling": {"steps": steps, "seed": seed, "latent_side": side, "scheduler": "FlowMatchEulerDiscreteScheduler"},
        "step_sqnr_db": step_sqnr,
        "final_latent_psnr_db": round(10 * torch.log10(torch.tensor(peak ** 2 / max(mse, 1e-30))).item(), 2),
        "final_latent_cosine": round(cosine, 6),
        "seconds": {"float": round(t_float, 2), "quantized": round(t_quant, 2)},
    }


def format_dit_eval(r: dict[str, Any]) -> str:
    s = r["sampling"]
    return "\n".join([
        f"artefact   {r['artefact']}  ({r['architecture']}, {r['scheme']}: {r['pipeline']})",
        f"measured   one sampling run of {s['steps']} steps ({s['scheduler']}, seed {s['seed']}, "
        f"{s['latent_side']}² latent patches), quantized vs float transformer",
        f"step SQNR  {' '.join(f'{v:.1f}' for v in r['step_sqnr_db'])} dB (min {min(r['step_sqnr_db']):.1f})",
        f"final      latents PSNR {r['final_latent_psnr_db']:.1f} dB, cosine {r['final_latent_cosine']:.5f}",
        f"time       float {r['seconds']['float']:.2f} s, quantized {r['seconds']['quantized']:.2f} s",
    ])
