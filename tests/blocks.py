"""Trace a tiny model's first block and get calibration inputs, for pass-level tests."""

from __future__ import annotations

from pathlib import Path

import torch

from qcompiler.frontends.hf import (
    Checkpoint,
    build_skeleton,
    capture_block_inputs,
    fill_block,
    find_blocks,
    probe_block_inputs,
    trace_block,
)
from qcompiler.pm.base import PassContext
from qcompiler.schemes import QuantScheme, get_scheme
from qcompiler.targets import get_target


def traced_block(model_dir: Path, index: int = 0, seq: int = 24, n_batches: int = 2):
    ckpt = Checkpoint(model_dir)
    model = build_skeleton(ckpt)
    prefix, blocks = find_blocks(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 250, (2, seq), generator=g) for _ in range(n_batches)]
    inputs = capture_block_inputs(model, batches).of_block(index)
    probe = probe_block_inputs(model)
    name = f"{prefix}.{index}"
    gm = trace_block(blocks[index], probe.calls[index], probe.of_block(index)[0], name)
    fill_block(gm, name, ckpt, blocks[index], torch.float32)
    return gm, inputs


def context(inputs, scheme: QuantScheme | str = "w4a16", target: str = "reference") -> PassContext:
    s = get_scheme(scheme) if isinstance(scheme, str) else scheme
    return PassContext(block="model.layers.0", scheme=s, target=get_target(target), calib=inputs)


def run(gm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([gm(*a) for a in inputs])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())
