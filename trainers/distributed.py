"""Data-parallel training across processes (one per GPU), set up from the environment.

A multi-GPU job runs one process per GPU; submitit/Slurm (or torchrun) set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``batch_size`` stays the *global*
batch: each rank takes an equal slice of every global batch, DDP averages the gradients,
so one step equals one single-process step on the same global batch (up to float
summation order). BatchNorm statistics are per process unless the model is converted to
SyncBatchNorm (done on CUDA; PyTorch's SyncBatchNorm has no CPU kernel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU); True if this call created it."""
    if not info.enabled or dist.is_initialized():
        return False
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world
    )
    return True


def all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.broadcast(t, src=0)
    return t


def shard_bounds(batch: int, info: DistInfo) -> tuple[int, int]:
    """This rank's [lo, hi) slice of a global batch (batch is divisible by world)."""
    per = batch // info.world
    return info.rank * per, (info.rank + 1) * per
