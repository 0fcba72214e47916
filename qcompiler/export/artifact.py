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

Written into a temporary sibling folder and renamed into place at the end, so OUT is only ever absent,
the previous complete result, or the new complete result.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qcompiler.errors import ArtifactError

FORMAT = "qcompiler"
VERSION = 1
DESCRIPTION = "qcompiler.json"


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


class ArtifactWriter:
    def __init__(self, out: str | Path):
        self.out = Path(out).absolute()
        check_output_dir(self.out)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.layers: dict[str, Any] = {}

    def add_tensors(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        clash = set(tensors) & set(self.weight_map)
        if clash:
            raise ArtifactError(f"tensor names written twice: {sorted(clash)[:5]}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.tmp / filename),
                  metadata={"format": "pt"})
        for k in tensors:
            self.weight_map[k] = filename

    def finish(self, description: dict[str, Any], copy_from: Path | None, tokenizer: Any | None) -> Path:
        if self.weight_map:  # (an ONNX-only artefact has no safetensors)
            total = sum((self.tmp / f).stat().st_size for f in set(self.weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if copy_from is not None:
            for name in ("config.json", "generation_config.json"):
                if (copy_from / name).is_file():
                    shutil.copy2(copy_from / name, self.tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        desc = {"format": FORMAT, "version": VERSION, **description}
        (self.tmp / DESCRIPTION).write_text(json.dumps(desc, indent=1, default=str))
        return publish(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def publish(complete: Path, out: Path) -> Path:
    """Move a complete artefact folder to `out` by renames (same file system), replacing an earlier one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{complete.name.rsplit('-', 1)[-1]}")
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
