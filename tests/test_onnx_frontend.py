"""The ONNX frontend and the ONNX → ONNX path: import (numerics equal onnxruntime's on the float model),
quantize with the ordinary passes, export, run in onnxruntime; refusals name the operator and node."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from tiny import make_tiny_model

from qcompiler.driver import QuantizeConfig, default_pipeline
from qcompiler.driver.onnx import compile_imported, export_graph, quantize_onnx
from qcompiler.errors import CalibrationError, ModelLoadError, UnsupportedOpError
from qcompiler.export.artifact import verify_manifest
from qcompiler.export.onnx.emit import EmitOptions
from qcompiler.frontends.onnx import import_onnx, load_onnx
from qcompiler.ir.graph import CONV, LINEAR, is_call
from qcompiler.numerics import sqnr_db
from qcompiler.schemes import get_scheme
from qcompiler.targets import get_target


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x))))


def _export(module: torch.nn.Module, args: tuple, path: Path, names: list[str], dynamo: bool, dynamic: dict) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=["y"],
                              dynamic_shapes=dynamic, external_data=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=["y"], dynamic_axes={n: {0: "batch"} for n in names})
    return path


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.features[1].running_mean.normal_(0, 0.1)
        m.features[1].running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, 16)
    paths = {
        "legacy": _export(m, (x,), root / "cnn_legacy.onnx", ["x"], False, {}),
        "dynamo": _export(m, (x,), root / "cnn_dynamo.onnx", ["x"], True, {"x": {0: "batch"}}),
    }
    # the same model with every weight in an external-data file beside it
    (root / "ext").mkdir()
    paths["external"] = root / "ext" / "cnn.onnx"
    onnx.save_model(onnx.load(str(paths["legacy"])), str(paths["external"]), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="cnn.onnx.data", size_threshold=0)
    return paths


class _LogitsOnly(torch.nn.Module):
    def __init__(self, m: torch.nn.Module):
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids, use_cache=False).logits


class _LogitsWithMask(_LogitsOnly):
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.m(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.fixture(scope="module")
def llm_onnx(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llm")
    hf = AutoModelForCausalLM.from_pretrained(str(make_tiny_model(root / "hf", "llama", head_dim=32))).eval()
    ids = torch.randint(3, 250, (1, 16))
    return {
        "dynamo": _export(_LogitsOnly(hf), (ids,), root / "llm_dynamo.onnx", ["input_ids"], True,
                          {"ids": {1: "seq"}}),
        "legacy": _export(_LogitsWithMask(hf), (ids, torch.ones_like(ids)), root / "llm_legacy.onnx",
                          ["input_ids", "attention_mask"], False, {}),
    }


def _feeds(path: Path, seq: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in ort.InferenceSession(str(path)).get_inputs():
        shape = [d if isinstance(d, int) else (1 if k == 0 else seq) for k, d in enumerate(i.shape)]
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in i.name:
            feeds[i.name] = np.ones(shape, np.int64)
        else:
            feeds[i.name] = rng.integers(3, 250, shape).astype(np.int64)
    return feeds


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, feeds)[0]


@pytest.mark.parametrize("kind", ["cnn:legacy", "cnn:dynamo", "cnn:external", "llm:legacy", "llm:dynamo"])
def test_imported_graph_computes_what_onnxruntime_computes(cnn_onnx, llm_onnx, kind):
    family, exporter = kind.split(":")
    path = (cnn_onnx if family == "cnn" else llm_onnx)[exporter]
    imported = import_onnx(load_onnx(path), path)
    feeds = _feeds(path)
    y = imported.gm(*[torch.from_numpy(feeds[vi.name]) for vi in imported.inputs])
    np.testing.assert_allclose(y.detach().numpy(), _ort(path, feeds), rtol=1e-4, atol=1e-4)
    linears = [n for n in imported.gm.graph.nodes if is_call(n, LINEAR)]
    assert len(linears) == (2 if family == "cnn" else 2 * 7 + 1)  # Gemm/MatMul with weights → aten.linear


def _eight_bit_operand_types(path: Path) -> set[int]:
    """The element types of every 8-bit GEMM operand in the file: the zero points of QuantizeLinear /
    DequantizeLinear and MatMulInteger's inputs that are initializers. They must be uint8 on both sides: onnxruntime's
    u8×s8 kernels saturate on x86 CPUs without VNNI (AVX2: logits 10–30 % off), u8×u8 is exact on all of them."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    types = set()
    for node in model.graph.node:
        names = {"QuantizeLinear": node.input[2:3], "DequantizeLinear": node.input[2:3],
                 "MatMulInteger": node.input[1:4]}.get(node.op_type, [])
        types |= {inits[n] for n in names if n in inits}
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(node.input) == 3, f"{node.name}: no zero point (its type would be int8 for a weight)"
    return types


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w8a8", "w8a8_dynamic"])
def test_quantized_transformer_export_runs_in_onnxruntime_exactly_as_the_lowered_graph(llm_onnx, tmp_path, scheme):
    path = llm_onnx["dynamo"]
    imported = import_onnx(load_onnx(path), path)
    s = get_scheme(scheme, group_size=32) if scheme.startswith("w4") else get_scheme(scheme)
    target = get_target("onnxruntime")
    ids = [torch.randint(3, 250, (1, 16)) for _ in range(4)]
    feeds = _feeds(path)
    float_logits = _ort(path, feeds)
    gm, layer_sqnr, out_sqnr, _ = compile_imported(imported, s, target, default_pipeline(s, target), [(i,) for i in ids])
    out = tmp_path / "model.onnx"
    export_graph(gm, imported, out, EmitOptions(accuracy_level=0, w8a8_dynamic="exact"), {})
    onnx.checker.check_model(str(out), full_check=True)
    ops = Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    # fused q|k|v, o, fused gate|up, down per block (the head matches the scheme's default ignore list: float)
    kernel = {"w8a16": "MatMulNBits", "w4a16": "MatMulNBits", "w8a8": "QuantizeLinear", "w8a8_dynamic": "MatMulInteger"}
    assert ops[kernel[scheme]] == 2 * 4 and ops["MatMul"] >= 1
    assert _eight_bit_operand_types(out) == ({TensorProto.UINT8} if scheme.startswith("w8a8") else set())
    got = _ort(out, feeds)
    expect = gm(torch.from_numpy(feeds["input_ids"])).detach().numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)
    assert len(layer_sqnr) == 2 * 7 + 1 and out_sqnr["y"] > 5
    # every layer keeps its own weights (a fused-name clash once gave layer 0 layer 1's q|k|v: these catch it)
    # (each layer's output through the quantized graph vs the float graph; the float head sees quantized inputs)
    assert min(layer_sqnr.values()) > {"w8a16": 30, "w8a8_dynamic": 20, "w8a8": 15, "w4a16": 8}[scheme]
    assert sqnr_db(torch.from_numpy(float_logits), torch.from_numpy(got)) > (10 if scheme == "w4a16" else 20)


