"""Bad input: every damaged or contradictory file, and every meaningless option, is one line on stderr with exit
code 2 that names the file / tensor / option and what to do, before anything is written — never a traceback, never
a silent wrong result, never an output folder."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TEXT, make_tiny_model

from qcompiler.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("bad") / "llama", "llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text(TEXT)
    return f


def run(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in process: (exit code, everything it wrote to stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # (argparse's usage errors)
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def quant(capsys, model: Path, out: Path, text: Path, *extra: str, scheme: str = "w8a16") -> tuple[int, str]:
    return run(capsys, "quant", "--model", str(model), "--scheme", scheme, "--out", str(out), "--calib-text",
               str(text), "--num-samples", "2", "--seq-len", "32", "--batch-size", "2", "--no-progress", *extra)


def refused(rc: int, err: str, *names: str) -> None:
    """Exit code 2 with one line naming every one of `names`."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("qcompile "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])


def nothing_written(parent: Path, before: set[str]) -> None:
    """No output folder, work folder or lock appeared next to the model."""
    assert {p.name for p in parent.iterdir()} == before


def copy_model(model: Path, dst: Path) -> Path:
    shutil.copytree(model, dst)
    return dst


def rewrite_weights(folder: Path, change) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ damaged weight files


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "absurd_header"])
def test_damaged_safetensors_is_refused_naming_the_file(model, text, tmp_path, capsys, damage):
    m = copy_model(model, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    gen = np.random.default_rng(0)
    f.write_bytes({"truncated": data[: len(data) // 2], "random": gen.bytes(4096), "empty": b"",
                   "absurd_header": struct.pack("<Q", 1 << 60) + data[8:]}[damage])
    before = {p.name for p in tmp_path.iterdir()}
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, "model.safetensors", "not a readable safetensors file")
    nothing_written(tmp_path, before)


def _shard(model: Path, dst: Path, weight_map_of=None) -> Path:
    """The model as a sharded checkpoint with an index (weight_map_of rewrites the index's map)."""
    m = copy_model(model, dst)
    (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
    names = load_file(str(m / "model-00001-of-00001.safetensors")).keys()
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    if weight_map_of is not None:
        weight_map = weight_map_of(weight_map)
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return m


def test_index_that_is_not_json_is_refused(model, text, tmp_path, capsys):
    m = _shard(model, tmp_path / "m")
    (m / "model.safetensors.index.json").write_text('{"weight_map": {')
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, "model.safetensors.index.json", "not valid JSON")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(model, text, tmp_path, capsys, where):
    def redirect(weight_map):
        first = next(iter(weight_map))
        return {**weight_map, first: where}

    m = _shard(model, tmp_path / "m", redirect)
    shutil.copy(m / "model-00001-of-00001.safetensors", tmp_path / "outside.safetensors")
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, "model.safetensors.index.json", where)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "says"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON list")])
def test_config_that_is_not_a_json_object_is_refused_as_the_config(model, text, tmp_path, capsys, content, says):
    m = copy_model(model, tmp_path / "m")
    (m / "config.json").write_text(content)
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, "config.json", says)
    assert "tokenizer" not in err


@pytest.mark.parametrize("method", ["gptq", "compressed-tensors", "fp8"])
def test_an_already_quantized_checkpoint_is_refused_naming_its_method(model, text, tmp_path, capsys, method):
    m = copy_model(model, tmp_path / "m")
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    before = {p.name for p in tmp_path.iterdir()}
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, "config.json", f"quant_method '{method}'", "float original")
    nothing_written(tmp_path, before)


