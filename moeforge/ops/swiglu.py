"""SwiGLU on a fused gate|up projection, optionally scaled per row: silu(g) * u * w.

The routed experts compute gate and up in one grouped matmul (M, 2I). Scaling each
row by its gate weight here, on the (M, I) activation, instead of on the (M, D) expert
output is the same product (the down projection is linear) at half the memory traffic,
and the backward pass writes the (M, 2I) input gradient in place rather than
concatenating two halves. `swiglu_reference` is the plain-autograd definition it is
tested against.

Shapes: M rows, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gu: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    out = F.silu(g) * u
    return out if w is None else out * w.unsqueeze(-1).to(out.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        g, u = gu.chunk(2, dim=-1)
        a = F.silu(g).mul_(u)  # (M, I) unweighted activation
        ctx.has_w = w is not None
        if w is None:
            ctx.save_for_backward(gu)
            return a
        ctx.save_for_backward(gu, w, a)
        return a * w.unsqueeze(-1).to(a.dtype)

    @staticmethod
    def backward(ctx, go: torch.Tensor):  # type: ignore[override]
        if ctx.has_w:
            gu, w, a = ctx.saved_tensors
            grad_w = torch.linalg.vecdot(go, a).to(w.dtype) if ctx.needs_input_grad[1] else None
            go = go * w.unsqueeze(-1).to(go.dtype)
        else:
            (gu,) = ctx.saved_tensors
            grad_w = None
        g, u = gu.chunk(2, dim=-1)
        grad = torch.empty_like(gu)
        grad_g, grad_u = grad.chunk(2, dim=-1)  # views: written in place, no concatenation
        torch.mul(go, F.silu(g), out=grad_u)
        torch.ops.aten.silu_backward.grad_input(go * u, g, grad_input=grad_g)
        return grad, grad_w


def swiglu(gu: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up [* w per row] for gu = [gate | up] of shape (M, 2I); w: (M,) or None."""
    return _SwiGLU.apply(gu, w)
