"""Data-parallel calibration over torch.distributed.

Every rank runs the same driver on the same model. Calibration batches are dealt round-robin (global batch
g goes to rank g mod W), each rank propagates only its own batches through the blocks, and every statistic
is reduced across ranks before a pass reads it (calib/stats.py: sums for Hessians, means and token counts,
max/min for absmax and ranges, merged histograms, percentile samples gathered in global batch order), so each
rank holds the same statistics and makes the same, deterministic, quantization decisions. Rank 0 alone writes
the artefact.

Launch with torchrun (`torchrun --nproc-per-node 2 -m qcompiler.cli quant ...`): WORLD_SIZE / RANK /
MASTER_ADDR come from the environment and `init_from_env` joins the group. The driver computes on CPU
tensors, so the backend is gloo; QCOMPILER_DIST_BACKEND=nccl (or hccl with torch_npu) is for a driver
whose statistics live on the accelerator, which this one does not do yet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this run is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend=os.environ.get("QCOMPILER_DIST_BACKEND", "gloo"))
    return active()


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's share of the calibration batches (round-robin, so rank 0 holds global batch 0)."""
    return list(batches[rank()::world_size()])


def global_batch_index(local_index: int) -> int:
    return rank() + local_index * world_size()


def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """In place; op: sum, max or min. A no-op when not distributed."""
    if active():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()

