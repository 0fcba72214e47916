"""Trust nothing on disk: no code runs from a state file, a stats cache or a model folder (unless asked), no file
qcompile did not write is ever removed, and a run killed at any step of `finish` completes with --resume.

Payloads are harmless: unpickling or importing one writes a marker file, which must never appear."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TEXT, make_tiny_model

from qcompiler.cli import main
from qcompiler.export.artifact import verify_manifest


class Payload:
    """Unpickling this writes the marker (what a planted pickle would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # head_dim 32: onnxruntime's GroupQueryAttention (the onnxruntime exporter's state is the richest)
    return make_tiny_model(tmp_path_factory.mktemp("sec") / "llama", "llama", num_hidden_layers=3, head_dim=32)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text(TEXT)
    return f


def args(model: Path, out: Path, text: Path, *extra: str, scheme: str = "w8a16") -> list[str]:
    return ["quant", "--model", str(model), "--scheme", scheme, "--out", str(out), "--calib-text", str(text),
            "--num-samples", "2", "--seq-len", "32", "--batch-size", "2", "--no-progress", *extra]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def files_of(out: Path) -> dict[str, str]:
    verify_manifest(out)
    return {k: v["sha256"] for k, v in json.loads((out / "manifest.json").read_text())["files"].items()}


class Crash(Exception):
    pass


def crash_at_block(monkeypatch, n: int) -> None:
    """The run stops with an exception after `n` blocks were checkpointed."""
    from qcompiler.export import artifact

    real = artifact.ArtifactWriter.checkpoint
    calls = {"n": 0}

    def checkpoint(self, state):
        calls["n"] += 1
        if calls["n"] > n:
            raise Crash
        real(self, state)

    monkeypatch.setattr(artifact.ArtifactWriter, "checkpoint", checkpoint)


# ------------------------------------------------------------------------------------------ --resume state


def stopped_onnx_run(model: Path, out: Path, text: Path, monkeypatch) -> Path:
    """An onnxruntime run (the richest exporter state) stopped after its first block: its state file."""
    crash_at_block(monkeypatch, 1)
    with pytest.raises(Crash):
        main(["--debug", *args(model, out, text, "--target", "onnxruntime", scheme="w4a16")])
    monkeypatch.undo()
    return out.parent / f".{out.name}.partial" / "state" / "state.json"


@pytest.mark.parametrize("plant", ["absolute", "relative", "old_pickle_name", "not_an_object"])
def test_resume_never_reads_a_file_a_state_names_outside_its_folder(model, text, tmp_path, capsys, monkeypatch,
                                                                   plant):
    out = tmp_path / "q"
    state_file = stopped_onnx_run(model, out, text, monkeypatch)
    state = json.loads(state_file.read_text())
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pkl"
    plant_pickle(evil, marker)
    plant_pickle(state_file.parent / "exporter-00001.pkl", marker)
    state["exporter"] = {"absolute": {**state["exporter"], "graph": str(evil)},
                         "relative": {**state["exporter"], "graph": "../../evil.pkl"},
                         "old_pickle_name": {**state["exporter"], "graph": "exporter-00001.pkl"},
                         "not_an_object": "../../evil.pkl"}[plant]
    state_file.write_text(json.dumps(state))
    rc, err = run(capsys, args(model, out, text, "--target", "onnxruntime", "--resume", scheme="w4a16"))
    assert rc == 2 and "run without --resume" in one_line(err)
    assert not marker.exists() and not out.exists()


def test_a_state_cannot_truncate_a_file_it_names(model, text, tmp_path, capsys, monkeypatch):
    """The ONNX builder's data file is the result folder's own; the path fields a state might carry are ignored."""
    out = tmp_path / "q"
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n" * 100)
    state_file = stopped_onnx_run(model, out, text, monkeypatch)
    state = json.loads(state_file.read_text())
    state["exporter"].update(model_path=str(victim), data_name=str(victim), data_bytes=3)
    state_file.write_text(json.dumps(state))
    rc, err = run(capsys, args(model, out, text, "--target", "onnxruntime", "--resume", scheme="w4a16"))
    assert victim.read_text() == "a user's file\n" * 100
    assert rc == 2 and "run without --resume" in one_line(err)  # (3 bytes: shorter than the blocks written)


@pytest.mark.slow
def test_stats_cache_entries_are_data_a_damaged_or_planted_one_is_a_miss(model, text, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    first = tmp_path / "a"
    assert main(args(model, first, text, "--stats-cache", str(cache), "--algo", "gptq", scheme="w4a16")) == 0
    entries = sorted(cache.glob("*.safetensors"))
    assert entries and not list(cache.glob("*.pt"))
    marker = tmp_path / "MARKER"
    for i, entry in enumerate(entries):  # a pickle where the tensors were, a .pt beside it, and a broken index
        plant_pickle(entry, marker)
        plant_pickle(entry.with_suffix(".pt"), marker)
        if i == 0:
            entry.with_suffix(".json").write_text("{nope")
    rc, err = run(capsys, args(model, tmp_path / "b", text, "--stats-cache", str(cache), "--algo", "gptq",
                               scheme="w4a16"))
    assert rc == 0 and not marker.exists()
    warned = [r.getMessage() for r in caplog.records if "ignoring damaged stats-cache entry" in r.getMessage()]
    assert len(warned) == len(entries) and any("Expecting property name" in w for w in warned)
    run_info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run_info["stats_cache"]["hits"] == 0
    assert files_of(tmp_path / "b") == files_of(first)  # (recomputed: the same statistics)


# ------------------------------------------------------------------------------------------ remote code


def _remote_code_model(model: Path, dst: Path, marker: Path) -> Path:
    """A Llama whose config.json asks for the folder's own classes; importing them writes the marker."""
    shutil.copytree(model, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "configuration_tiny.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n")
    (dst / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n")
    return dst


@pytest.mark.slow
def test_a_model_folder_code_runs_only_with_trust_remote_code(model, text, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    m = _remote_code_model(model, tmp_path / "custom", marker)
    rc, err = run(capsys, args(m, tmp_path / "q", text))
    line = one_line(err)
    assert rc == 2 and "--trust-remote-code" in line and "configuration_tiny.TinyCustomConfig" in line
    assert not marker.exists() and not (tmp_path / "q").exists()
    for cmd, says in (("quant", "off by default"), ("eval", "Python files the model folder ships")):
        help_text = subprocess.run([sys.executable, "-m", "qcompiler.cli", cmd, "--help"], capture_output=True,
                                   text=True).stdout
        assert "--trust-remote-code" in help_text and says in " ".join(help_text.split())
    # with the flag, transformers imports the folder's code (in a child process: its module cache is per process)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    done = subprocess.run([sys.executable, "-m", "qcompiler.cli", *args(m, tmp_path / "q", text, "--trust-remote-code")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "imported"
    assert json.loads((tmp_path / "q" / "qcompiler.json").read_text())["layers"]


def test_a_known_architecture_ignores_the_folder_code_without_the_flag(model, text, tmp_path, capsys):
    """model_type llama with an auto_map: transformers' own class is used, the folder's code is never imported."""
    marker = tmp_path / "MARKER"
    m = _remote_code_model(model, tmp_path / "custom", marker)
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    rc, err = run(capsys, args(m, tmp_path / "q", text))
    assert rc == 0, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ user data


def test_an_output_folder_with_files_qcompile_did_not_write_is_refused_not_deleted(model, text, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "qcompiler.json").write_text("{}")
    (out / "chapter1.tex").write_text("years of work")
    (out / "results").mkdir()
    (out / "results" / "table.csv").write_text("1,2,3")
    rc, err = run(capsys, args(model, out, text))
    assert rc == 2 and "thesis" in one_line(err)
    assert (out / "chapter1.tex").read_text() == "years of work" and (out / "results" / "table.csv").is_file()

    # a complete artefact is replaced; the same artefact with a file added is refused, naming the file
    out = tmp_path / "q"
    assert main(args(model, out, text)) == 0
    assert main(args(model, out, text, "--seed", "1")) == 0
    (out / "notes.md").write_text("mine")
    (out / "compressed-tensors").mkdir()
    rc, err = run(capsys, args(model, out, text))
    line = one_line(err)
    assert rc == 2 and "notes.md" in line and "compressed-tensors/" in line
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_symlinked_lock_is_refused_and_its_target_untouched(model, text, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".q.lock").symlink_to(victim)
    rc, err = run(capsys, args(model, tmp_path / "q", text))
    assert rc == 2 and "symbolic link" in one_line(err)
    assert victim.read_text() == "precious" and not (tmp_path / "q").exists()


def test_a_foreign_work_folder_is_refused_not_removed(model, text, tmp_path, capsys):
    (tmp_path / ".q.partial").mkdir()
    (tmp_path / ".q.partial" / "mine.txt").write_text("not qcompile's")
    rc, err = run(capsys, args(model, tmp_path / "q", text))
    assert rc == 2 and ".q.partial" in one_line(err)
    assert (tmp_path / ".q.partial" / "mine.txt").read_text() == "not qcompile's"


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_run_resumes(model, text, tmp_path, capsys, monkeypatch):
    import errno

    from qcompiler.export import artifact

    whole = tmp_path / "whole"
    assert main(args(model, whole, text, "--target", "cuda")) == 0
    real = artifact.save_file
    calls = {"n": 0}

    def full_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(artifact, "save_file", full_on_second)
    out = tmp_path / "q"
    rc, err = run(capsys, args(model, out, text, "--target", "cuda"))
    line = one_line(err)
    assert rc == 2 and "disk full" in line and "--resume" in line
    monkeypatch.undo()
    assert main(args(model, out, text, "--target", "cuda", "--resume")) == 0
    assert files_of(out) == files_of(whole)


# ------------------------------------------------------------------------------------------ kills during finish

# Each step of the end of a run (after the last block's checkpoint): the function to stop in, and which of its calls
# (a predicate on its arguments) stops; the stop comes before the call does anything.
FINISH_STEPS = {
    "exporter_finish": ("qcompiler.export.serving:FormatExporter.finish", lambda *a: True),
    # part-way through the serving format's shard renames (shard-00000 and -00001 are renamed, -00002 is not)
    "shard_renames": ("pathlib:Path.rename", lambda src, dst: src.name == "shard-00002.safetensors"),
    "manifest": ("qcompiler.export.artifact:write_manifest", lambda *a: True),
    "publish": ("qcompiler.export.artifact:ArtifactWriter._publish", lambda *a: True),
    # OUT's earlier artefact is moved aside, the new result not yet in its place
    "out_moved_aside": ("pathlib:Path.rename", lambda src, dst: src.name == "result"),
    "work_removal": ("qcompiler.export.artifact:ArtifactWriter._remove_work", lambda *a: True),
}


def stop_in_step(step: str, stop) -> None:
    """Patch the step's function so that `stop()` runs instead of the call its predicate picks (counted only once
    the run has reached its end: the serving format's finish)."""
    import importlib

    from qcompiler.export.serving import FormatExporter

    spec, pick = FINISH_STEPS[step]
    finishing = {"on": False}
    real_finish = FormatExporter.finish

    def finish(self, *a, **k):
        finishing["on"] = True
        return real_finish(self, *a, **k)

    FormatExporter.finish = finish  # type: ignore[method-assign]
    module, _, path = spec.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    real = getattr(owner, name)

    def patched(*a, **k):
        if (finishing["on"] or real is finish) and pick(*a):
            stop()
        return real(*a, **k)

    setattr(owner, name, patched)


def _run_and_stop_in_finish(model: Path, out: Path, text: Path, step: str, how: str) -> None:
    """A child process runs the CLI and is stopped at `step`: by SIGKILL (no Python cleanup at all) or by an
    exception that unwinds through the driver's own error handling."""
    argv = args(model, out, text, "--target", "cuda")
    stop = "lambda: os.kill(os.getpid(), signal.SIGKILL)" if how == "sigkill" else "crash"
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_security import stop_in_step\n"
        "from qcompiler.cli import main\n"
        "def crash():\n    raise KeyboardInterrupt\n"
        f"stop_in_step({step!r}, {stop})\n"
        f"sys.exit(main({argv!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode in (-signal.SIGKILL, 130), done.stderr[-2000:]


@pytest.mark.parametrize("how", ["exception", "sigkill"])
@pytest.mark.parametrize("step", list(FINISH_STEPS))
@pytest.mark.slow
def test_a_run_stopped_at_any_step_of_finish_completes_with_resume(model, text, tmp_path, how, step):
    whole = tmp_path / "whole"
    assert main(args(model, whole, text, "--target", "cuda")) == 0
    out = tmp_path / "q"
    shutil.copytree(whole, out)  # an earlier artefact at --out: replacing it is part of finishing
    (out / "run.json").write_text("{}")
    _run_and_stop_in_finish(model, out, text, step, how)
    assert main(args(model, out, text, "--target", "cuda", "--resume")) == 0
    assert files_of(out) == files_of(whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "whole"]  # no work folder, lock or old copy left


def test_the_package_never_unpickles():
    """No pickle import and no torch.load anywhere in the installed package's sources (qcompiler/, passes/,
    kernels/); numpy files are read with allow_pickle=False."""
    root = Path(__file__).parent.parent
    offenders = []
    for folder in ("qcompiler", "passes", "kernels"):
        for f in (root / folder).rglob("*.py"):
            text = f.read_text()
            for needle in ("import pickle", "from pickle", "torch.load(", "allow_pickle=True", "dill", "cloudpickle",
                           "__setstate__", "__reduce__"):
                if needle in text:
                    offenders.append(f"{f.relative_to(root)}: {needle}")
    assert not offenders
