"""The ONNX path: ONNX model → FX IR (frontends/onnx.py) → the same pass pipeline → ONNX Runtime model.

The imported graph is one "block": calibrated on the given inputs (an .npz of arrays keyed by input name,
or generated ones: token windows from the default corpus when a tokenizer sits beside the model, standard
normal data otherwise), transformed, measured (output SQNR against the float graph), lowered, and emitted
with the original graph inputs and outputs (names, types, symbolic shapes) and opset. Nodes the passes did
not touch are written back as they were imported.

    OUT/model.onnx, OUT/model.onnx.data, OUT/qcompiler.json (scheme, pipeline, per-layer records and errors)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from qcompiler.driver.plan import description_head, plan_run
from qcompiler.driver.probe import compare_layers
from qcompiler.errors import CalibrationError, ModelLoadError
from qcompiler.export.artifact import ArtifactWriter, check_output_dir
from qcompiler.export.onnx.builder import MODEL_FILE, OnnxBuilder
from qcompiler.export.onnx.emit import EmitOptions, GraphEmitter
from qcompiler.frontends.onnx import ImportedModel, import_onnx, load_onnx
from qcompiler.ir.graph import copy_graph
from qcompiler.ir.records import block_records
from qcompiler.numerics import sqnr_db
from qcompiler.pm.base import Pass, PassContext
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import format_pipeline
from qcompiler.schemes import QuantScheme
from qcompiler.targets.base import Target
from qcompiler.targets.onnxruntime import emit_options

_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.bool_): torch.bool}


def _dims(vi: onnx.ValueInfoProto, batch: int, seq_len: int) -> list[int]:
    """Concrete shape for generated inputs. Symbolic dims: batch first, a KV cache's past length 0 (exporters
    name it past_sequence_length; `past_sequence_length + sequence_length` is then the sequence), else seq_len."""
    dims = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        elif "past" in d.dim_param and "+" not in d.dim_param:
            dims.append(0)
        else:
            dims.append(batch if i == 0 else seq_len)
    return dims


def _embedding_rows(model: onnx.ModelProto, name: str) -> int | None:
    """The vocabulary size of an int input that indexes an embedding table (Gather on an initializer)."""
    init = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and n.input[0] in init:
            return int(init[n.input[0]].dims[0])
    return None


def calibration_inputs(model: onnx.ModelProto, imported: ImportedModel, path: Path, num_samples: int,
                       seq_len: int, batch_size: int, inputs_file: Path | None) -> list[tuple[torch.Tensor, ...]]:
    if inputs_file is not None:
        arrays = read_calibration_arrays(Path(inputs_file), imported)
        total = arrays[0].shape[0]
        return [tuple(a[i:i + batch_size] for a in arrays) for i in range(0, min(total, num_samples), batch_size)]
    tokens = None
    if any(vi.type.tensor_type.elem_type == onnx.TensorProto.INT64 for vi in imported.inputs) and \
            (path.parent / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from qcompiler.calib import data as calib_data

        tok = AutoTokenizer.from_pretrained(str(path.parent), trust_remote_code=False)
        tokens = calib_data.calibration_batches(tok, None, num_samples, seq_len, batch_size)
    g = torch.Generator().manual_seed(0)
    batches = []
    for bi in range(-(-num_samples // batch_size)):
        b = min(batch_size, num_samples - bi * batch_size)
        row = []
        for vi in imported.inputs:
            shape = _dims(vi, b, seq_len)
            et = vi.type.tensor_type.elem_type
            if et == onnx.TensorProto.FLOAT:
                row.append(torch.randn(shape, generator=g))
            elif et == onnx.TensorProto.INT64 and "mask" in vi.name:
                row.append(torch.ones(shape, dtype=torch.int64))
            elif et == onnx.TensorProto.INT64 and "position" in vi.name:
                row.append(torch.arange(shape[-1]).expand(shape).clone())
            elif et == onnx.TensorProto.INT64:
                if tokens is not None:
                    row.append(tokens[bi][:, : shape[-1]] if len(shape) == 2 else tokens[bi])
                else:
                    hi = _embedding_rows(model, vi.name) or 2
                    row.append(torch.randint(0, hi, shape, generator=g))
            else:
                raise CalibrationError(f"cannot generate calibration data for input '{vi.name}' (element type {et}); "
                                       "pass --calib-inputs FILE.npz")
        batches.append(tuple(row))
    return batches


_ONNX_TO_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
               onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_}


def read_calibration_arrays(path: Path, imported: ImportedModel) -> list[torch.Tensor]:
    """One array per graph input from an .npz (first axis: samples), checked against the graph's inputs: every
    input present, of its element type and rank, its fixed dimensions equal, and as many samples in each. The
    file is read as plain arrays (never pickled objects)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            found = {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise CalibrationError(f"calibration inputs '{path}' do not exist") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CalibrationError(f"'{path}' is not an .npz of plain arrays ({' '.join(str(e).split())[:200]}); save it "
                               "with numpy.savez(path, **{input_name: array})") from None
    missing = [vi.name for vi in imported.inputs if vi.name not in found]
    if missing:
        raise CalibrationError(f"'{path}' lacks arrays for graph inputs {missing} (it has {sorted(found)})")
    arrays, samples = [], None
    for vi in imported.inputs:
        a = found[vi.name]
        tt = vi.type.tensor_type
        want = _ONNX_TO_NP.get(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if want is None or a.dtype != np.dtype(want):
            raise CalibrationError(f"'{path}': array '{vi.name}' is {a.dtype}, the graph input takes "
                                   f"{np.dtype(want).name if want else onnx.TensorProto.DataType.Name(tt.elem_type)}")
        if a.ndim != len(dims) or any(d is not None and d > 0 and i > 0 and a.shape[i] != d for i, d in enumerate(dims)):
            raise CalibrationError(f"'{path}': array '{vi.name}' has shape {list(a.shape)}, the graph input is "
                                   f"{[d if d else '?' for d in dims]} (first axis: samples)")
        if samples is not None and a.shape[0] != samples:
            raise CalibrationError(f"'{path}': array '{vi.name}' holds {a.shape[0]} samples, the others {samples}")
        samples = a.shape[0]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CalibrationError(f"'{path}': array '{vi.name}' holds NaN or Inf values")
        arrays.append(torch.from_numpy(np.ascontiguousarray(a)))
    if not samples:
        raise CalibrationError(f"'{path}' holds no samples (the first axis of every array is the sample axis)")
    return arrays


def check_runs(imported: ImportedModel, path: Path, batch: tuple[torch.Tensor, ...]) -> None:
    """Run the imported float graph once on a calibration batch: a graph that cannot run on its own inputs (an
    initializer of the wrong type or shape in a damaged file) is refused here, naming the node, before any pass."""
    try:
        outputs = _outputs(imported.gm, batch)
    except Exception as e:  # noqa: BLE001 (the graph's own ops fail in many ways on an invalid graph)
        raise ModelLoadError(f"'{path}': the ONNX graph does not run on its inputs ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:240]}); check it with onnx.checker.check_model") from None
    bad = [vi.name for vi, y in zip(imported.outputs, outputs, strict=False)
           if y.is_floating_point() and not bool(torch.isfinite(y).all())]
    if bad:
        raise ModelLoadError(f"'{path}': the float ONNX graph computes NaN or Inf for outputs {bad} on the calibration "
                             "inputs; check its weights and the inputs")


def _outputs(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        y = gm(*args)
    return list(y) if isinstance(y, tuple | list) else [y]


def export_graph(gm: fx.GraphModule, imported: ImportedModel, path: Path, options: EmitOptions,
                 metadata: dict[str, str]) -> onnx.ModelProto:
    """Emit a (lowered) imported graph with the original inputs, outputs and opset."""
    b = OnnxBuilder(path, opset=max(imported.opset, 13))
    try:
        em = GraphEmitter(b, gm, "", options)
        for ph, vi in zip([n for n in gm.graph.nodes if n.op == "placeholder"], imported.inputs, strict=True):
            b.inputs.append(vi)
            b.fresh(vi.name)
            em.env[ph] = vi.name
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        results = out_node.args[0] if isinstance(out_node.args[0], tuple | list) else (out_node.args[0],)
        values = em.emit(list(results))
        for vi, v in zip(imported.outputs, values, strict=True):
            b.node("Identity", [v], f"output/{vi.name}", outputs=[vi.name])  # type: ignore[list-item]
            b.outputs.append(vi)
        return b.finish("qcompiler_" + path.stem, metadata)
    except BaseException:
        b.abort()
        raise


def compile_imported(imported: ImportedModel, scheme: QuantScheme, target: Target, passes: list[Pass],
                     calib: list[tuple[torch.Tensor, ...]], dump_dir: Path | None = None
                     ) -> tuple[fx.GraphModule, dict[str, float], dict[str, float], dict[str, float]]:
    """Run the pipeline on an imported graph: (lowered graph, per-layer and per-output SQNR in dB against the
    float graph on the first calibration batch, pass timings)."""
    gm = imported.gm
    float_gm = copy_graph(gm)
    ctx = PassContext(block="", scheme=scheme, target=target, calib=calib)
    transform = PassManager(passes[:-1], dump_dir=dump_dir)
    lowering = PassManager(passes[-1:], dump_dir=dump_dir)
    gm = transform.run(gm, ctx)
    y_float, y_quant, layer_sqnr = compare_layers(float_gm, gm, calib[0], ctx.output_divisors)  # (the float graph ran: checked before)
    outs_f = y_float if isinstance(y_float, tuple | list) else [y_float]
    outs_q = y_quant if isinstance(y_quant, tuple | list) else [y_quant]
    out_sqnr = {vi.name: round(sqnr_db(f.float(), q.float()), 2)
                for vi, f, q in zip(imported.outputs, outs_f, outs_q, strict=True) if f.is_floating_point()}
    gm = lowering.run(gm, ctx)
    return gm, layer_sqnr, out_sqnr, transform.timings | lowering.timings


def quantize_onnx(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`cfg` is a QuantizeConfig whose `model` is an .onnx file."""
    t0 = time.perf_counter()
    if cfg.target not in ("reference", "onnxruntime"):
        raise ModelLoadError(f"an ONNX model can only be lowered for target 'onnxruntime', not '{cfg.target}'")
    if cfg.scheme.kv_cache is not None or cfg.scheme.sparsity is not None:
        raise ModelLoadError(f"'{cfg.model}': KV-cache quantization and 2:4 sparsity are applied to Hugging Face "
                             "checkpoints (their attention and decoder export); quantize the source checkpoint, or "
                             "drop --kv-cache / use a scheme without sparsity for an ONNX input")
    plan = plan_run(dataclasses.replace(cfg, target="onnxruntime"), imported=True)
    target, passes = plan.target, plan.passes
    cfg = dataclasses.replace(cfg, scheme=plan.scheme)
    options = emit_options(cfg.target_options)
    path = Path(cfg.model)
    model = load_onnx(path)
    imported = import_onnx(model, path)  # unsupported operators are reported here, before any output exists
    check_output_dir(Path(cfg.out).absolute())
    calib = calibration_inputs(model, imported, path, cfg.num_samples, cfg.seq_len, cfg.batch_size,
                               cfg.extra.get("calib_inputs"))
    check_runs(imported, path, calib[0])
    del model
    log(f"quantizing {path} (imported: {sum(1 for n in imported.gm.graph.nodes if n.op == 'call_function')} nodes) "
        f"as {cfg.scheme.describe()} for target 'onnxruntime'")
    log(f"pipeline: {format_pipeline(passes)}")
    gm, layer_sqnr, out_sqnr, timings = compile_imported(imported, cfg.scheme, target, passes, calib, cfg.dump_dir)
    writer = ArtifactWriter(cfg.out)
    try:
        export_graph(gm, imported, writer.tmp / MODEL_FILE, options,
                     {"qcompiler.scheme": cfg.scheme.describe(), "qcompiler.pipeline": format_pipeline(passes)})
        layers = {path: rec.to_dict() for path, rec in block_records(gm, None, layer_sqnr).items()}
        elapsed = time.perf_counter() - t0
        description = {
            **description_head(cfg, plan),
            "architecture": "onnx",
            "onnx_model": MODEL_FILE,
            "calibration": {"batches": len(calib), "inputs": str(cfg.extra.get("calib_inputs") or "generated")},
            "output_sqnr_db": out_sqnr,
            "layers": layers,
        }
        run = {"quantize_seconds": round(elapsed, 2), "pass_seconds": {k: round(v, 2) for k, v in timings.items()}}
        out = writer.finish(description, copy_from=None, tokenizer=None, run_info=run)
    except BaseException:
        writer.abort()
        raise
    log(f"wrote {out} in {elapsed:.1f} s ({sum(1 for r in layers.values() if r['op'] != 'linear')} quantized layers; "
        f"output SQNR {out_sqnr} dB)")
    return {**description, "run": run}
