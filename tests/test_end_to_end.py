"""Whole models: quantize → artefact → reload → logits, the CLI, bad input, atomic output."""

import hashlib
import json

import pytest
import torch
from tiny import FAMILIES

from qcompiler.cli import main
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ArtifactError, CalibrationError, PassError, SchemeError
from qcompiler.numerics import fake_quant_weight
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme


def _quantize(model, out, scheme, text, passes=None, **kw):
    from qcompiler.pm.pipeline import parse_pipeline

    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, calib_texts=[text], num_samples=4, seq_len=48,
                         batch_size=2, progress=False, passes=parse_pipeline(passes) if passes else None, **kw)
    return quantize(cfg, log=lambda s: None)


@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_model_matches_the_fake_quantized_float_model(tiny_models, family, tmp_path, calib_text):
    """The reference target runs the lowered model end to end; its logits equal those of the float model
    with every block linear replaced by its fake-quantized weight (rows quantize independently, so fusion
    does not change the grid)."""
    from transformers import AutoModelForCausalLM

    scheme = get_scheme("w4a16", group_size=32)
    _quantize(tiny_models[family], tmp_path / "out", scheme, calib_text, passes="fuse_linears,rtn")
    fake = AutoModelForCausalLM.from_pretrained(str(tiny_models[family]), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, mod in fake.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(fake_quant_weight(mod.weight, scheme.weights))
    q = load_quantized(tmp_path / "out")
    ids = torch.randint(3, 250, (2, 33))
    with torch.no_grad():
        expect, got = fake(ids).logits, q(ids).logits
    assert float((got - expect).norm() / expect.norm()) < 1e-5


@pytest.mark.slow
def test_reload_in_bf16_uses_cpu_int4_kernels(tiny_llama, tmp_path, calib_text):
    _quantize(tiny_llama, tmp_path / "out", get_scheme("w4a16", group_size=32), calib_text)
    exact = load_quantized(tmp_path / "out")
    fast = load_quantized(tmp_path / "out", dtype=torch.bfloat16)
    ops = [n.target for blk in fast.model.layers for n in blk.gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.qc.linear_int4pack_cpu.default) == 8 and torch.ops.qc.linear_woq.default not in ops
    ids = torch.randint(3, 250, (2, 33))
    with torch.no_grad():
        a, b = exact(ids).logits, fast(ids).logits.float()
    assert float((a - b).norm() / a.norm()) < 0.05  # bf16 activations: a few 2^-8 per layer


def test_artefact_description_and_determinism(tiny_llama, tmp_path, calib_text):
    scheme = get_scheme("w8a8")
    d1 = _quantize(tiny_llama, tmp_path / "a", scheme, calib_text)
    _quantize(tiny_llama, tmp_path / "b", scheme, calib_text)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"config.json", "qcompiler.json", "model.safetensors.index.json", "rest.safetensors",
            "block-00000.safetensors", "block-00001.safetensors"} <= set(files)
    for f in files:
        if f.endswith(".safetensors"):
            h = [hashlib.sha256((tmp_path / x / f).read_bytes()).hexdigest() for x in ("a", "b")]
            assert h[0] == h[1], f
    layers = d1["layers"]
    assert len(layers) == 8 and {r["op"] for r in layers.values()} == {"linear_w8a8"}
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert [m["path"] for m in qkv["fused_from"]] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert set(qkv["output_sqnr_db"]) == {m["path"] for m in qkv["fused_from"]}
    assert all(v > 20 for v in qkv["output_sqnr_db"].values())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # run.json says where the time went: every phase of the block loop, summing to the run's time (the laps cover it)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    phases = run["phase_seconds"]
    assert {"open: tokenizer, outer weights, tokenize the calibration text", "prologue: first block inputs",
            "trace and read weights", "passes: own arithmetic",
            "passes: calibration forwards and statistics", "per-layer error report", "propagate to the next block",
            "lower", "write: export, block files, checkpoint"} == set(phases)
    assert all(v >= 0 for v in phases.values()) and phases["passes: calibration forwards and statistics"] > 0
    assert abs(sum(phases.values()) - run["quantize_seconds"]) < 0.05 * run["quantize_seconds"] + 0.1


