"""One source of truth for the weight grid: a pass option that sets bits / group size / symmetry rewrites the
run's scheme before any target check, and every export states the grid its tensors hold (tests/formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from formats import check_stated_grids
from tiny import TEXT, make_tiny_model

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import PipelineError, SchemeError
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.schemes import get_scheme


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # K = 96 (hidden), 128 (o_proj), 160 (down_proj): 32 divides all, 64 does not divide 96 or 160
    return make_tiny_model(tmp_path_factory.mktemp("grids") / "llama", "llama", head_dim=32)


def _cfg(model: Path, out: Path, target: str, passes: str, group: int, **kw) -> QuantizeConfig:
    return QuantizeConfig(model=model, scheme=get_scheme("w4a16", group_size=group), out=out, target=target,
                          passes=parse_pipeline(passes), calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2,
                          progress=False, **kw)


@pytest.mark.parametrize(("target", "options", "formats"), [
    ("reference", {}, {"qcompiler"}),
    ("cuda", {"format": "compressed-tensors,awq,gptq"}, {"qcompiler", "compressed-tensors", "awq", "gptq"}),
    ("ascend", {}, {"qcompiler", "msmodelslim"}),
    ("onnxruntime", {}, {"qcompiler", "onnx"}),
])
def test_a_pass_grid_option_is_the_scheme_every_format_states(model, tmp_path, target, options, formats):
    # the scheme says g64, which the serving targets refuse for K = 96; the pass says g32: that is what is stored,
    # checked and stated
    d = quantize(_cfg(model, tmp_path / "q", target, "fuse_linears,gptq{group_size=32}", 64, target_options=options),
                 log=lambda _: None)
    assert d["scheme"]["weights"]["group_size"] == 32
    checked = check_stated_grids(tmp_path / "q")
    assert set(checked) == formats and all(n > 0 for n in checked.values()), checked


def test_the_grid_a_target_forbids_is_refused_whichever_option_sets_it(tmp_path, tiny_llama):
    """The reported case: --group-size 32 passed the cuda check while gptq{group_size=40} wrote g40 over K = 96."""
    with pytest.raises(SchemeError, match="group size 40 does not divide"):
        quantize(_cfg(tiny_llama, tmp_path / "q", "cuda", "fuse_linears,gptq{group_size=40}", 32), log=lambda _: None)
    assert not any(tmp_path.iterdir())
    d = quantize(_cfg(tiny_llama, tmp_path / "r", "reference", "fuse_linears,gptq{group_size=40}", 32),
                 log=lambda _: None)
    assert d["scheme"]["weights"]["group_size"] == 40
    assert check_stated_grids(tmp_path / "r")["qcompiler"] > 0


def test_two_weight_passes_asking_for_different_grids_are_refused(tmp_path, tiny_llama):
    with pytest.raises(PipelineError, match="different grids"):
        quantize(_cfg(tiny_llama, tmp_path / "q", "reference", "rtn{group_size=32},gptq{group_size=16}", 32),
                 log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_the_cli_picks_a_group_every_format_loads_unless_one_is_given(model, tmp_path, capsys):
    """w4a16's g128 does not divide K = 96 or 160: with no --group-size the CLI takes the largest power of two up
    to 128 that divides every input size (32 here) and says so; a group given explicitly is refused as before."""
    from qcompiler.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    common = ["quant", "--model", str(model), "--scheme", "w4a16", "--target", "cuda", "--algo", "rtn",
              "--calib-text", str(text), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "auto")]) == 0
    assert "group size 32, the largest up to 128" in capsys.readouterr().out
    d = json.loads((tmp_path / "auto" / "qcompiler.json").read_text())
    assert d["scheme"]["weights"]["group_size"] == 32
    assert check_stated_grids(tmp_path / "auto")["compressed-tensors"] > 0
    assert main([*common, "--group-size", "128", "--out", str(tmp_path / "given")]) == 2
    assert "group size 128 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "given").exists()