def test_quantize_onnx_cnn_writes_a_complete_folder(cnn_onnx, tmp_path):
    out = tmp_path / "q"
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32))
    desc = quantize_onnx(QuantizeConfig(model=cnn_onnx["legacy"], scheme=get_scheme("w8a8"), out=out, num_samples=8,
                                        batch_size=4, target="onnxruntime", extra={"calib_inputs": calib}),
                         log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data", "qcompiler.json",
                                                    "run.json"]
    verify_manifest(out)
    ops_by_layer = Counter(r["op"] for r in desc["layers"].values())
    assert ops_by_layer == {"linear_w8a8": 2, "conv_int8": 2} and {"fc1", "fc2"} <= set(desc["layers"])
    assert all(r["activations"] == {"bits": 8, "dynamic": False, "granularity": "tensor", "symmetric": True}
               for r in desc["layers"].values())
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    assert ops["Conv"] == 2 and ops["QuantizeLinear"] == 4 and ops["Gemm"] == 0
    feeds = _feeds(cnn_onnx["legacy"])
    assert sqnr_db(torch.from_numpy(_ort(cnn_onnx["legacy"], feeds)), torch.from_numpy(_ort(out / "model.onnx", feeds))) > 20
    # What onnxruntime makes of it: the Q/DQ MatMuls become integer GEMMs; the convolutions, whose outputs are not
    # re-quantized (our schemes quantize layer inputs only), run as float convolutions on the dequantized int8
    # kernels (QLinearConv needs a quantized output) — int8 on disk, float speed. Pinned so a change shows.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), so)
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert fused["QLinearConv"] == 0 and fused["FusedConv"] + fused["Conv"] == 2, fused
    with pytest.raises(CalibrationError, match="lacks arrays"):
        np.savez(calib, image=np.zeros((2, 3, 16, 16), np.float32))
        quantize_onnx(QuantizeConfig(model=cnn_onnx["legacy"], scheme=get_scheme("w8a8"), out=tmp_path / "q2",
                                     extra={"calib_inputs": calib}), log=lambda _: None)
    assert not (tmp_path / "q2").exists()


