"""The calibration activations that flow from block to block: in memory, or spilled to disk.

The driver keeps one `ActivationStore` for the current block's inputs (one tuple of flat block inputs per
batch) and fills the next one while it propagates. With `spill=True` every batch is written to its own
safetensors file as soon as it is computed and read back (memory-mapped) when a pass iterates the store,
so a calibration set far larger than RAM costs disk, not memory. Either kind can be saved to a folder and
loaded again bit for bit: that is the driver's checkpoint of a run's progress (--resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Batch = tuple[torch.Tensor, ...]


def _save_batch(batch: Batch, path: Path) -> None:
    # clone: safetensors refuses tensors that share storage (e.g. a mask broadcast from another input)
    save_file({str(i): t.detach().contiguous().clone() for i, t in enumerate(batch)}, str(path))


def _load_batch(path: Path) -> Batch:
    d = load_file(str(path))
    return tuple(d[str(i)] for i in range(len(d)))


class ActivationStore(Sequence[Batch]):
    """A sequence of block-input batches, held in memory or in `folder` (one file per batch)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._batches: list[Batch] = []
        self._files: list[Path] = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    @classmethod
    def in_memory(cls, batches: Sequence[Batch]) -> ActivationStore:
        s = cls()
        s._batches = list(batches)
        return s

    def append(self, batch: Batch) -> None:
        if self.folder is None:
            self._batches.append(batch)
        else:
            path = self.folder / f"batch-{len(self._files):05d}.safetensors"
            _save_batch(batch, path)
            self._files.append(path)

    def __len__(self) -> int:
        return len(self._files) if self.folder is not None else len(self._batches)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _load_batch(self._files[i]) if self.folder is not None else self._batches[i]

    def __iter__(self) -> Iterator[Batch]:
        for i in range(len(self)):
            yield self[i]

    def save(self, folder: Path) -> None:
        """Write every batch into `folder` (already there for a spilled store in that folder)."""
        if self.folder is not None and self.folder.resolve() == folder.resolve():
            return
        folder.mkdir(parents=True, exist_ok=True)
        for i, batch in enumerate(self):
            _save_batch(batch, folder / f"batch-{i:05d}.safetensors")

    @classmethod
    def load(cls, folder: Path, count: int, spill: bool) -> ActivationStore:
        """The store saved in `folder`; spilled: read lazily from there, else loaded into memory."""
        files = [folder / f"batch-{i:05d}.safetensors" for i in range(count)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"'{folder}': saved activations {missing[:3]} are missing")
        if spill:
            s = cls(folder)
            s._files = files
            return s
        return cls.in_memory([_load_batch(f) for f in files])
