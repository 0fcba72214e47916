"""Our quantized-model artefact ("qcompiler" format v1): what `qcompile quant --out` writes and
`qcompile eval` / `qcompiler.load_quantized` read.

    OUT/
      config.json, tokenizer files      the source model's, unchanged
      qcompiler.json                    format, version, scheme, target, pipeline, source model, and per
                                        quantized layer its op, scheme, group size, tensor names, fused
                                        members and error report
      block-00000.safetensors ...       one file per decoder block (written as each block finishes)
      rest.safetensors                  embeddings, final norm, head (float)
      model.safetensors.index.json      tensor name -> file (the Hugging Face sharded-checkpoint index)
      <format>/                         a serving engine's checkpoint, when the target writes one
      run.json                          how this run went: timings, traces, cache hits, ranks, resumes
      manifest.json                     sha256 and size of every file but run.json (`verify_manifest`)

Everything but run.json is a function of the inputs: the same model, scheme, pipeline, calibration text and
options give bit-identical files (tested), resumed or not, one process or several.

Written into the sibling folder `.OUT.partial` and renamed into place at the end, so OUT is only ever
absent, the previous complete result, or the new complete result. While the run goes, the driver keeps its
progress in `.OUT.partial/.state/` after every block (`checkpoint`); `--resume` continues from there when
the fingerprint of the inputs matches. A lock file (`.OUT.lock`) keeps two runs off one output.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors.torch import save_file

from qcompiler.errors import ArtifactError

FORMAT = "qcompiler"
VERSION = 1
DESCRIPTION = "qcompiler.json"
MANIFEST = "manifest.json"
RUN_INFO = "run.json"  # timings and other facts of the run: the one file that differs between equal runs
STATE_DIR = ".state"
STATE_FILE = "state.json"


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, to replace a folder that is not ours (never clobber user data)."""
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"output '{out}' exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not (out / DESCRIPTION).is_file():
            raise ArtifactError(
                f"output folder '{out}' is not empty and holds no qcompiler artefact; choose another --out"
            )
    if not out.parent.exists():
        raise ArtifactError(f"the parent of output folder '{out}' does not exist")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """manifest.json: size and sha256 of every file under `folder` except run.json and the manifest itself.
    `known` holds hashes taken when files were written ({relpath: {"bytes", "sha256"}}), reused when the
    size still matches."""
    files: dict[str, dict[str, Any]] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel in (MANIFEST, RUN_INFO) or rel.startswith(STATE_DIR + "/"):
            continue
        size = f.stat().st_size
        k = (known or {}).get(rel)
        files[rel] = k if k is not None and k["bytes"] == size else {"bytes": size, "sha256": file_sha256(f)}
    manifest = {"format": "qcompiler-manifest", "version": 1, "files": files, "unhashed": [RUN_INFO]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(out: str | Path) -> None:
    """Raise ArtifactError naming every file that is missing, extra or changed since the manifest."""
    folder = Path(out)
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"'{folder}' has no {MANIFEST} (written by qcompiler ≥ 0.6); re-run `qcompile quant`")
    want = json.loads((folder / MANIFEST).read_text())["files"]
    have = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()} - {MANIFEST, RUN_INFO}
    problems = [f"missing {f}" for f in sorted(set(want) - have)] + [f"extra {f}" for f in sorted(have - set(want))]
    for rel in sorted(set(want) & have):
        f = folder / rel
        if f.stat().st_size != want[rel]["bytes"] or file_sha256(f) != want[rel]["sha256"]:
            problems.append(f"changed {rel}")
    if problems:
        raise ArtifactError(f"'{folder}' does not match its manifest: {'; '.join(problems[:10])}")


