"""Running an exported decoder folder with onnxruntime: a callable with the `model(input_ids=...).logits`
interface the perplexity loop uses (empty KV cache, full attention mask)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from qcompiler.errors import ArtifactError
from qcompiler.export.onnx.builder import MODEL_FILE


class OrtCausalLM:
    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"'{folder}' has no {MODEL_FILE}; quantize with --target onnxruntime to export one")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        # KV heads and head size: from the input shapes, or genai_config.json where they are symbolic
        cfg_path = Path(folder) / "genai_config.json"
        dec = json.loads(cfg_path.read_text())["model"]["decoder"] if cfg_path.is_file() else {}
        shape = self.past[0].shape if self.past else [None] * 4
        self.kv_heads = shape[1] if isinstance(shape[1], int) else int(dec["num_key_value_heads"])
        # a quantized cache is int8 [B, H, T, D] or uint8 [B, H, T, D/2] (two int4 codes per byte)
        kinds: dict[str, tuple[Any, int]] = {"tensor(int8)": (np.int8, 1), "tensor(uint8)": (np.uint8, 2)}
        cache: tuple[Any, int] = kinds.get(self.past[0].type, (np.float32, 1)) if self.past else (np.float32, 1)
        self.cache_dtype: Any = cache[0]
        per_byte = cache[1]
        self.head_dim = int(dec["head_size"]) if "head_size" in dec else int(shape[3]) * per_byte
        self.cache_last = self.head_dim // per_byte

    def run(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
            mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits and the present KV cache (by past input name)."""
        b = ids.shape[0]
        if past is None:
            past = {i.name: np.zeros((b, self.kv_heads, 0, self.cache_last), self.cache_dtype) for i in self.past}
        p = next(iter(past.values())).shape[2] if past else 0
        if mask is None:
            mask = np.ones((b, p + ids.shape[1]), np.int64)
        outs = self.session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask, **past})
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, outs, strict=True))
        present = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"], present

    def __call__(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        logits, _ = self.run(input_ids.numpy())
        return SimpleNamespace(logits=torch.from_numpy(logits))
