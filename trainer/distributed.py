"""Data parallelism under `torchrun`: the process group, and each rank's share of a batch.

Every rank draws the same window order and the same diffusion noise for the GLOBAL
micro-batch and takes its shard of both, so N processes compute what one process computes
for the same global batch (the gradients are averaged over equal shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dprgb.config import DeviceConfig


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_distributed(device: DeviceConfig) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.device != "cpu" and torch.cuda.is_available()
    initialized_here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialized_here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here)


def shard_bounds(batch: int, dinfo: DistInfo) -> tuple[int, int]:
    """(start, stop) of this rank's rows in a global micro-batch of `batch` rows."""
    sizes = [len(part) for part in torch.arange(batch).tensor_split(dinfo.world_size)]
    start = sum(sizes[:dinfo.rank])
    return start, start + sizes[dinfo.rank]


def rank_shard(order: torch.Tensor, k: int, batch_size: int, dinfo: DistInfo) -> torch.Tensor:
    """This rank's share of global micro-batch k: windows order[k*B:(k+1)*B], split by rank."""
    start, stop = shard_bounds(batch_size, dinfo)
    return order[k * batch_size:(k + 1) * batch_size][start:stop]
