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

Written in a work folder beside OUT and moved into place at the end, so OUT is only ever absent, the previous
complete result, or the new complete result:

    .OUT.partial/                qcompile's work folder for OUT (its marker file says so; nothing else is removed)
      qcompile-work.json         the marker
      result/                    the artefact being written; renamed to OUT when complete
      state/                     progress after every block: state.json, the next block's activations per rank,
                                 the exporters' state (JSON + an ONNX graph protobuf; never pickle)
      previous/                  OUT's earlier artefact while it is replaced (deleted with the work folder)
    .OUT.lock                    held (flock) while a run writes OUT

`--resume` continues from state/ when the fingerprint of the inputs matches. Every step of `finish` can be
repeated after a kill at any point: the state says "publish" once the result is complete, and a resumed run
then only completes the renames. OUT itself is replaced only when every file in it is one its manifest lists
(a folder holding anything else is refused, naming the files): qcompile never deletes what it did not write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qcompiler.errors import ArtifactError
from qcompiler.files import dumps, plain_file_name, read_json, relative_file_name
from qcompiler.frontends.conversions import converted_config

FORMAT = "qcompiler"
VERSION = 1
DESCRIPTION = "qcompiler.json"
MANIFEST = "manifest.json"
RUN_INFO = "run.json"  # timings and other facts of the run: the one file that differs between equal runs
STATE_FILE = "state.json"
WORK_MARKER = "qcompile-work.json"


# A vision-language model's image / video preprocessing and chat template, copied as they are (the processor is
# not instantiated: its image backends are not needed to quantize the language model).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


def _manifest_files(folder: Path) -> dict[str, Any]:
    """The "files" object of folder/manifest.json (names checked to stay inside the folder)."""
    manifest = read_json(folder / MANIFEST, "the artefact's manifest", ArtifactError)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"'{folder / MANIFEST}' has no 'files' object; the artefact is damaged")
    for rel, entry in files.items():
        relative_file_name(rel, f"'{folder / MANIFEST}'", ArtifactError)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            raise ArtifactError(f"'{folder / MANIFEST}': entry '{rel}' lacks its size or sha256; the artefact is damaged")
    return files


