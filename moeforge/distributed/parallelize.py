"""Apply parallelism to a single-device model, in one documented order: EP, then FSDP2.

1. Expert parallel (`ep > 1`): each MoE block's routed experts become an
   `ExpertParallelExperts` holding E / ep experts of this rank's EP group.
2. FSDP2 (`fully_shard`): with `dp_shard > 1` each EP rank's expert slice is its own
   unit, sharded over the dp_shard group (the ranks holding the same slice); then every
   decoder block (and MTP block) is a unit over the whole world, then the root
   (embedding, head, final norm). With dp_shard = 1 the expert slices are left out
   (`ignored_params`: nothing to shard them over); with ep = 1 the experts are ordinary
   parameters and FSDP shards them with their block.

Gradient scale: every rank's loss is the mean over its own tokens, and FSDP averages
over the world, so replicated parameters get the gradient of the global mean. A rank's
experts, however, receive gradient from the tokens of all `ep` ranks of its EP group
(the all-to-all backward), i.e. ep times the global-mean share: `sync_expert_grads`
divides by ep (FSDP has averaged over dp_shard). Then `clip_grad_norm` takes the norm over
all shards (FSDP DTensors and the EP slices, each counted once).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moeforge.distributed.dims import ParallelDims
from moeforge.distributed.expert_parallel import ExpertParallelExperts, apply_expert_parallel


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block (and MTP block) in the backward pass instead of storing its activations.

    `checkpoint_wrapper` keeps parameter names unchanged in state dicts. Applied before FSDP
    (order: EP -> activation checkpointing -> compile -> FSDP).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)
    for m in model.mtp:
        m.block = checkpoint_wrapper(m.block)


class Parallel:
    """What the trainer needs to know about the process layout."""

    def __init__(self, dims: ParallelDims, device: torch.device):
        self.dims = dims
        self.rank = dist.get_rank()
        # (dp_shard, ep): rank = d * ep + e, so an EP group is a row and a dp_shard group a column
        self.mesh: DeviceMesh = init_device_mesh(device.type, (dims.dp_shard, dims.ep), mesh_dim_names=("dp_shard", "ep"))
        self.world_mesh: DeviceMesh = init_device_mesh(device.type, (dims.world,), mesh_dim_names=("world",))
        self.ep_group = self.mesh.get_group("ep")
        self.dp_group = self.mesh.get_group("dp_shard")
        self.dp_rank = self.mesh.get_local_rank("dp_shard")
        self.expert_modules: list[ExpertParallelExperts] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def apply_ep(self, model: nn.Module) -> None:
        """Step 1: expert parallel (before activation checkpointing and FSDP)."""
        self.dims.check_model(model.cfg.moe.n_routed_experts)
        if self.dims.ep > 1 and not self.expert_modules:
            self.expert_modules = apply_expert_parallel(model, self.ep_group)

    def apply(self, model: nn.Module) -> nn.Module:
        """EP (if not applied yet), then FSDP2."""
        self.apply_ep(model)
        ignored: set[nn.Parameter] = set()
        if self.expert_modules and self.dims.dp_shard > 1:
            # the experts of this EP rank are sharded over the ranks that hold the same slice
            for m in self.expert_modules:
                if m.local % self.dims.dp_shard:
                    raise ValueError(f"{m.local} experts per EP rank cannot be split over dp_shard="
                                     f"{self.dims.dp_shard}; choose ep and world so that it divides")
                fully_shard(m, mesh=self.mesh["dp_shard"])
        elif self.expert_modules:  # dp_shard == 1: each expert slice lives on one rank only
            ignored = {p for m in self.expert_modules for p in m.parameters()}
        # blocks return a detached view (the MoE token counts); nothing modifies it in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in list(model.layers) + [m.block for m in model.mtp]:
            fully_shard(block, mesh=self.world_mesh, ignored_params=ignored or None)
        fully_shard(model, mesh=self.world_mesh, ignored_params=ignored or None)
        return model

    # ------------------------------------------------------------ gradients
    @torch.no_grad()
    def sync_expert_grads(self) -> None:
        for m in self.expert_modules:
            for p in m.parameters():
                if p.grad is not None:  # FSDP already averaged over dp_shard when the experts are sharded
                    p.grad.div_(self.dims.ep)

    @torch.no_grad()
    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        # plain (unsharded) expert slices: distinct over the EP group, nowhere else
        expert = {id(p) for m in self.expert_modules for p in m.parameters() if not isinstance(p, DTensor)}
        sq = torch.zeros((), dtype=torch.float64)
        for p in params:
            if p.grad is None:
                continue
            g = p.grad
            if isinstance(g, DTensor):
                g = g.to_local()  # this rank's shard; shards are summed below
            part = g.double().pow(2).sum().cpu()
            sq += part
        # FSDP shards (DTensors, the experts' too when dp_shard > 1) partition their parameters over
        # the ranks that hold them, so summing local squares over the world counts each value once;
        # plain EP slices are summed over the EP group only.
        shard_sq = torch.zeros((), dtype=torch.float64)
        for p in params:
            if p.grad is not None and id(p) in expert:
                shard_sq += p.grad.double().pow(2).sum().cpu()
        fsdp_sq = sq - shard_sq
        dist.all_reduce(fsdp_sq)
        if self.expert_modules:
            dist.all_reduce(shard_sq, group=self.ep_group)
        total = math.sqrt(float(fsdp_sq + shard_sq))
        if max_norm > 0 and math.isfinite(total) and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return torch.tensor(total)

    # ------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor at full size, on CPU (a collective: all ranks call it; all get the result)."""
        expert_names = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)
                        for p in ("gate_up_proj", "down_proj")}
        out = {}
        for name, t in model.state_dict().items():
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if name in expert_names:
                parts = [torch.empty_like(t) for _ in range(self.dims.ep)]
                dist.all_gather(parts, t.contiguous(), group=self.ep_group)
                t = torch.cat(parts)
            out[name] = t.detach().cpu().clone()
        return out

    # ------------------------------------------------------------ reductions
    def sum_all(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def mean_all(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.dims.world