def test_weights_of_another_shape_or_an_integer_dtype_are_refused_naming_the_tensor(model, text, tmp_path, capsys):
    name = "model.layers.1.mlp.down_proj.weight"
    m = copy_model(model, tmp_path / "shape")
    rewrite_weights(m, lambda t: t.__setitem__(name, t[name][:, :-8].contiguous()))
    rc, err = quant(capsys, m, tmp_path / "o1", text)
    refused(rc, err, name, "shape", "config.json")
    m = copy_model(model, tmp_path / "dtype")
    rewrite_weights(m, lambda t: t.__setitem__(name, (t[name] * 1000).to(torch.int32)))
    rc, err = quant(capsys, m, tmp_path / "o2", text)
    refused(rc, err, name, "I32")
    m = copy_model(model, tmp_path / "embed")  # (outer weights were assigned without a shape check)
    rewrite_weights(m, lambda t: t.__setitem__("model.embed_tokens.weight", t["model.embed_tokens.weight"][:-3]))
    rc, err = quant(capsys, m, tmp_path / "o3", text)
    refused(rc, err, "model.embed_tokens.weight", "shape")


def test_a_missing_tensor_is_found_before_any_block_runs(model, text, tmp_path, capsys):
    name = "model.layers.1.self_attn.v_proj.weight"
    m = copy_model(model, tmp_path / "m")
    rewrite_weights(m, lambda t: t.pop(name))
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, name, "missing")
    assert not (tmp_path / ".out.partial").exists()  # (refused before the first block, not after it)


def test_config_with_fewer_layers_than_the_checkpoint_is_refused_naming_the_unused_tensors(model, text, tmp_path,
                                                                                           capsys):
    m = copy_model(model, tmp_path / "m")
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    rc, err = quant(capsys, m, tmp_path / "out", text)
    refused(rc, err, "model.layers.1.", "does not use")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "algo"), [
    ("model.embed_tokens.weight", "rtn"),  # (was copied silently)
    ("model.layers.0.self_attn.q_proj.weight", "rtn"),  # (crashed inside pack_int4)
    ("model.layers.1.self_attn.q_proj.weight", "gptq"),  # (named an FX node)
    ("model.norm.weight", "rtn"),
])
def test_nan_or_inf_in_any_weight_is_refused_naming_the_tensor(model, text, tmp_path, capsys, name, algo):
    m = copy_model(model, tmp_path / "m")

    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[3] = float("nan") if "q_proj" in name else float("inf")

    rewrite_weights(m, poison)
    rc, err = quant(capsys, m, tmp_path / "out", text, "--algo", algo, scheme="w4a16")
    refused(rc, err, name, "NaN or Inf")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ meaningless options


