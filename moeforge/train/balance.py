"""Expert load balance: the auxiliary-loss-free bias update and load statistics.

DeepSeek-V3 report section 2.1.2: after each optimizer step every MoE layer (MTP
layers included) moves its selection bias b_i by gamma * sign(mean_load - load_i), from
the tokens each expert received in that step. Overloaded experts become less likely
to be chosen; the gate weights never see b. In data/expert parallel runs the counts
must be summed over all ranks first: `reduce` is that hook (identity on one process).

Statistics per layer: max/mean load ratio (1.0 = perfect), experts with no token,
normalised routing entropy of the load (1.0 = uniform), and the bias range.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moeforge.model.moe import MoE


def moe_modules(model: nn.Module) -> list[MoE]:
    """MoE blocks in the order the model reports their statistics: main layers, then MTP layers."""
    main = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    mtp = [m.block.mlp for m in getattr(model, "mtp", [])]
    return main + mtp


@torch.no_grad()
def update_bias(
    modules: list[MoE],
    counts: torch.Tensor,
    speed: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda c: c,
) -> None:
    """counts: (layers, E) tokens per expert in this optimizer step (all micro-batches)."""
    if speed <= 0:
        return
    counts = reduce(counts.float())
    for module, c in zip(modules, counts, strict=True):
        bias = module.gate.e_score_correction_bias
        if bias is None:
            continue
        bias.add_(speed * torch.sign(c.mean() - c).to(bias.device))


def load_stats(modules: list[MoE], counts: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer balance figures for metrics.jsonl."""
    c = counts.float()
    mean = c.mean(-1).clamp_min(1e-9)
    p = c / c.sum(-1, keepdim=True).clamp_min(1e-9)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(c.shape[-1])))
    lo, hi = [], []
    for m in modules:
        b = m.gate.e_score_correction_bias
        lo.append(float(b.min()) if b is not None else 0.0)
        hi.append(float(b.max()) if b is not None else 0.0)
    return {
        "load_max_over_mean": [round(float(v), 4) for v in c.max(-1).values / mean],
        "experts_without_tokens": [int(v) for v in (c == 0).sum(-1)],
        "routing_entropy": [round(float(v), 4) for v in entropy],
        "bias_min": [round(v, 5) for v in lo],
        "bias_max": [round(v, 5) for v in hi],
    }
