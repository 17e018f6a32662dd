"""Parallel dimensions and process-group set-up for torchrun launches.

world = dp_shard x ep. Every rank reads its own data (data parallel over the whole
world); the routed experts are split over `ep` ranks (expert parallel) and replicated
over `dp_shard` groups; everything else is replicated and sharded by FSDP2 over the
whole world. The backend follows the device: nccl for CUDA/ROCm, hccl for Ascend
(torch_npu), xccl for Intel XPU, gloo for CPU.

Mesh layout (dp_shard, ep): ranks r = d * ep + e. EP groups are the rows (ranks sharing
d, holding all experts between them); the dp_shard groups are the columns (ranks
holding the same expert slice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl", "cpu": "gloo"}


@dataclass(frozen=True)
class ParallelDims:
    world: int
    ep: int = 1

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world size must be >= 1 (got {self.world})")
        if self.ep < 1 or self.world % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the number of processes ({self.world}): "
                             f"world = dp_shard x ep")

    @property
    def dp_shard(self) -> int:
        return self.world // self.ep

    def check_model(self, n_routed_experts: int) -> None:
        if n_routed_experts % self.ep:
            raise ValueError(f"--ep {self.ep} must divide n_routed_experts ({n_routed_experts})")


def backend_for(device: torch.device) -> str:
    try:
        return BACKENDS[device.type]
    except KeyError:
        raise ValueError(f"no distributed backend known for device type {device.type!r}") from None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device, ep: int) -> tuple[ParallelDims, dist.ProcessGroup, dist.ProcessGroup]:
    """Initialise the default process group from torchrun's environment.

    Returns the dims, this rank's EP group and its dp_shard group (ranks holding the same experts).
    """
    if not dist.is_initialized():
        if device.type != "cpu" and hasattr(torch, "accelerator"):
            torch.accelerator.set_device_index(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend_for(device))
    dims = ParallelDims(dist.get_world_size(), ep)
    rank = dist.get_rank()
    ep_group = dp_group = None
    # every rank must create every group, in the same order
    for d in range(dims.dp_shard):
        ranks = [d * ep + e for e in range(ep)]
        g = dist.new_group(ranks)
        if rank in ranks:
            ep_group = g
    for e in range(ep):
        ranks = [d * ep + e for d in range(dims.dp_shard)]
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return dims, ep_group, dp_group
