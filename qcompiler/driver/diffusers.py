"""The driver for diffusion transformers (frontends/diffusers.py): model → per-block FX graphs → the same pass
pipeline → lowered blocks → our artefact, which `load_quantized` runs as the diffusers transformer it came from.

    open        the transformer (float, from safetensors), the calibration trajectory: the model's inputs at each
                sampling step from seeded noise (the scheduler with the model's own predictions), and every block's
                inputs at every step (captured from the float model)
    blocks      for each block: trace, transform, measure each layer against the float block, lower, write
    finish      the weights outside the blocks, description, manifest, publish

Every block is calibrated on the inputs the float model gives it (propagate = "float"): a block's inputs here come
from several streams (image and text tokens, the timestep embedding, rotary tables), captured as the model makes
them. Written for the `reference` target (our artefact), the `ascend` target (also OUT/msmodelslim/: the quantized
linears in msModelSlim's ascend v1 layout under the transformer's own module names, everything else FLOAT, and
w8a8c8's Q / K / V grids as FAQuant scales) and the
`onnxruntime` target (also OUT/model.onnx: static w8a8 as QDQ, w8a16 / w4a16 as MatMulNBits; export/onnx/dit.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qcompiler.driver.config import QuantizeConfig
from qcompiler.driver.plan import RunPlan, description_head, plan_run
from qcompiler.driver.probe import compare_layers
from qcompiler.errors import PipelineError, SchemeError
from qcompiler.export.artifact import ArtifactWriter, check_output_dir
from qcompiler.export.layers import ExportLayer
from qcompiler.export.onnx.dit import export_dit_qdq, qdq_scheme_reason
from qcompiler.export.serving import split_block
from qcompiler.frontends.diffusers import (
    capture_calls,
    dit_blocks,
    example_inputs,
    load_dit,
    model_timestep,
    sample,
    trace_dit_block,
)
from qcompiler.ir.graph import copy_graph, drop_tensors, tensor_attrs
from qcompiler.ir.records import block_records, checkpoint_name, kv_records
from qcompiler.memory import rss_bytes
from qcompiler.numerics import sqnr_db
from qcompiler.pm.base import Pass, PassContext
from qcompiler.pm.manager import PassManager

Log = Callable[[str], None]
CALIBRATION_BATCH = 2  # latents per sampling step
DIT_TARGETS = ("reference", "ascend", "onnxruntime")


def latent_side(seq_len: int) -> int:
    """Patches per side of the calibration latents: about seq_len image tokens."""
    return max(3, math.isqrt(seq_len))


def quantize_dit(cfg: QuantizeConfig, plan: RunPlan, log: Log = print) -> dict[str, Any]:
    """Quantize a diffusion transformer block by block (module docstring); returns the description."""
    t_start = time.perf_counter()
    if plan.target.name not in DIT_TARGETS:
        raise SchemeError(f"target '{plan.target.name}': diffusion transformers are written for --target "
                          f"{', '.join(DIT_TARGETS)} so far (our artefact; ascend adds msModelSlim's layout, "
                          "onnxruntime a model.onnx); their compressed-tensors export is not built yet")
    if plan.target.name == "onnxruntime" and (reason := qdq_scheme_reason(plan.scheme)) is not None:
        raise SchemeError(f"scheme '{cfg.scheme.name}' for a diffusion transformer on --target onnxruntime: {reason}")
    # (a DiT has no LM head: the head quantization a decoder target adds does not apply)
    if plan.rotation_fallback:  # (the default's rotation before static activations: not for DiTs, which smooth)
        plan = plan_run(cfg, rotation=False)
    plan = dataclasses.replace(plan, passes=[p for p in plan.passes if p.name != "quantize_head"])
    outer = [p.name for p in plan.passes if type(p).transform_outer is not Pass.transform_outer]
    if outer:  # (the residual rotation and the head's quantization change weights outside the blocks)
        raise PipelineError(f"passes {outer} change weights outside the blocks, which the diffusion-transformer driver "
                            "does not do yet; leave them out for these models")
    check_output_dir(cfg.out.absolute())
    model = load_dit(Path(cfg.model))
    steps = max(2, cfg.num_samples // CALIBRATION_BATCH)
    if cfg.timestep_groups > steps:
        raise SchemeError(f"--timestep-groups {cfg.timestep_groups}: calibration runs {steps} sampling steps "
                          f"(--num-samples {cfg.num_samples} / {CALIBRATION_BATCH} latents a step); give at most "
                          f"{steps} groups or more samples")
    inputs, _ = sample(model, steps, CALIBRATION_BATCH, cfg.seed, latent_side(cfg.seq_len))
    calls = capture_calls(model, inputs)
    groups, bounds = timestep_groups(inputs, cfg.timestep_groups)
    scheme = plan.scheme  # (as stored: what the pipeline makes of the requested one)
    log(f"quantizing {cfg.model} ({type(model).__name__}, {len(calls)} blocks) as {scheme.describe()}")
    log(f"pipeline: {plan.pipeline}")
    log(f"calibration: {steps} sampling steps × {CALIBRATION_BATCH} latents of {latent_side(cfg.seq_len) ** 2} tokens")
    # quantized attention on a DiT is Q, K and V in int8 (msModelSlim's FA3): no cache, the kernel reads all three
    passes = [dataclasses.replace(p, query=True) if p.name == "kv_quant" else p  # type: ignore[call-arg]
              for p in plan.passes]
    assert passes[-1].name == "lower"
    transform, lowering = PassManager(passes[:-1]), PassManager(passes[-1:])
    fingerprint = {"model": str(Path(cfg.model).absolute()), "scheme": str(plan.scheme.to_dict()),
                   "pipeline": plan.pipeline, "seed": cfg.seed,
                   "calib_precision": cfg.calib_precision}
    writer = ArtifactWriter(cfg.out, fingerprint, resume=False, owner=True, log=log)
    exporter = (plan.target.exporter(writer.tmp, model, cfg.target_options, Path(cfg.model))
                if plan.target.name == "ascend" else None)
    qdq: QdqCollector | None = QdqCollector(model) if plan.target.name == "onnxruntime" else None
    layers: dict[str, Any] = {}
    kv_cache: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    timestep_grids: dict[str, list[float]] = {}  # activation grid tensor -> its value per timestep group
    try:
        for i, (name, block) in enumerate(dit_blocks(model)):
            call, example = calls[name][0]
            gm = trace_dit_block(block, call, example, name)
            float_gm = copy_graph(gm, share_tensors=True)
            calib = [tensors for _, tensors in calls[name]]
            ctx = PassContext(block=name, scheme=scheme, target=plan.target, calib=calib,
                              calib_groups=groups if len(groups) > 1 else None, forward_precision=cfg.calib_precision)
            gm = transform.run(gm, ctx)
            y_float, y_quant, layer_sqnr = compare_layers(float_gm, gm, calib[0], ctx.output_divisors)
            flat = (lambda ys: torch.cat([y.reshape(-1) for y in ys if y is not None]))  # noqa: E731
            grids = ctx.report.get("act_quant", {}).pop("timestep_grids", {})
            timestep_grids.update({checkpoint_name(name, t): values for t, values in grids.items()})
            reports[name] = {"output_sqnr_db": round(sqnr_db(flat(y_float), flat(y_quant)), 2), "passes": ctx.report}
            gm = lowering.run(gm, ctx)
            records = block_records(gm, name, layer_sqnr)
            layers.update({path: rec.to_dict() for path, rec in records.items()})
            kv = kv_records(gm, name)
            if kv:  # (w8a8c8: Q, K and V quantized at every attention of the block)
                kv_cache[name] = [rec.to_dict() for rec in kv]
            writer.add_tensors(f"block-{i:05d}.safetensors", {checkpoint_name(name, t): v for t, v in tensor_attrs(gm)})
            if exporter is not None:
                exporter.add_block(i, name, gm, records, kv)
            if qdq is not None:
                qdq.add_block(name, gm, records)
            drop_tensors(float_gm)
        if not any(r["op"] != "linear" for r in layers.values()):
            raise SchemeError(f"no layer of '{cfg.model}' was quantized; nothing to write")
        prefixes = tuple(f"{name}." for name, _ in dit_blocks(model))
        writer.add_tensors("rest.safetensors", {n: p for n, p in model.state_dict().items() if not n.startswith(prefixes)})
        elapsed = time.perf_counter() - t_start
        description = {
            **description_head(cfg, plan),
            "architecture": type(model).__name__,
            "frontend": "diffusers",
            "blocks": {"names": [name for name, _ in dit_blocks(model)]},
            "calibration": {"sampling_steps": steps, "latents_per_step": CALIBRATION_BATCH,
                            "latent_side": latent_side(cfg.seq_len), "scheduler": "FlowMatchEulerDiscreteScheduler",
                            "propagate": "float", "seed": cfg.seed},
            "layers": layers,
            "kv_cache": kv_cache,
            "block_report": reports,
        }
        if len(groups) > 1:
            description["timestep_groups"] = {"bounds": bounds, "grids": timestep_grids}
        if exporter is not None:
            exporter.finish(model, {"qcompiler.scheme": cfg.scheme.describe(), "qcompiler.pipeline": plan.pipeline})
        if qdq is not None:
            qdq.finish(writer.tmp / "model.onnx", latent_side(cfg.seq_len))
        run = {"quantize_seconds": round(elapsed, 2), "peak_rss_bytes": rss_bytes("VmHWM")}
        writer.finish(description, copy_from=Path(cfg.model), tokenizer=None, run_info=run)
    except BaseException:
        if exporter is not None:
            exporter.abort()
        writer.abort(keep_progress=False)
        raise
    log(f"wrote {cfg.out} in {elapsed:.1f} s ({len(layers)} quantized layers)")
    return {**description, "run": run}



def timestep_groups(inputs: list[dict[str, torch.Tensor]], count: int) -> tuple[list[list[int]], list[float]]:
    """The calibration batches (one per sampling step, in sampling order) cut into `count` groups of consecutive
    steps, early to late, and the timesteps between groups: bounds[g] is the midpoint of the last timestep of
    group g and the first of group g + 1, in the units the model takes. A call at timestep t belongs to the first
    group g with t > bounds[g] (the timesteps fall along the run), else to the last."""
    steps = len(inputs)
    groups = [[j for j in range(steps) if j * count // steps == g] for g in range(count)]
    t = [float(step["timestep"].reshape(-1)[0]) for step in inputs]
    bounds = [(t[groups[g][-1]] + t[groups[g + 1][0]]) / 2 for g in range(count - 1)]
    return groups, bounds


class QdqCollector:
    """--target onnxruntime: every block's quantized layers (split back to the model's own linears) and the other
    tensors the passes changed (smoothed norms), put into the float model at the end and exported as QDQ ONNX."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.state_names = set(model.state_dict())
        self.layers: dict[str, ExportLayer] = {}
        self.changed: dict[str, torch.Tensor] = {}

    def add_block(self, name: str, gm: torch.fx.GraphModule, records: dict[str, Any]) -> None:
        block = split_block("onnxruntime QDQ", name, gm, records, [], self.state_names)
        self.layers.update({layer.name: layer for layer in block.layers})
        self.changed.update({k: v.detach().clone() for k, v in block.rest.items()})

    def finish(self, path: Path, side: int) -> None:
        self.model.load_state_dict(self.changed, strict=False)
        example = {**example_inputs(self.model, 2, torch.Generator().manual_seed(0), latent_side=side),
                   "timestep": model_timestep(self.model, torch.tensor(500.0), 2)}
        export_dit_qdq(self.model, {n: rec for n, rec in self.layers.items() if rec.bits is not None}, example,
                       path)