def test_int8_convolutions_export_as_the_lowered_graph_computes(cnn_onnx, tmp_path):
    path = cnn_onnx["dynamo"]
    imported = import_onnx(load_onnx(path), path)
    target = get_target("onnxruntime")
    feeds = _feeds(path)
    for scheme, expect_q in (("w8a16", 0), ("w8a8", 4)):
        s = get_scheme(scheme)
        calib = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
        gm, layer_sqnr, _, _ = compile_imported(import_onnx(load_onnx(path), path), s, target,
                                                default_pipeline(s, target), calib)
        out = tmp_path / f"{scheme}.onnx"
        export_graph(gm, imported, out, EmitOptions(accuracy_level=0), {})
        ops = Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
        assert ops["Conv"] == 2 and ops["QuantizeLinear"] == expect_q
        assert _eight_bit_operand_types(out) == {TensorProto.UINT8}  # (int8 kernels of both schemes)
        assert ops["DequantizeLinear"] == 2 + (2 * expect_q if scheme == "w8a8" else 0) - (2 if scheme == "w8a8" else 0)
        expect = gm(torch.from_numpy(feeds["x"])).detach().numpy()
        np.testing.assert_allclose(_ort(out, feeds), expect, rtol=1e-3, atol=1e-3)
        assert len(layer_sqnr) == 4 and min(layer_sqnr.values()) > 20
    # int4 has no convolution kernel: the convolutions stay float, the report says why
    s = get_scheme("w4a16", group_size=32)
    gm, layer_sqnr, _, _ = compile_imported(import_onnx(load_onnx(path), path), s, target, default_pipeline(s, target),
                                            [(torch.randn(2, 3, 16, 16),)])
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is CONV and "qc.record" in n.meta) == 0


OPTIMUM = Path(__file__).parent / "data" / "optimum"


