"""Seeded fuzzing of the inputs qcompile reads: a tiny safetensors checkpoint (its weights, its header, config.json,
the shard index) and a tiny ONNX model, mutated by bit flips, truncation and shape / dtype / value edits.

Every case must end in exit code 2 with one line on stderr, or exit code 0 with a complete, verified artefact
whose tensors are finite; never a traceback, never a file written outside --out. CI runs FUZZ_CASES cases per
input kind (short); QCOMPILE_FUZZ_CASES=500 runs a longer campaign (the README states what was tried)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import TEXT, make_tiny_model

from qcompiler.cli import main
from qcompiler.export.artifact import verify_manifest

FUZZ_CASES = int(os.environ.get("QCOMPILE_FUZZ_CASES", "12"))
SCHEMES = (("w8a16", "rtn"), ("w4a16", "gptq"), ("w8a8", "rtn"))


@pytest.fixture(scope="module")
def seed_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    model = make_tiny_model(root / "llama", "llama")
    sharded = root / "sharded"
    shutil.copytree(model, sharded)
    tensors = safe_open(str(sharded / "model.safetensors"), "pt").keys()
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}))
    (root / "calib.txt").write_text(TEXT)
    return {"model": model, "sharded": sharded, "onnx": _tiny_onnx(root / "mlp.onnx"), "text": root / "calib.txt"}


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = np.random.default_rng(0)
    inits = [numpy_helper.from_array(gen.standard_normal(s).astype(np.float32) * 0.1, n)
             for n, s in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ------------------------------------------------------------------------------------------ mutations


def _flip_bits(data: bytes, gen: np.random.Generator, region: tuple[int, int] | None = None) -> bytes:
    b = bytearray(data)
    lo, hi = region or (0, len(b))
    for _ in range(int(gen.integers(1, 9))):
        i = int(gen.integers(lo, hi))
        b[i] ^= 1 << int(gen.integers(0, 8))
    return bytes(b)


def _mutate_safetensors(path: Path, gen: np.random.Generator) -> str:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    kind = gen.choice(["header_bits", "data_bits", "truncate", "shape", "dtype", "offsets"])
    if kind == "header_bits":
        path.write_bytes(_flip_bits(data, gen, (0, 8 + n)))
    elif kind == "data_bits":
        path.write_bytes(_flip_bits(data, gen, (8 + n, len(data))))
    elif kind == "truncate":
        path.write_bytes(data[: int(gen.integers(0, len(data)))])
    else:
        header = json.loads(data[8:8 + n])
        name = str(gen.choice(sorted(k for k in header if k != "__metadata__")))
        entry = header[name]
        if kind == "shape":
            entry["shape"] = [int(d) + int(gen.integers(-2, 3)) for d in entry["shape"]][::int(gen.choice([1, -1]))]
        elif kind == "dtype":
            entry["dtype"] = str(gen.choice(["I32", "F16", "BF16", "I64", "U8", "F64", "BOOL", "F8_E4M3"]))
        else:
            entry["data_offsets"] = [int(o) + int(gen.integers(-64, 65)) for o in entry["data_offsets"]]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        return f"safetensors {kind} {name}"
    return f"safetensors {kind}"


_CONFIG_VALUES = (0, -1, 1, 2, 3, 7, 10**9, 1e-30, -0.5, float("nan"), "x", None, [], {}, True, "llama", "gemma")


def _mutate_config(path: Path, gen: np.random.Generator) -> str:
    text = path.read_text()
    kind = gen.choice(["value", "value", "value", "drop", "truncate"])
    if kind == "truncate":
        path.write_text(text[: int(gen.integers(0, len(text)))])
        return "config truncate"
    config = json.loads(text)
    key = str(gen.choice(sorted(config)))
    if kind == "drop":
        del config[key]
    else:
        config[key] = _CONFIG_VALUES[int(gen.integers(0, len(_CONFIG_VALUES)))]
    path.write_text(json.dumps(config))
    return f"config {kind} {key}={config.get(key)!r}"


def _mutate_index(path: Path, gen: np.random.Generator) -> str:
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    name = str(gen.choice(sorted(wm)))
    kind = gen.choice(["drop", "other_file", "escape", "garbage", "add"])
    if kind == "drop":
        del wm[name]
    elif kind == "other_file":
        wm[name] = "model-00002-of-00002.safetensors"
    elif kind == "escape":
        wm[name] = str(gen.choice(["../llama/model.safetensors", "/dev/zero", "./x/../../y"]))
    elif kind == "add":
        wm["model.layers.9.mlp.up_proj.weight"] = next(iter(wm.values()))
    else:
        path.write_text(json.dumps(index)[: int(gen.integers(0, 40))])
        return "index garbage"
    path.write_text(json.dumps(index))
    return f"index {kind} {name}"


def _mutate_onnx(path: Path, gen: np.random.Generator) -> str:
    import onnx

    kind = gen.choice(["bits", "truncate", "dims", "elem_type", "rename_input"])
    data = path.read_bytes()
    if kind == "bits":
        path.write_bytes(_flip_bits(data, gen))
        return "onnx bits"
    if kind == "truncate":
        path.write_bytes(data[: int(gen.integers(0, len(data)))])
        return "onnx truncate"
    model = onnx.load(str(path))
    init = model.graph.initializer[int(gen.integers(0, len(model.graph.initializer)))]
    if kind == "dims":
        dims = [max(0, int(d) + int(gen.integers(-3, 4))) for d in init.dims]
        del init.dims[:]
        init.dims.extend(dims)
    elif kind == "elem_type":
        init.data_type = int(gen.choice([onnx.TensorProto.INT32, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16]))
    else:
        model.graph.node[int(gen.integers(0, len(model.graph.node)))].input[0] = "nowhere"
    path.write_bytes(model.SerializeToString())
    return f"onnx {kind} {init.name}"


# ------------------------------------------------------------------------------------------ the property


def _listing(root: Path, skip: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if skip not in (p, *p.parents)}


def _check_case(capsys, case_dir: Path, argv: list[str], what: str) -> int:
    out = case_dir / "out"
    before = _listing(case_dir, out)
    capsys.readouterr()
    try:
        rc = main(argv + ["--out", str(out), "--no-progress"])
    except SystemExit as e:
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    assert _listing(case_dir, out) == before, f"{what}: files appeared outside --out"
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, f"{what}: {err}"
        assert not out.exists(), f"{what}: a refused run left {out}"
        return rc
    assert rc == 0, f"{what}: exit code {rc}: {err}"
    verify_manifest(out)
    json.loads((out / "qcompiler.json").read_text(), parse_constant=lambda c: pytest.fail(f"{what}: JSON {c}"))
    for f in out.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                t = h.get_tensor(k)
                assert not t.is_floating_point() or bool(torch.isfinite(t.float()).all()), f"{what}: {f.name}:{k}"
    return rc


KINDS = ("weights", "config", "index")


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_checkpoints_end_in_a_clear_error_or_a_verified_artefact(seed_inputs, tmp_path, capsys, kind):
    outcomes = []
    for case in range(FUZZ_CASES):
        gen = np.random.default_rng([KINDS.index(kind), case])
        case_dir = tmp_path / f"case-{case}"
        case_dir.mkdir()
        model = case_dir / "model"
        shutil.copytree(seed_inputs["sharded" if kind == "index" else "model"], model)
        if kind == "weights":
            what = _mutate_safetensors(model / "model.safetensors", gen)
        elif kind == "config":
            what = _mutate_config(model / "config.json", gen)
        else:
            what = _mutate_index(model / "model.safetensors.index.json", gen)
        scheme, algo = SCHEMES[case % len(SCHEMES)]
        argv = ["quant", "--model", str(model), "--scheme", scheme, "--algo", algo, "--calib-text",
                str(seed_inputs["text"]), "--num-samples", "2", "--seq-len", "32", "--batch-size", "2"]
        outcomes.append(_check_case(capsys, case_dir, argv, f"case {case} ({what}, {scheme})"))
        shutil.rmtree(case_dir)
    with capsys.disabled():
        print(f"\nfuzz {kind}: {len(outcomes)} cases, exit codes {dict(sorted(Counter(outcomes).items()))}")
    assert 2 in outcomes  # (the mutations do reach the checks)


def test_fuzzed_onnx_models_end_in_a_clear_error_or_a_verified_artefact(seed_inputs, tmp_path, capsys):
    outcomes = []
    for case in range(FUZZ_CASES):
        gen = np.random.default_rng([3, case])
        case_dir = tmp_path / f"case-{case}"
        case_dir.mkdir()
        model = case_dir / "mlp.onnx"
        shutil.copy(seed_inputs["onnx"], model)
        what = _mutate_onnx(model, gen)
        argv = ["quant", "--model", str(model), "--scheme", "w8a8", "--num-samples", "4", "--batch-size", "2"]
        outcomes.append(_check_case(capsys, case_dir, argv, f"case {case} ({what})"))
        shutil.rmtree(case_dir)
    with capsys.disabled():
        print(f"\nfuzz onnx: {len(outcomes)} cases, exit codes {dict(sorted(Counter(outcomes).items()))}")
    assert 2 in outcomes