def _unlisted(folder: Path, listed: set[str]) -> list[str]:
    """Every file, link or empty folder under `folder` (not followed through links) that is not `listed`."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        for d in list(dirs):
            p = Path(root) / d
            if p.is_symlink():
                out.append((rel_root / d).as_posix())
                dirs.remove(d)
            elif not any(p.iterdir()):
                out.append((rel_root / d).as_posix() + "/")
        out.extend(rel for f in files if (rel := (rel_root / f).as_posix()) not in listed)
    return sorted(out)


def check_output_dir(out: Path) -> None:
    """Refuse, before any work, an output that qcompile may not replace: a file or a link, or a folder holding
    anything but a complete qcompiler artefact (every file listed in its manifest). Never clobber user data."""
    if out.is_symlink():
        raise ArtifactError(f"output '{out}' is a symbolic link; pass the folder it points to, or another --out")
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"output '{out}' exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            if not (out / DESCRIPTION).is_file() or not (out / MANIFEST).is_file():
                raise ArtifactError(
                    f"output folder '{out}' is not empty and holds no qcompiler artefact with a {MANIFEST}; "
                    "choose another --out (qcompile replaces only its own complete results)"
                )
            foreign = _unlisted(out, set(_manifest_files(out)) | {MANIFEST, RUN_INFO})
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ArtifactError(
                    f"output folder '{out}' holds files its qcompiler artefact did not write ({shown}); move them "
                    "out or choose another --out (qcompile replaces only what its manifest lists)"
                )
    if not out.parent.is_dir():
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
        if rel in (MANIFEST, RUN_INFO):
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
    want = _manifest_files(folder)
    have = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()} - {MANIFEST, RUN_INFO}
    problems = [f"missing {f}" for f in sorted(set(want) - have)] + [f"extra {f}" for f in sorted(have - set(want))]
    for rel in sorted(set(want) & have):
        f = folder / rel
        if f.stat().st_size != want[rel]["bytes"] or file_sha256(f) != want[rel]["sha256"]:
            problems.append(f"changed {rel}")
    if problems:
        raise ArtifactError(f"'{folder}' does not match its manifest: {'; '.join(problems[:10])}")


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that failed for want of space (OSError ENOSPC / EDQUOT, or a library's wrapper
    of one, e.g. safetensors' `StorageFull`)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


class ArtifactWriter:
    """The work folder of one run: files go into `tmp` as blocks finish; `finish` publishes it whole.

    fingerprint: everything the result depends on (see compile.run_fingerprint); a partial run is resumed
    only when `resume` is asked and its fingerprint is equal. owner=False (data-parallel ranks > 0): the
    folder is read, never created, changed or removed. After construction with resume=True, `completed`
    says that the unfinished run had already written its whole result (a kill during publishing), and that
    it is now published: the caller has nothing left to do."""

    def __init__(self, out: str | Path, fingerprint: dict[str, Any] | None = None, resume: bool = False,
                 owner: bool = True, log: Any = print):
        self.out = Path(out).absolute()
        self.owner = owner
        self.fingerprint = fingerprint
        self.log = log
        check_output_dir(self.out)
        self.work = self.out.parent / f".{self.out.name}.partial"
        self.tmp = self.work / "result"
        self.state_dir = self.work / "state"
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self._lock: int | None = None
        self.resumed: dict[str, Any] | None = None
        self.completed = False
        self.weight_map: dict[str, str] = {}
        self.hashes: dict[str, dict[str, Any]] = {}
        if not owner:
            return
        self._lock = self._acquire_lock()
        try:
            self._prepare(resume)
        except BaseException:
            self._release_lock()
            raise

    def _prepare(self, resume: bool) -> None:
        ours = self._check_work_folder()
        previous = self._read_state() if ours else None
        if resume and previous is not None:
            if previous.get("fingerprint") != self.fingerprint:
                fp, old = self.fingerprint or {}, previous.get("fingerprint") or {}
                diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
                raise ArtifactError(
                    f"--resume: the unfinished run in '{self.work}' was made with different inputs ({', '.join(diff)}); "
                    "run without --resume to start over"
                )
            if previous.get("phase") == "publish":
                self._publish()
                self.completed = True
                self.log(f"--resume: the unfinished run had written its whole result; published it at '{self.out}'")
                return
            self.resumed = previous
            writer = previous.get("writer")
            if not (isinstance(writer, dict) and isinstance(writer.get("weight_map"), dict)
                    and isinstance(writer.get("hashes"), dict)):
                raise ArtifactError(f"'{self.state_dir / STATE_FILE}' lacks the writer's progress; it was edited or "
                                    "damaged: run without --resume to start over")
            self.weight_map = dict(writer["weight_map"])
            self.hashes = dict(writer["hashes"])
            self.log(f"resuming from block {previous['next_block']} (progress kept in '{self.work}')")
            return
        if resume:
            self.log(f"--resume: no unfinished run for '{self.out}'; starting from the first block")
        elif ours:
            self.log(f"removing the unfinished run in '{self.work}' (pass --resume to continue it instead)")
        if ours:
            if (self.work / "previous").is_dir() and not self.out.exists():
                # killed between moving OUT aside and moving the new result in: OUT goes back first
                (self.work / "previous").rename(self.out)
            self._remove_work()
        self.work.mkdir()
        (self.work / WORK_MARKER).write_text(json.dumps({"format": "qcompile-work", "out": self.out.name}))
        self.tmp.mkdir()
        self.state_dir.mkdir()

    def _check_work_folder(self) -> bool:
        """Whether a work folder for OUT exists; one that is not qcompile's (no marker) is refused, not removed."""
        if not self.work.exists() and not self.work.is_symlink():
            return False
        marker = self.work / WORK_MARKER
        if self.work.is_symlink() or not self.work.is_dir() or marker.is_symlink() or not marker.is_file():
            raise ArtifactError(f"'{self.work}' exists and is not a qcompile work folder (no {WORK_MARKER}); "
                                "qcompile never removes what it did not make: move it away, or choose another --out")
        return True

    # ------------------------------------------------------------------ lock and state
    def _acquire_lock(self) -> int:
        """flock on `.OUT.lock`, opened without following a link and never truncated. A run that finishes
        unlinks the lock while it still holds it, so a run that opened the old file before the unlink sees on
        the re-check that the path no longer names its file, and opens the new one instead."""
        for _ in range(10):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                what = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
                raise ArtifactError(f"lock file '{self.lock_path}' {what}; remove it (qcompile never follows or "
                                    "truncates one)") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ArtifactError(f"lock file '{self.lock_path}' is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ArtifactError(f"another qcompile run is writing '{self.out}'; wait for it or choose another --out") from None
            if self._is_lock_file(fd):
                return fd
            os.close(fd)  # (the holder unlinked it between our open and our lock: try the new file)
        raise ArtifactError(f"could not lock '{self.lock_path}' (it keeps changing); is another run starting?")

    def _is_lock_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.lock_path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _release_lock(self) -> None:
        if self._lock is None:
            return
        fd, self._lock = self._lock, None
        if self._is_lock_file(fd):  # (never unlink a file that another run or the user put in its place)
            os.unlink(self.lock_path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _read_state(self) -> dict[str, Any] | None:
        f = self.state_dir / STATE_FILE
        if not f.is_file():
            return None
        state = read_json(f, "an unfinished run's progress", ArtifactError)
        if not isinstance(state.get("fingerprint"), dict) or state.get("phase", "blocks") not in ("blocks", "publish"):
            raise ArtifactError(f"'{f}' is not a qcompile progress file; run without --resume to start over")
        if state.get("phase", "blocks") == "blocks" and not (isinstance(state.get("next_block"), int)
                                                              and state["next_block"] >= 0):
            raise ArtifactError(f"'{f}': 'next_block' is not a block index; run without --resume to start over")
        return state

    def read_state(self) -> dict[str, Any] | None:
        """The last checkpoint (for data-parallel ranks that do not own the folder)."""
        return self._read_state()

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Record the run's progress atomically (the state file is replaced by a rename)."""
        self._write_state({**state, "phase": "blocks",
                           "writer": {"weight_map": self.weight_map, "hashes": self.hashes}})

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(dumps(state, indent=None))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.state_dir / STATE_FILE)

    @property
    def has_progress(self) -> bool:
        """Whether the work folder holds a checkpoint a later --resume can continue from."""
        return (self.state_dir / STATE_FILE).is_file()

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
        """Write the index, config, tokenizer, description and manifest into the result, then publish it.
        Every file is rewritten whole, so a run killed here and resumed writes the same files again."""
        if self.weight_map:  # (an ONNX-only artefact has no safetensors)
            total = sum((self.tmp / f).stat().st_size for f in set(self.weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if copy_from is not None:
            for name in ("config.json", "generation_config.json", *PROCESSOR_FILES):
                if (copy_from / name).is_file():
                    shutil.copyfile(copy_from / name, self.tmp / name)
            if (self.tmp / "config.json").is_file():
                source = json.loads((self.tmp / "config.json").read_text())
                converted = converted_config(source)  # a converted family is written as the native architecture it was read as
                if converted is not None or config_updates or "quantization_config" in source:
                    config = converted or source
                    config.update(config_updates or {})
                    # (a source's own quantization, MXFP4 experts read as float, never describes this artefact)
                    config.pop("quantization_config", None)
                    (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        desc = {"format": FORMAT, "version": VERSION, **description}
        (self.tmp / DESCRIPTION).write_text(dumps(desc))
        (self.tmp / RUN_INFO).write_text(dumps(run_info or {}))
        write_manifest(self.tmp, self.hashes)
        self._write_state({"fingerprint": self.fingerprint, "phase": "publish"})
        self._publish()
        return self.out

    def _publish(self) -> None:
        """Move the complete result to OUT and remove the work folder; each step may be repeated after a kill."""
        for child in self.state_dir.iterdir() if self.state_dir.is_dir() else ():
            if child.name != STATE_FILE:  # (activations and exporter state: not needed any more)
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if self.tmp.is_dir():
            if not (self.tmp / MANIFEST).is_file():
                raise ArtifactError(f"the unfinished run's result in '{self.tmp}' is incomplete (no {MANIFEST}); "
                                    "run without --resume to start over")
            previous = self.work / "previous"
            if self.out.exists() or self.out.is_symlink():
                check_output_dir(self.out)  # (again: nothing foreign may have arrived since the run started)
                if previous.exists():
                    shutil.rmtree(previous)
                self.out.rename(previous)
            self.tmp.rename(self.out)
        elif not (self.out / MANIFEST).is_file():
            raise ArtifactError(f"the unfinished run in '{self.work}' has lost its result; run without --resume")
        self._remove_work()
        self._release_lock()

    def _remove_work(self) -> None:
        """Delete the work folder: the progress file first (no state may outlive the files it points to) and
        the marker last (a work folder without one would be refused as foreign)."""
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        for child in self.work.iterdir():
            if child.name == WORK_MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (self.work / WORK_MARKER).unlink()
        self.work.rmdir()

    def abort(self, keep_progress: bool = False) -> None:
        """Remove the work folder, or keep it (a run that finished blocks can be resumed)."""
        if self.owner and not keep_progress and self.work.is_dir() and (self.work / WORK_MARKER).is_file():
            self._remove_work()
        self._release_lock()


def publish(complete: Path, out: Path) -> Path:
    """Move a complete artefact folder to `out` by renames (same file system), replacing an earlier artefact
    (checked again: a folder holding files its manifest does not list is never replaced)."""
    check_output_dir(out.absolute())
    old = None
    if out.exists():
        old = complete.parent / f".{out.name}.replaced-{os.getpid()}"
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
    desc = read_json(f, "the artefact's description", ArtifactError)
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise ArtifactError(f"'{f}': unsupported format {desc.get('format')} v{desc.get('version')}")
    return desc


def folder_size(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern))


def run_info(out: str | Path) -> dict[str, Any]:
    """run.json of an artefact ({} when absent)."""
    f = Path(out) / RUN_INFO
    return dict(read_json(f, "the artefact's run record", ArtifactError)) if f.is_file() else {}


@dataclass(frozen=True)
class SavedExporter:
    """An exporter's progress as its `save_state` returned it (JSON fields, read back from the run's state file)
    and the folder its files are in. Nothing in it is trusted: restoring checks every field and file name."""

    fields: dict[str, Any]
    folder: Path

    def file(self, key: str) -> Path:
        """The file a field names, which must be a plain file name inside `folder`."""
        name = plain_file_name(self.fields.get(key), f"'{self.folder}': exporter state field '{key}'", ArtifactError,
                               "run without --resume to start over")
        return self.folder / name

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """A field of the given JSON type (ArtifactError naming it otherwise)."""
        value = self.fields.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ArtifactError(f"'{self.folder}': exporter state field '{key}' is missing or not a "
                                f"{getattr(kind, '__name__', kind)}; run without --resume to start over")
        return value