@pytest.mark.parametrize(("extra", "says"), [
    (("--group-size", "-1"), "--group-size -1"),
    (("--seed", "-3"), "--seed -3"),
    (("--num-samples", "0"), "--num-samples 0"),
    (("--group-size", "4096"), "group size 4096 is larger than every layer's input size"),
    (("--group-size", "x"), "invalid int value"),
])
def test_meaningless_numbers_are_refused(model, text, tmp_path, capsys, extra, says):
    rc, err = quant(capsys, model, tmp_path / "out", text, *extra, scheme="w4a16")
    refused(rc, err, says)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ ONNX inputs


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gen = np.random.default_rng(0)
    w = numpy_helper.from_array(gen.standard_normal((16, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    path = tmp_path_factory.mktemp("onnx") / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def onnx_quant(capsys, model: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run(capsys, "quant", "--model", str(model), "--scheme", "w8a8", "--out", str(out), "--num-samples", "4",
               "--batch-size", "2", "--no-progress", *extra)


def test_empty_or_garbage_onnx_is_refused(tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    rc, err = onnx_quant(capsys, tmp_path / "empty.onnx", tmp_path / "out")
    refused(rc, err, "empty.onnx", "empty")
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(0).bytes(300))
    rc, err = onnx_quant(capsys, tmp_path / "junk.onnx", tmp_path / "out")
    refused(rc, err, "junk.onnx")
    assert not (tmp_path / "out").exists()


def test_calibration_npz_is_checked_against_the_graph(onnx_model, tmp_path, capsys):
    rc, err = onnx_quant(capsys, onnx_model, tmp_path / "out", "--calib-inputs", str(tmp_path / "missing.npz"))
    refused(rc, err, "missing.npz", "do not exist")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}, None], dtype=object))
    rc, err = onnx_quant(capsys, onnx_model, tmp_path / "out", "--calib-inputs", str(tmp_path / "objects.npz"))
    refused(rc, err, "objects.npz", "not an .npz of plain arrays")
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 12), dtype=np.float32))
    rc, err = onnx_quant(capsys, onnx_model, tmp_path / "out", "--calib-inputs", str(tmp_path / "shape.npz"))
    refused(rc, err, "shape.npz", "'x'", "[4, 12]")
    np.savez(tmp_path / "dtype.npz", x=np.zeros((4, 16), dtype=np.float64))
    rc, err = onnx_quant(capsys, onnx_model, tmp_path / "out", "--calib-inputs", str(tmp_path / "dtype.npz"))
    refused(rc, err, "dtype.npz", "float64")
    np.savez(tmp_path / "other.npz", z=np.zeros((4, 16), dtype=np.float32))
    rc, err = onnx_quant(capsys, onnx_model, tmp_path / "out", "--calib-inputs", str(tmp_path / "other.npz"))
    refused(rc, err, "other.npz", "lacks arrays")
    np.savez(tmp_path / "good.npz", x=np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32))
    rc, err = onnx_quant(capsys, onnx_model, tmp_path / "out", "--calib-inputs", str(tmp_path / "good.npz"))
    assert rc == 0, err
    assert (tmp_path / "out" / "model.onnx").is_file()


# ------------------------------------------------------------------------------------------ JSON we write


def test_an_exact_layer_writes_standard_json(model, text, tmp_path, capsys):
    """A layer whose quantization is exact has an infinite SQNR: written as null, never as the non-JSON Infinity."""
    m = copy_model(model, tmp_path / "m")
    rewrite_weights(m, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                                               torch.zeros_like(t["model.layers.0.mlp.up_proj.weight"])))
    rc, err = quant(capsys, m, tmp_path / "out", text)
    assert rc == 0, err
    desc = json.loads((tmp_path / "out" / "qcompiler.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    sqnr = {k: v for rec in desc["layers"].values() for k, v in rec["output_sqnr_db"].items()}
    assert sqnr["model.layers.0.mlp.up_proj"] is None and sqnr["model.layers.0.mlp.gate_proj"] > 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "up_proj exact" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["config_list", "vocab_mismatch", "nan"])
@pytest.mark.slow
def test_a_refusal_is_one_line_on_the_real_stderr(model, text, tmp_path, damage):
    """In a real process, where library loggers write to the terminal too (capsys cannot see them)."""
    import subprocess
    import sys

    m = copy_model(model, tmp_path / "m")
    if damage == "config_list":
        (m / "config.json").write_text("[]")
    elif damage == "vocab_mismatch":  # (transformers warns about the special tokens before our refusal)
        config = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**config, "vocab_size": 2}))
    else:
        rewrite_weights(m, lambda t: t["model.layers.0.mlp.up_proj.weight"].view(-1).__setitem__(0, float("nan")))
    done = subprocess.run([sys.executable, "-m", "qcompiler.cli", "quant", "--model", str(m), "--scheme", "w8a16",
                           "--out", str(tmp_path / "out"), "--calib-text", str(text), "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_target_option_value_out_of_its_choices_is_one_line_before_any_work(model, text, tmp_path, capsys):
    """(two options in one flag read as one value: it was an internal error while the pipeline was planned)"""
    rc, err = quant(capsys, model, tmp_path / "out", text, "--target", "onnxruntime", "--target-option",
                    "lm_head_bits=float,accuracy_level=0")
    assert rc == 2 and "has no option lm_head_bits=float,accuracy_level=0" in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