def test_existing_foreign_folder_is_never_overwritten(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not empty"):
        _quantize(tiny_llama, out, get_scheme("w8a16"), calib_text)
    assert (out / "notes.txt").read_text() == "precious"


def test_failure_leaves_no_partial_output(tiny_llama, tmp_path, calib_text, monkeypatch):
    with pytest.raises(CalibrationError, match="fewer than one window"):
        _quantize(tiny_llama, tmp_path / "out", get_scheme("w8a16"), "too short")
    assert list(tmp_path.iterdir()) == []
    # a pass option that sets a grid the target cannot run is refused before anything exists (it is the scheme)
    with pytest.raises(SchemeError, match="int4-asym-g32"):
        _quantize(tiny_llama, tmp_path / "out", get_scheme("w8a8_dynamic"), calib_text,
                  passes="rtn{bits=4,group_size=32,symmetric=false}")
    assert list(tmp_path.iterdir()) == []
    # a failure in the middle of the first block (after the work folder exists) cleans up too
    import qcompiler.driver.hf as driver

    def fail(*_a, **_k):
        raise PassError("injected failure inside block 0")

    monkeypatch.setattr(driver, "compare_layers", fail)
    with pytest.raises(PassError, match="injected"):
        _quantize(tiny_llama, tmp_path / "out", get_scheme("w8a8_dynamic"), calib_text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_quant_eval_inspect(tiny_llama, tmp_path, calib_text, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # (eval caches the float result there)
    text = tmp_path / "calib.txt"
    text.write_text(calib_text)
    out = tmp_path / "out"
    rc = main(["quant", "--model", str(tiny_llama), "--scheme", "w8a8_dynamic", "--out", str(out),
               "--calib-text", str(text), "--num-samples", "4", "--seq-len", "48", "--no-progress",
               "--passes", "smoothquant{alpha=0.6},fuse_linears,rtn"])
    assert rc == 0
    assert json.loads((out / "qcompiler.json").read_text())["pipeline"] == \
        "smoothquant{alpha=0.6},fuse_linears,rtn,act_quant,lower"
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["float"]["tokens"] == r["quantized"]["tokens"] > 0 and r["quantized"]["seq_len"] == 64
    assert r["quantized"]["tokenizer"] == tiny_llama.name  # named after the source model, not the output folder
    assert abs(r["ppl_increase_pct"]) < 10 and r["size_ratio"] < 1
    # the float result is cached per model, text and settings: equal the second time, measured again otherwise
    assert "cached" not in r["float"]
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["float"].pop("cached") is True and again["float"] == r["float"]
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "32", "--json"]) == 0
    assert "cached" not in json.loads(capsys.readouterr().out)["float"]
    for entry in (tmp_path / "cache" / "qcompiler" / "float-perplexity").glob("*.json"):
        entry.write_text('{"key": "not this one"}')  # a damaged entry is measured again, never trusted
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    remeasured = json.loads(capsys.readouterr().out)["float"]
    assert "cached" not in remeasured and remeasured["perplexity"] == r["float"]["perplexity"]
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "int8 per-token" in table


@pytest.mark.parametrize(
    "args,message",
    [
        (["quant", "--model", "/no/such/dir", "--scheme", "w4a16", "--out", "x"], "does not exist"),
        (["quant", "--model", "MODEL", "--scheme", "w5a16", "--out", "x"], "unknown scheme"),
        (["quant", "--model", "MODEL", "--scheme", "w8a8", "--group-size", "64", "--out", "x"],
         "cannot run scheme"),
        (["quant", "--model", "MODEL", "--scheme", "w4a16", "--passes", "rtn{bitz=4}", "--out", "x"],
         "has no option 'bitz'"),
        (["quant", "--model", "MODEL", "--scheme", "w4a16", "--passes", "gptqq", "--out", "x"], "unknown pass"),
        (["quant", "--model", "MODEL", "--scheme", "w4a16", "--target", "tpu", "--out", "x"], "unknown target"),
        (["eval", "/no/such/out"], "not a qcompiler artefact"),
        (["quant", "--model", "MODEL", "--scheme", "w8a8", "--timestep-groups", "2", "--out", "x"],
         "for diffusion transformers"),
        (["quant", "--model", "MODEL", "--scheme", "w8a8", "--timestep-groups", "2", "--target", "cuda", "--out", "x"],
         "one activation grid per layer"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message(tiny_llama, args, message, capsys, tmp_path):
    args = [str(tiny_llama) if a == "MODEL" else str(tmp_path / "x") if a == "x" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_lists_passes_and_schemes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("smoothquant", "rtn", "fuse_linears", "fold_norm", "act_quant", "lower"):
        assert name in out
    assert main(["schemes"]) == 0
    assert "w8a8_dynamic" in capsys.readouterr().out


def test_yaml_recipe(tiny_llama, tmp_path, calib_text):
    from qcompiler.pm.pipeline import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - smoothquant: {alpha: 0.7}\n  - rtn: {clip: mse}\n")
    passes = load_recipe(recipe)
    assert [p.spec() for p in passes] == ["smoothquant{alpha=0.7}", "rtn{clip=mse}"]


def test_a_poor_result_is_warned_about_from_its_weakest_block():
    from qcompiler.cli import POOR_BLOCK_SQNR_DB, poor_result_warning

    good = {"block_report": {"model.layers.0": {"output_sqnr_db": 35.0}, "model.layers.1": {"output_sqnr_db": 28.0}}}
    assert poor_result_warning(good) is None
    poor = {"block_report": {**good["block_report"], "model.layers.2": {"output_sqnr_db": POOR_BLOCK_SQNR_DB - 5}}}
    warning = poor_result_warning(poor)
    assert warning is not None and "model.layers.2" in warning and "15.0 dB" in warning
    assert "--algo gptq" in warning  # (weight-only: the weight algorithm is the remedy)
    static = {**poor, "scheme": get_scheme("w8a8").to_dict(), "pipeline": "smoothquant,fuse_linears,rtn,act_quant,lower"}
    assert "residual rotation" in (poor_result_warning(static) or "")  # static activations: the rotation is
    rotated = {**static, "pipeline": "rotate,fuse_linears,rtn,act_quant,lower"}
    assert "residual rotation" not in (poor_result_warning(rotated) or "")
    # int4 activations: the learned transforms are the remedy, until they ran; then 8-bit activations
    w4a4 = {**poor, "scheme": get_scheme("w4a4").to_dict(), "pipeline": "rotate,fuse_linears,gptq,act_quant,lower"}
    assert "--algo flatquant" in (poor_result_warning(w4a4) or "")
    learned = {**w4a4, "pipeline": "rotate,fuse_linears,flatquant,gptq{quantized_input=True},tune_grids,act_quant,lower"}
    warning = poor_result_warning(learned)
    assert warning is not None and "--algo flatquant" not in warning and "w4a8" in warning
    assert poor_result_warning({}) is None


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_evaluation_load_dequantizes_once_with_bit_equal_logits(tiny_llama, tmp_path, calib_text, scheme):
    """`qcompile eval` loads weight-only layers dequantized once (runtime/cpu_prepack.dequantize_once): the graph
    calls F.linear on the oracle's ŵ instead of qc::linear_woq, and the logits are bit-equal to the exact load."""
    _quantize(tiny_llama, tmp_path / "out", get_scheme(scheme, group_size=32), calib_text, passes="fuse_linears,rtn")
    exact = load_quantized(tmp_path / "out")
    once = load_quantized(tmp_path / "out", dequantize_weights=True)
    ops = [n.target for blk in once.model.layers for n in blk.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.qc.linear_woq.default not in ops and ops.count(torch.nn.functional.linear) >= 4
    ids = torch.randint(3, 250, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exact(ids).logits, once(ids).logits)