class ArtifactWriter:
    """The partial folder of one run: files go in as blocks finish; `finish` publishes it whole.

    fingerprint: everything the result depends on (see compile.run_fingerprint); a partial folder is resumed
    only when `resume` is asked and its fingerprint is equal. owner=False (data-parallel ranks > 0): the
    folder is read, never created, changed or removed."""

    def __init__(self, out: str | Path, fingerprint: dict[str, Any] | None = None, resume: bool = False,
                 owner: bool = True, log: Any = print):
        self.out = Path(out).absolute()
        self.owner = owner
        check_output_dir(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        self.state_dir = self.tmp / STATE_DIR
        self._lock: TextIO | None = None
        self.resumed: dict[str, Any] | None = None
        self.weight_map: dict[str, str] = {}
        self.hashes: dict[str, dict[str, Any]] = {}
        if not owner:
            return
        self._lock = self._acquire_lock()
        previous = self._read_state()
        if resume and previous is not None:
            if previous["fingerprint"] != fingerprint:
                fp = fingerprint or {}
                diff = sorted(k for k in set(fp) | set(previous["fingerprint"])
                              if fp.get(k) != previous["fingerprint"].get(k))
                self._release_lock()
                raise ArtifactError(
                    f"--resume: the unfinished run in '{self.tmp}' was made with different inputs ({', '.join(diff)}); "
                    "run without --resume to start over"
                )
            self.resumed = previous
            self.weight_map = dict(previous["writer"]["weight_map"])
            self.hashes = dict(previous["writer"]["hashes"])
            log(f"resuming from block {previous['next_block']} (progress kept in '{self.tmp}')")
        else:
            if resume:
                log(f"--resume: no unfinished run for '{self.out}'; starting from the first block")
            elif self.tmp.exists():
                log(f"removing the unfinished run in '{self.tmp}' (pass --resume to continue it instead)")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()

    # ------------------------------------------------------------------ lock and state
    def _acquire_lock(self) -> TextIO:
        f = open(self.out.parent / f".{self.out.name}.lock", "w")  # noqa: SIM115 (held until finish/abort)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ArtifactError(f"another qcompile run is writing '{self.out}'; wait for it or choose another --out") from None
        return f

    def _release_lock(self) -> None:
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _read_state(self) -> dict[str, Any] | None:
        f = self.state_dir / STATE_FILE
        if not f.is_file():
            return None
        try:
            return dict(json.loads(f.read_text()))
        except json.JSONDecodeError:  # (written by rename: only a foreign edit can corrupt it)
            return None

    def read_state(self) -> dict[str, Any] | None:
        """The last checkpoint (for data-parallel ranks that do not own the folder)."""
        return self._read_state()

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Record the run's progress atomically (the state file is replaced by a rename)."""
        self.state_dir.mkdir(exist_ok=True)
        state = {**state, "writer": {"weight_map": self.weight_map, "hashes": self.hashes}}
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(state, default=str))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.state_dir / STATE_FILE)

    # ------------------------------------------------------------------ files
    def add_tensors(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        # a resumed run rewrites the block it was in when it stopped: its own earlier names are not a clash
        clash = {k for k in tensors if self.weight_map.get(k, filename) != filename}
        if clash:
            raise ArtifactError(f"tensor names written twice: {sorted(clash)[:5]}")
        path = self.tmp / filename
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        for k in tensors:
            self.weight_map[k] = filename
        self.hashes[filename] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}

    def finish(self, description: dict[str, Any], copy_from: Path | None, tokenizer: Any | None,
               run_info: dict[str, Any] | None = None, config_updates: dict[str, Any] | None = None) -> Path:
        if self.weight_map:  # (an ONNX-only artefact has no safetensors)
            total = sum((self.tmp / f).stat().st_size for f in set(self.weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if copy_from is not None:
            for name in ("config.json", "generation_config.json"):
                if (copy_from / name).is_file():
                    shutil.copy2(copy_from / name, self.tmp / name)
            if config_updates and (self.tmp / "config.json").is_file():
                config = json.loads((self.tmp / "config.json").read_text())
                config.update(config_updates)
                (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        desc = {"format": FORMAT, "version": VERSION, **description}
        (self.tmp / DESCRIPTION).write_text(json.dumps(desc, indent=1, default=str))
        (self.tmp / RUN_INFO).write_text(json.dumps(run_info or {}, indent=1, default=str))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        write_manifest(self.tmp, self.hashes)
        out = publish(self.tmp, self.out)
        self._release_lock()
        return out

    def abort(self, keep_progress: bool = False) -> None:
        """Remove the partial folder, or keep it (a run that finished blocks can be resumed)."""
        if self.owner and not keep_progress:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._release_lock()


def publish(complete: Path, out: Path) -> Path:
    """Move a complete artefact folder to `out` by renames (same file system), replacing an earlier one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    complete.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def read_description(out: str | Path) -> dict[str, Any]:
    p = Path(out)
    f = p / DESCRIPTION
    if not f.is_file():
        raise ArtifactError(f"'{p}' is not a qcompiler artefact (no {DESCRIPTION}); run `qcompile quant` first")
    desc = json.loads(f.read_text())
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise ArtifactError(f"'{f}': unsupported format {desc.get('format')} v{desc.get('version')}")
    return desc


def folder_size(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))


def run_info(out: str | Path) -> dict[str, Any]:
    """run.json of an artefact ({} when absent)."""
    f = Path(out) / RUN_INFO
    return dict(json.loads(f.read_text())) if f.is_file() else {}
