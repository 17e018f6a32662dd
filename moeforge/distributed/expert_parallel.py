"""Expert parallelism, applied from outside the model: each EP rank holds E / ep experts.

The single-device MoE block sorts its token-expert pairs by expert and hands the sorted
rows, per-expert counts and gate weights to `moe.experts` (a `GroupedExperts`). This
module replaces exactly that submodule with `ExpertParallelExperts`, which

1. exchanges the per-expert counts with every EP rank (`all_to_all_single` on the counts:
   the variable split sizes are known before any row moves),
2. sends each row, with its gate weight, to the rank that owns its expert (autograd-aware
   `all_to_all_single`, so the backward pass sends gradients the other way),
3. regroups the received rows from (source rank, local expert) to (local expert, source)
   order, runs the local experts, restores the order and sends the results back.

Routing, the router's bias, shared experts and everything else stay replicated on every
rank. The model code never imports torch.distributed.

Shapes: M rows this rank routed, E experts, El = E / ep local experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moeforge.model.moe import GroupedExperts, MoE, unfused_routed
from moeforge.ops.permute import permute


def _a2a(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    y = all_to_all_single_autograd(x.contiguous(), out_sizes, in_sizes, group)
    return y.wait() if hasattr(y, "wait") else y


class ExpertParallelExperts(GroupedExperts):
    """Drop-in for GroupedExperts holding experts [rank * El, (rank + 1) * El) of E, under the same names."""

    def __init__(self, full: GroupedExperts, group: dist.ProcessGroup):
        nn.Module.__init__(self)
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = full.gate_up_proj.shape[0]
        if E % self.ep:
            raise ValueError(f"n_routed_experts={E} is not divisible by ep={self.ep}; choose an ep that divides it")
        self.num_experts, self.local = E, E // self.ep
        self.sent_bytes = 0  # forward all-to-all payload sent to other ranks (dispatch + combine), for benchmarks
        self.first = lo = self.rank * self.local
        for key, value in vars(full).items():  # plain settings (impl, limit, ...): everything but modules/params
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[lo : lo + self.local].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[lo : lo + self.local].clone())

    def routed(self, flat: torch.Tensor, tok: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor,
               acc: torch.dtype) -> torch.Tensor:
        return unfused_routed(self, flat, tok, counts, weights, acc)  # rows must be in expert order to be sent

    def forward(self, x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        ep, El = self.ep, self.local
        send_counts = counts.view(ep, El)  # rows for (destination rank, its local expert)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)  # (source rank, local expert)
        send = send_counts.sum(1).tolist()
        recv = recv_counts.sum(1).tolist()
        row_bytes = x.shape[1] * x.element_size()
        self.sent_bytes += row_bytes * ((sum(send) - send[self.rank]) + (sum(recv) - recv[self.rank]))
        x_recv = _a2a(x, recv, send, self.group)
        w_recv = None if weights is None else _a2a(weights, recv, send, self.group)

        # regroup (source, local expert) -> (local expert, source): each local expert's rows contiguous
        rc = recv_counts.tolist()
        starts, pos = [], 0
        for s in range(ep):
            row = []
            for j in range(El):
                row.append(pos)
                pos += rc[s][j]
            starts.append(row)
        perm = torch.cat([torch.arange(starts[s][j], starts[s][j] + rc[s][j]) for j in range(El) for s in range(ep)]
                         or [torch.zeros(0, dtype=torch.long)]).to(x.device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=x.device)
        local_x = permute(x_recv, perm, inv)
        local_w = None if w_recv is None else permute(w_recv, perm, inv)
        y = super().forward(local_x, recv_counts.sum(0), local_w)
        y_recv = permute(y, inv, perm)
        return _a2a(y_recv, send, recv, self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> list[ExpertParallelExperts]:
    """Replace the routed experts of every MoE block (MTP included) by their EP shard. Returns the wrappers."""
    wrapped = []
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, group)
            wrapped.append(module.experts)
    return wrapped
