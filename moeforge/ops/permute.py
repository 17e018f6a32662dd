"""Moving token rows to and from expert order, with gather-only backward passes.

The MoE block sorts its N*K token-expert pairs by expert. Plain indexing would do, but
its backward is a scatter-add (`index_put_` with accumulate), which on CPU costs as
much as the expert matmuls themselves. Because the sort is a permutation, every
backward here is again a gather with the inverse permutation.

Shapes: N tokens, K experts per token, M = N*K pairs, D hidden.
"""

from __future__ import annotations

import torch


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        n_pairs, d = g.shape
        # each token was copied to its K pairs: its gradient is the sum over them
        return g.index_select(0, inv).view(n_pairs // ctx.k, ctx.k, d).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int, acc: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(order)
        ctx.k, ctx.dtype = k, y.dtype
        n_pairs, d = y.shape
        return y.index_select(0, inv).view(n_pairs // k, k, d).sum(1, dtype=acc)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (order,) = ctx.saved_tensors
        # sorted row j belongs to token order[j] // k, whose output gradient it receives
        return g.to(ctx.dtype).index_select(0, order // ctx.k), None, None, None, None


def dispatch(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of x (N, D) for each pair in expert order: pair p = order[j] takes token p // k. -> (M, D)"""
    return _Dispatch.apply(x, order, inv, k)


def combine(y: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int, acc: torch.dtype) -> torch.Tensor:
    """Expert-ordered rows (M, D) summed per token in dtype acc -> (N, D); the inverse of dispatch."""
    return _Combine.apply(y, order, inv, k, acc)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def permute(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Rows x[perm] for a permutation perm with inverse inv; the backward pass is the inverse gather."""
    return _Permute.apply(x, perm, inv)
