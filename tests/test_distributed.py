"""Data-parallel calibration: 2 processes (torchrun, gloo on CPU) write the same files as 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TEXT, make_tiny_model

from qcompiler.export.artifact import run_info, verify_manifest

pytestmark = pytest.mark.slow  # (two torchrun processes per case)


def _torchrun(nproc: int, model: Path, out: Path, text: Path, scheme: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qcompiler.cli", "quant", "--model", str(model), "--scheme", scheme, "--out", str(out),
           "--calib-text", str(text), "--num-samples", "8", "--seq-len", "48", "--batch-size", "2",
           "--no-progress", *extra]
    # one thread per process in both runs: the comparison is about the data split, not BLAS threading
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _hashes(out: Path) -> dict[str, str]:
    verify_manifest(out)
    return {k: v["sha256"] for k, v in json.loads((out / "manifest.json").read_text())["files"].items()}


@pytest.mark.parametrize(("family", "scheme", "extra"), [
    # absmax (smoothquant), Hessians (gptq), histograms (mse observer)
    ("llama", "w8a8", ["--passes", "smoothquant,fuse_linears,gptq,act_quant{observer=mse}"]),
    # percentile samples gathered in batch order; MoE expert token counts and routed-only Hessians
    ("qwen3_moe", "w8a8", ["--passes", "fuse_linears,gptq,act_quant{observer=percentile}"]),
])
def test_two_processes_write_the_same_files_as_one(tmp_path, family, scheme, extra):
    model = make_tiny_model(tmp_path / family, family)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    _torchrun(1, model, tmp_path / "one", text, scheme, extra)
    _torchrun(2, model, tmp_path / "two", text, scheme, extra)
    assert run_info(tmp_path / "two")["data_parallel_ranks"] == 2
    assert run_info(tmp_path / "one")["data_parallel_ranks"] == 1
    assert _hashes(tmp_path / "two") == _hashes(tmp_path / "one")
    desc = json.loads((tmp_path / "two" / "qcompiler.json").read_text())
    if family == "qwen3_moe":  # token counts are summed over the ranks: every token routed to its top-2
        assert sum(desc["block_report"]["model.layers.0"]["expert_tokens"].values()) == 8 * 48 * 2
