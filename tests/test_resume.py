"""Bit-identical outputs: determinism, streaming vs whole-model loading, spilled activations, kill-and-resume
(in process and with SIGKILL), the manifest, and the partial folder's lock and fingerprint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import TEXT, make_tiny_model

from qcompiler.calib.activations import ActivationStore
from qcompiler.cli import main
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ArtifactError
from qcompiler.export import artifact
from qcompiler.export.artifact import ArtifactWriter, verify_manifest
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.schemes import get_scheme


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    # head_dim 32: onnxruntime's GroupQueryAttention needs a multiple of 16
    return make_tiny_model(tmp_path_factory.mktemp("deep") / "llama4", "llama", num_hidden_layers=4, head_dim=32)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text(TEXT)
    return f


def _cfg(model, out, scheme="w8a8", passes="smoothquant,fuse_linears,gptq", target="reference", **kw):
    return QuantizeConfig(model=model, scheme=get_scheme(scheme), out=out, target=target, calib_texts=[TEXT],
                          num_samples=4, seq_len=48, batch_size=2, progress=False,
                          passes=parse_pipeline(passes) if passes else None, **kw)


def _files(out: Path) -> dict[str, str]:
    """{relative path: sha256} of everything the manifest covers (all but run.json), checked against it."""
    verify_manifest(out)
    return {k: v["sha256"] for k, v in json.loads((out / "manifest.json").read_text())["files"].items()}


@pytest.mark.slow
def test_equal_runs_are_bit_identical_and_the_manifest_catches_changes(llama4, tmp_path):
    quantize(_cfg(llama4, tmp_path / "a"), log=lambda _: None)
    quantize(_cfg(llama4, tmp_path / "b"), log=lambda _: None)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and {"qcompiler.json", "block-00003.safetensors", "rest.safetensors"} <= set(a)
    assert set(p.name for p in (tmp_path / "a").iterdir()) - set(a) == {"manifest.json", "run.json"}
    with open(tmp_path / "b" / "block-00001.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ArtifactError, match="changed block-00001.safetensors"):
        verify_manifest(tmp_path / "b")
    assert main(["verify", str(tmp_path / "a")]) == 0
    assert main(["verify", str(tmp_path / "b")]) == 2


@pytest.mark.slow
def test_streaming_whole_model_loading_and_low_memory_give_identical_files(llama4, tmp_path):
    quantize(_cfg(llama4, tmp_path / "stream"), log=lambda _: None)
    quantize(_cfg(llama4, tmp_path / "whole", streaming=False), log=lambda _: None)
    quantize(_cfg(llama4, tmp_path / "spill", spill_activations=True, low_memory=True), log=lambda _: None)  # --low-memory
    stream = _files(tmp_path / "stream")
    assert _files(tmp_path / "whole") == stream
    assert _files(tmp_path / "spill") == stream
    assert json.loads((tmp_path / "spill" / "run.json").read_text())["low_memory"] is True
    assert not list(tmp_path.glob(".*"))  # no partial folder or lock left behind


def test_activation_store_round_trips_bit_for_bit(tmp_path):
    batches = [(torch.randn(2, 5, 8), torch.arange(5)[None], torch.randn(1, 5, 4)) for _ in range(3)]
    mem = ActivationStore.in_memory(batches)
    mem.save(tmp_path / "m")
    spilled = ActivationStore(tmp_path / "s")
    for b in batches:
        spilled.append(b)
    for store in (ActivationStore.load(tmp_path / "m", 3, spill=False), ActivationStore.load(tmp_path / "m", 3, spill=True),
                  spilled):
        assert len(store) == 3
        for got, want in zip(store, batches, strict=True):
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    with pytest.raises(FileNotFoundError, match="batch-00003"):
        ActivationStore.load(tmp_path / "m", 4, spill=False)


class _Crash(Exception):
    pass


@pytest.mark.parametrize(("target", "where"), [
    ("reference", "checkpoint"),     # killed after block 2's files, before its state was recorded
    ("onnxruntime", "exporter"),     # killed while saving the exporter's progress (ONNX graph + data offset)
    ("cuda", "checkpoint"),          # compressed-tensors shards streamed by the serving-format exporter
])
@pytest.mark.slow
def test_a_run_stopped_mid_way_resumes_to_the_identical_result(llama4, tmp_path, monkeypatch, target, where):
    passes = "smoothquant,fuse_linears,gptq" if target != "onnxruntime" else "fuse_linears,gptq"
    scheme = "w8a8" if target != "onnxruntime" else "w4a16"
    whole = quantize(_cfg(llama4, tmp_path / "whole", scheme, passes, target), log=lambda _: None)
    assert whole["run"]["resumed_from_block"] is None

    calls = {"n": 0}
    real = artifact.ArtifactWriter.checkpoint if where == "checkpoint" else None

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Crash
        if real is not None:
            return real(*args, **kwargs)
        return original_save(*args, **kwargs)

    import qcompiler.driver.hf as compile_mod

    original_save = compile_mod.save_exporter_state
    if where == "checkpoint":
        monkeypatch.setattr(artifact.ArtifactWriter, "checkpoint", crash_on_third)
    else:
        monkeypatch.setattr(compile_mod, "save_exporter_state", crash_on_third)
    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        quantize(_cfg(llama4, out, scheme, passes, target), log=lambda _: None)
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".resumed.partial" / "state" / "state.json").is_file()

    logs: list[str] = []
    desc = quantize(_cfg(llama4, out, scheme, passes, target, resume=True), log=logs.append)
    assert desc["run"]["resumed_from_block"] == 2 and any("resuming from block 2" in m for m in logs)
    assert _files(out) == _files(tmp_path / "whole")
    assert not (tmp_path / ".resumed.partial").exists()


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(llama4, text_file, tmp_path):
    """A real crash: the CLI is killed with SIGKILL once the run has recorded progress; --resume finishes."""
    def cli(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "qcompiler.cli", "quant", "--model", str(llama4), "--scheme", "w4a16",
                "--algo", "gptq", "--group-size", "32", "--out", str(out), "--calib-text", str(text_file),
                "--num-samples", "8", "--seq-len", "48", "--batch-size", "2", "--no-progress", *extra]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cli(tmp_path / "whole"), check=True, env=env, capture_output=True, cwd=tmp_path)
    out = tmp_path / "killed"
    state = tmp_path / ".killed.partial" / "state" / "state.json"
    proc = subprocess.Popen(cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["next_block"] >= 1:
            break
        time.sleep(0.02)
    time.sleep(0.05)  # somewhere inside the next block
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    done = subprocess.run(cli(out, "--resume"), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resuming from block" in done.stdout
    assert _files(out) == _files(tmp_path / "whole")


@pytest.mark.slow
def test_resume_refuses_a_partial_run_of_other_inputs_and_a_fresh_run_replaces_it(llama4, tmp_path, monkeypatch):
    def crash(*_a, **_k):
        raise _Crash

    monkeypatch.setattr(artifact.ArtifactWriter, "checkpoint", crash)
    with pytest.raises(_Crash):
        quantize(_cfg(llama4, tmp_path / "q"), log=lambda _: None)
    # the crash came before any checkpoint: nothing to resume, nothing kept
    assert not (tmp_path / ".q.partial").exists()
    monkeypatch.undo()

    real = artifact.ArtifactWriter.checkpoint
    calls = {"n": 0}

    def crash_second(self, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash
        real(self, state)

    monkeypatch.setattr(artifact.ArtifactWriter, "checkpoint", crash_second)
    with pytest.raises(_Crash):
        quantize(_cfg(llama4, tmp_path / "q"), log=lambda _: None)
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match=r"different inputs \(pipeline, scheme\)"):
        quantize(_cfg(llama4, tmp_path / "q", scheme="w8a16", passes="rtn", resume=True), log=lambda _: None)
    desc = quantize(_cfg(llama4, tmp_path / "q", scheme="w8a16", passes="rtn"), log=lambda _: None)
    assert desc["run"]["resumed_from_block"] is None and desc["scheme"]["name"] == "w8a16"


def test_two_runs_cannot_write_one_output(tmp_path):
    first = ArtifactWriter(tmp_path / "q")
    with pytest.raises(ArtifactError, match="another qcompile run is writing"):
        ArtifactWriter(tmp_path / "q")
    first.abort()
    ArtifactWriter(tmp_path / "q").abort()  # the lock is released
