from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The Triton kernels are tested on the CPU by Triton's interpreter, which must be chosen before anything imports
# triton (transformers and torch may import it while other test modules are collected): Triton decides per
# @triton.jit function, at decoration, whether it is interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import TEXT, make_tiny_model  # noqa: E402

torch.manual_seed(0)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs two workers on two cores: one torch thread each (two each would oversubscribe the cores)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same generator state, whatever ran before it (tests pass in any order)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {fam: make_tiny_model(root / fam, fam) for fam in ("llama", "qwen2", "qwen3", "mistral", "gemma")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def calib_text() -> str:
    return TEXT