def _optimum_feeds(path: Path, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for i in ort.InferenceSession(str(path)).get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, 250, (2, 10)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((2, past + 10), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(past, past + 10)[None].repeat(2, 0).astype(np.int64)
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros((2, 10), np.int64)
        else:  # past_key_values.*: [batch, kv heads, past, head dim]
            feeds[i.name] = rng.standard_normal((2, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["llama-with-past.onnx", "bert.onnx"])
def test_optimum_exports_import_exactly_and_quantize(name, tmp_path):
    path = OPTIMUM / name
    imported = import_onnx(load_onnx(path), path)
    feeds = _optimum_feeds(path, past=4 if name.startswith("llama") else 0)
    expect = ort.InferenceSession(str(path)).run(None, feeds)
    got = imported.gm(*[torch.from_numpy(feeds[vi.name]) for vi in imported.inputs])
    got = got if isinstance(got, tuple | list) else [got]
    for e, g in zip(expect, got, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=1e-4, atol=1e-4)
    out = tmp_path / "q"
    desc = quantize_onnx(QuantizeConfig(model=path, scheme=get_scheme("w8a8_dynamic"), out=out, num_samples=4,
                                        batch_size=2, seq_len=16), log=lambda _: None)
    assert len(desc["layers"]) == 2 * 4  # fused q|k|v, o, (fused) MLP; the head is float (default ignore list)
    assert any(k.startswith(("model.layers.0.", "encoder.layer.0.")) for k in desc["layers"])
    quantized = ort.InferenceSession(str(out / "model.onnx")).run(None, feeds)  # KV-cache inputs included
    assert sqnr_db(torch.from_numpy(expect[0]), torch.from_numpy(quantized[0])) > 20


def _run_single_op(op: str, x: np.ndarray, consts: list[np.ndarray], n_out: int = 1, **attrs) -> np.ndarray:
    """The first output of one ONNX node run by onnxruntime."""
    names = [f"c{i}" for i in range(len(consts))]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, ["x", *names], outs, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                          [onnx.numpy_helper.from_array(c, n) for c, n in zip(consts, names, strict=True)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("op,consts,attrs", [
    ("Slice", [[0], [2], [0], [1]], {}),
    ("Slice", [[-1], [-4], [2], [-1]], {}),
    ("Slice", [[1, 0], [100, -1], [1, 2], [2, 1]], {}),
    ("Slice", [[4], [-100], [2], [-2]], {}),
    ("Slice", [[3], [0], [1], [-1]], {}),
    ("Unsqueeze", [[-1, 0]], {}),
    ("Squeeze", [], {}),
    ("Flatten", [], {"axis": 3}),
    ("Flatten", [], {"axis": -1}),
    ("Gather", [[-1, 0]], {"axis": 1}),
    ("Split", [[1, 3]], {"axis": 1}),
    ("Expand", [[2, 3, 4, 5]], {}),
    ("Transpose", [], {"perm": [2, 0, 1]}),
    ("ReduceMax", [], {"axes": [1], "keepdims": 0}),
    ("CumSum", [1], {}),
])
def test_op_implementations_match_onnxruntime(op, consts, attrs):
    from qcompiler.frontends.onnx import OnnxOp

    x = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    if op == "Squeeze":
        x = x[:, :1]
    arrays = [np.array(c, np.int64) for c in consts]
    n_out = 2 if op == "Split" else 1
    want = _run_single_op(op, x, arrays, n_out, **attrs)
    got = OnnxOp(op, attrs, n_out)(torch.from_numpy(x), *(torch.from_numpy(a) for a in arrays))
    got = got[0] if isinstance(got, tuple) else got  # (Split: the first output)
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def _model_with(nodes: list, inputs: list, outputs: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])


def test_unsupported_operators_are_all_named_before_any_work(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    model = _model_with([helper.make_node("Relu", ["x"], ["a"], name="ok"),
                         helper.make_node("FancyNorm", ["a"], ["b"], name="my_norm", domain="custom.ops"),
                         helper.make_node("NonMaxSuppression", ["b"], ["y"], name="nms")], [x], [y])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "q"
    with pytest.raises(UnsupportedOpError) as e:
        quantize_onnx(QuantizeConfig(model=path, scheme=get_scheme("w8a16"), out=out), log=lambda _: None)
    msg = str(e.value)
    assert "custom.ops::FancyNorm" in msg and "'my_norm'" in msg and "ai.onnx::NonMaxSuppression" in msg and "'nms'" in msg
    assert "2 node(s)" in msg and not out.exists()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_cli_quantizes_an_onnx_file(llm_onnx, tmp_path):
    from qcompiler.cli import main

    out = tmp_path / "q"
    assert main(["quant", "--model", str(llm_onnx["dynamo"]), "--scheme", "w4a16", "--group-size", "32",
                 "--num-samples", "2", "--batch-size", "1", "--seq-len", "16", "--out", str(out)]) == 0
    feeds = _feeds(llm_onnx["dynamo"])
    assert _ort(out / "model.onnx", feeds).shape == _ort(llm_onnx["dynamo"], feeds).shape
    assert main(["inspect", str(out)]) == 0
    assert main(["eval", str(out)]) == 2  # an imported graph has no perplexity to measure: said, not crashed
    assert main(["quant", "--model", str(llm_onnx["dynamo"]), "--scheme", "w4a16", "--target", "reference",
                 "--fallback", "auto", "--out", str(tmp_path / "x")]) == 2
